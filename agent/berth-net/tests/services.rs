//! Privileged tests of the Services table against the real kernel: pods in
//! namespaces on a bridge, inside the test thread's own throwaway network
//! namespace. They need root and fail loudly without it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use berth_net::link::{self, PodLink};
use berth_net::netns::NetnsDir;
use berth_net::nft::{self, Endpoint, PortRules, Protocol, Ruleset, ServiceRules};

fn sandbox(name: &str) -> NetnsDir {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the privileged networking tests need root (CI runs them as root)"
    );
    link::isolate_thread().expect("a network namespace of the test's own");
    let dir = std::env::temp_dir().join(format!("berth-nft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    NetnsDir::new(dir.join("netns"))
}

/// A node as the agent makes it (the bridge, the Service range routed onto
/// it so a cluster IP is never "network unreachable", forwarding), two
/// pods serving their names on 8080, and a client pod.
fn node_with_two_servers(name: &str) -> (NetnsDir, PodLink, PodLink, PodLink) {
    let dir = sandbox(name);
    let cidr = "10.88.0.0/24".parse().unwrap();
    let gw = Ipv4Addr::new(10, 88, 0, 1);
    link::with_netlink(|h| async move {
        let index = link::ensure_bridge(&h, "berth0", gw, cidr).await?;
        link::ensure_link_route(&h, "10.96.0.0/12".parse().unwrap(), index).await
    })
    .expect("bridge and service route");
    berth_net::enable_forwarding().expect("forwarding and br_netfilter");
    let (a, b, client) = (
        pod("default_a", 2),
        pod("default_b", 3),
        pod("default_c", 4),
    );
    for p in [&a, &b, &client] {
        link::ensure_pod(&dir, "berth0", p).expect("wired");
    }
    serve(&dir, &a, 8080);
    serve(&dir, &b, 8080);
    (dir, a, b, client)
}

fn pod(name: &str, last: u8) -> PodLink {
    PodLink {
        netns: name.to_string(),
        host_if: berth_net::host_if_name(name),
        ip: Ipv4Addr::new(10, 88, 0, last),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 88, 0, 1),
    }
}

/// A server in the pod's namespace that answers every connection with the
/// pod's name.
fn serve(dir: &NetnsDir, p: &PodLink, port: u16) {
    let addr = SocketAddrV4::new(p.ip, port);
    let listener = dir
        .run_in(&p.netns, move || TcpListener::bind(addr))
        .expect("enter")
        .expect("bind");
    let name = p.netns.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(name.as_bytes());
        }
    });
}

fn ask(to: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn ask_from(dir: &NetnsDir, from: &str, to: SocketAddrV4) -> std::io::Result<String> {
    dir.run_in(from, move || ask(to)).expect("enter")
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn rules(endpoints: &[&PodLink]) -> Ruleset {
    let eps = endpoints
        .iter()
        .map(|p| Endpoint {
            ip: p.ip,
            port: 8080,
        })
        .collect();
    Ruleset {
        pod_cidr: "10.88.0.0/24".parse().unwrap(),
        refused_to_pods: Vec::new(),
        services: vec![
            ServiceRules {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: VIP,
                affinity_seconds: None,
                ports: vec![PortRules {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    endpoints: eps,
                }],
            },
            ServiceRules {
                namespace: "default".into(),
                name: "empty".into(),
                cluster_ip: EMPTY_VIP,
                affinity_seconds: None,
                ports: vec![PortRules {
                    name: "80".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: None,
                    endpoints: Vec::new(),
                }],
            },
        ],
    }
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn cluster_ips_spread_over_endpoints_node_ports_answer_and_a_flushed_table_is_noticed() {
    let (dir, a, b, client) = node_with_two_servers("spread");

    let ruleset = rules(&[&a, &b]);
    nft::apply(&nft::render(&ruleset)).expect("nft accepts the table");
    let applied = nft::listing().expect("listed").expect("the table exists");

    // By cluster IP from another pod: both backends answer.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..24 {
        let who =
            ask_from(&dir, &client.netns, SocketAddrV4::new(VIP, 80)).expect("service answers");
        *seen.entry(who).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "traffic spread over both endpoints: {seen:?}"
    );

    // Hairpin: a pod reaching its own Service, whichever endpoint it lands on.
    for _ in 0..8 {
        ask_from(&dir, &a.netns, SocketAddrV4::new(VIP, 80)).expect("hairpin answers");
    }

    // The node port on the node's own address, from the node itself.
    let gw = Ipv4Addr::new(10, 88, 0, 1);
    let who = ask(SocketAddrV4::new(gw, 30080)).expect("node port answers");
    assert!(who == "default_a" || who == "default_b", "{who}");

    // A Service without endpoints refuses at once instead of timing out.
    let refused =
        ask_from(&dir, &client.netns, SocketAddrV4::new(EMPTY_VIP, 80)).expect_err("refused");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    // One endpoint left: all traffic goes to it.
    nft::apply(&nft::render(&rules(&[&b]))).expect("applied");
    for _ in 0..6 {
        assert_eq!(
            ask_from(&dir, &client.netns, SocketAddrV4::new(VIP, 80)).expect("answers"),
            "default_b"
        );
    }

    // Someone flushes the table: the listing differs; applying again restores it.
    nft::apply(&nft::render(&ruleset)).expect("applied");
    assert_eq!(
        nft::listing().expect("listed").as_deref(),
        Some(applied.as_str())
    );
    let flush = std::process::Command::new("nft")
        .args(["flush", "table", "ip", "berth"])
        .status()
        .expect("nft");
    assert!(flush.success());
    assert_ne!(
        nft::listing().expect("listed").as_deref(),
        Some(applied.as_str())
    );
    nft::remove().expect("removed");
    assert_eq!(nft::listing().expect("listed"), None);
    nft::apply(&nft::render(&ruleset)).expect("restored");
    assert_eq!(
        nft::listing().expect("listed").as_deref(),
        Some(applied.as_str())
    );
    ask_from(&dir, &client.netns, SocketAddrV4::new(VIP, 80)).expect("service answers again");
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn session_affinity_keeps_a_client_on_one_endpoint() {
    let (dir, a, b, client) = node_with_two_servers("affinity");
    let mut ruleset = rules(&[&a, &b]);
    ruleset.services[0].affinity_seconds = Some(600);
    nft::apply(&nft::render(&ruleset)).expect("nft accepts affinity sets");
    let applied = nft::listing().expect("listed").expect("exists");
    let first = ask_from(&dir, &client.netns, SocketAddrV4::new(VIP, 80)).expect("answers");
    for _ in 0..12 {
        assert_eq!(
            ask_from(&dir, &client.netns, SocketAddrV4::new(VIP, 80)).expect("answers"),
            first
        );
    }
    // Learnt clients are traffic, not an edit.
    assert_eq!(
        nft::listing().expect("listed").as_deref(),
        Some(applied.as_str())
    );
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn an_update_in_place_leaves_the_same_table_as_a_full_rewrite() {
    let _dir = sandbox("update");
    let a = |ip: u8| Endpoint {
        ip: Ipv4Addr::new(10, 88, 0, ip),
        port: 8080,
    };
    let build = |web: Vec<Endpoint>, api: Vec<Endpoint>, sticky: Option<u32>| Ruleset {
        pod_cidr: "10.88.0.0/24".parse().unwrap(),
        refused_to_pods: Vec::new(),
        services: vec![
            ServiceRules {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: VIP,
                affinity_seconds: sticky,
                ports: vec![PortRules {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    endpoints: web,
                }],
            },
            ServiceRules {
                namespace: "default".into(),
                name: "api".into(),
                cluster_ip: EMPTY_VIP,
                affinity_seconds: None,
                ports: vec![PortRules {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    node_port: None,
                    endpoints: api,
                }],
            },
        ],
    };
    let steps = [
        build(vec![a(2), a(3)], vec![], None),
        build(vec![a(3)], vec![a(4)], None),
        build(vec![a(3), a(5), a(6)], vec![a(4), a(2)], Some(60)),
        build(vec![], vec![a(4)], Some(60)),
        build(vec![a(7)], vec![], None),
    ];
    nft::apply(&nft::render(&steps[0])).expect("first table");
    for pair in steps.windows(2) {
        let update = nft::render_update(&pair[0], &pair[1]).expect("in place");
        nft::apply(&update).unwrap_or_else(|e| panic!("{e}\n{update}"));
        let incremental = nft::listing().expect("listed").expect("exists");
        nft::apply(&nft::render(&pair[1])).expect("full");
        let full = nft::listing().expect("listed").expect("exists");
        assert_eq!(
            nft::meaning(&incremental),
            nft::meaning(&full),
            "after:\n{update}"
        );
        // Continue from the incremental state, as the agent does.
        nft::apply(&nft::render(&pair[0])).expect("back");
        nft::apply(&update).expect("again");
    }
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn the_generation_moves_with_every_transaction_and_only_then() {
    let _dir = sandbox("generation");
    let before = nft::generation().expect("NFT_MSG_GETGEN answers");
    assert_eq!(
        nft::generation().expect("again"),
        before,
        "reading changes nothing"
    );
    nft::apply(&nft::render(&rules(&[]))).expect("applied");
    let after = nft::generation().expect("read");
    assert_ne!(after, before, "our own transaction");
    nft::listing().expect("listed");
    assert_eq!(
        nft::generation().expect("read"),
        after,
        "listing changes nothing"
    );
    // Someone else's table counts too: anything may have touched ours.
    let other = std::process::Command::new("nft")
        .args(["add", "table", "ip", "admin"])
        .status()
        .expect("nft");
    assert!(other.success());
    assert_ne!(nft::generation().expect("read"), after);
}

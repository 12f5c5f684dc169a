//! Pod network benchmarks, printed as figures (nothing is asserted):
//!
//! - TCP throughput and round-trip latency between two network namespaces
//!   joined by a bare veth pair (the baseline), pod to pod over the node's
//!   bridge, and pod to a Service's cluster IP (DNAT) in the same run;
//! - the time to apply the Services table for 1,000 Services with 5
//!   endpoints each, and for one endpoint change at that size;
//! - the drift check: listing the table, and reading the nftables
//!   generation over netlink;
//! - DNS queries per second answered from the zone.
//!
//! Needs root; runs in a throwaway network namespace of its own:
//! `make bench-net` (`sudo target/release/examples/netbench`).

#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use berth_net::dns::{self, DnsServer, ServiceEntry, ServicePort, Zone};
use berth_net::link::{self, PodLink};
use berth_net::netns::NetnsDir;
use berth_net::nft::{self, Endpoint, PortRules, Protocol, Ruleset, ServiceRules};

const BULK: usize = 512 << 20;
const ROUND_TRIPS: u32 = 20_000;

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "netbench needs root");
    link::isolate_thread().expect("a network namespace of its own");
    let dir = std::env::temp_dir().join(format!("berth-netbench-{}", std::process::id()));
    let netns = NetnsDir::new(dir.join("netns"));

    // The node: bridge, forwarding, Service range routed to the bridge.
    let pods: berth_net::Cidr = "10.88.0.0/24".parse().unwrap();
    let gw = Ipv4Addr::new(10, 88, 0, 1);
    link::with_netlink(|h| async move {
        let i = link::ensure_bridge(&h, "berth0", gw, pods).await?;
        link::ensure_link_route(&h, "10.96.0.0/12".parse().unwrap(), i).await
    })
    .expect("bridge");
    berth_net::enable_forwarding().expect("forwarding");
    let server = pod("bench_server", 2);
    let client = pod("bench_client", 3);
    for p in [&server, &client] {
        link::ensure_pod(&netns, "berth0", p).expect("pod");
    }
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    nft::apply(&nft::render(&Ruleset {
        pod_cidr: pods,
        refused_to_pods: Vec::new(),
        services: vec![service("default", "bench", vip, &[server.ip])],
    }))
    .expect("table");
    // The baseline: two namespaces on one veth pair, no bridge, no nftables
    // rule in the path.
    let (a, b) = bare_pair(&netns);

    println!(
        "## TCP between namespaces ({} MiB bulk, {ROUND_TRIPS} 1-byte round trips)",
        BULK >> 20
    );
    println!("| path | throughput | round trip |");
    println!("|---|---|---|");
    for (what, server_ns, listen, client_ns, target) in [
        (
            "veth pair (baseline)",
            "bench_a",
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7000),
            "bench_b",
            SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7000),
        ),
        (
            "pod to pod (bridge)",
            &*server.netns,
            SocketAddrV4::new(server.ip, 7001),
            &*client.netns,
            SocketAddrV4::new(server.ip, 7001),
        ),
        (
            "pod to Service (cluster IP, DNAT)",
            &*server.netns,
            SocketAddrV4::new(server.ip, 8080),
            &*client.netns,
            SocketAddrV4::new(vip, 80),
        ),
    ] {
        let (mbps, rtt) = measure(&netns, server_ns, listen, client_ns, target);
        println!("| {what} | {mbps:.0} MB/s | {rtt:.1} µs |");
    }
    let _ = (a, b);

    println!();
    println!("## The Services table");
    let big = |moved: bool| Ruleset {
        pod_cidr: "10.88.0.0/16".parse().unwrap(),
        refused_to_pods: Vec::new(),
        services: (0..1000u32)
            .map(|i| {
                let ips: Vec<Ipv4Addr> = (0..5u32)
                    .map(|e| {
                        let n = i * 5 + e + 2 + u32::from(moved && i == 500 && e == 0) * 60_000;
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 88, 0, 0)) + n)
                    })
                    .collect();
                service(
                    "bench",
                    &format!("svc-{i}"),
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 2 + i),
                    &ips,
                )
            })
            .collect(),
    };
    let base = big(false);
    let changed = big(true);
    let t = Instant::now();
    let text = nft::render(&base);
    let render_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut full = Vec::new();
    let mut one = Vec::new();
    let mut small = Vec::new();
    let mut list = Vec::new();
    let update = nft::render_update(&base, &changed).expect("an update");
    for _ in 0..5 {
        let _ = nft::remove();
        let t = Instant::now();
        nft::apply(&text).expect("applied");
        full.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        nft::apply(&nft::render(&changed)).expect("applied");
        one.push(t.elapsed().as_secs_f64() * 1e3);
        nft::apply(&text).expect("applied");
        let t = Instant::now();
        nft::apply(&update).expect("applied");
        small.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let listing = nft::listing().expect("listed").expect("exists");
        list.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(listing.len() > 100_000);
        nft::apply(&text).expect("applied");
    }
    println!(
        "1,000 Services × 5 endpoints: {} bytes of nft input, rendered in {render_ms:.1} ms",
        text.len()
    );
    println!("| operation | median of 5 |");
    println!("|---|---|");
    println!("| create the table | {:.0} ms |", median(&mut full));
    println!(
        "| one endpoint changed, the whole table replaced in one transaction | {:.0} ms |",
        median(&mut one)
    );
    println!(
        "| one endpoint changed, only what changed ({} lines in one transaction) | {:.0} ms |",
        update.lines().count(),
        median(&mut small)
    );
    println!(
        "| list the table (the drift check after an nftables transaction) | {:.0} ms |",
        median(&mut list)
    );
    let mut generation: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            nft::generation().expect("generation");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    println!(
        "| read the nftables generation (the idle poll's check while nothing changed) | {:.0} µs |",
        median(&mut generation)
    );

    println!();
    println!("## DNS");
    let zone = Zone {
        domain: "cluster.local".into(),
        services: (0..1000u32)
            .map(|i| {
                (
                    ("bench".to_string(), format!("svc-{i}")),
                    ServiceEntry {
                        namespace: "bench".into(),
                        name: format!("svc-{i}"),
                        cluster_ip: Some(Ipv4Addr::from(
                            u32::from(Ipv4Addr::new(10, 96, 0, 2)) + i,
                        )),
                        endpoints: Vec::new(),
                        ports: vec![ServicePort {
                            name: Some("http".into()),
                            protocol: "tcp".into(),
                            port: 80,
                        }],
                    },
                )
            })
            .collect(),
    };
    let server = DnsServer::start(SocketAddr::from((gw, 53)), Vec::new(), zone).expect("dns");
    let qps = dns_qps(server.address, Duration::from_secs(3));
    println!(
        "cluster names answered from a 1,000-Service zone over UDP, 4 clients: {qps:.0} queries/s"
    );
    drop(server);
    let _ = nft::remove();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = dns::TTL;
}

fn pod(name: &str, last: u8) -> PodLink {
    PodLink {
        netns: name.into(),
        host_if: berth_net::host_if_name(name),
        ip: Ipv4Addr::new(10, 88, 0, last),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 88, 0, 1),
    }
}

fn service(ns: &str, name: &str, vip: Ipv4Addr, ips: &[Ipv4Addr]) -> ServiceRules {
    ServiceRules {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: vip,
        affinity_seconds: None,
        ports: vec![PortRules {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    ip: *ip,
                    port: 8080,
                })
                .collect(),
        }],
    }
}

/// `bench_a` and `bench_b` joined by one veth pair: 10.77.0.1 and .2.
fn bare_pair(netns: &NetnsDir) -> (String, String) {
    for n in ["bench_a", "bench_b"] {
        netns.ensure(n).expect("namespace");
    }
    let fa = std::fs::File::open(netns.path("bench_a")).unwrap();
    let fb = std::fs::File::open(netns.path("bench_b")).unwrap();
    let (da, db) = (fa.as_raw_fd(), fb.as_raw_fd());
    link::with_netlink(|h| async move {
        h.link()
            .add(rtnetlink::LinkVeth::new("bva", "bvb").build())
            .execute()
            .await
            .expect("veth");
        for (name, fd) in [("bva", da), ("bvb", db)] {
            let l = link::link_by_name(&h, name).await?.expect("end");
            h.link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(l.header.index)
                        .setns_by_fd(fd)
                        .build(),
                )
                .execute()
                .await
                .expect("moved");
        }
        Ok(())
    })
    .expect("pair");
    for (ns, ifname, last) in [("bench_a", "bva", 1u8), ("bench_b", "bvb", 2u8)] {
        netns
            .run_in(ns, move || {
                link::with_netlink(|h| async move {
                    for n in ["lo", ifname] {
                        let l = link::link_by_name(&h, n).await?.expect("link");
                        if n == ifname {
                            h.address()
                                .add(l.header.index, Ipv4Addr::new(10, 77, 0, last).into(), 30)
                                .execute()
                                .await
                                .expect("address");
                        }
                        h.link()
                            .set(
                                rtnetlink::LinkUnspec::new_with_index(l.header.index)
                                    .up()
                                    .build(),
                            )
                            .execute()
                            .await
                            .expect("up");
                    }
                    Ok(())
                })
            })
            .expect("enter")
            .expect("configured");
    }
    ("bench_a".into(), "bench_b".into())
}

/// Bulk throughput (MB/s) and mean round trip (µs) from `client_ns` to a
/// server listening in `server_ns`.
fn measure(
    netns: &NetnsDir,
    server_ns: &str,
    listen: SocketAddrV4,
    client_ns: &str,
    target: SocketAddrV4,
) -> (f64, f64) {
    let listener = netns
        .run_in(server_ns, move || TcpListener::bind(listen))
        .unwrap()
        .expect("bind");
    let server = std::thread::spawn(move || {
        // Bulk: read until the client closes.
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        drop(s);
        // Ping-pong.
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let connect = || {
        netns
            .run_in(client_ns, move || TcpStream::connect(target))
            .unwrap()
            .expect("connect")
    };
    let mut s = connect();
    let chunk = vec![7u8; 1 << 16];
    let t = Instant::now();
    let mut sent = 0;
    while sent < BULK {
        s.write_all(&chunk).expect("write");
        sent += chunk.len();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mbps = BULK as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop(s);
    let mut s = connect();
    s.set_nodelay(true).unwrap();
    let mut b = [1u8; 1];
    let t = Instant::now();
    for _ in 0..ROUND_TRIPS {
        s.write_all(&b).expect("ping");
        s.read_exact(&mut b).expect("pong");
    }
    let rtt = t.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS);
    drop(s);
    server.join().unwrap();
    (mbps, rtt)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn dns_qps(server: SocketAddr, for_: Duration) -> f64 {
    let clients: Vec<_> = (0..4)
        .map(|c| {
            std::thread::spawn(move || {
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut answered = 0u64;
                let mut buf = [0u8; 512];
                let end = Instant::now() + for_;
                let mut i = 0u32;
                while Instant::now() < end {
                    let name = format!("svc-{}.bench.svc.cluster.local.", (i + c * 250) % 1000);
                    let mut q = hickory_proto::op::Message::query();
                    q.add_query(hickory_proto::op::Query::query(
                        hickory_proto::rr::Name::from_ascii(&name).unwrap(),
                        hickory_proto::rr::RecordType::A,
                    ));
                    sock.send_to(&q.to_vec().unwrap(), server).unwrap();
                    if sock.recv(&mut buf).is_ok() {
                        answered += 1;
                    }
                    i += 1;
                }
                answered
            })
        })
        .collect();
    let total: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    total as f64 / for_.as_secs_f64()
}

//! Privileged tests of the agent's pod network against the real kernel,
//! inside a throwaway network namespace of the test's own thread: a pool
//! that runs out, leases kept across an agent restart and rebuilt after a
//! lost lease file, and leftovers of a crash collected. They need root and
//! fail loudly without it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use berth_agent::network::{NetworkPaths, PodNetwork, Wired};
use berth_net::NetworkSettings;
use berth_net::netns::NetnsDir;

fn sandbox(name: &str) -> (NetworkPaths, PathBuf) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the privileged networking tests need root (CI runs them as root)"
    );
    berth_net::link::isolate_thread().expect("a network namespace of the test's own");
    let dir = std::env::temp_dir().join(format!("berth-podnet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    (
        NetworkPaths {
            netns_dir: dir.join("netns"),
            files_dir: dir.join("pods"),
            leases: dir.join("state/leases.json"),
            upstream_resolv_conf: dir.join("resolv.conf"),
        },
        dir,
    )
}

fn pods(replicas: u32) -> Vec<berth_plan::DesiredPod> {
    let yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - {{name: c, image: busybox:1.37}}\n"
    );
    let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
        path: "web.yaml".into(),
        text: yaml,
    }]);
    let node = berth_plan::NodeInfo::new("n", BTreeMap::new(), 64 << 30, 64_000);
    let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
        reference: "busybox:1.37".into(),
        cmd: vec!["sh".into()],
        ..Default::default()
    }]);
    berth_plan::plan_node(&catalog, &node, &images, &Default::default(), "r").pods
}

fn small() -> NetworkSettings {
    NetworkSettings::parse(Some("10.99.0.0/28"), Some("10.98.0.0/24"), None, None).unwrap()
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn a_pool_that_runs_out_names_the_pods_left_without_an_address() {
    let (paths, dir) = sandbox("pool");
    let mut net = PodNetwork::new(paths);
    net.prepare_node(&small()).expect("node network");
    // A /28 has 13 addresses for pods (network, gateway and broadcast out).
    let all = pods(14);
    let wired = net.wire(&all);
    let failed: Vec<(&String, &String)> = wired
        .iter()
        .filter_map(|(k, w)| match w {
            Wired::Failed(m) => Some((k, m)),
            Wired::Ip(_) => None,
        })
        .collect();
    assert_eq!(wired.len(), 14);
    assert_eq!(failed.len(), 1, "{wired:?}");
    assert_eq!(
        failed[0].1,
        "no pod IP: the pool 10.99.0.0/28 has no free address: 13 of 13 are leased; widen the prefix in the node config"
    );
    // Fewer replicas: the leases of the pods gone are reclaimed, and the
    // pod that had none now gets one.
    let keep: BTreeSet<String> = all[..12].iter().map(|p| p.id.key()).collect();
    let removed = net.unwire_others(&keep);
    assert!(
        removed.iter().any(|r| r.starts_with("lease ")),
        "{removed:?}"
    );
    let again = net.wire(&all[..13]);
    assert!(
        again.values().all(|w| matches!(w, Wired::Ip(_))),
        "{again:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn addresses_survive_a_restart_and_a_lost_lease_file_and_crash_leftovers_go() {
    let (paths, dir) = sandbox("restart");
    let settings = small();
    let three = pods(3);
    let first: BTreeMap<String, Wired> = {
        let mut net = PodNetwork::new(paths.clone());
        net.prepare_node(&settings).expect("node network");
        net.wire(&three)
    };
    assert!(
        first.values().all(|w| matches!(w, Wired::Ip(_))),
        "{first:?}"
    );

    // The agent restarts: same leases, nothing to remake.
    let mut net = PodNetwork::new(paths.clone());
    net.prepare_node(&settings).expect("node network");
    assert_eq!(net.wire(&three), first);

    // The lease file is corrupted: moved aside, and the addresses are read
    // back from the live namespaces.
    std::fs::write(&paths.leases, b"{ half a file").expect("corrupt");
    drop(net);
    let mut net = PodNetwork::new(paths.clone());
    let notes = net.prepare_node(&settings).expect("node network");
    assert!(
        notes.iter().any(|n| n.contains("not a lease book")),
        "{notes:?}"
    );
    assert_eq!(
        net.wire(&three),
        first,
        "addresses rebuilt from the namespaces"
    );

    // A crash left a namespace and a veth of a pod nobody wants.
    let netns = NetnsDir::new(&paths.netns_dir);
    netns.ensure("default_ghost").expect("stray namespace");
    let stray = berth_net::host_if_name("default_gone");
    let name = stray.clone();
    berth_net::link::with_netlink(|h| async move {
        h.link()
            .add(rtnetlink::LinkVeth::new(&name, "bvpeer0").build())
            .execute()
            .await
            .expect("stray veth");
        Ok(())
    })
    .expect("netlink");
    let keep: BTreeSet<String> = three.iter().map(|p| p.id.key()).collect();
    let removed = net.unwire_others(&keep);
    assert!(
        removed.contains(&"network namespace default_ghost".to_string()),
        "{removed:?}"
    );
    assert!(removed.contains(&format!("veth {stray}")), "{removed:?}");
    assert!(!netns.exists("default_ghost"));
    let mut left = netns.list();
    left.sort();
    let mut want: Vec<String> = keep.into_iter().collect();
    want.sort();
    assert_eq!(left, want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn a_taken_dns_port_is_reported_and_pods_are_wired_anyway() {
    let (paths, dir) = sandbox("dns-port");
    // Someone else's resolver holds port 53 on every address.
    let blocker = std::net::UdpSocket::bind("0.0.0.0:53").expect("port 53 in the test's namespace");
    let mut net = PodNetwork::new(paths);
    let notes = net
        .prepare_node(&small())
        .expect("the node network without DNS");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("cluster DNS on 10.99.0.1:53: ") && n.ends_with("; retrying")),
        "{notes:?}"
    );
    let wired = net.wire(&pods(2));
    assert!(
        wired.values().all(|w| matches!(w, Wired::Ip(_))),
        "{wired:?}"
    );
    // Reported once, not on every pass; gone once the port is free.
    assert!(net.prepare_node(&small()).expect("again").is_empty());
    drop(blocker);
    assert!(net.prepare_node(&small()).expect("again").is_empty());
    net.program_services(
        &berth_plan::services::ServicePlan::default(),
        &[],
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .expect("programmed");
    assert!(
        net.service_problems.is_empty(),
        "{:?}",
        net.service_problems
    );
    let _ = std::fs::remove_dir_all(dir);
}

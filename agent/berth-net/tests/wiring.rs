//! Privileged tests: real namespaces, veths and a bridge, made inside a
//! throwaway network namespace of the test's own thread, so the host's
//! links are never touched. They need root and fail loudly without it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use berth_net::Cidr;
use berth_net::link::{self, PodLink};
use berth_net::netns::NetnsDir;

/// Moves this test's thread into a fresh network namespace with `lo` up,
/// and gives it a scratch directory for namespace names.
fn sandbox(name: &str) -> (NetnsDir, PathBuf) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the privileged networking tests need root (CI runs them as root)"
    );
    link::isolate_thread().expect("a network namespace of the test's own");
    let dir = std::env::temp_dir().join(format!("berth-net-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    (NetnsDir::new(dir.join("netns")), dir)
}

fn pod(netns: &str, last: u8) -> PodLink {
    PodLink {
        netns: netns.to_string(),
        host_if: berth_net::host_if_name(netns),
        ip: Ipv4Addr::new(10, 88, 0, last),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 88, 0, 1),
    }
}

/// A listener made inside `ns` (the socket stays there), and a connection
/// made from inside `from` to it: one byte each way.
fn talk(dir: &NetnsDir, server: &PodLink, from: &str) -> std::io::Result<()> {
    let addr = SocketAddrV4::new(server.ip, 7000);
    let listener = dir.run_in(&server.netns, move || TcpListener::bind(addr))??;
    let accept = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        s.write_all(&[b[0] + 1])
    });
    let reply = dir.run_in(from, move || -> std::io::Result<u8> {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&[41])?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(b[0])
    })??;
    accept.join().expect("accept thread")?;
    assert_eq!(reply, 42);
    Ok(())
}

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn two_pods_on_the_bridge_talk_by_ip_and_broken_wiring_is_remade() {
    let (dir, scratch) = sandbox("talk");
    let pods: Cidr = "10.88.0.0/24".parse().unwrap();
    let gateway = Ipv4Addr::new(10, 88, 0, 1);
    let bridge = "berth0";
    link::with_netlink(|h| async move { link::ensure_bridge(&h, bridge, gateway, pods).await })
        .expect("bridge");
    let a = pod("default_a", 2);
    let b = pod("default_b", 3);
    assert!(link::ensure_pod(&dir, bridge, &a).expect("wire a"));
    assert!(link::ensure_pod(&dir, bridge, &b).expect("wire b"));
    talk(&dir, &b, &a.netns).expect("a reaches b by pod IP");
    // Again: nothing to do.
    assert!(!link::ensure_pod(&dir, bridge, &a).expect("again"));
    assert_eq!(
        link::pod_address(&dir, &a.netns).expect("read"),
        Some((a.ip, 24))
    );

    // Someone deletes the host end: the next ensure remakes it.
    let host_if = a.host_if.clone();
    link::with_netlink(|h| async move { link::delete_link(&h, &host_if).await }).expect("deleted");
    assert!(link::ensure_pod(&dir, bridge, &a).expect("remade"));
    talk(&dir, &a, &b.netns).expect("b reaches a again");

    // A namespace name left as a plain file by a crash is reused.
    std::fs::write(dir.path("default_c"), b"").expect("leftover");
    let c = pod("default_c", 4);
    assert!(link::ensure_pod(&dir, bridge, &c).expect("wire c over a leftover"));
    talk(&dir, &c, &a.netns).expect("a reaches c");

    // Removal leaves nothing behind.
    link::remove_pod(&dir, &a.netns, &a.host_if).expect("removed");
    assert!(!dir.exists(&a.netns));
    let host_if = a.host_if.clone();
    let gone = link::with_netlink(|h| async move { link::link_by_name(&h, &host_if).await })
        .expect("read");
    assert!(gone.is_none());
    assert_eq!(dir.list(), ["default_b", "default_c"]);
    for p in [&b, &c] {
        link::remove_pod(&dir, &p.netns, &p.host_if).expect("removed");
    }
    let _ = std::fs::remove_dir_all(scratch);
}

//! Measures what the prober costs per probe on this machine's kernel: 50
//! containers, each with an httpGet and a tcpSocket probe every second,
//! against one server (address and port from the arguments;
//! `scripts/bench_probe_host.sh` makes one in a network namespace). Prints
//! the process's user and system CPU per probe over the span (the
//! kernel's connection work done in the prober's context included).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::net::Ipv4Addr;
use std::time::Duration;

use berth_agent::prober::{ProbeTarget, Prober};
use berth_manifest::probe::{Action, HttpGet, Probe, Probes};

/// utime and stime of this process, in seconds (ticks of 10 ms).
fn rusage() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<f64> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f[11] / 100.0, f[12] / 100.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let address: Ipv4Addr = args[1].parse().unwrap();
    let port: u16 = args[2].parse().unwrap();
    let seconds: u64 = args.get(3).map_or(30, |s| s.parse().unwrap());
    let probe = |action| {
        Box::new(Probe {
            action,
            initial_delay_seconds: 0,
            period_seconds: 1,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 3,
            termination_grace_period_seconds: None,
        })
    };
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let targets: Vec<ProbeTarget> = (0..50)
        .map(|i| ProbeTarget {
            pod: format!("default/web-{i}"),
            container: "main".into(),
            since_usec: since,
            main_pid: std::process::id(),
            control_group: String::new(),
            workdir: "/".into(),
            address,
            probes: Probes {
                startup: None,
                readiness: Some(probe(Action::HttpGet(HttpGet {
                    https: false,
                    host: None,
                    port,
                    path: "/ready".into(),
                    headers: vec![],
                }))),
                liveness: Some(probe(Action::TcpSocket { host: None, port })),
            },
        })
        .collect();
    let (tx, _rx) = std::sync::mpsc::channel();
    let prober = Prober::start("/bin/false".into(), tx).unwrap();
    prober.set_targets(targets);
    std::thread::sleep(Duration::from_secs(3));
    let (u0, s0) = rusage();
    std::thread::sleep(Duration::from_secs(seconds));
    let (u1, s1) = rusage();
    let probes = 100.0 * seconds as f64;
    let h = prober.health();
    let ready = h.values().filter(|c| c["main"].ready()).count();
    let (user, system) = ((u1 - u0) / probes * 1e6, (s1 - s0) / probes * 1e6);
    println!(
        "bench: prober on this kernel, 100 probes a second (50 httpGet + 50 tcpSocket) for {seconds} s: user {user:.0} µs, system {system:.0} µs per probe, {:.2} % of one CPU ({ready} of 50 ready)",
        (user + system) * 100.0 / 1e6 * 100.0
    );
    assert_eq!(ready, 50, "every probe should pass against the server");
}

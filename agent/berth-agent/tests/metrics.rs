//! The metrics endpoint on loopback, over a cgroup tree written by the
//! test: what it serves parses with the Prometheus project's own parser
//! (scripts/parse_metrics.py), carries cAdvisor's and kube-state-metrics'
//! series with the values the cgroup files and the snapshot hold, and
//! refuses what is not `GET /metrics`. A scrape storm is served from one
//! rendering per second.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_agent::metrics::{ContainerSample, Exporter, PodSample, Server, Snapshot};
use serde_json::Value;

const POD_CG: &str = "/berth.slice/berth-guaranteed.slice/berth-shop_web.slice";
const MAIN_CG: &str =
    "/berth.slice/berth-guaranteed.slice/berth-shop_web.slice/berth-shop_web_main.service";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_cgroup(root: &Path, cg: &str, usage_usec: u64, current: u64, inactive: u64, max: &str) {
    let dir = root.join(cg.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cpu.stat"),
        format!("usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 2\n"),
    )
    .unwrap();
    std::fs::write(dir.join("memory.current"), format!("{current}\n")).unwrap();
    std::fs::write(
        dir.join("memory.stat"),
        format!("anon 5\nfile 6\nactive_file 7\ninactive_file {inactive}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    std::fs::write(dir.join("memory.max"), format!("{max}\n")).unwrap();
}

fn snapshot() -> Snapshot {
    Snapshot {
        node: "n1".into(),
        applied: Some("a".repeat(40)),
        attempted: Some("b".repeat(40)),
        drift_open: 2,
        pushes: 5,
        push_failures: 1,
        pods: vec![
            PodSample {
                namespace: "shop".into(),
                name: "web".into(),
                phase: "Running".into(),
                reason: None,
                qos: Some("Guaranteed".into()),
                cgroup: Some(POD_CG.into()),
                containers: vec![ContainerSample {
                    name: "main".into(),
                    image: "registry.local/web:1.0".into(),
                    cgroup: Some(MAIN_CG.into()),
                    restarts: 3,
                    ready: true,
                    state: "running",
                    waiting_reason: None,
                    last_terminated_reason: Some("OOMKilled".into()),
                    probes: vec![("Readiness".into(), 10, 4)],
                }],
            },
            PodSample {
                namespace: "shop".into(),
                name: "hog".into(),
                phase: "Failed".into(),
                reason: Some("Evicted".into()),
                qos: Some("BestEffort".into()),
                cgroup: None,
                containers: Vec::new(),
            },
        ],
    }
}

fn get(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The body parsed by the Prometheus project's parser.
fn parse(body: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/parse_metrics.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (scripts/deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(parsed: &Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parsed["samples"].as_array()?.iter().find_map(|s| {
        let l = &s[1];
        (s[0] == name && labels.iter().all(|(k, v)| l[*k] == *v)).then(|| s[2].as_f64())?
    })
}

#[test]
fn the_endpoint_serves_cadvisor_and_kube_state_metrics_series_that_prometheus_parses() {
    let root = scratch("cg");
    write_cgroup(&root, POD_CG, 3_500_000, 50 << 20, 10 << 20, "67108864");
    write_cgroup(&root, MAIN_CG, 2_250_000, 40 << 20, 8 << 20, "max");
    std::fs::write(root.join("cpu.stat"), "usage_usec 99000000\n").unwrap();
    let exporter = Exporter::new(&root, &root);
    exporter.update(snapshot());
    exporter
        .figures
        .pass("applied", std::time::Duration::from_millis(300));
    exporter
        .figures
        .pass("failed", std::time::Duration::from_secs(3));
    exporter.figures.fetch(true);
    exporter.figures.pull(false);
    let server = Server::start("127.0.0.1:0".parse().unwrap(), exporter).unwrap();

    let (head, body) = get(server.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let p = parse(&body);
    let main = [("namespace", "shop"), ("pod", "web"), ("container", "main")];
    assert_eq!(p["families"]["container_cpu_usage_seconds"], "counter");
    assert_eq!(
        value(&p, "container_cpu_usage_seconds_total", &main),
        Some(2.25)
    );
    assert_eq!(
        value(&p, "container_memory_working_set_bytes", &main),
        Some((32u64 << 20) as f64)
    );
    assert_eq!(
        value(&p, "container_memory_usage_bytes", &main),
        Some((40u64 << 20) as f64)
    );
    assert_eq!(
        value(
            &p,
            "container_cpu_usage_seconds_total",
            &[
                ("pod", "web"),
                ("image", "registry.local/web:1.0"),
                ("id", MAIN_CG)
            ]
        ),
        Some(2.25)
    );
    assert_eq!(
        value(&p, "container_spec_memory_limit_bytes", &main),
        Some(0.0)
    );
    assert_eq!(value(&p, "container_oom_events_total", &main), Some(1.0));
    // The pod's own cgroup, as cAdvisor's container="" series.
    let pod = [("namespace", "shop"), ("pod", "web"), ("container", "")];
    assert_eq!(
        value(&p, "container_cpu_usage_seconds_total", &pod),
        Some(3.5)
    );
    assert_eq!(
        value(&p, "container_spec_memory_limit_bytes", &pod),
        Some(67_108_864.0)
    );
    assert_eq!(
        value(&p, "container_cpu_usage_seconds_total", &[("id", "/")]),
        Some(99.0)
    );
    // kube-state-metrics.
    assert_eq!(
        value(&p, "kube_pod_container_status_restarts_total", &main),
        Some(3.0)
    );
    assert_eq!(
        value(&p, "kube_pod_container_status_ready", &main),
        Some(1.0)
    );
    assert_eq!(
        value(&p, "kube_pod_container_status_running", &main),
        Some(1.0)
    );
    assert_eq!(
        value(
            &p,
            "kube_pod_container_status_last_terminated_reason",
            &[("pod", "web"), ("reason", "OOMKilled")]
        ),
        Some(1.0)
    );
    for (phase, want) in [("Running", 1.0), ("Pending", 0.0), ("Failed", 0.0)] {
        assert_eq!(
            value(
                &p,
                "kube_pod_status_phase",
                &[("pod", "web"), ("phase", phase)]
            ),
            Some(want),
            "{phase}"
        );
    }
    assert_eq!(
        value(
            &p,
            "kube_pod_status_phase",
            &[("pod", "hog"), ("phase", "Failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &p,
            "kube_pod_status_reason",
            &[("pod", "hog"), ("reason", "Evicted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &p,
            "kube_pod_status_qos_class",
            &[("pod", "web"), ("qos_class", "Guaranteed")]
        ),
        Some(1.0)
    );
    // The kubelet's prober counter.
    let probe = |result| {
        value(
            &p,
            "prober_probe_total",
            &[
                ("pod", "web"),
                ("probe_type", "Readiness"),
                ("result", result),
            ],
        )
    };
    assert_eq!(probe("successful"), Some(6.0));
    assert_eq!(probe("failed"), Some(4.0));
    // The agent's own.
    assert_eq!(
        value(&p, "berth_passes_total", &[("outcome", "applied")]),
        Some(1.0)
    );
    assert_eq!(
        value(&p, "berth_passes_total", &[("outcome", "failed")]),
        Some(1.0)
    );
    assert_eq!(p["families"]["berth_pass_duration_seconds"], "histogram");
    assert_eq!(
        value(&p, "berth_pass_duration_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(&p, "berth_pass_duration_seconds_bucket", &[("le", "0.5")]),
        Some(1.0)
    );
    assert_eq!(
        value(&p, "berth_git_fetches_total", &[("result", "success")]),
        Some(1.0)
    );
    assert_eq!(
        value(&p, "berth_image_pulls_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(
        value(&p, "berth_git_pushes_total", &[("result", "success")]),
        Some(4.0)
    );
    assert_eq!(
        value(&p, "berth_git_pushes_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(value(&p, "berth_drift_open", &[]), Some(2.0));
    let applied = "a".repeat(40);
    assert_eq!(
        value(
            &p,
            "berth_revision_info",
            &[("state", "applied"), ("revision", applied.as_str())]
        ),
        Some(1.0)
    );
    assert!(value(&p, "machine_memory_bytes", &[]).is_some_and(|v| v > 0.0));

    // Within a second a storm is served the same rendering; after it, the
    // cgroups are read again.
    write_cgroup(&root, MAIN_CG, 4_000_000, 40 << 20, 8 << 20, "max");
    let (_, again) = get(server.addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(again, body, "rendered again within a second");
    std::thread::sleep(berth_agent::metrics::RENDER_EVERY);
    let (_, later) = get(server.addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(
        value(&parse(&later), "container_cpu_usage_seconds_total", &main),
        Some(4.0)
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn what_is_not_get_metrics_is_refused_and_a_long_head_is_cut_short() {
    let root = scratch("refuse");
    let server =
        Server::start("127.0.0.1:0".parse().unwrap(), Exporter::new(&root, &root)).unwrap();
    let (head, _) = get(server.addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = get(server.addr, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let (head, _) = get(server.addr, "nonsense\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // A head that never ends: cut at the limit (exactly the limit sent,
    // so the answer is not lost to a reset for unread bytes).
    let mut long = "GET /metrics HTTP/1.1\r\nX: ".to_string();
    long.push_str(&"y".repeat(berth_agent::metrics::MAX_REQUEST - long.len()));
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(long.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 431"), "{out:.80}");
    // Still serving.
    let (head, _) = get(server.addr, "GET /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Dropped: the port is closed.
    let addr = server.addr;
    drop(server);
    assert!(TcpStream::connect(addr).is_err());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_storm_is_answered_no_more_often_than_the_answers_a_second() {
    let root = scratch("storm");
    let server = berth_agent::metrics::Server::start_limited(
        "127.0.0.1:0".parse().unwrap(),
        Exporter::new(&root, &root),
        2,
    )
    .unwrap();
    let started = std::time::Instant::now();
    // Six clients at once: all answered, two a second.
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let addr = server.addr;
            std::thread::spawn(move || get(addr, "GET /metrics HTTP/1.1\r\n\r\n").0)
        })
        .collect();
    for c in clients {
        let head = c.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // Answers 3 and 5 each waited for a new second (a lower bound: a slow
    // machine only adds to it).
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1900),
        "six answers at two a second came in {took:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

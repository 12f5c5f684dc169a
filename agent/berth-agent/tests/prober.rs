//! The prober against real endpoints on loopback: HTTP servers that answer
//! 200, 500, redirect on their host and to another, hang, or send an
//! endless body; a closed port; a real HTTPS server (`openssl s_server`,
//! self-signed); exec probes whose command never exits and forks (the
//! whole process group is killed at the timeout); and the prober thread
//! end to end: readiness turns on and off past its thresholds, and each
//! change wakes the loop.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_agent::Wake;
use berth_agent::prober::{ProbeTarget, Prober, run_probe};
use berth_manifest::probe::{Action, HttpGet, Probe, Probes};
use berth_plan::health::Outcome;

/// A small HTTP server on loopback; `healthy` decides `/ready`.
fn server(healthy: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let healthy = Arc::clone(&healthy);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let reply = |s: &mut std::net::TcpStream, status: &str, extra: &str| {
                    let _ = write!(s, "HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\n\r\n");
                };
                match path.as_str() {
                    "/ok" => reply(&mut s, "200 OK", ""),
                    "/fail" => reply(&mut s, "500 Internal Server Error", ""),
                    "/ready" if healthy.load(Ordering::SeqCst) => reply(&mut s, "200 OK", ""),
                    "/ready" => reply(&mut s, "503 Service Unavailable", ""),
                    "/here" => reply(&mut s, "302 Found", "Location: /fail\r\n"),
                    // Not followed: the prober never contacts another host.
                    "/away" => reply(&mut s, "302 Found", "Location: http://192.0.2.1/ok\r\n"),
                    "/loop" => reply(&mut s, "302 Found", "Location: /loop\r\n"),
                    "/headers" => {
                        let ok = req.contains("User-Agent: kube-probe/1.35")
                            && req.contains("X-Token: abc");
                        reply(&mut s, if ok { "200 OK" } else { "400 Bad Request" }, "")
                    }
                    "/hang" => std::thread::sleep(Duration::from_secs(10)),
                    "/endless" => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\n\r\n");
                        let chunk = [b'x'; 65536];
                        while s.write_all(&chunk).is_ok() {}
                    }
                    _ => reply(&mut s, "404 Not Found", ""),
                }
            });
        }
    });
    port
}

fn target(probes: Probes) -> ProbeTarget {
    ProbeTarget {
        pod: "default/web".into(),
        container: "main".into(),
        since_usec: 1,
        main_pid: std::process::id(),
        control_group: "/".into(),
        workdir: "/".into(),
        address: Ipv4Addr::LOCALHOST,
        probes,
    }
}

fn get(port: u16, path: &str) -> Action {
    Action::HttpGet(HttpGet {
        https: false,
        host: None,
        port,
        path: path.into(),
        headers: vec![("X-Token".into(), "abc".into())],
    })
}

fn run(action: &Action, timeout: Duration, exe: &Path) -> (Outcome, Duration) {
    let t = target(Probes::default());
    let started = Instant::now();
    let outcome = run_probe(action, &t, timeout, exe);
    (outcome, started.elapsed())
}

fn failure(o: &Outcome) -> &str {
    match o {
        Outcome::Failure(m) => m,
        Outcome::Success => "",
    }
}

#[test]
fn http_and_tcp_probes_judge_as_the_kubelet() {
    let port = server(Arc::new(AtomicBool::new(true)));
    let none = PathBuf::from("/nonexistent");
    let second = Duration::from_secs(1);
    assert_eq!(run(&get(port, "/ok"), second, &none).0, Outcome::Success);
    assert_eq!(
        run(&get(port, "/headers"), second, &none).0,
        Outcome::Success
    );
    assert_eq!(
        failure(&run(&get(port, "/fail"), second, &none).0),
        "HTTP probe failed with statuscode: 500"
    );
    // A redirect on the same host is followed (to a 500 here).
    assert_eq!(
        failure(&run(&get(port, "/here"), second, &none).0),
        "HTTP probe failed with statuscode: 500"
    );
    // One to another host is not followed, and counts as a success.
    assert_eq!(run(&get(port, "/away"), second, &none).0, Outcome::Success);
    assert!(
        failure(&run(&get(port, "/loop"), second, &none).0).contains("stopped after 10 redirects"),
        "a redirect loop ends"
    );
    // An endless body is never read: the head decides, at once.
    let (endless, took) = run(&get(port, "/endless"), second, &none);
    assert_eq!(endless, Outcome::Success);
    assert!(took < second, "{took:?}");
    // A hanging endpoint fails at its timeout, not later.
    let (hang, took) = run(&get(port, "/hang"), second, &none);
    assert!(
        failure(&hang).contains("Client.Timeout exceeded"),
        "{hang:?}"
    );
    assert!(took >= second && took < 2 * second, "{took:?}");
    // TCP: open and closed ports.
    assert_eq!(
        run(&Action::TcpSocket { host: None, port }, second, &none).0,
        Outcome::Success
    );
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = run(
        &Action::TcpSocket {
            host: None,
            port: closed,
        },
        second,
        &none,
    )
    .0;
    assert!(
        failure(&refused).starts_with(&format!("dial tcp 127.0.0.1:{closed}: connect: ")),
        "{refused:?}"
    );
    let http_refused = run(&get(closed, "/"), second, &none).0;
    assert!(
        failure(&http_refused).starts_with("Get \"http://127.0.0.1:"),
        "{http_refused:?}"
    );
}

#[test]
fn https_probes_skip_certificate_checks() {
    let dir = std::env::temp_dir().join(format!("berth-prober-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=elsewhere.invalid",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl tool (scripts/deps.sh installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let action = Action::HttpGet(HttpGet {
        https: true,
        host: None,
        port,
        path: "/".into(),
        headers: Vec::new(),
    });
    let outcome = run(&action, Duration::from_secs(5), Path::new("/nonexistent")).0;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(outcome, Outcome::Success);
}

/// A stand-in for `berth exec-enter`: a script that runs what it is given
/// after `--`, so exec probes run for real without a container.
fn fake_exec_enter(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("exec-enter");
    std::fs::write(
        &path,
        "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn exec_probes_fail_with_their_output_and_are_killed_whole_at_the_timeout() {
    let dir = std::env::temp_dir().join(format!("berth-prober-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = fake_exec_enter(&dir);
    let sh = |script: &str| Action::Exec {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
    };
    let second = Duration::from_secs(1);
    assert_eq!(run(&sh("exit 0"), second, &exe).0, Outcome::Success);
    assert_eq!(
        failure(&run(&sh("echo not ready; exit 3"), second, &exe).0),
        "not ready"
    );
    assert_eq!(
        failure(&run(&sh("exit 4"), second, &exe).0),
        "command \"/bin/sh -c exit 4\" exited with 4"
    );
    // A command that forks and never exits: at the timeout, its whole
    // process group goes, the forked child too.
    let marker = dir.join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; sleep 300", marker.display());
    let (outcome, took) = run(&sh(&script), second, &exe);
    assert!(
        failure(&outcome).contains("timed out after 1s"),
        "{outcome:?}"
    );
    assert!(took < 2 * second, "{took:?}");
    let child: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone, or a zombie waiting for its reaper (init, here).
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let gone = state.is_empty() || state.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forked child {child} survived: {state}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_prober_thread_turns_readiness_on_and_off_past_its_thresholds_and_wakes_the_loop() {
    let healthy = Arc::new(AtomicBool::new(false));
    let port = server(Arc::clone(&healthy));
    let readiness = Probe {
        action: get(port, "/ready"),
        initial_delay_seconds: 0,
        period_seconds: 1,
        timeout_seconds: 1,
        success_threshold: 2,
        failure_threshold: 2,
        termination_grace_period_seconds: None,
    };
    let probes = Probes {
        readiness: Some(Box::new(readiness)),
        ..Probes::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let prober = Prober::start(PathBuf::from("/nonexistent"), tx).unwrap();
    let mut t = target(probes);
    t.since_usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    prober.set_targets(vec![t.clone()]);
    let ready = |p: &Prober| p.health()["default/web"]["main"].ready();
    let runs = |p: &Prober| {
        p.health()["default/web"]["main"]
            .readiness
            .as_ref()
            .unwrap()
            .runs
    };
    // Failing: stays not ready, and nothing changes, so nothing wakes.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!ready(&prober));
    assert!(runs(&prober) >= 2, "probed every period");
    assert!(rx.try_recv().is_err());
    // Healthy: ready after two successes in a row, with one wake-up.
    healthy.store(true, Ordering::SeqCst);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        Wake::Health
    );
    assert!(ready(&prober));
    // Unhealthy again: not ready after two failures.
    healthy.store(false, Ordering::SeqCst);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        Wake::Health
    );
    assert!(!ready(&prober));
    // An agent restarted meanwhile: a new prober resumed from the results
    // the state file kept carries on with the same instance's counts.
    let kept = prober.health();
    let (tx2, _rx2) = std::sync::mpsc::channel();
    let resumed = Prober::start(PathBuf::from("/nonexistent"), tx2).unwrap();
    resumed.resume(&kept);
    resumed.set_targets(vec![t.clone()]);
    assert_eq!(
        resumed.health()["default/web"]["main"],
        kept["default/web"]["main"]
    );
    drop(resumed);
    // The same instance keeps its results; a restarted one starts afresh.
    let before = runs(&prober);
    prober.set_targets(vec![t.clone()]);
    assert!(runs(&prober) >= before);
    t.since_usec += 1;
    prober.set_targets(vec![t]);
    assert_eq!(runs(&prober), 0);
    // No target: no results.
    prober.set_targets(Vec::new());
    assert!(prober.health().is_empty());
}

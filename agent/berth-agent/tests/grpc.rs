//! The grpc probe against grpcio's own health service (`grpc/health_server.py`,
//! in the virtual environment `scripts/deps.sh` makes under `target/`): a
//! serving service passes, a not-serving one fails with its status, an
//! unknown one and a closed port fail. Fails loudly without the server.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use berth_agent::prober::{ProbeTarget, run_probe};
use berth_manifest::probe::Action;
use berth_plan::health::Outcome;

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join("target/grpc-venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/deps.sh (it installs grpcio there)",
        venv.display()
    );
    venv
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(port: u16, service: Option<&str>) -> Outcome {
    let target = ProbeTarget {
        pod: "default/g".into(),
        container: "main".into(),
        since_usec: 1,
        main_pid: 1,
        control_group: "/".into(),
        workdir: "/".into(),
        address: Ipv4Addr::LOCALHOST,
        probes: Default::default(),
    };
    let action = Action::Grpc {
        port,
        service: service.map(str::to_string),
    };
    run_probe(
        &action,
        &target,
        Duration::from_secs(5),
        std::path::Path::new("/nonexistent"),
    )
}

#[test]
fn grpc_probes_pass_and_fail_as_grpcios_health_server_says() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/health_server.py");
    let mut child = std::process::Command::new(python())
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let port: u16 = line.trim().parse().expect("the server prints its port");
    assert_eq!(probe(port, None), Outcome::Success);
    assert_eq!(probe(port, Some("up")), Outcome::Success);
    assert_eq!(
        probe(port, Some("down")),
        Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
    );
    // grpcio answers an unknown service with an empty message (status
    // UNKNOWN) and NOT_FOUND in its trailers: a failure either way.
    match probe(port, Some("nosuch")) {
        Outcome::Failure(m) => assert!(
            m.contains("UNKNOWN") || m.contains("ended without a response"),
            "{m}"
        ),
        Outcome::Success => panic!("an unknown service passed"),
    }
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match probe(closed, None) {
        Outcome::Failure(m) => assert!(
            m.contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, closed)).to_string()),
            "{m}"
        ),
        Outcome::Success => panic!("a closed port passed"),
    }
}

/// The canned answer the QEMU test's pod serves with `busybox nc`, here on
/// loopback: SERVING passes, NOT_SERVING fails.
#[test]
fn the_canned_answer_of_the_qemu_test_reads_as_grpcio_s() {
    let dir = std::env::temp_dir().join(format!("berth-grpc-canned-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let down = dir.join("down");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/answer.sh");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("busybox")
        .args(["nc", "-ll", "-p", &port.to_string(), "-e"])
        .arg(&script)
        .env("DOWN", &down)
        .spawn()
        .expect("busybox (scripts/deps.sh installs busybox-static)");
    let _server = Server(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "busybox nc did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(probe(port, None), Outcome::Success);
    std::fs::write(&down, "").unwrap();
    // busybox nc takes a moment to listen again after each connection (the
    // prober's probes are a period apart).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        probe(port, None),
        Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

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
    futures_lite::future::block_on(run_probe(
        &action,
        &target,
        Duration::from_secs(5),
        std::path::Path::new("/nonexistent"),
    ))
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
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match probe(closed, None) {
        Outcome::Failure(m) => assert!(
            m.contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, closed)).to_string()),
            "{m}"
        ),
        Outcome::Success => panic!("a closed port passed"),
    }
}

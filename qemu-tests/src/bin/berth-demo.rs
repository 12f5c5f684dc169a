//! `make demo`: boots the appliance in QEMU against a local Git repository
//! seeded with `manifests/`, shows the node fetching them and its pods
//! coming up, and powers it off (or keeps it running with `--keep` until
//! Ctrl-C).

use std::io::Write;
use std::time::Duration;

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, repo_root, test_image};

fn main() {
    if let Err(e) = run() {
        eprintln!("berth-demo: {e}");
        std::process::exit(1);
    }
}

fn run() -> berth_qemu_tests::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let image = test_image()?;
    let git = GitHost::fresh("demo", "desired.git")?;
    git.add_dir(&repo_root().join("manifests"), "manifests")?;
    let revision = git.push(&[], "the example manifests")?;
    let mut options = VmOptions::new("demo");
    options.esp_config = Some("node:\n  name: demo-node\n  labels: {disk: ssd}\ngit:\n  branch: main\n  path: manifests\n  pollInterval: 10s\n".into());
    options
        .credentials
        .push(("berth.repo".into(), format!("git://{GIT_HOST}/desired.git")));
    // The example Service's node port, on this machine's loopback.
    let host_port = if std::net::TcpListener::bind(("127.0.0.1", NODE_PORT)).is_ok() {
        NODE_PORT
    } else {
        berth_qemu_tests::free_loopback_port()?
    };
    options.host_forwards.push((host_port, NODE_PORT));
    say(&format!(
        "booting {} by UEFI under TCG; the Git remote is {} on this machine",
        image.display(),
        git.dir.join("desired.git").display()
    ));
    let vm = Vm::boot(&image, &git, &options)?;
    let mut shown = 0;
    let accepted = format!("revision {} accepted", &revision[..12]);
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let text = vm.console_text();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("berth: ")).collect();
        for line in &lines[shown..] {
            say(strip_ansi(line.split("berth: ").nth(1).map_or(*line, |rest| rest)).as_str());
        }
        shown = lines.len();
        if text.contains(&accepted) {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(berth_qemu_tests::HarnessError(format!(
                "no revision accepted in time; console: {}",
                vm.console.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Then the pods: wait until none is still being created.
    let settled = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (rc, out) = vm.exec("berth get pods -o json", Duration::from_secs(60))?;
        let pods: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        let starting = pods.iter().any(|p| {
            let s = p["status"].as_str().unwrap_or("Pending");
            s == "Pending" || s == "ContainerCreating" || s.starts_with("Init:")
        });
        if rc == 0 && !pods.is_empty() && !starting {
            break;
        }
        if std::time::Instant::now() > settled {
            say("some pods are still starting; showing them as they are");
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // Endpoints (and the addresses in the saved status) follow one pass
    // after the pods start: give the node up to a minute.
    let ready_by = std::time::Instant::now() + Duration::from_secs(60);
    while berth_qemu_tests::http_get_loopback(host_port).is_err()
        && std::time::Instant::now() < ready_by
    {
        std::thread::sleep(Duration::from_secs(2));
    }
    let (_, status) = vm.exec("berth status", Duration::from_secs(60))?;
    say(&format!(
        "node booted and running revision {} after {:.0} s; `berth status` in the guest says:",
        &revision[..12],
        vm.started.elapsed().as_secs_f64()
    ));
    for line in status.lines() {
        say(&format!("  {line}"));
    }
    // The Service from outside the node: QEMU forwards the host's loopback
    // port to the node port, the node's nftables table spreads it.
    for _ in 0..4 {
        match berth_qemu_tests::http_get_loopback(host_port) {
            Ok(body) => say(&format!("GET http://localhost:{host_port}/ → {body}")),
            Err(e) => say(&format!("GET http://localhost:{host_port}/ failed: {e}")),
        }
    }
    if keep {
        say(&format!(
            "the node keeps running; push to {} and watch {}; Ctrl-C stops it",
            git.work.display(),
            vm.console.display()
        ));
        return vm.follow_reboots(&git, &options);
    }
    say("powering off (make demo ARGS=--keep keeps the node running)");
    vm.poweroff(Duration::from_secs(120))
}

const NODE_PORT: u16 = 30080;

fn say(line: &str) {
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "demo | {line}");
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

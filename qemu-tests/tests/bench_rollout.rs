//! Benchmark, not a check: rollouts under load. Prints the figures that
//! docs/benchmarks.md quotes. `make bench-rollout` runs it; the QEMU tier
//! of `make test` skips it.
//!
//! In one boot: a 3-replica Deployment of busybox httpd with a readiness
//! probe behind a NodePort Service (`maxSurge: 1, maxUnavailable: 0`),
//! while the host sends requests one after another through the forwarded
//! node port. The image changes (to a second tag of the same image, as a
//! retag would give), then an env var. The server leaves at SIGTERM (a
//! shell that traps it as PID 1; busybox httpd as PID 1 would ignore it
//! and hold its stop for the whole grace period, which the network
//! scenario covers). For each rollout: requests sent and
//! failed, the rollout's time (revision accepted → Deployment complete),
//! and each new pod's start-to-ready time from the agent's journal, which
//! the rollout time is compared with (`replicas × start-to-ready`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_qemu_tests::{
    GIT_HOST, GitHost, Hammer, Load, Vm, VmOptions, deployment_status, free_loopback_port, must,
    retry_on_tcg_flake, test_image,
};

const WAIT: Duration = Duration::from_secs(900);
const REPLICAS: u32 = 3;
const NODE_PORT: u16 = 30090;

fn web(image: &str, version: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {REPLICAS}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: main
        image: {image}
        command: [sh, -c, \"mkdir -p /tmp/www; cat /etc/hostname > /tmp/www/index.html; trap 'exit 0' TERM; httpd -f -p 8080 -h /tmp/www & wait\"]
        env: [{{name: VERSION, value: \"{version}\"}}]
        readinessProbe:
          httpGet: {{path: /index.html, port: 8080}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
"
    )
}

#[test]
#[ignore = "benchmark: needs QEMU and the test image (make bench-rollout)"]
fn bench_rollouts_under_load() {
    retry_on_tcg_flake("bench-rollout", scenario);
}

fn web_status(vm: &Vm) -> serde_json::Value {
    deployment_status(vm, "default/web")
}

/// Pushes `yaml`, waits for the rollout to complete; returns the seconds
/// from the revision accepted to complete (as the test saw it, polling),
/// the new template's hash and the revision.
fn roll(vm: &mut Vm, git: &GitHost, yaml: &str, what: &str) -> (f64, String, String) {
    let rev = must(git.push(&[("pods/web.yaml", yaml)], what));
    vm.sh("systemctl reload berth-agent.service");
    let accepted = must(vm.wait_for(&format!("revision {} accepted", &rev[..12]), WAIT));
    let end = Instant::now() + WAIT;
    loop {
        let d = web_status(vm);
        if d["revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && rev.starts_with(r))
            && d["conditions"][0]["reason"] == "NewReplicaSetAvailable"
        {
            let done = vm.started.elapsed();
            return (
                (done - accepted).as_secs_f64(),
                d["templateHash"].as_str().unwrap_or_default().to_string(),
                rev,
            );
        }
        assert!(Instant::now() < end, "{what}: {d}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The agent's journal: each line with its time (seconds since the epoch).
fn journal(vm: &Vm) -> Vec<(f64, String)> {
    vm.sh("journalctl -u berth-agent.service -o short-unix --no-pager")
        .lines()
        .filter_map(|line| {
            let t = line.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((t, line.to_string()))
        })
        .collect()
}

/// The rollout's seconds by the agent's own clock: from the revision
/// accepted to the Deployment logged complete (no polling in it).
fn journal_rollout(vm: &Vm, rev: &str) -> Option<f64> {
    let lines = journal(vm);
    let accepted = lines
        .iter()
        .find(|(_, l)| l.contains(&format!("revision {} accepted", &rev[..12])))?
        .0;
    let complete = lines
        .iter()
        .find(|(t, l)| {
            *t >= accepted && l.contains("Deployment default/web: NewReplicaSetAvailable")
        })?
        .0;
    Some(complete - accepted)
}

/// Where the rest of the rollout's time goes: revision accepted → first
/// new pod's start planned, each new pod ready → the next one's start
/// planned, the last one ready → complete (seconds, from the journal).
fn between_steps(vm: &Vm, rev: &str, hash: &str) -> Vec<f64> {
    let lines = journal(vm);
    let at = |needle: &str| {
        lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    };
    let mut marks = vec![at(&format!("revision {} accepted", &rev[..12]))];
    for i in 0..REPLICAS {
        let pod = format!("web-{hash}-{i}");
        marks.push(at(&format!("plan: start berth-default_{pod}_main.service")));
        marks.push(at(&format!("pod default/{pod} is ready")));
    }
    let accepted = marks[0].unwrap_or_default();
    marks.push(
        lines
            .iter()
            .find(|(t, l)| {
                *t >= accepted && l.contains("Deployment default/web: NewReplicaSetAvailable")
            })
            .map(|(t, _)| *t),
    );
    // (accepted, start0), (ready0, start1), ..., (ready2, complete)
    marks
        .chunks(2)
        .filter_map(|pair| Some(pair.get(1).copied()?? - pair[0]?))
        .collect()
}

/// Each new pod's seconds from the agent's start of it to its container
/// ready, from the journal.
fn start_to_ready(vm: &Vm, hash: &str) -> Vec<f64> {
    let mut starts = BTreeMap::new();
    let mut ready = BTreeMap::new();
    for (t, line) in journal(vm) {
        for i in 0..REPLICAS {
            let pod = format!("web-{hash}-{i}");
            if line.contains(&format!("plan: start berth-default_{pod}_main.service")) {
                starts.entry(i).or_insert(t);
            }
            if line.contains(&format!("pod default/{pod} is ready")) {
                ready.entry(i).or_insert(t);
            }
        }
    }
    (0..REPLICAS)
        .filter_map(|i| Some(ready.get(&i)? - starts.get(&i)?))
        .collect()
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("bench-rollout", "desired.git"));
    must(git.push(&[("pods/web.yaml", &web("busybox:1.37", "1"))], "web"));
    let host_port = must(free_loopback_port());
    let mut options = VmOptions::new("bench-rollout");
    options.esp_config = Some(format!(
        "node:\n  name: bench\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 60s\n"
    ));
    options.host_forwards = vec![(host_port, NODE_PORT)];
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        WAIT,
    ));
    let end = Instant::now() + WAIT;
    while web_status(&vm)["availableReplicas"] != REPLICAS {
        assert!(
            Instant::now() < end,
            "web never came up: {}",
            web_status(&vm)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    // A second tag of the same image, as a retag in a registry would give.
    vm.sh(
        "cd /var/lib/berth/images && sed -i 's|\"docker.io/library/busybox:1.37\": \\(\"[^\"]*\"\\)|\"docker.io/library/busybox:1.37\": \\1, \"docker.io/library/busybox:rollout\": \\1|' refs.json",
    );
    let refs = vm.sh("cat /var/lib/berth/images/refs.json");
    assert!(refs.contains("busybox:rollout"), "{refs}");

    let mut rows = Vec::new();
    for (what, yaml) in [
        (
            "image busybox:1.37 → busybox:rollout",
            web("busybox:rollout", "1"),
        ),
        ("env VERSION 1 → 2", web("busybox:rollout", "2")),
    ] {
        let load = Hammer::start(host_port);
        std::thread::sleep(Duration::from_secs(2));
        let (polled, hash, rev) = roll(&mut vm, &git, &yaml, what);
        let seconds = journal_rollout(&vm, &rev).expect("the rollout in the journal");
        std::thread::sleep(Duration::from_secs(2));
        let Load {
            sent,
            failed,
            answers,
        } = load.finish();
        let each = start_to_ready(&vm, &hash);
        let between = between_steps(&vm, &rev, &hash);
        // Each pass of the rollout, with where its time went.
        for (t, line) in journal(&vm) {
            if line.contains("actions applied") && line.contains(&rev[..12]) {
                println!(
                    "pass at {t:.3}: {}",
                    line.split("berth-agent").last().unwrap_or(&line)
                );
            }
        }
        let mean = each.iter().sum::<f64>() / each.len().max(1) as f64;
        let expected = f64::from(REPLICAS) * mean;
        let row = format!(
            "{what}: {sent} requests, {failed} failed; rollout {seconds:.1} s by the journal ({polled:.1} s polled); start-to-ready per pod {each:.1?} s (mean {mean:.1}); {REPLICAS} × mean = {expected:.1} s; rollout / that = {:.2}; between the steps (accepted → first start, each ready → next start, last ready → complete) {between:.1?} s; answered by {} pods",
            seconds / expected,
            answers.len()
        );
        println!("bench: {row}");
        rows.push(row);
    }
    for row in &rows {
        println!("bench: {row}");
    }
    must(vm.poweroff(Duration::from_secs(120)));
}

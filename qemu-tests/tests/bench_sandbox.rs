//! Benchmark, not a check: where systemd spends a container's start. Boots
//! the test image, starts one pod, then times transient services with each
//! of the container's sandbox settings alone and together
//! (`guest/sandbox-cost.sh`), and prints the pod's own timeline from the
//! journal; then starts many pods (`BERTH_BENCH_SANDBOX_PODS`, 20) with the
//! guest's CPU by command, and times the sandboxed start once more beside
//! them. `make bench-sandbox` runs it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, must, retry_on_tcg_flake, test_image};

const WAIT: Duration = Duration::from_secs(600);
const SCRIPT: &str = include_str!("guest/sandbox-cost.sh");

#[test]
#[ignore = "benchmark: needs QEMU and the test image (make bench-sandbox)"]
fn bench_sandbox_cost_per_setting() {
    retry_on_tcg_flake("bench-sandbox", scenario);
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("bench-sandbox", "desired.git"));
    let pod = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: bench}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: bench}}\n  template:\n    metadata: {labels: {app: bench}}\n    spec:\n      containers:\n      - name: main\n        image: busybox:1.37\n        command: [sleep, \"1000000\"]\n        resources: {requests: {cpu: 10m, memory: 4Mi}, limits: {cpu: 100m, memory: 32Mi}}\n";
    let rev = must(git.push(&[("pods/bench.yaml", pod)], "one pod"));
    let mut options = VmOptions::new("bench-sandbox");
    options.memory_mib = 2048;
    options.esp_config = Some(format!(
        "node:\n  name: bench\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\n"
    ));
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        WAIT,
    ));
    must(vm.wait_for(&format!("revision {}: ", &rev[..12]), WAIT));
    // The first command waits as long as the guest needs to finish its boot.
    let (_, journal) = must(vm.exec(
        "journalctl -o short-unix --no-pager -u berth-agent.service -u 'berth-default_bench-*' -u 'berth*.slice' | tail -n 40",
        WAIT,
    ));
    println!("{journal}");
    must(vm.put_file("/run/sandbox-cost.sh", SCRIPT));
    let runs = std::env::var("BERTH_BENCH_RUNS").unwrap_or_else(|_| "3".into());
    let (rc, out) = must(vm.exec(
        &format!("RUNS={runs} sh /run/sandbox-cost.sh"),
        Duration::from_secs(1800),
    ));
    println!("{out}");
    assert_eq!(rc, 0, "{out}");
    // Where the CPU goes while many pods start: the guest's busy time and
    // each command's, the pass's phases, and the journal's timeline.
    let pods: u32 = std::env::var("BERTH_BENCH_SANDBOX_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let many = pod.replace("replicas: 1", &format!("replicas: {pods}"));
    let applied = must(vm.apply_commit(&git, &[("pods/bench.yaml", &many)], "many pods", WAIT));
    println!(
        "sandbox: {pods} pods: {:.2} s: {}",
        applied.seconds, applied.line
    );
    println!(
        "sandbox: {pods} pods: guest CPU ticks by command: {:?}",
        applied.cpu
    );
    println!(
        "{}",
        vm.sh("journalctl -o short-unix --no-pager --since=-120s _PID=1 + SYSLOG_IDENTIFIER=berth | grep -E 'Starting|Started|Created slice|applied|fetched|Mounted' | tail -n 200")
    );
    // One unit's start again, now beside the many: what each start costs
    // as the node's mount table grows.
    let (rc, out) = must(vm.exec(
        &format!("RUNS={runs} SET=quick sh /run/sandbox-cost.sh"),
        Duration::from_secs(1800),
    ));
    println!("beside {pods} pods:\n{out}");
    assert_eq!(rc, 0, "{out}");
    must(vm.poweroff(Duration::from_secs(120)));
}

//! Benchmark, not a check: how fast the appliance starts 1 and 50 pods,
//! and what the agent costs idle and with 50 pods. Prints the figures that
//! docs/benchmarks.md quotes. `make bench-pods` runs it; the QEMU tier of
//! `make test` skips it.
//!
//! Times come from the agent's journal in the guest: from its
//! "fetched ... at REV" line to its "revision REV: N actions applied" line,
//! which it writes once every start job has finished (a `Type=exec` service
//! is active once its program is executing).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, retry_on_tcg_flake, test_image};

const WAIT: Duration = Duration::from_secs(600);

fn must<T>(r: berth_qemu_tests::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn sh(vm: &Vm, command: &str) -> String {
    let (rc, out) = must(vm.exec(command, Duration::from_secs(120)));
    assert_eq!(rc, 0, "{command}: {out}");
    out
}

fn agent_pid(vm: &Vm) -> String {
    sh(vm, "systemctl show -p MainPID --value berth-agent.service")
        .trim()
        .to_string()
}

fn rss_kib(vm: &Vm) -> u64 {
    let line = sh(vm, &format!("grep VmRSS /proc/{}/status", agent_pid(vm)));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn deployment(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: bench}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: bench}}}}\n  template:\n    metadata: {{labels: {{app: bench}}}}\n    spec:\n      containers:\n      - name: main\n        image: busybox:1.37\n        command: [sleep, \"1000000\"]\n        resources: {{requests: {{cpu: 10m, memory: 4Mi}}}}\n"
    )
}

#[test]
#[ignore = "benchmark: needs QEMU and the test image (make bench-pods)"]
fn bench_pods_start_time_and_agent_cost() {
    retry_on_tcg_flake("bench-pods", scenario);
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("bench-pods", "desired.git"));
    let empty = must(git.push(
        &[(
            "pods/empty.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: empty}\n",
        )],
        "nothing yet",
    ));
    let metrics_port = must(berth_qemu_tests::free_loopback_port());
    let mut options = VmOptions::new("bench-pods");
    options.esp_config = Some(format!(
        "node:\n  name: bench\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\nmetrics:\n  listen: 0.0.0.0:9100\n"
    ));
    options.host_forwards = vec![(metrics_port, 9100)];
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        WAIT,
    ));
    must(vm.wait_for(&format!("revision {} accepted", &empty[..12]), WAIT));
    std::thread::sleep(Duration::from_secs(10));
    let idle_rss = rss_kib(&vm);
    let idle_cpu = vm.agent_cpu_percent(60).0;

    let mut results = Vec::new();
    for replicas in [1u32, 50] {
        let applied = must(vm.apply_commit(
            &git,
            &[("pods/bench.yaml", &deployment(replicas))],
            "bench",
            WAIT,
        ));
        let seconds = applied.seconds;
        println!("bench: {replicas} pod(s): {}", applied.line);
        println!(
            "bench: {replicas} pod(s): guest CPU ticks by command: {:?}",
            applied.cpu
        );
        let running = sh(
            &vm,
            "systemctl list-units --plain --no-legend --state=active 'berth-default_bench-*_main.service' | wc -l",
        );
        assert_eq!(running.trim(), replicas.to_string());
        results.push((replicas, seconds));
        if replicas == 1 {
            // Back to nothing, so the 50 all start new.
            must(vm.apply_commit(
                &git,
                &[(
                    "pods/bench.yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bench}\n",
                )],
                "clear",
                WAIT,
            ));
        }
    }
    std::thread::sleep(Duration::from_secs(10));
    let bare = git.dir.join("desired.git");
    let status_commits = || -> u64 {
        must(git.git(&[
            "--git-dir",
            bare.to_str().unwrap(),
            "rev-list",
            "--count",
            "berth/status/bench",
        ]))
        .parse()
        .unwrap()
    };
    let commits_before = status_commits();
    let busy_rss = rss_kib(&vm);
    let busy_cpu = vm.agent_cpu_percent(60).0;
    let commits_in_window = status_commits() - commits_before;
    let status_bytes = must(git.git(&[
        "--git-dir",
        bare.to_str().unwrap(),
        "cat-file",
        "-s",
        "berth/status/bench:status.yaml",
    ]));
    for (replicas, seconds) in &results {
        println!("bench: commit fetched -> {replicas} pod(s) active: {seconds:.2} s");
    }
    println!(
        "bench: agent idle (no pods): {:.1} MiB resident, {idle_cpu:.2}% CPU over 60 s",
        idle_rss as f64 / 1024.0
    );
    println!(
        "bench: agent managing 50 pods: {:.1} MiB resident, {busy_cpu:.2}% CPU over 60 s",
        busy_rss as f64 / 1024.0
    );
    println!(
        "bench: status.yaml with 50 pods: {status_bytes} bytes; {commits_in_window} status commits in 60 s of steady state (heartbeat 5 min)"
    );
    metrics_figures(&vm, metrics_port);
    must(vm.poweroff(Duration::from_secs(120)));
}

/// `GET /metrics` through the forward: bytes and wall time.
fn scrape(port: u16) -> Option<(usize, Duration)> {
    let (head, body, took) = berth_qemu_tests::metrics_get_loopback(port).ok()?;
    head.starts_with("HTTP/1.1 200")
        .then_some((body.len(), took))
}

/// The metrics endpoint with 50 pods: one scrape's size and latency, and
/// what a scrape storm (8 clients without pause for 30 s) costs the agent.
fn metrics_figures(vm: &Vm, port: u16) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let (bytes, took) = scrape(port).expect("a scrape");
        size = bytes;
        times.push(took.as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(1100));
    }
    times.sort_by(f64::total_cmp);
    let cpu_quiet = vm.agent_cpu_percent(30).0;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut served = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if scrape(port).is_some() {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    let cpu_storm = vm.agent_cpu_percent(30).0;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served: u64 = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    println!(
        "bench: metrics with 50 pods: {size} bytes; scrape through the forward min {:.0} / median {:.0} / max {:.0} ms (20 scrapes, 1.1 s apart)",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    println!(
        "bench: metrics scrape storm (8 clients, no pause): {served} scrapes served in about 30 s; agent CPU {cpu_storm:.2}% against {cpu_quiet:.2}% without"
    );
}

//! Benchmark, not a check: Berth against Podman's `kube play`, the same
//! YAML in the same guest in the same boot (`make bench-anchors`). For 1,
//! 10 and 50 pods of one busybox container each (requests and limits set,
//! a Service in front of them):
//!
//! - Berth: from the agent's "fetched ... at REV" journal line to its
//!   "revision REV: N actions applied" (every start job finished);
//! - Podman (Berth's agent stopped, its pods gone): the wall time of
//!   `podman kube play`, which returns once the pods run;
//! - for both: processes and memory added beside the containers' own
//!   (`guest/processes.sh`), the supervisor's CPU while idle (the agent;
//!   the `conmon`s; `guest/cpu-ticks.sh`), and the time to remove it all.
//!
//! Prints the table and writes it into `docs/benchmarks.md` between the
//! markers of [`berth_qemu_tests::anchors`]. Needs the bench image
//! (`image/build.sh --bench`, which adds Debian's podman to the test image).
//! `BERTH_BENCH_IDLE` sets the idle window (60 s), `BERTH_BENCH_PODS` the
//! pod counts (`1,10,50`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use berth_qemu_tests::anchors::{self, Run, Setting, Tool};
use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, bench_image, must, retry_on_tcg_flake};

const WAIT: Duration = Duration::from_secs(900);
const PROCESSES: &str = include_str!("guest/processes.sh");
const CPU_TICKS: &str = include_str!("guest/cpu-ticks.sh");

/// N Pods and a Service. The command carries the marker the process
/// listing recognises, and ends on SIGTERM (a shell as PID 1 of its
/// namespace traps it; `sleep` alone would ignore it and wait out the
/// grace period under either tool).
fn pods_yaml(n: u32) -> String {
    let mut out = String::new();
    for i in 0..n {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bench-{i}\n  labels: {{app: bench}}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"trap 'exit 0' TERM; sleep 1000042 & wait\"]\n    resources:\n      requests: {{cpu: 10m, memory: 8Mi}}\n      limits: {{cpu: 100m, memory: 32Mi}}\n---\n"
        ));
    }
    out.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: bench}\nspec:\n  selector: {app: bench}\n  ports: [{port: 80}]\n");
    out
}

/// Writes `text` to `path` in the guest.
fn put(vm: &Vm, path: &str, text: &str) {
    must(vm.put_file(path, text));
}

fn sh_long(vm: &Vm, command: &str) -> String {
    let (rc, out) = must(vm.exec(command, WAIT));
    assert_eq!(rc, 0, "{command}: {out}");
    out
}

fn processes(vm: &Vm) -> Vec<anchors::Process> {
    anchors::parse_processes(&sh_long(vm, "sh /run/processes.sh")).unwrap_or_else(|e| panic!("{e}"))
}

/// The named processes' CPU over the idle window, in percent of one CPU.
fn idle_cpu(vm: &Vm, names: &str, seconds: u64) -> f64 {
    let ticks = || anchors::parse_ticks(&vm.sh(&format!("sh /run/cpu-ticks.sh {names}"))).unwrap();
    let before = ticks();
    std::thread::sleep(Duration::from_secs(seconds));
    let after = ticks();
    after.saturating_sub(before) as f64 / seconds as f64
}

/// What `tool` added once `n` pods settle (10 s): the new processes named
/// for the record, and every container's two processes checked running.
fn settled_cost(vm: &Vm, tool: &str, before: &[anchors::Process], n: u32) -> anchors::Added {
    std::thread::sleep(Duration::from_secs(10));
    let after = processes(vm);
    println!(
        "bench-anchors: {tool}, {n} pods: new processes {:?}",
        anchors::new_processes(before, &after)
    );
    let added = anchors::added(before, &after, n);
    assert_eq!(
        added.workload,
        2 * n as usize,
        "{tool}: every container's two processes run"
    );
    added
}

/// Seconds a podman command takes in the guest, its output shown if it
/// fails; its streams away from the channel's pipe.
fn podman_timed(vm: &Vm, command: &str, log: &str) -> f64 {
    let took = sh_long(
        vm,
        &format!(
            "s=$(date +%s%N); {command} </dev/null >{log} 2>&1 || {{ cat {log}; exit 1; }}; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))"
        ),
    );
    took.trim().lines().last().unwrap().parse::<f64>().unwrap() / 1000.0
}

fn count(vm: &Vm, command: &str) -> u32 {
    vm.sh(command)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{command}: not a count"))
}

#[test]
#[ignore = "benchmark: needs QEMU and the bench image (make bench-anchors)"]
fn bench_berth_against_podman_kube_play() {
    retry_on_tcg_flake("bench-anchors", scenario);
}

fn scenario() {
    let image = must(bench_image());
    let idle: u64 = std::env::var("BERTH_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let counts: Vec<u32> = std::env::var("BERTH_BENCH_PODS")
        .unwrap_or_else(|_| "1,10,50".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BERTH_BENCH_PODS: pod counts, comma-separated")
        })
        .collect();
    let git = must(GitHost::fresh("bench-anchors", "desired.git"));
    let nothing = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bench}\n";
    let empty = must(git.push(&[("pods/bench.yaml", nothing)], "nothing yet"));
    let mut options = VmOptions::new("bench-anchors");
    options.memory_mib = 2048;
    options.disk_bytes = 4 << 30;
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
    must(vm.wait_for(&format!("revision {} accepted", &empty[..12]), WAIT));
    // Measured on a settled node: the boot's own units done, and the
    // helpers they started idle again.
    let _ = vm.exec("systemctl is-system-running --wait", WAIT);
    put(&vm, "/run/processes.sh", PROCESSES);
    put(&vm, "/run/cpu-ticks.sh", CPU_TICKS);
    std::thread::sleep(Duration::from_secs(30));

    let mut runs = Vec::new();
    for &n in &counts {
        let before = processes(&vm);
        let applied =
            must(vm.apply_commit(&git, &[("pods/bench.yaml", &pods_yaml(n))], "bench", WAIT));
        let start_s = applied.seconds;
        println!("bench-anchors: Berth, {n} pods: {}", applied.line);
        println!(
            "bench-anchors: Berth, {n} pods: guest CPU ticks by command: {:?}",
            applied.cpu
        );
        if n <= 10 {
            // The start's timeline: the agent's lines and systemd's.
            println!(
                "{}",
                vm.sh("journalctl -o short-unix --no-pager --since=-120s _PID=1 + SYSLOG_IDENTIFIER=berth | grep -E 'fetched|Created slice|Starting berth|Started berth|applied' | tail -n 40")
            );
        }
        let active = count(
            &vm,
            "systemctl list-units --plain --no-legend --state=active 'berth-default_bench-*_main.service' | wc -l",
        );
        assert_eq!(active, n, "Berth: containers active");
        let added = settled_cost(&vm, "Berth", &before, n);
        let idle_cpu_percent = idle_cpu(&vm, "berth", idle);
        let remove_s =
            must(vm.apply_commit(&git, &[("pods/bench.yaml", nothing)], "clear", WAIT)).seconds;
        let left = count(
            &vm,
            "systemctl list-units --all --plain --no-legend 'berth-default_bench-*' | wc -l",
        );
        assert_eq!(left, 0, "Berth: everything removed");
        let run = Run {
            tool: Tool::Berth,
            pods: n,
            start_s,
            added,
            idle_cpu_percent,
            remove_s,
        };
        println!("bench-anchors: {run:?}");
        runs.push(run);
    }

    // Podman alone: Berth's agent stopped (its pods are gone already).
    // Every podman command runs with its standard streams away from the
    // test channel's pipe: a helper it leaves running (conmon, the DNS
    // server of kube play's network) would otherwise hold the pipe open
    // (the channel itself keeps its port away from every command).
    // `kube play` runs in a scope of its own: the channel's service is
    // restarted after every command, which would kill the conmons and
    // containers left in its cgroup.
    println!("bench-anchors: stopping Berth's agent");
    sh_long(&vm, "timeout 180 systemctl stop berth-agent.service");
    println!("bench-anchors: loading busybox into podman");
    sh_long(
        &vm,
        "loaded=$(timeout 300 podman load -q -i /usr/share/berth/images/busybox.tar </dev/null 2>/dev/null | sed -n 's/^Loaded image: //p' | tail -n1) && podman tag \"$loaded\" docker.io/library/busybox:1.37 </dev/null && podman images --format '{{.Repository}}:{{.Tag}}'",
    );
    // The pause image is built on the first play: warm it, unmeasured.
    println!("bench-anchors: warming podman's pause image");
    put(&vm, "/run/bench-warm.yaml", &pods_yaml(1));
    sh_long(
        &vm,
        "timeout 600 systemd-run --scope --quiet -- podman kube play /run/bench-warm.yaml </dev/null >/tmp/podman-warm.log 2>&1 && podman kube down /run/bench-warm.yaml </dev/null >>/tmp/podman-warm.log 2>&1 || { cat /tmp/podman-warm.log; exit 1; }",
    );
    std::thread::sleep(Duration::from_secs(10));
    for &n in &counts {
        let file = format!("/run/bench-{n}.yaml");
        put(&vm, &file, &pods_yaml(n));
        let before = processes(&vm);
        let start_s = podman_timed(
            &vm,
            &format!("systemd-run --scope --quiet -- podman kube play {file}"),
            "/tmp/podman-play.log",
        );
        let running = count(
            &vm,
            "podman ps --format '{{.Names}}' | grep -c -- '-main$' || true",
        );
        assert_eq!(running, n, "Podman: containers running");
        let added = settled_cost(&vm, "Podman", &before, n);
        let idle_cpu_percent = idle_cpu(&vm, "conmon podman", idle);
        let remove_s = podman_timed(
            &vm,
            &format!("podman kube down {file}"),
            "/tmp/podman-down.log",
        );
        assert_eq!(
            count(&vm, "podman ps -a -q | wc -l"),
            0,
            "Podman: everything removed"
        );
        let run = Run {
            tool: Tool::Podman,
            pods: n,
            start_s,
            added,
            idle_cpu_percent,
            remove_s,
        };
        println!("bench-anchors: {run:?}");
        runs.push(run);
        std::thread::sleep(Duration::from_secs(5));
    }

    let setting = Setting {
        date: String::from_utf8_lossy(
            &std::process::Command::new("date")
                .arg("-u")
                .arg("+%F")
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
        .to_string(),
        host: host_description(),
        qemu: String::from_utf8_lossy(
            &std::process::Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .unwrap()
                .stdout,
        )
        .lines()
        .next()
        .unwrap_or("QEMU")
        .to_string()
            + " (TCG, 2 vCPUs, 2 GiB)",
        podman: vm.sh("podman --version").trim().to_string(),
        idle_seconds: idle,
    };
    let table = anchors::render(&setting, &runs);
    println!("\n{table}");
    let doc = berth_qemu_tests::repo_root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_default();
    std::fs::write(&doc, anchors::replace_section(&text, &table))
        .expect("docs/benchmarks.md written");
    println!("bench-anchors: written to {}", doc.display());
    must(vm.poweroff(Duration::from_secs(120)));
}

/// "2 cores of <model>, Debian 12" from the host's own files.
fn host_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("PRETTY_NAME=")
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores of {model}, {os}")
}

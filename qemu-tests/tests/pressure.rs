//! Node memory pressure on the real image: two pods take memory without
//! bound while a Guaranteed pod works. The node evicts in the kubelet's
//! order before the kernel's OOM killer acts: the BestEffort pod first,
//! then the Burstable pod over its request; the Guaranteed pod and the
//! agent are untouched, and the status branch says who went and why.
//! Prints the time from the watch seeing memory short to the pod's cgroup
//! gone, which docs/benchmarks.md quotes.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use berth_qemu_tests::{
    GIT_HOST, GitHost, Vm, VmOptions, free_loopback_port, metrics_get_loopback, must,
    retry_on_tcg_flake, test_image,
};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(240);
/// The hard threshold the scenario's node runs with: well under what the
/// 1 GiB guest has free at rest (checked), so only the hogs cross it.
const THRESHOLD_MIB: u64 = 300;

fn pod(name: &str, resources: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 30\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"{command}\"]\n    resources: {resources}\n"
    )
}

/// Memory taken at `mib` MiB per 0.2 s, never given back (tail keeps a
/// line that never ends).
fn hog(mib: u64) -> String {
    format!(
        "while :; do head -c {} /dev/zero; sleep 0.2; done | tail",
        mib << 20
    )
}

#[test]
#[ignore = "needs QEMU and the test image (scripts/test.sh runs it)"]
fn memory_pressure_evicts_besteffort_then_burstable_and_spares_guaranteed() {
    retry_on_tcg_flake("pressure", scenario);
}

fn available_mib(vm: &Vm) -> u64 {
    let meminfo = vm.sh("cat /proc/meminfo");
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kib("MemFree:") + kib("Inactive(file):")) / 1024
}

/// The metrics endpoint's port in the guest (`metrics.listen`).
const METRICS_PORT: u16 = 9100;

/// `GET /metrics` through the host forward, timed, and parsed by the
/// Prometheus project's parser (scripts/parse_metrics.py).
fn scrape(port: u16) -> (serde_json::Value, usize, Duration) {
    use std::io::Write;
    let (head, body, took) = metrics_get_loopback(port).expect("the metrics forward");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/parse_metrics.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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
        "the Prometheus parser refused the text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        body.len(),
        took,
    )
}

fn sample(parsed: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parsed["samples"].as_array()?.iter().find_map(|s| {
        (s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v)).then(|| s[2].as_f64())?
    })
}

/// The metrics of the Guaranteed pod, scraped from the host, against what
/// its cgroups say in the guest; pods refused on the endpoint's port.
fn metrics_of_a_known_pod(vm: &Vm, port: u16) {
    let cg = vm
        .sh("systemctl show -p ControlGroup --value berth-default_gold_main.service")
        .trim()
        .to_string();
    let cpu_seconds = || -> f64 {
        vm.sh(&format!("grep usage_usec /sys/fs/cgroup{cg}/cpu.stat"))
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
            .expect("cpu.stat")
            / 1e6
    };
    let cpu_before = cpu_seconds();
    let gold = [
        ("namespace", "default"),
        ("pod", "gold"),
        ("container", "main"),
    ];
    // The endpoint shows what the last pass saw: the pass that found gold
    // running may still be reporting.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let (m, bytes, took) = loop {
        let (m, bytes, took) = scrape(port);
        if sample(&m, "kube_pod_container_status_running", &gold) == Some(1.0)
            || std::time::Instant::now() > end
        {
            break (m, bytes, took);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    println!("metrics scrape through the forward: {bytes} bytes in {took:.2?}");
    let cpu = sample(&m, "container_cpu_usage_seconds_total", &gold).expect("gold's CPU");
    let cpu_after = cpu_seconds();
    assert!(
        cpu_before <= cpu && cpu <= cpu_after,
        "CPU {cpu} s not between the cgroup's {cpu_before} and {cpu_after}"
    );
    assert_eq!(
        sample(
            &m,
            "container_cpu_usage_seconds_total",
            &[("pod", "gold"), ("id", cg.as_str())]
        ),
        Some(cpu),
        "the id label is the container's cgroup"
    );
    let working = sample(&m, "container_memory_working_set_bytes", &gold).expect("working set");
    assert!(working > 0.0 && working < (64u64 << 20) as f64, "{working}");
    let pod = [("namespace", "default"), ("pod", "gold"), ("container", "")];
    assert_eq!(
        sample(&m, "container_spec_memory_limit_bytes", &pod),
        Some((64u64 << 20) as f64),
        "the pod's limit"
    );
    assert_eq!(
        sample(&m, "kube_pod_container_status_restarts_total", &gold),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "kube_pod_container_status_running", &gold),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "kube_pod_status_phase",
            &[("pod", "gold"), ("phase", "Running")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "kube_pod_status_qos_class",
            &[("pod", "gold"), ("qos_class", "Guaranteed")]
        ),
        Some(1.0)
    );
    assert!(sample(&m, "berth_passes_total", &[("outcome", "applied")]).is_some_and(|n| n >= 1.0));
    assert!(sample(&m, "berth_pass_duration_seconds_count", &[]).is_some_and(|n| n >= 1.0));
    assert!(
        sample(&m, "berth_git_fetches_total", &[("result", "success")]).is_some_and(|n| n >= 1.0)
    );
    let applied = vm.sh("berth status -o json");
    let revision = m["samples"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s[0] == "berth_revision_info" && s[1]["state"] == "applied")
        })
        .map(|s| s[1]["revision"].as_str().unwrap_or("").to_string())
        .expect("berth_revision_info");
    assert!(
        revision.len() == 40 && applied.contains(&revision),
        "{revision} not in {applied:.300}"
    );
    // The node itself reaches the endpoint on the bridge; the pod is reset.
    let own = vm.sh("busybox wget -q -T 5 -O - http://10.88.0.1:9100/metrics | grep -c '^kube_pod_status_phase' || true");
    assert!(own.trim().parse::<u32>().is_ok_and(|n| n >= 5), "{own}");
    let from_pod = vm.sh("ip netns exec default_gold busybox wget -q -T 5 -O - http://10.88.0.1:9100/metrics 2>&1; echo rc=$?");
    assert!(
        from_pod.contains("rc=1") && from_pod.contains("refused"),
        "a pod reached the metrics endpoint: {from_pod:.300}"
    );
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("pressure", "desired.git"));
    must(git.push(
        &[(
            "pods/gold.yaml",
            // Leaves at once when asked (the poweroff at the end would
            // otherwise wait its 30 s grace period: a `sleep` that is PID 1
            // of its namespace ignores SIGTERM).
            &pod(
                "gold",
                "{limits: {cpu: 200m, memory: 64Mi}}",
                "trap 'exit 0' TERM; sleep 1000000 & wait",
            ),
        )],
        "a Guaranteed pod",
    ));
    let metrics_port = must(free_loopback_port());
    let mut options = VmOptions::new("pressure");
    options.esp_config = Some(format!(
        "node:\n  name: pressure\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\neviction:\n  hard: {{memory.available: {THRESHOLD_MIB}Mi}}\nmetrics:\n  listen: 0.0.0.0:{METRICS_PORT}\n"
    ));
    options.host_forwards = vec![(metrics_port, METRICS_PORT)];
    let (vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    vm.pods_until("gold running", SETTLE, |p| {
        p.get("gold").is_some_and(|g| g["status"] == "Running")
    });
    let at_rest = available_mib(&vm);
    println!("memory.available at rest: {at_rest} MiB (threshold {THRESHOLD_MIB} MiB)");
    assert!(
        at_rest > THRESHOLD_MIB + 150,
        "the guest has too little memory free at rest for this scenario: {at_rest} MiB"
    );
    // (What the memory watch costs the agent at rest is `make
    // bench-pods`' idle figure: the watch always runs.)
    metrics_of_a_known_pod(&vm, metrics_port);
    let gold_invocation =
        vm.sh("systemctl show -p InvocationID --value berth-default_gold_main.service");
    let agent_pid = vm.sh("systemctl show -p MainPID --value berth-agent.service");
    let since = vm.sh("date +%s").trim().to_string();

    // The hogs: BestEffort at about 50 MiB/s, Burstable (requests 16Mi,
    // no limit) at about 10 MiB/s.
    must(git.push(
        &[
            ("pods/hog.yaml", &pod("hog", "{}", &hog(10))),
            (
                "pods/burst.yaml",
                &pod("burst", "{requests: {memory: 16Mi}}", &hog(2)),
            ),
        ],
        "two pods that take memory without bound",
    ));
    vm.sh("systemctl reload berth-agent.service");
    let pods = vm.pods_until("both hogs evicted", SETTLE, |p| {
        ["hog", "burst"]
            .iter()
            .all(|n| p.get(*n).is_some_and(|x| x["status"] == "Evicted"))
    });
    println!("{}", vm.sh("berth get pods"));
    println!("{}", vm.sh("berth get events"));
    for name in ["hog", "burst"] {
        let text = pods[name].to_string();
        assert!(
            text.contains("The node was low on resource: memory"),
            "{name}: {text}"
        );
        assert_eq!(pods[name]["phase"], "Failed", "{text}");
    }
    // In the kubelet's order: the BestEffort pod first.
    let journal = vm.sh(&format!(
        "journalctl -u berth-agent.service -o short-unix --no-pager --since @{since}"
    ));
    let at = |needle: &str| -> Option<(usize, f64)> {
        journal.lines().enumerate().find_map(|(i, l)| {
            l.contains(needle)
                .then(|| Some((i, l.split_whitespace().next()?.parse().ok()?)))
                .flatten()
        })
    };
    let (hog_line, hog_at) = at("pod default/hog evicted").expect("hog evicted in the journal");
    let (burst_line, _) = at("pod default/burst evicted").expect("burst evicted in the journal");
    assert!(hog_line < burst_line, "{journal}");
    // The kernel's OOM killer never had to act, and nothing else moved.
    let kernel = vm.sh("journalctl -k --no-pager | grep -c 'Out of memory' || true");
    assert_eq!(
        kernel.trim(),
        "0",
        "{}",
        vm.sh("journalctl -k --no-pager | tail -40")
    );
    assert_eq!(
        vm.sh("systemctl show -p InvocationID --value berth-default_gold_main.service"),
        gold_invocation,
        "the Guaranteed pod was restarted"
    );
    assert_eq!(pods["gold"]["status"], "Running");
    assert_eq!(
        vm.sh("systemctl show -p MainPID --value berth-agent.service"),
        agent_pid,
        "the agent was restarted"
    );
    // Not started again while evicted.
    assert_eq!(
        vm.sh("systemctl list-units --all --plain --no-legend 'berth-default_hog*' 'berth-default_burst*'")
            .trim(),
        ""
    );

    // The watch's first sight of the shortage → the hog's cgroup gone.
    let (_, seen_at) = at("is under its eviction threshold").expect("the watch saw it");
    let gone_at = journal
        .lines()
        .skip(hog_line)
        .find(|l| l.contains("actions applied"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .expect("the eviction's pass applied");
    println!(
        "bench: memory short (watch) → hog evicted (planned) {:.2} s → its cgroup gone (pass applied) {:.2} s",
        hog_at - seen_at,
        gone_at - seen_at
    );

    // On the status branch: both evicted, with the reason.
    common::await_status_branch(&git, "pressure", "the evictions", SETTLE, |d| {
        let evicted: BTreeMap<&str, String> = d
            .pods
            .iter()
            .filter(|p| p.status == "Evicted")
            .map(|p| (p.name.as_str(), p.messages.join(" ")))
            .collect();
        ["hog", "burst"].iter().all(|n| {
            evicted
                .get(n)
                .is_some_and(|m| m.contains("low on resource: memory"))
        }) && ["Pod/default/hog", "Pod/default/burst"].iter().all(|o| {
            d.events
                .get(*o)
                .is_some_and(|e| e.iter().any(|e| e.reason == "Evicted"))
        })
    });
    a_pod_filling_var_is_evicted(&vm, &git, &gold_invocation);
    must(vm.poweroff(Duration::from_secs(120)));
}

/// A pod writing 400 MiB into its writable layer under a
/// `nodefs.available` threshold 200 MiB below what `/var` has free: the
/// node (with no unused image to reclaim) evicts it for ephemeral-storage,
/// its layer goes, and the Guaranteed pod is untouched.
fn a_pod_filling_var_is_evicted(vm: &Vm, git: &GitHost, gold_invocation: &str) {
    let free_mib: u64 = vm
        .sh("df -m --output=avail /var/lib/berth | tail -1")
        .trim()
        .parse()
        .expect("df");
    assert!(
        free_mib > 700,
        "/var has too little room for this check: {free_mib} MiB"
    );
    let threshold = free_mib - 200;
    let config = format!(
        "node:\n  name: pressure\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\neviction:\n  hard: {{memory.available: {THRESHOLD_MIB}Mi, nodefs.available: {threshold}Mi}}\nmetrics:\n  listen: 0.0.0.0:{METRICS_PORT}\n"
    );
    let encoded = {
        use std::io::Write;
        let mut child = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("base64");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    vm.sh(&format!(
        "mount -o remount,rw /efi && echo {encoded} | base64 -d > /efi/berth/config.yaml && mount -o remount,ro /efi"
    ));
    let since = vm.sh("date +%s").trim().to_string();
    must(git.push(
        &[(
            "pods/filler.yaml",
            &pod(
                "filler",
                "{}",
                "dd if=/dev/zero of=/fill bs=1M count=400; exec sleep 1000000",
            ),
        )],
        "a pod that fills /var",
    ));
    vm.sh("systemctl reload berth-agent.service");
    let pods = vm.pods_until("filler evicted", SETTLE, |p| {
        p.get("filler").is_some_and(|x| x["status"] == "Evicted")
    });
    let text = pods["filler"].to_string();
    assert!(
        text.contains("The node was low on resource: ephemeral-storage"),
        "{text}"
    );
    let journal = vm.sh(&format!(
        "journalctl -u berth-agent.service -o cat --no-pager --since @{since} | grep -E 'nodefs.available|evicted' || true"
    ));
    println!("{journal}");
    assert!(
        journal.contains("nodefs.available") && journal.contains("is under its eviction threshold"),
        "the watch did not see /var short: {journal}"
    );
    assert_eq!(
        vm.sh("systemctl show -p InvocationID --value berth-default_gold_main.service"),
        gold_invocation,
        "the Guaranteed pod was restarted"
    );
    // Its layer is gone: /var has its room back.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now_free: u64 = vm
            .sh("df -m --output=avail /var/lib/berth | tail -1")
            .trim()
            .parse()
            .expect("df");
        if now_free > threshold {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "/var did not get its room back: {now_free} MiB free"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

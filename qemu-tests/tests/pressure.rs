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

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, must, retry_on_tcg_flake, test_image};

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

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("pressure", "desired.git"));
    must(git.push(
        &[(
            "pods/gold.yaml",
            &pod(
                "gold",
                "{limits: {cpu: 200m, memory: 64Mi}}",
                "exec sleep 1000000",
            ),
        )],
        "a Guaranteed pod",
    ));
    let mut options = VmOptions::new("pressure");
    options.esp_config = Some(format!(
        "node:\n  name: pressure\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\neviction:\n  hard: {{memory.available: {THRESHOLD_MIB}Mi}}\n"
    ));
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
    // The agent at rest with the memory watch (250 ms) running: a figure
    // for docs/benchmarks.md, set against `make bench-pods`' idle CPU.
    std::thread::sleep(Duration::from_secs(10));
    let (idle_cpu, _) = vm.agent_cpu_percent(30);
    println!("bench: agent CPU at rest with the pressure watch, 1 pod: {idle_cpu:.2} % over 30 s");
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
    must(vm.poweroff(Duration::from_secs(120)));
}

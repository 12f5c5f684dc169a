//! Status and drift back into Git, on the real appliance: the node pushes
//! `berth/status/<node>` to the host's Git daemon; a `systemctl
//! set-property` on a pod's unit becomes a `berth/drift/<node>` branch whose
//! diff changes the memory limit in the manifest; merging that branch makes
//! the node adopt it with no further drift; a pod with the `heal` policy has
//! its property put back and the heal recorded; the status branch shows a
//! crashing container's restart count. Prints the figures
//! docs/benchmarks.md quotes. Run by `scripts/test.sh` with `--ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_agent::report::NodeStatusDoc;
use berth_qemu_tests::{
    GIT_HOST, GitHost, Vm, VmOptions, repo_root, retry_on_tcg_flake, test_image,
};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(180);
const NODE: &str = "drifty";

fn must<T>(r: berth_qemu_tests::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A pod of one busybox container. Its `sleep`, PID 1 of its namespace,
/// ignores SIGTERM: a grace period of 3 s keeps the poweroff from waiting
/// the default 30.
fn pod(name: &str, annotations: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{annotations}spec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [{command}]\n    resources:\n      limits:\n        memory: 64Mi   # reviewed in PR 12\n"
    )
}

fn sh(vm: &Vm, command: &str) -> String {
    let (rc, out) = must(vm.exec(command, Duration::from_secs(60)));
    assert_eq!(rc, 0, "{command}: {out}");
    out
}

fn unit(name: &str) -> String {
    format!("berth-default_{name}_main.service")
}

fn bare(git: &GitHost) -> PathBuf {
    git.dir.join("desired.git")
}

/// A file on a branch of the host's bare repository, if the branch exists.
fn branch_file(git: &GitHost, branch: &str, file: &str) -> Option<String> {
    berth_git::publish::read_branch_file(&bare(git), branch, file)
        .unwrap()
        .and_then(|f| f.content)
        .map(|b| String::from_utf8(b).unwrap())
}

fn status(git: &GitHost) -> Option<NodeStatusDoc> {
    branch_file(git, &format!("berth/status/{NODE}"), "status.yaml")
        .map(|t| NodeStatusDoc::from_yaml(&t).unwrap())
}

/// Polls every 500 ms until `done` gives a value.
fn until<T>(what: &str, vm: &Vm, timeout: Duration, mut done: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {timeout:?}; console: {}",
            vm.console.display()
        );
        // Some polls run a command in the guest: under TCG each is a few
        // hundred milliseconds of work for it.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn memory_max(vm: &Vm, name: &str) -> u64 {
    // Bounded, and if PID 1 does not answer, what the guest is doing is
    // shown instead of a test channel that went quiet.
    let out = sh(
        vm,
        &format!(
            "timeout 20 systemctl show -p MemoryMax --value {} || {{ echo SYSTEMCTL-HUNG; ps -eo pid,stat,wchan:30,etime,cmd; cat /proc/1/stack; }}",
            unit(name)
        ),
    );
    assert!(
        !out.contains("SYSTEMCTL-HUNG"),
        "systemctl show did not answer:\n{out}"
    );
    out.trim().parse().unwrap()
}

/// The host's `berth` binary (scripts/test.sh builds it before this tier).
fn berth() -> PathBuf {
    let release = repo_root().join("target/release/berth");
    assert!(
        release.exists(),
        "{} is missing: run `cargo build --release` (make test does)",
        release.display()
    );
    release
}

fn berth_cli(args: &[&str], repo: &Path) -> String {
    let out = Command::new(berth())
        .args(args)
        .arg("--from-git")
        .arg(repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn drift_becomes_a_branch_that_merging_adopts_and_status_reaches_git() {
    retry_on_tcg_flake("drift", scenario);
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("drift", "desired.git"));
    must(git.push(
        &[
            ("pods/web.yaml", &pod("web", "", "sleep, \"1000000\"")),
            (
                "pods/healme.yaml",
                &pod(
                    "healme",
                    "  annotations:\n    berth.dev/drift-policy: heal\n",
                    "sleep, \"1000000\"",
                ),
            ),
            ("pods/crash.yaml", &pod("crash", "", "sh, -c, \"exit 1\"")),
        ],
        "three pods",
    ));
    let mut options = VmOptions::new("drift");
    options.esp_config = Some(format!(
        "node:\n  name: {NODE}\ngit:\n  url: git://{GIT_HOST}/desired.git\n  branch: main\n  path: pods\n  pollInterval: 5s\nstatus:\n  heartbeat: 30s\ndrift:\n  policy: report\n"
    ));
    let (vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));

    // The status branch appears with the pods running.
    let doc = until(
        "status branch with web and healme running",
        &vm,
        SETTLE,
        || {
            status(&git).filter(|d| {
                ["web", "healme"]
                    .iter()
                    .all(|n| d.pods.iter().any(|p| p.name == *n && p.status == "Running"))
            })
        },
    );
    assert_eq!(doc.node.name, NODE);
    assert!(
        doc.node
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True"),
        "{:?}",
        doc.node.conditions
    );
    assert_eq!(doc.drift.count, 0);
    let web_invocation = sh(
        &vm,
        &format!("systemctl show -p InvocationID --value {}", unit("web")),
    );

    // Someone changes the memory limit behind Berth's back.
    sh(
        &vm,
        &format!(
            "systemctl set-property --runtime {} MemoryMax=100M",
            unit("web")
        ),
    );
    let changed = Instant::now();
    let manifest = until("drift branch pushed", &vm, SETTLE, || {
        branch_file(&git, &format!("berth/drift/{NODE}"), "pods/web.yaml")
    });
    let to_branch = changed.elapsed();
    println!(
        "set-property to drift branch on the Git server: {:.1} s (poll interval 5 s)",
        to_branch.as_secs_f64()
    );
    assert!(
        manifest.contains("        memory: 100Mi   # reviewed in PR 12\n"),
        "{manifest}"
    );
    let diff = must(git.git(&[
        "--git-dir",
        bare(&git).to_str().unwrap(),
        "diff",
        "--stat",
        "main",
        &format!("berth/drift/{NODE}"),
    ]));
    println!("{diff}");
    assert!(
        diff.contains("pods/web.yaml") && diff.contains(&format!("drift/{NODE}/DRIFT.md")),
        "the diff is the drift: {diff}"
    );
    let report = berth_cli(&["drift", "--node", NODE], &bare(&git));
    println!("{report}");
    assert!(
        report.contains("| Pod/default/web | main | MemoryMax | 64Mi | 100Mi |"),
        "{report}"
    );
    assert_eq!(memory_max(&vm, "web"), 100 << 20, "policy report leaves it");

    // A reviewer merges the drift branch: the node adopts it.
    must(git.git(&["fetch", "-q", "origin"]));
    must(git.git(&[
        "merge",
        "-q",
        "--ff-only",
        &format!("origin/berth/drift/{NODE}"),
    ]));
    must(git.git(&["push", "-q", "origin", "HEAD:main"]));
    let merged = must(git.git(&["rev-parse", "HEAD"]));
    let doc = until("merge applied, drift gone", &vm, SETTLE, || {
        status(&git).filter(|d| {
            d.revisions
                .applied
                .as_ref()
                .is_some_and(|r| r.revision == merged)
                && d.drift.count == 0
        })
    });
    assert!(doc.errors.is_empty(), "{:?}", doc.errors);
    until("drift branch removed", &vm, SETTLE, || {
        branch_file(&git, &format!("berth/drift/{NODE}"), "pods/web.yaml")
            .is_none()
            .then_some(())
    });
    assert_eq!(memory_max(&vm, "web"), 100 << 20, "adopted");
    assert_eq!(
        sh(
            &vm,
            &format!("systemctl show -p InvocationID --value {}", unit("web"))
        ),
        web_invocation,
        "adopting restarted nothing"
    );
    // And it stays that way over further passes.
    std::thread::sleep(Duration::from_secs(12));
    let state = sh(&vm, "berth status -o json");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["agent"]["drift"], serde_json::Value::Null, "{state}");

    // A pod whose policy is heal gets its property back, and it is recorded.
    sh(
        &vm,
        &format!(
            "systemctl set-property --runtime {} MemoryMax=100M",
            unit("healme")
        ),
    );
    until("healme healed", &vm, SETTLE, || {
        (memory_max(&vm, "healme") == 64 << 20).then_some(())
    });
    let doc = until("heal recorded on the status branch", &vm, SETTLE, || {
        status(&git).filter(|d| {
            d.drift
                .healed
                .iter()
                .any(|h| h.unit == unit("healme") && h.field == "MemoryMax")
        })
    });
    let healed = doc
        .drift
        .healed
        .iter()
        .find(|h| h.unit == unit("healme"))
        .unwrap();
    assert_eq!(
        (healed.found.as_str(), healed.restored.as_str()),
        ("100Mi", "64Mi")
    );

    // The crashing container's restarts reach the status branch.
    let doc = until("restart count on the status branch", &vm, SETTLE, || {
        status(&git).filter(|d| {
            d.pods
                .iter()
                .any(|p| p.name == "crash" && p.restarts() >= 1)
        })
    });
    let crash = doc.pods.iter().find(|p| p.name == "crash").unwrap();
    println!("crash restarts on the status branch: {}", crash.restarts());

    // A reviewer's view of the fleet, from the clone alone.
    let fleet = berth_cli(&["status"], &bare(&git));
    println!("{fleet}");
    assert!(fleet.lines().any(|l| l.starts_with(NODE)), "{fleet}");
    let one = berth_cli(&["status", "--node", NODE], &bare(&git));
    assert!(one.contains("crash") && one.contains("healed:"), "{one}");

    // Figures: status commits and their size, agent memory.
    let commits = must(git.git(&[
        "--git-dir",
        bare(&git).to_str().unwrap(),
        "rev-list",
        "--count",
        &format!("berth/status/{NODE}"),
    ]));
    let size = branch_file(&git, &format!("berth/status/{NODE}"), "status.yaml")
        .unwrap()
        .len();
    println!(
        "status branch: {commits} commits over {:.0} s, status.yaml {size} bytes for {} pods",
        vm.started.elapsed().as_secs_f64(),
        doc.pods.len()
    );
    println!(
        "agent memory: {}, {} bytes charged to its cgroup (mirror pages included)",
        sh(
            &vm,
            "grep VmRSS /proc/$(systemctl show -p MainPID --value berth-agent.service)/status"
        )
        .trim(),
        sh(
            &vm,
            "systemctl show -p MemoryCurrent --value berth-agent.service"
        )
        .trim()
    );
    must(vm.poweroff(Duration::from_secs(60)));
}

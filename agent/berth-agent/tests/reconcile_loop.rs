//! The agent's loop against the in-memory systemd: Git in, units out.
//! The same behaviours run against PID 1 in `qemu-tests/tests/pods.rs`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use berth_agent::config::ConfigSources;
use berth_agent::{Agent, AgentPaths, Log, PassOutcome, Runtime};
use berth_plan::ActiveState;
use berth_runtime::fake::FakeSystemd;
use berth_runtime::images::{ImageStore, archive};
use berth_runtime::rootfs::{ContainerRoots, FakeRootMounter, RootMounter as _, UserRecords};
use berth_runtime::{FailureReason, Systemd};

struct Node {
    dir: PathBuf,
    systemd: Arc<FakeSystemd>,
    /// The node's container root mounts, kept across agent restarts.
    mounts: Arc<FakeRootMounter>,
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

fn pod(name: &str, command: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [{command}]\n{extra}"
    )
}

impl Node {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-loop-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A bare remote (libgit2 pushes only to bare local repositories)
        // and a working clone that commits go through.
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "--bare", "-b", "main", "origin.git"]);
        git(&dir, &["clone", "-q", "origin.git", "repo"]);
        std::fs::create_dir_all(dir.join("repo/pods")).unwrap();
        std::fs::create_dir_all(dir.join("archives")).unwrap();
        let layer = archive::layer(&[("bin/sleep", b"#!", 0o755)]).unwrap();
        archive::write(
            &dir.join("archives/busybox.tar"),
            "busybox:1.37",
            &[layer],
            &serde_json::json!({"config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}}),
        )
        .unwrap();
        std::fs::write(
            dir.join("config.yaml"),
            format!(
                "node:\n  name: n1\ngit:\n  url: {}\n  path: pods\n",
                dir.join("origin.git").display()
            ),
        )
        .unwrap();
        Self {
            dir,
            systemd: Arc::new(FakeSystemd::new(257)),
            mounts: FakeRootMounter::new(),
        }
    }

    fn commit(&self, files: &[(&str, Option<String>)]) {
        for (path, body) in files {
            let p = self.dir.join("repo").join(path);
            match body {
                Some(b) => std::fs::write(&p, b).unwrap(),
                None => std::fs::remove_file(&p).unwrap(),
            }
        }
        git(&self.dir.join("repo"), &["add", "-A"]);
        git(&self.dir.join("repo"), &["commit", "-q", "-m", "change"]);
        self.push();
    }

    fn push(&self) {
        git(
            &self.dir.join("repo"),
            &["push", "-q", "-f", "origin", "HEAD:main"],
        );
    }

    /// A fresh agent process on this node: same state dir, same systemd.
    fn agent(&self) -> Agent {
        let paths = AgentPaths {
            config: ConfigSources {
                esp_file: self.dir.join("config.yaml"),
                credentials_dir: None,
                kernel_cmdline: String::new(),
                hostname: "n1".into(),
            },
            state_dir: self.dir.join("state"),
            node_memory_bytes: 4 << 30,
            node_cpu_milli: 2000,
            proc_net: self.dir.join("proc-net"),
        };
        let containers = self.dir.join("state/containers");
        let runtime = Runtime {
            systemd: Box::new(Arc::clone(&self.systemd)),
            images: ImageStore::open(&self.dir.join("state/images")).unwrap(),
            roots: ContainerRoots::new(&containers, Arc::clone(&self.mounts) as _),
            users: UserRecords::new(&self.dir.join("userdb")),
            cgroup_root: self.dir.join("cgroup"),
            containers_dir: containers.to_string_lossy().into_owned(),
            image_archives: Some(self.dir.join("archives")),
        };
        let mut agent = Agent::new(paths, Log::from_env(), Some(runtime)).unwrap();
        agent.import_images();
        agent
    }

    fn active(&self, unit: &str) -> bool {
        self.systemd
            .unit(unit)
            .unwrap()
            .is_some_and(|u| u.active_state == ActiveState::Active)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn pushed_pods_start_in_their_slices_and_removed_ones_are_pruned() {
    let node = Node::new("prune");
    node.systemd
        .add_admin_unit("berth-admin-debug.service", "admin debug shell");
    node.commit(&[
        (
            "pods/a.yaml",
            Some(pod(
                "a",
                "sleep, \"100\"",
                "    resources: {limits: {cpu: 500m, memory: 64Mi}}\n",
            )),
        ),
        ("pods/b.yaml", Some(pod("b", "sleep, \"100\"", ""))),
    ]);
    let mut agent = node.agent();
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { changed: true, .. }),
        "{outcome:?}"
    );
    assert!(node.active("berth-default_a_main.service"));
    assert!(node.active("berth-guaranteed-default_a.slice"));
    assert!(node.active("berth-default_b_main.service"));
    assert!(node.active("berth-besteffort-default_b.slice"));
    let a = node
        .systemd
        .unit("berth-default_a_main.service")
        .unwrap()
        .unwrap();
    assert_eq!(
        a.properties.get("MemoryMax"),
        Some(&berth_plan::PropertyValue::Unsigned(64 << 20))
    );
    let mounted = node.mounts.mounted(&node.dir).unwrap();
    assert!(
        mounted
            .iter()
            .any(|m| m.ends_with("state/containers/default_a_main/rootfs")),
        "the container root is mounted: {mounted:?}"
    );
    assert!(
        agent.state().failures.is_empty(),
        "{:?}",
        agent.state().failures
    );

    node.commit(&[("pods/b.yaml", None)]);
    agent.pass(true);
    assert!(
        node.systemd
            .unit("berth-default_b_main.service")
            .unwrap()
            .is_none()
    );
    assert!(
        node.systemd
            .unit("berth-besteffort-default_b.slice")
            .unwrap()
            .is_none()
    );
    assert!(
        !node.dir.join("state/containers/default_b_main").exists(),
        "the container's layer is deleted"
    );
    assert!(node.active("berth-default_a_main.service"));
    assert!(
        node.active("berth-admin-debug.service"),
        "the admin's unit is never touched"
    );
}

#[test]
fn the_state_directory_is_the_agents_alone() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::new("state-mode");
    // As found on a node whose directory was made by someone else.
    std::fs::create_dir_all(node.dir.join("state")).unwrap();
    std::fs::set_permissions(
        node.dir.join("state"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let _agent = node.agent();
    let mode = std::fs::metadata(node.dir.join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn a_restarted_agent_adopts_what_runs_and_changes_nothing() {
    let node = Node::new("adopt");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    node.agent().pass(true);
    node.systemd.take_calls();
    let mut again = node.agent();
    let (outcome, _) = again.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert_eq!(node.systemd.take_calls(), Vec::<String>::new());
}

#[test]
fn units_lost_in_a_reboot_are_recreated_once() {
    let node = Node::new("reboot");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    node.agent().pass(true);
    // Transient units vanish at reboot; the container directories stay.
    for unit in node.systemd.unit_names() {
        node.systemd.stop(&unit).unwrap();
    }
    let mut agent = node.agent();
    agent.pass(true);
    agent.pass(false);
    let services: Vec<String> = node
        .systemd
        .unit_names()
        .into_iter()
        .filter(|n| n.ends_with(".service"))
        .collect();
    assert_eq!(services, vec!["berth-default_a_main.service".to_string()]);
    assert!(node.active("berth-default_a_main.service"));
}

#[test]
fn faults_are_reported_per_pod_and_do_not_block_the_others() {
    let node = Node::new("faults");
    node.systemd.remove_binary("/no/such/program");
    node.commit(&[
        ("pods/ok.yaml", Some(pod("ok", "sleep, \"100\"", ""))),
        ("pods/nobin.yaml", Some(pod("nobin", "/no/such/program", ""))),
        (
            "pods/ghost.yaml",
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  containers:\n  - {name: main, image: registry.example/ghost:1, imagePullPolicy: Never, command: [/x]}\n"
                    .into(),
            ),
        ),
        (
            "pods/huge.yaml",
            Some(pod(
                "huge",
                "sleep, \"1\"",
                "    resources: {requests: {cpu: \"64\"}}\n",
            )),
        ),
        (
            "pods/root.yaml",
            Some(pod(
                "root",
                "sleep, \"1\"",
                "    securityContext: {privileged: true}\n",
            )),
        ),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    assert!(node.active("berth-default_ok_main.service"));
    let failures = &agent.state().failures;
    let reason = |unit: &str| failures.iter().find(|f| f.unit == unit).map(|f| f.reason);
    assert_eq!(
        reason("berth-default_ghost_main.service"),
        Some(FailureReason::ErrImageNeverPull)
    );
    assert_eq!(
        reason("berth-default_nobin_main.service"),
        Some(FailureReason::StartError)
    );
    assert!(
        node.systemd
            .unit("berth-default_huge_main.service")
            .unwrap()
            .is_none()
    );
    let refused = &agent.state().not_admitted;
    assert_eq!(refused.len(), 2);
    assert!(refused[0].reason.contains("64 CPU"), "{:?}", refused[0]);
    assert_eq!(refused[0].status(), "OutOfcpu");
    // A privileged container on a node of the default (baseline) level:
    // refused alone, with the check and field; the revision is accepted.
    assert_eq!(refused[1].pod, "default/root");
    assert_eq!(refused[1].status(), "Forbidden");
    assert!(
        refused[1].reason.contains(
            "privileged (spec.containers[0].securityContext.privileged: must not be true)"
        ),
        "{:?}",
        refused[1]
    );
    assert!(
        node.systemd
            .unit("berth-default_root_main.service")
            .unwrap()
            .is_none()
    );
    assert!(
        agent.state().errors.is_empty(),
        "{:?}",
        agent.state().errors
    );
}

/// Roots are prepared while the slices are made; a pod whose slice could
/// not be made starts nothing and keeps no root mounted.
#[test]
fn a_pod_whose_slice_fails_keeps_no_root_mounted() {
    let node = Node::new("slicefails");
    // Only pod slices carry `TasksMax` (the pod's PID limit).
    node.systemd.refuse_property("TasksMax");
    node.commit(&[
        ("pods/a.yaml", Some(pod("a", "sleep, \"100\"", ""))),
        ("pods/b.yaml", Some(pod("b", "sleep, \"100\"", ""))),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    for p in ["a", "b"] {
        assert!(!node.active(&format!("berth-default_{p}_main.service")));
        let failure = agent
            .state()
            .failures
            .iter()
            .find(|f| f.unit == format!("berth-default_{p}_main.service"))
            .unwrap_or_else(|| panic!("pod {p}'s container failed: {:?}", agent.state().failures));
        assert!(failure.message.contains("earlier unit"), "{failure:?}");
    }
    let mounts = node.mounts.mounted(&node.dir).unwrap();
    assert!(mounts.is_empty(), "no root left mounted: {mounts:?}");
}

#[test]
fn a_refused_property_fails_only_its_pod() {
    let node = Node::new("refused");
    node.systemd.refuse_property("MemoryMax");
    node.commit(&[
        (
            "pods/limited.yaml",
            Some(pod(
                "limited",
                "sleep, \"1\"",
                "    resources: {limits: {memory: 64Mi}}\n",
            )),
        ),
        ("pods/free.yaml", Some(pod("free", "sleep, \"1\"", ""))),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    assert!(node.active("berth-default_free_main.service"));
    let failure = agent
        .state()
        .failures
        .iter()
        .find(|f| f.pod.as_deref() == Some("default/limited"))
        .expect("the limited pod failed");
    assert!(failure.message.contains("MemoryMax"), "{failure:?}");
}

#[test]
fn a_crashing_container_is_restarted_by_systemd_not_by_the_agent() {
    let node = Node::new("crash");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let mut agent = node.agent();
    agent.pass(true);
    node.systemd.exit_main("berth-default_a_main.service", 3);
    node.systemd.exit_main("berth-default_a_main.service", 3);
    node.systemd.take_calls();
    agent.pass(false);
    assert_eq!(node.systemd.take_calls(), Vec::<String>::new());
    let unit = node
        .systemd
        .unit("berth-default_a_main.service")
        .unwrap()
        .unwrap();
    assert_eq!(unit.runtime.restarts, 2);
    assert_eq!(unit.runtime.exit_status, 3);
}

#[test]
fn an_apply_cut_short_converges_on_the_next_start_without_duplicates() {
    let node = Node::new("cut");
    let files: Vec<(String, Option<String>)> = (0..5)
        .map(|i| {
            (
                format!("pods/p{i}.yaml"),
                Some(pod(&format!("p{i}"), "sleep, \"100\"", "")),
            )
        })
        .collect();
    let refs: Vec<(&str, Option<String>)> =
        files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    node.commit(&refs);
    // The first agent dies after seven changes: some pods whole, one with a
    // slice and its root mounted but no service.
    node.systemd.cut_after(7);
    let mut first = node.agent();
    first.pass(true);
    assert!(!first.state().failures.is_empty());
    node.systemd.reconnect();
    let mut second = node.agent();
    second.pass(true);
    assert!(
        second.state().failures.is_empty(),
        "{:?}",
        second.state().failures
    );
    let names = node.systemd.unit_names();
    let mounts = node.mounts.mounted(&node.dir).unwrap();
    for i in 0..5 {
        assert!(
            node.active(&format!("berth-default_p{i}_main.service")),
            "{names:?}"
        );
        let key = format!("default_p{i}_main");
        assert_eq!(
            names.iter().filter(|n| n.contains(&key)).count(),
            1,
            "one service for p{i}: {names:?}"
        );
        assert_eq!(
            mounts
                .iter()
                .filter(|m| m.ends_with(format!("{key}/rootfs")))
                .count(),
            1,
            "one root mount for p{i}: {mounts:?}"
        );
    }
    node.systemd.take_calls();
    second.pass(false);
    assert_eq!(node.systemd.take_calls(), Vec::<String>::new(), "converged");
}

#[test]
fn a_poll_that_finds_nothing_new_does_not_observe_again_until_a_unit_changes() {
    let node = Node::new("quiet");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let mut agent = node.agent();
    agent.pass(true);
    let after_first = node.systemd.list_count();
    agent.pass(true);
    assert_eq!(
        node.systemd.list_count(),
        after_first,
        "an idle poll observed"
    );
    // A unit changed (systemd said so): observe and heal.
    node.systemd.stop("berth-default_a_main.service").unwrap();
    agent.pass(false);
    assert!(node.systemd.list_count() > after_first);
    assert!(node.active("berth-default_a_main.service"), "healed");
}

#[test]
fn a_pod_whose_unit_an_admin_holds_is_refused_and_said_so() {
    let node = Node::new("conflict");
    node.systemd
        .add_admin_unit("berth-default_taken_main.service", "the admin's own");
    node.commit(&[
        ("pods/taken.yaml", Some(pod("taken", "sleep, \"1\"", ""))),
        ("pods/free.yaml", Some(pod("free", "sleep, \"1\"", ""))),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    assert!(node.active("berth-default_free_main.service"));
    let errors = &agent.state().plan_errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("was not created by Berth"), "{errors:?}");
    let admin = node
        .systemd
        .unit("berth-default_taken_main.service")
        .unwrap()
        .unwrap();
    assert_eq!(
        admin.properties.get("Description"),
        Some(&berth_plan::PropertyValue::text("the admin's own"))
    );
}

// ---- drift and the node's own branches ----

impl Node {
    fn configure(&self, extra: &str) {
        let path = self.dir.join("config.yaml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(extra);
        std::fs::write(path, text).unwrap();
    }

    fn branch_file(&self, branch: &str, file: &str) -> Option<String> {
        berth_git::publish::read_branch_file(&self.dir.join("origin.git"), branch, file)
            .unwrap()
            .and_then(|f| f.content)
            .map(|b| String::from_utf8(b).unwrap())
    }

    fn memory_max(&self, unit: &str) -> Option<u64> {
        match self
            .systemd
            .unit(unit)
            .unwrap()?
            .properties
            .get("MemoryMax")
        {
            Some(berth_plan::PropertyValue::Unsigned(n)) => Some(*n),
            _ => None,
        }
    }

    /// What `systemctl set-property UNIT MemoryMax=…` does.
    fn set_memory_max(&self, unit: &str, bytes: u64) {
        let mut p = berth_plan::Properties::new();
        p.insert("MemoryMax", berth_plan::PropertyValue::Unsigned(bytes));
        self.systemd.set_properties(unit, &p).unwrap();
    }
}

const APP: &str = "berth-default_a_main.service";

fn limited(extra_meta: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n{extra_meta}spec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sleep, \"100\"]\n    resources:\n      limits:\n        memory: 64Mi   # sized for the test\n"
    )
}

#[test]
fn a_reported_drift_becomes_a_branch_whose_merge_adopts_it() {
    let node = Node::new("drift-report");
    node.configure("drift:\n  policy: report\nstatus:\n  heartbeat: 10s\n");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    assert!(agent.state().drift.is_empty(), "{:?}", agent.state().drift);
    assert_eq!(node.memory_max(APP), Some(64 << 20));

    node.set_memory_max(APP, 100 << 20);
    agent.pass(false);
    let drift = &agent.state().drift;
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].field, "MemoryMax");
    assert_eq!(drift[0].desired, "64Mi");
    assert_eq!(drift[0].actual, "100Mi");
    assert_eq!(drift[0].adopt.as_deref(), Some("100Mi"));
    assert_eq!(node.memory_max(APP), Some(100 << 20), "report leaves it");
    agent.stop_publishing();

    // The drift branch: the manifest line changed in place, comment kept,
    // and the report beside it.
    let edited = node
        .branch_file("berth/drift/n1", "pods/a.yaml")
        .expect("drift branch");
    assert!(
        edited.contains("        memory: 100Mi   # sized for the test\n"),
        "{edited}"
    );
    assert_eq!(edited.replace("100Mi", "64Mi"), limited(""));
    let report = node
        .branch_file("berth/drift/n1", "drift/n1/DRIFT.md")
        .expect("report");
    assert!(
        report.contains("| Pod/default/a | main | MemoryMax | 64Mi | 100Mi |"),
        "{report}"
    );
    let status = node
        .branch_file("berth/status/n1", "status.yaml")
        .expect("status branch");
    let doc = berth_agent::report::NodeStatusDoc::from_yaml(&status).unwrap();
    assert_eq!(doc.drift.count, 1);
    assert_eq!(doc.pods.len(), 1);

    // A reviewer merges: the node adopts it, and the drift is gone.
    git(&node.dir.join("repo"), &["fetch", "-q", "origin"]);
    git(
        &node.dir.join("repo"),
        &["merge", "-q", "--ff-only", "origin/berth/drift/n1"],
    );
    node.push();
    let mut agent = node.agent();
    agent.publish().unwrap();
    node.systemd.take_calls();
    agent.pass(true);
    assert!(agent.state().drift.is_empty(), "{:?}", agent.state().drift);
    assert_eq!(node.memory_max(APP), Some(100 << 20));
    assert!(
        !node
            .systemd
            .take_calls()
            .iter()
            .any(|c| c.contains("start")),
        "adopting restarts nothing"
    );
    agent.pass(false);
    assert!(agent.state().drift.is_empty(), "no further drift");
    agent.stop_publishing();
    assert_eq!(
        node.branch_file("berth/drift/n1", "drift/n1/DRIFT.md"),
        None,
        "the drift branch is removed once the drift is gone"
    );
}

#[test]
fn healed_drift_is_put_back_and_recorded_and_ignored_fields_are_left_alone() {
    let node = Node::new("drift-heal");
    node.commit(&[(
        "pods/a.yaml",
        Some(limited("  annotations: {berth.dev/drift-policy: heal}\n")),
    )]);
    let mut agent = node.agent();
    agent.pass(true);
    node.set_memory_max(APP, 100 << 20);
    agent.pass(false);
    assert_eq!(node.memory_max(APP), Some(64 << 20), "healed");
    assert!(agent.state().drift.is_empty());
    let healed = &agent.state().healed;
    assert_eq!(healed.len(), 1, "{healed:?}");
    assert_eq!(
        (
            healed[0].field.as_str(),
            healed[0].found.as_str(),
            healed[0].restored.as_str()
        ),
        ("MemoryMax", "100Mi", "64Mi")
    );

    // The admin may change MemoryMax on this pod on purpose.
    node.commit(&[(
        "pods/a.yaml",
        Some(limited(
            "  annotations: {berth.dev/drift-ignore: MemoryMax}\n",
        )),
    )]);
    agent.pass(true);
    node.set_memory_max(APP, 200 << 20);
    agent.pass(false);
    assert_eq!(node.memory_max(APP), Some(200 << 20), "ignored: not healed");
    assert!(agent.state().drift.is_empty(), "ignored: not reported");
}

#[test]
fn a_stopped_unit_is_drift_and_a_new_commit_is_not() {
    let node = Node::new("drift-stop");
    node.configure("drift:\n  policy: report\n");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.pass(true);
    // A change from Git is applied, not reported.
    node.commit(&[("pods/a.yaml", Some(limited("").replace("64Mi", "96Mi")))]);
    agent.pass(true);
    assert!(agent.state().drift.is_empty(), "{:?}", agent.state().drift);
    assert_eq!(node.memory_max(APP), Some(96 << 20));
    // Someone stops the container.
    node.systemd.stop(APP).unwrap();
    agent.pass(false);
    let drift = &agent.state().drift;
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].field, "state");
    assert!(!node.active(APP), "report leaves it stopped");
}

#[test]
fn drift_reports_stay_readable_with_many_drifted_fields() {
    let node = Node::new("drift-many");
    node.configure("drift:\n  policy: report\n");
    let pods: Vec<(String, Option<String>)> = (0..60)
        .map(|i| {
            (
                format!("pods/p{i}.yaml"),
                Some(limited("").replace("name: a", &format!("name: p{i}"))),
            )
        })
        .collect();
    let files: Vec<(&str, Option<String>)> =
        pods.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    node.commit(&files);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    for i in 0..60 {
        node.set_memory_max(&format!("berth-default_p{i}_main.service"), 80 << 20);
    }
    agent.pass(false);
    assert_eq!(agent.state().drift.len(), 60);
    agent.stop_publishing();
    let report = node
        .branch_file("berth/drift/n1", "drift/n1/DRIFT.md")
        .expect("report");
    let rows = report.lines().filter(|l| l.starts_with("| Pod/")).count();
    assert_eq!(rows, berth_agent::drift::REPORT_LIMIT);
    assert!(report.contains("…and 10 more: 10 × MemoryMax"), "{report}");
    // Every file is still edited: the diff adopts all of it.
    assert!(
        node.branch_file("berth/drift/n1", "pods/p59.yaml")
            .unwrap()
            .contains("memory: 80Mi")
    );
}

#[test]
fn unsigned_or_wrongly_signed_commits_are_not_applied() {
    let node = Node::new("signed");
    let keys = node.dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let keygen = |name: &str| {
        let key = keys.join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .output()
            .expect("ssh-keygen (openssh-client)");
        assert!(out.status.success());
        key
    };
    let alice = keygen("alice");
    let mallory = keygen("mallory");
    let public = std::fs::read_to_string(alice.with_extension("pub")).unwrap();
    std::fs::write(keys.join("allowed"), format!("alice@example.org {public}")).unwrap();
    node.configure(&format!(
        "  allowedSigners: {}\n",
        keys.join("allowed").display()
    ));
    let sign_with = |key: &Path| {
        git(
            &node.dir.join("repo"),
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={}", key.display()),
                "commit",
                "-q",
                "--amend",
                "--no-edit",
                "-S",
            ],
        );
        node.push();
    };
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let mut agent = node.agent();
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Rejected { .. }),
        "{outcome:?}"
    );
    assert!(
        agent.state().errors[0].contains("is not signed"),
        "{:?}",
        agent.state().errors
    );
    assert!(node.systemd.unit_names().is_empty(), "nothing applied");

    sign_with(&mallory);
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Rejected { .. }),
        "{outcome:?}"
    );
    assert!(agent.state().errors[0].contains("not in the allowed signers"));
    assert!(node.systemd.unit_names().is_empty(), "nothing applied");

    sign_with(&alice);
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert!(node.active(APP));
    assert!(
        agent
            .state()
            .signed_by
            .as_deref()
            .is_some_and(|s| s.starts_with("alice@example.org (SHA256:")),
        "{:?}",
        agent.state().signed_by
    );

    // A later signed commit is applied; pushing the branch back to the
    // earlier one (signed, but older) is a replay and is refused.
    let repo = node.dir.join("repo");
    let head = || {
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&repo)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let older = head();
    node.commit(&[("pods/b.yaml", Some(pod("b", "sleep, \"100\"", "")))]);
    sign_with(&alice);
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { .. }),
        "{outcome:?}"
    );
    let newer = head();
    git(&repo, &["reset", "-q", "--hard", &older]);
    node.push();
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Rejected { .. }),
        "{outcome:?}"
    );
    let errors = &agent.state().errors;
    assert!(
        errors[0].contains(&format!(
            "commit {} does not descend from {}, the last one applied",
            &older[..12],
            &newer[..12]
        )) && errors[0].contains("git.allowRewind"),
        "{errors:?}"
    );
    assert!(
        node.active("berth-default_b_main.service"),
        "the last good revision keeps running"
    );

    // Allowed explicitly, a rewind is applied (from the next commit on).
    node.configure("  allowRewind: true\n");
    let mut agent = node.agent();
    node.commit(&[("pods/c.yaml", Some(pod("c", "sleep, \"100\"", "")))]);
    sign_with(&alice);
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert!(node.active("berth-default_c_main.service"));
    assert!(!node.active("berth-default_b_main.service"));
}

fn wait_for_record(
    agent: &Agent,
    what: &str,
    done: impl Fn(&berth_agent::publisher::PublishRecord) -> bool,
) -> berth_agent::publisher::PublishRecord {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let record = agent.publish_record().expect("publishing");
        if done(&record) {
            return record;
        }
        assert!(std::time::Instant::now() < end, "{what}: {record:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn status_waits_locally_while_git_is_away_and_goes_out_when_it_is_back() {
    let node = Node::new("away");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    let first = wait_for_record(&agent, "first push", |r| {
        r.last_push.is_some() && !r.pending
    });

    // The server goes away; a drift is healed meanwhile.
    let origin = node.dir.join("origin.git");
    let away = node.dir.join("origin.away");
    std::fs::rename(&origin, &away).unwrap();
    node.set_memory_max(APP, 100 << 20);
    let (outcome, _) = agent.pass(true);
    assert!(matches!(outcome, PassOutcome::Failed { .. }), "{outcome:?}");
    agent.pass(false);
    assert_eq!(
        node.memory_max(APP),
        Some(64 << 20),
        "pods are still healed"
    );
    assert!(node.active(APP));
    let failing = wait_for_record(&agent, "push fails", |r| r.error.is_some());
    assert!(failing.pending);
    assert_ne!(
        failing.status_commit, first.status_commit,
        "committed locally"
    );

    // Back again: what was committed meanwhile goes out by itself.
    std::fs::rename(&away, &origin).unwrap();
    wait_for_record(&agent, "pushed after the outage", |r| {
        r.error.is_none() && !r.pending && r.last_push > first.last_push
    });
    agent.stop_publishing();
    let doc = berth_agent::report::NodeStatusDoc::from_yaml(
        &node.branch_file("berth/status/n1", "status.yaml").unwrap(),
    )
    .unwrap();
    assert_eq!(doc.drift.healed.len(), 1, "{:?}", doc.drift.healed);
    assert!(
        doc.errors.iter().any(|e| e.contains("fetching")),
        "the outage itself is in the status: {:?}",
        doc.errors
    );
}

#[test]
fn status_history_and_the_outbox_stay_bounded_and_drift_survives_a_restart_over() {
    let node = Node::new("bounded");
    node.configure("status:\n  history: 3\n");
    let reported = limited("  annotations: {berth.dev/drift-policy: report}\n")
        .replace("name: a\n", "name: b\n");
    node.commit(&[
        ("pods/a.yaml", Some(limited(""))),
        ("pods/b.yaml", Some(reported)),
    ]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    node.set_memory_max("berth-default_b_main.service", 80 << 20);
    agent.pass(false);
    let mut last = wait_for_record(&agent, "drift pushed", |r| {
        r.drift_commit.is_some() && !r.pending
    });
    // Each heal changes the status: one commit per round.
    for i in 1..=8u64 {
        node.set_memory_max(APP, (64 + i) << 20);
        agent.pass(false);
        let before = last.status_commit.clone();
        last = wait_for_record(&agent, "status committed and pushed", |r| {
            r.status_commit != before && !r.pending
        });
    }
    agent.stop_publishing();
    let count = |git_dir: &Path, rev: &str| -> usize {
        let out = Command::new("git")
            .args(["--git-dir"])
            .arg(git_dir)
            .args(["rev-list", "--count", rev])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let origin = node.dir.join("origin.git");
    let depth = count(&origin, "berth/status/n1");
    assert!(
        (1..=3).contains(&depth),
        "status history kept to 3: {depth}"
    );
    let outbox = node.dir.join("state/outbox.git");
    let kept = count(&outbox, "refs/berth/out/status");
    assert!(
        kept <= 3,
        "the outbox starts over too: {kept} status commits"
    );
    // The drift branch came through every start-over.
    assert!(
        node.branch_file("berth/drift/n1", "pods/b.yaml")
            .unwrap()
            .contains("memory: 80Mi")
    );
    let doc = berth_agent::report::NodeStatusDoc::from_yaml(
        &node.branch_file("berth/status/n1", "status.yaml").unwrap(),
    )
    .unwrap();
    assert_eq!(doc.drift.healed.len(), 8);
}

#[test]
fn a_force_push_that_rewrites_desired_history_is_followed() {
    let node = Node::new("rewrite");
    node.configure("drift:\n  policy: report\n");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    let first = agent.state().last_good.clone().unwrap().revision;
    node.set_memory_max(APP, 100 << 20);
    agent.pass(false);
    wait_for_record(&agent, "drift pushed", |r| {
        r.drift_commit.is_some() && !r.pending
    });
    // History rewritten: the first commit is replaced, not followed.
    std::fs::write(
        node.dir.join("repo/pods/a.yaml"),
        limited("").replace("64Mi", "100Mi"),
    )
    .unwrap();
    git(&node.dir.join("repo"), &["add", "-A"]);
    git(
        &node.dir.join("repo"),
        &["commit", "-q", "--amend", "-m", "rewritten"],
    );
    node.push();
    let (outcome, _) = agent.pass(true);
    let PassOutcome::Applied { revision, changed } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(changed && revision != first);
    agent.pass(false);
    assert!(agent.state().drift.is_empty(), "{:?}", agent.state().drift);
    agent.stop_publishing();
    assert_eq!(
        node.branch_file("berth/drift/n1", "drift/n1/DRIFT.md"),
        None,
        "the drift branch on the old history is gone"
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn dir_kib(path: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(path) / 1024
}

/// `make bench-mirror`: the agent (in this process, on the in-memory
/// systemd) fetching 500 desired commits one after another, each applied
/// and reported as a status commit; prints resident memory and the sizes
/// of the mirror and the outbox as they grow.
#[test]
#[ignore = "benchmark: make bench-mirror"]
#[allow(clippy::print_stdout)]
fn bench_long_lived_mirror() {
    let node = Node::new("bench-mirror");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    let start = rss_kib();
    println!("bench: after the first pass: {start} KiB resident");
    let mut last_commit = None;
    for i in 1..=500u32 {
        node.commit(&[(
            "pods/config.yaml",
            Some(format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{round: \"{i}\"}}\n"
            )),
        )]);
        agent.pass(true);
        let before = last_commit.clone();
        let record = wait_for_record(&agent, "status pushed", |r| {
            r.status_commit != before && !r.pending
        });
        last_commit = record.status_commit;
        if [100, 250, 500].contains(&i) {
            println!(
                "bench: after {i} desired commits and status commits: {} KiB resident, mirror {} KiB, outbox {} KiB",
                rss_kib(),
                dir_kib(&node.dir.join("state/mirror.git")),
                dir_kib(&node.dir.join("state/outbox.git")),
            );
        }
    }
    agent.stop_publishing();
}

#[test]
fn an_idle_poll_notices_a_changed_cgroup_limit_without_observing_every_unit() {
    let node = Node::new("limits");
    node.configure("drift:\n  policy: report\n");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    agent.pass(true);
    agent.pass(false); // the started units observed, their cgroups read
    let lists = node.systemd.list_count();
    agent.pass(true);
    assert_eq!(node.systemd.list_count(), lists, "an idle poll observed");
    // What `systemctl set-property` does: the unit's property and its
    // cgroup file change, and PID 1 sends no job signal.
    let unit = node.systemd.unit(APP).unwrap().unwrap();
    let dir = node
        .dir
        .join("cgroup")
        .join(unit.runtime.control_group.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memory.max"), "104857600\n").unwrap();
    node.set_memory_max(APP, 100 << 20);
    agent.pass(true);
    assert!(node.systemd.list_count() > lists, "the change was observed");
    let drift = &agent.state().drift;
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].field, "MemoryMax");
}

/// The plan the agent's last pass applied (`plan.json`) is the plan
/// `plan_node` makes from the snapshot it wrote (`observed.json`) and the
/// same manifests, and systemd saw exactly its unit actions. With
/// `BERTH_BLESS=1` the case is recorded for the CLI's replay test
/// (`agent/berth/tests/data/replay/<case>/`).
fn replay_matches_what_was_applied(node: &Node, case: &str, calls: &[String]) -> serde_json::Value {
    let state = node.dir.join("state");
    let observed_text = std::fs::read_to_string(state.join("observed.json")).unwrap();
    let observed: berth_plan::ActualState = serde_json::from_str(&observed_text).unwrap();
    let applied_text = std::fs::read_to_string(state.join("plan.json")).unwrap();
    let applied: serde_json::Value = serde_json::from_str(&applied_text).unwrap();
    let sources = manifests(&node.dir.join("repo/pods"));
    let catalog = berth_manifest::load_sources(sources.clone());
    let images = berth_plan::ImageCatalog::new(observed.image_configs.clone());
    let replay = berth_plan::plan_node(
        &catalog,
        observed.node.as_ref().expect("the snapshot names its node"),
        &images,
        &observed,
        applied["revision"].as_str().unwrap(),
    );
    assert_eq!(
        serde_json::to_value(&replay.plan).unwrap(),
        applied,
        "{case}: the replayed plan differs from the applied one"
    );
    // Every unit action reached systemd, and nothing else was started.
    for action in &replay.plan.actions {
        let unit = action.unit.as_str();
        let expected = match action.verb {
            berth_plan::Verb::Pull => continue,
            berth_plan::Verb::Start | berth_plan::Verb::Restart | berth_plan::Verb::CreateSlice => {
                format!("start {unit}")
            }
            berth_plan::Verb::Stop | berth_plan::Verb::RemoveSlice => format!("stop {unit}"),
            berth_plan::Verb::Update | berth_plan::Verb::UpdateSlice => {
                format!("set-properties {unit}")
            }
            berth_plan::Verb::Kill => format!(
                "kill {unit} {}",
                if action.grace_seconds == Some(0) {
                    "all 9"
                } else {
                    "main 15"
                }
            ),
        };
        assert!(
            calls.contains(&expected),
            "{case}: {expected} not in {calls:?}"
        );
    }
    for call in calls
        .iter()
        .filter(|c| c.starts_with("start berth-") && c.ends_with(".service"))
    {
        let unit = call.trim_start_matches("start ");
        assert!(
            replay.plan.actions.iter().any(|a| a.unit.as_str() == unit),
            "{case}: {call} is not in the plan"
        );
    }
    if std::env::var_os("BERTH_BLESS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../berth/tests/data/replay")
            .join(case);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        for s in &sources {
            std::fs::write(dir.join("manifests").join(&s.path), &s.text).unwrap();
        }
        std::fs::write(dir.join("observed.json"), observed_text).unwrap();
        std::fs::write(dir.join("plan.json"), applied_text).unwrap();
    }
    applied
}

fn manifests(dir: &Path) -> Vec<berth_manifest::SourceFile> {
    let mut out: Vec<berth_manifest::SourceFile> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| berth_manifest::SourceFile {
            path: e.file_name().into(),
            text: std::fs::read_to_string(e.path()).unwrap(),
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn verbs(plan: &serde_json::Value) -> Vec<String> {
    plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                a["verb"].as_str().unwrap(),
                a["unit"].as_str().unwrap()
            )
        })
        .collect()
}

fn held(plan: &serde_json::Value) -> Vec<String> {
    plan["held"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|h| {
                    format!(
                        "{} {}",
                        h["reason"].as_str().unwrap(),
                        h["unit"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_plan_replayed_from_a_fresh_nodes_snapshot_is_the_one_it_applied() {
    let node = Node::new("replay-fresh");
    node.commit(&[("pods/a.yaml", Some(limited("")))]);
    let mut agent = node.agent();
    node.systemd.take_calls();
    agent.pass(true);
    let calls = node.systemd.take_calls();
    let plan = replay_matches_what_was_applied(&node, "fresh-node", &calls);
    assert!(verbs(&plan).contains(&format!("start {APP}")), "{plan:#}");
    assert!(node.active(APP));
}

#[test]
fn the_plan_replayed_from_a_drifted_nodes_snapshot_heals_and_holds_as_the_node_did() {
    let node = Node::new("replay-drift");
    let b = limited("  annotations: {berth.dev/drift-policy: report}\n")
        .replace("name: a\n", "name: b\n");
    node.commit(&[("pods/a.yaml", Some(limited(""))), ("pods/b.yaml", Some(b))]);
    let mut agent = node.agent();
    agent.pass(true);
    let b_unit = "berth-default_b_main.service";
    node.set_memory_max(APP, 100 << 20);
    node.set_memory_max(b_unit, 100 << 20);
    node.systemd.take_calls();
    agent.pass(false);
    let calls = node.systemd.take_calls();
    let plan = replay_matches_what_was_applied(&node, "running-with-drift", &calls);
    assert_eq!(verbs(&plan), vec![format!("update {APP}")], "{plan:#}");
    assert_eq!(
        held(&plan),
        vec![format!("DriftReported {b_unit}")],
        "{plan:#}"
    );
    assert_eq!(node.memory_max(APP), Some(64 << 20), "healed");
    assert_eq!(
        node.memory_max(b_unit),
        Some(100 << 20),
        "reported, left as found"
    );
}

#[test]
fn the_plan_replayed_while_a_pull_is_under_way_pulls_and_waits_as_the_node_did() {
    let node = Node::new("replay-pull");
    // Nothing listens on port 9 of loopback: the pull is asked, then fails.
    let pod = limited("").replace("busybox:1.37", "127.0.0.1:9/missing:1");
    node.commit(&[("pods/a.yaml", Some(pod))]);
    let mut agent = node.agent();
    node.systemd.take_calls();
    agent.pass(true);
    let calls = node.systemd.take_calls();
    let plan = replay_matches_what_was_applied(&node, "pull-under-way", &calls);
    assert_eq!(verbs(&plan)[0], format!("pull {APP}"), "{plan:#}");
    assert_eq!(plan["actions"][0]["image"], "127.0.0.1:9/missing:1");
    assert!(!verbs(&plan).contains(&format!("start {APP}")), "{plan:#}");
    assert_eq!(
        held(&plan),
        vec![format!("ContainerCreating {APP}")],
        "{plan:#}"
    );
    assert!(!calls.iter().any(|c| c.contains(APP)), "{calls:?}");
    assert_eq!(
        agent.state().failures[0].reason,
        FailureReason::ContainerCreating
    );
}

#[test]
fn the_plan_replayed_while_a_claim_is_not_ready_holds_its_pod_as_the_node_did() {
    let node = Node::new("replay-claim");
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests: {storage: 64Mi}\n";
    let pod = format!(
        "{}    volumeMounts:\n    - {{name: data, mountPath: /data}}\n  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: data}}\n",
        limited("")
    );
    let other = limited("").replace("name: a\n", "name: b\n");
    node.commit(&[
        ("pods/a.yaml", Some(pod)),
        ("pods/b.yaml", Some(other)),
        ("pods/claim.yaml", Some(claim.to_string())),
    ]);
    // This agent keeps no volumes: the claim cannot be made ready.
    let mut agent = node.agent();
    node.systemd.take_calls();
    agent.pass(true);
    let calls = node.systemd.take_calls();
    let plan = replay_matches_what_was_applied(&node, "claim-not-ready", &calls);
    assert_eq!(
        held(&plan),
        vec!["FailedMount volumes of default/a".to_string()],
        "{plan:#}"
    );
    assert!(!verbs(&plan).contains(&format!("start {APP}")), "{plan:#}");
    assert!(
        node.active("berth-default_b_main.service"),
        "the other pod runs"
    );
    assert!(!node.active(APP));
    assert_eq!(agent.state().failures[0].reason, FailureReason::FailedMount);
}

/// A node whose remote nobody answers (port 1 of loopback) and whose
/// routes (`proc-net/route`) have no default route yet: as at boot.
fn node_before_the_network(name: &str) -> (Node, std::path::PathBuf) {
    let node = Node::new(name);
    std::fs::write(
        node.dir.join("config.yaml"),
        "node:\n  name: n1\ngit:\n  url: git://127.0.0.1:1/desired.git\n  path: pods\n",
    )
    .unwrap();
    let routes = node.dir.join("proc-net");
    std::fs::create_dir_all(&routes).unwrap();
    // Only the link's own prefix, no default route: the network is not up.
    std::fs::write(
        routes.join("route"),
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
         eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n",
    )
    .unwrap();
    let route_file = routes.join("route");
    (node, route_file)
}

/// The network comes up: a default route through 10.0.2.2.
fn add_default_route(route_file: &std::path::Path) {
    std::fs::write(
        route_file,
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
         eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\n",
    )
    .unwrap();
}

#[test]
fn a_fetch_before_the_network_is_up_waits_for_it_and_after_that_fails_as_an_error() {
    let (node, route_file) = node_before_the_network("no-network");
    let mut agent = node.agent();
    let (outcome, _) = agent.pass(true);
    match outcome {
        PassOutcome::Failed { reason } => {
            assert!(reason.starts_with("waiting for the network: "), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A default route: the same failure is now an error of its own.
    add_default_route(&route_file);
    let (outcome, _) = agent.pass(true);
    match outcome {
        PassOutcome::Failed { reason } => {
            assert!(!reason.starts_with("waiting for the network"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_push_before_the_network_is_up_waits_for_it_and_after_that_fails_as_an_error() {
    let (node, route_file) = node_before_the_network("no-network-push");
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    let waiting = wait_for_record(&agent, "a push tried", |r| r.error.is_some());
    assert!(
        waiting
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("waiting for the network: ")),
        "{waiting:?}"
    );
    assert_eq!(waiting.failures, 0, "{waiting:?}");
    assert!(waiting.pending, "{waiting:?}");
    // A default route: the same failure is now a failure.
    add_default_route(&route_file);
    agent.pass(true);
    let failed = wait_for_record(&agent, "a push failed", |r| r.failures > 0);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| !e.starts_with("waiting for the network")),
        "{failed:?}"
    );
}

#[test]
fn the_snapshot_holds_no_secret_and_still_replays_the_plan_applied() {
    let node = Node::new("replay-secret");
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: token}\nstringData: {token: s3cr3t-replay-value}\n";
    let pod = format!(
        "{}    env:\n    - name: TOKEN\n      valueFrom: {{secretKeyRef: {{name: token, key: token}}}}\n",
        limited("")
    );
    node.commit(&[
        ("pods/a.yaml", Some(pod.clone())),
        ("pods/secret.yaml", Some(secret.to_string())),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    // A second pass, with the units running: the snapshot holds their
    // environment, and a memory change gives the plan something to do.
    node.commit(&[("pods/a.yaml", Some(pod.replace("64Mi", "96Mi")))]);
    node.systemd.take_calls();
    agent.pass(true);
    let calls = node.systemd.take_calls();
    let observed = std::fs::read_to_string(node.dir.join("state/observed.json")).unwrap();
    assert!(!observed.contains("s3cr3t-replay-value"), "{observed}");
    // The unit names a root-only file for it; its value is in no property.
    assert!(
        observed.contains("/containers/default_a_main/environment-"),
        "{observed}"
    );
    let plan = replay_matches_what_was_applied(&node, "secret-env", &calls);
    assert!(verbs(&plan).contains(&format!("update {APP}")), "{plan:#}");
    let applied = std::fs::read_to_string(node.dir.join("state/plan.json")).unwrap();
    assert!(!applied.contains("s3cr3t-replay-value"), "{applied}");
}

#[test]
fn status_and_drift_go_to_their_own_remote_when_one_is_configured() {
    // The desired remote is read-only to the node in a fleet that separates
    // them; status goes to a remote (and credentials) of its own.
    let node = Node::new("status-url");
    git(
        &node.dir,
        &["init", "-q", "--bare", "-b", "main", "status.git"],
    );
    let status_remote = node.dir.join("status.git");
    node.configure(&format!("status:\n  url: {}\n", status_remote.display()));
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let mut agent = node.agent();
    agent.publish().unwrap();
    agent.pass(true);
    wait_for_record(&agent, "status pushed", |r| {
        r.last_push.is_some() && !r.pending
    });
    agent.stop_publishing();
    let status =
        berth_git::publish::read_branch_file(&status_remote, "berth/status/n1", "status.yaml")
            .unwrap()
            .and_then(|f| f.content)
            .map(|b| String::from_utf8(b).unwrap())
            .expect("status on the status remote");
    assert!(
        status.contains("kind: NodeStatus") && status.contains("pods: 1"),
        "{status}"
    );
    assert_eq!(
        node.branch_file("berth/status/n1", "status.yaml"),
        None,
        "nothing is pushed to the desired remote"
    );
}

#[test]
fn pods_are_healed_while_the_git_server_fails_and_the_failure_is_reported() {
    let node = Node::new("git-down");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let mut agent = node.agent();
    agent.pass(true);
    assert!(node.active("berth-default_a_main.service"));
    // The server goes away (a stalled one ends the same way, at the stall
    // timeout: berth-git's stall test); a container dies meanwhile.
    let config = node.dir.join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let origin = node.dir.join("origin.git").display().to_string();
    std::fs::write(
        &config,
        text.replace(&origin, "git://127.0.0.1:1/desired.git"),
    )
    .unwrap();
    node.systemd.stop("berth-default_a_main.service").unwrap();
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(&outcome, PassOutcome::Failed { reason } if reason.contains("127.0.0.1:1")),
        "{outcome:?}"
    );
    // The container's end wakes the loop (PID 1 signals it), for a pass
    // that does not wait on Git.
    agent.pass(false);
    assert!(
        node.active("berth-default_a_main.service"),
        "the last good revision is healed while Git fails"
    );
    // Back again: the next pass fetches and reports no error.
    std::fs::write(&config, text).unwrap();
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert!(agent.state().errors.is_empty());
}

fn deployment(env: &str, command: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 3\n  strategy: {{rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: busybox:1.37\n        command: [{command}]\n        env: [{{name: VERSION, value: \"{env}\"}}]\n"
    )
}

impl Node {
    /// The active container units of Deployment web, by pod name.
    fn web_pods(&self) -> Vec<String> {
        let mut pods: Vec<String> = self
            .systemd
            .unit_names()
            .into_iter()
            .filter(|u| u.starts_with("berth-default_web-") && u.ends_with("_main.service"))
            .filter(|u| self.active(u))
            .map(|u| {
                u.trim_start_matches("berth-default_")
                    .trim_end_matches("_main.service")
                    .to_string()
            })
            .collect();
        pods.sort();
        pods
    }
}

/// Passes without fetching until the rollout settles; at every step the
/// bounds hold (at most 4 pods, at least 3 running).
fn settle(node: &Node, agent: &mut Agent) -> usize {
    for n in 1..=20 {
        agent.pass(false);
        let pods = node.web_pods();
        assert!(pods.len() <= 4 && pods.len() >= 3, "pass {n}: {pods:?}");
        if agent.state().deployments.iter().all(|d| d.settled()) {
            return n;
        }
    }
    panic!("no settle: {:#?}", agent.state().deployments);
}

#[test]
fn a_changed_deployment_rolls_a_failed_revision_rolls_back_and_a_fix_rolls_forward() {
    let node = Node::new("rollout");
    node.commit(&[("pods/web.yaml", Some(deployment("1", "sleep, \"100\"")))]);
    let mut agent = node.agent();
    agent.pass(true);
    settle(&node, &mut agent);
    let v1 = node.web_pods();
    assert_eq!(v1.len(), 3, "{v1:?}");
    let healthy = agent.state().last_healthy.clone().expect("v1 healthy");

    // v2: a new env value rolls, one pod at a time.
    node.commit(&[("pods/web.yaml", Some(deployment("2", "sleep, \"100\"")))]);
    agent.pass(true);
    assert_eq!(
        node.web_pods().len(),
        4,
        "one surge pod: {:?}",
        node.web_pods()
    );
    settle(&node, &mut agent);
    let v2 = node.web_pods();
    assert_eq!(v2.len(), 3);
    assert!(v2.iter().all(|p| !v1.contains(p)), "{v1:?} → {v2:?}");
    let healthy2 = agent.state().last_healthy.clone().expect("v2 healthy");
    assert_ne!(healthy2.revision, healthy.revision);

    // v3 crash-loops: its new pod fails the rollout, and the node returns
    // to v2 without touching v2's pods.
    node.commit(&[("pods/web.yaml", Some(deployment("3", "sleep, \"100\"")))]);
    agent.pass(true);
    let new: Vec<String> = node
        .web_pods()
        .into_iter()
        .filter(|p| !v2.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "{:?}", node.web_pods());
    let unit = format!("berth-default_{}_main.service", new[0]);
    node.systemd.exit_main(&unit, 1);
    node.systemd.exit_main(&unit, 1);
    node.systemd.take_calls();
    agent.pass(false);
    let rolled = agent.state().rolled_back.clone().expect("rolled back");
    assert_eq!(rolled.to.as_deref(), Some(healthy2.revision.as_str()));
    assert!(
        rolled.reason.contains("CrashLoopBackOff"),
        "{}",
        rolled.reason
    );
    assert_eq!(
        agent.state().last_good.as_ref().map(|g| g.revision.clone()),
        Some(healthy2.revision.clone())
    );
    agent.pass(false);
    let calls = node.systemd.take_calls();
    assert!(
        calls
            .iter()
            .all(|c| v2.iter().all(|p| !c.contains(p.as_str()))),
        "v2's pods are not touched: {calls:#?}"
    );
    assert_eq!(node.web_pods(), v2, "only the failed pod is gone");
    // The failed commit is still the branch's head: it is not tried again.
    let (outcome, _) = agent.pass(true);
    assert!(
        matches!(outcome, PassOutcome::Rejected { .. }),
        "{outcome:?}"
    );
    assert_eq!(node.web_pods(), v2);

    // A fix arrives: rolled forward; an agent restarted in the middle
    // resumes without a duplicate.
    node.commit(&[("pods/web.yaml", Some(deployment("4", "sleep, \"100\"")))]);
    agent.pass(true);
    let mid = node.web_pods();
    assert_eq!(mid.len(), 4, "{mid:?}");
    drop(agent);
    let mut agent = node.agent();
    settle(&node, &mut agent);
    let v4 = node.web_pods();
    assert_eq!(v4.len(), 3);
    assert!(v4.iter().all(|p| !v2.contains(p)), "{v4:?}");
    assert!(
        mid.iter().any(|p| v4.contains(p)),
        "the pod started before the restart is kept"
    );
    assert!(agent.state().rolled_back.is_some());
    assert_eq!(
        agent
            .state()
            .last_healthy
            .as_ref()
            .map(|h| h.revision.clone()),
        agent.state().last_good.as_ref().map(|g| g.revision.clone())
    );
}

fn web_deployment(version: &str, strategy: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 2\n  strategy: {strategy}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: main\n        image: busybox:1.37\n        command: [sleep, \"100\"]\n        env: [{{name: VERSION, value: \"{version}\"}}]\n"
    )
}

/// The main units of `web`'s pods.
fn web_units(node: &Node) -> Vec<String> {
    node.systemd
        .unit_names()
        .into_iter()
        .filter(|n| n.starts_with("berth-default_web-") && n.ends_with("_main.service"))
        .collect()
}

/// Rolls `web` from v1 to v2, each old pod taking 400 ms to stop;
/// returns the calls of the pass that stopped the first old pod.
fn roll_with_slow_stops(name: &str, strategy: &str) -> (Node, Vec<String>, Vec<String>) {
    let node = Node::new(name);
    node.commit(&[("pods/web.yaml", Some(web_deployment("1", strategy)))]);
    let mut agent = node.agent();
    agent.pass(true);
    let old = web_units(&node);
    assert_eq!(old.len(), 2, "{old:?}");
    for unit in &old {
        node.systemd
            .slow_stop(unit, std::time::Duration::from_millis(400));
    }
    node.commit(&[("pods/web.yaml", Some(web_deployment("2", strategy)))]);
    node.systemd.take_calls();
    for _ in 0..6 {
        agent.pass(true);
        let calls = node.systemd.take_calls();
        if calls.iter().any(|c| c.starts_with("stopped ")) {
            return (node, old, calls);
        }
    }
    panic!("no old pod stopped in 6 passes");
}

#[test]
fn a_rolling_updates_old_pod_winds_down_while_its_replacement_starts() {
    let (node, old, calls) = roll_with_slow_stops(
        "beside",
        "{type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}",
    );
    let at = |prefix: &str| calls.iter().position(|c| c.starts_with(prefix));
    let stopped = at("stopped ").expect("an old pod stopped");
    let stopping = calls[stopped].trim_start_matches("stopped ").to_string();
    assert!(old.contains(&stopping), "{calls:#?}");
    // The second new pod starts in the pass that stops the first old
    // one, before that stop is done: the room is taken at once.
    let started = calls
        .iter()
        .position(|c| {
            c.starts_with("start berth-default_web-")
                && c.ends_with("_main.service")
                && !old.iter().any(|o| c.ends_with(o.as_str()))
        })
        .expect("a new pod starts in the same pass");
    assert!(started < stopped, "{calls:#?}");
    // What follows the stop (its slice) comes after it, in the same pass.
    let slice_removed = calls
        .iter()
        .position(|c| c.starts_with("stop berth-") && c.ends_with(".slice"))
        .expect("the old pod's slice goes");
    assert!(slice_removed > stopped, "{calls:#?}");
    assert!(node.systemd.unit(&stopping).unwrap().is_none());
}

#[test]
fn a_recreated_deployments_old_pods_stop_before_a_new_one_starts() {
    let (_node, old, calls) = roll_with_slow_stops("recreate", "{type: Recreate}");
    let last_stopped = calls
        .iter()
        .rposition(|c| c.starts_with("stopped "))
        .expect("stopped");
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("stopped ")).count(),
        old.len(),
        "{calls:#?}"
    );
    // Recreate starts nothing until every old pod is gone (a later pass).
    assert!(
        !calls[..last_stopped]
            .iter()
            .any(|c| c.starts_with("start berth-default_web-")),
        "{calls:#?}"
    );
}

#[test]
fn a_pods_story_is_told_in_events_counted_not_repeated() {
    let node = Node::new("events");
    node.commit(&[
        ("pods/c.yaml", Some(pod("c", "sleep, \"100\"", ""))),
        ("pods/keep.yaml", Some(pod("keep", "sleep, \"100\"", ""))),
    ]);
    let mut agent = node.agent();
    agent.pass(true);
    let events = || berth_agent::events::EventStore::new(&node.dir.join("state")).load();
    let story = |object: &str| -> Vec<(String, u64)> {
        events()
            .events()
            .filter(|e| e.object == object)
            .map(|e| (e.reason.clone(), e.count))
            .collect()
    };
    assert_eq!(
        story("Pod/default/c"),
        [
            ("Scheduled".to_string(), 1),
            ("Created".to_string(), 1),
            ("Started".to_string(), 1)
        ]
    );
    // The container exits (3) and systemd restarts it, twice.
    for _ in 0..2 {
        node.systemd.exit_main("berth-default_c_main.service", 3);
        agent.pass(false);
    }
    let backoff = events()
        .events()
        .find(|e| e.object == "Pod/default/c" && e.reason == "BackOff")
        .cloned()
        .expect("a BackOff event");
    assert_eq!(backoff.count, 2, "{backoff:?}");
    assert!(backoff.message.contains("code 3"), "{}", backoff.message);
    assert_eq!(
        story("Pod/default/c")
            .iter()
            .filter(|(r, _)| r == "BackOff")
            .count(),
        1
    );
    // The last state is on the pod's status, and the agent restarted does
    // not tell the old restarts again.
    let state = berth_agent::state::StateStore::new(&node.dir.join("state")).load();
    let mark = &state.lifecycle.containers["berth-default_c_main.service"];
    assert_eq!(
        mark.last.as_ref().map(|l| (l.reason.as_str(), l.exit_code)),
        Some(("Error", Some(3)))
    );
    drop(agent);
    let mut agent = node.agent();
    agent.pass(false);
    assert_eq!(
        events()
            .events()
            .find(|e| e.reason == "BackOff")
            .map(|e| e.count),
        Some(2)
    );
    // Removed from Git: the pod's containers are stopped, and said so.
    node.commit(&[("pods/c.yaml", None)]);
    agent.pass(true);
    assert!(
        story("Pod/default/c").iter().any(|(r, _)| r == "Killing"),
        "{:?}",
        story("Pod/default/c")
    );
}

/// An agent that died after mounting a container's root and before its
/// service started, for a pod Git no longer wants: the next agent unmounts
/// the root and removes its layers.
#[test]
fn a_root_left_mounted_by_a_crash_is_unmounted_and_removed() {
    use berth_runtime::rootfs::Overlay;
    let node = Node::new("leftover");
    node.commit(&[("pods/a.yaml", Some(pod("a", "sleep, \"100\"", "")))]);
    let containers = node.dir.join("state/containers");
    let left = containers.join("default_gone_main");
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(left.join(d)).unwrap();
    }
    let overlay = Overlay {
        options: "lowerdir=/nowhere".into(),
        read_only: false,
    };
    node.mounts.mount(&left.join("rootfs"), &overlay).unwrap();
    let mut agent = node.agent();
    agent.pass(true);
    let mounts = node.mounts.mounted(&node.dir).unwrap();
    assert!(
        !mounts.iter().any(|m| m.starts_with(&left)),
        "the leftover root is unmounted: {mounts:?}"
    );
    assert!(!left.exists(), "its layers are removed");
    assert!(
        mounts.iter().any(|m| m.ends_with("default_a_main/rootfs")),
        "the wanted pod's root stays: {mounts:?}"
    );
}

/// A container with a CPU limit starts without it and gets it once it runs
/// (systemd sets up its sandbox inside its own cgroup, which the limit
/// would throttle), its pod slice likewise; an init container keeps its
/// limit from the start. The node ends as planned, and the next pass finds
/// nothing to do.
#[test]
fn cpu_limits_are_given_once_the_containers_run() {
    let node = Node::new("cpulimit");
    let limited = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  initContainers:\n  - name: init\n    image: busybox:1.37\n    command: [sleep, \"0\"]\n    resources: {limits: {cpu: 100m, memory: 32Mi}}\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sleep, \"100\"]\n    resources: {limits: {cpu: 100m, memory: 32Mi}}\n";
    node.commit(&[("pods/a.yaml", Some(limited.to_string()))]);
    let mut agent = node.agent();
    agent.pass(true);
    assert!(
        agent.state().failures.is_empty(),
        "{:?}",
        agent.state().failures
    );
    let quota = |unit: &str| {
        node.systemd
            .unit(unit)
            .unwrap()
            .unwrap()
            .properties
            .get("CPUQuotaPerSecUSec")
            .cloned()
    };
    let tenth = Some(berth_plan::PropertyValue::Unsigned(100_000));
    let slice = "berth-guaranteed-default_a.slice";
    for unit in [
        "berth-default_a_main.service",
        "berth-default_a_init.service",
        slice,
    ] {
        assert_eq!(quota(unit), tenth, "{unit}");
    }
    let calls = node.systemd.take_calls();
    let at = |call: &str| {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("no {call:?} in {calls:?}"))
    };
    assert!(
        at("start berth-default_a_main.service")
            < at("set-properties berth-default_a_main.service")
    );
    assert!(at(&format!("start {slice}")) < at(&format!("set-properties {slice}")));
    assert!(
        at("set-properties berth-default_a_main.service") < at(&format!("set-properties {slice}"))
    );
    assert!(
        !calls.contains(&"set-properties berth-default_a_init.service".to_string()),
        "the init container kept its limit from its start: {calls:?}"
    );
    agent.pass(false);
    assert_eq!(node.systemd.take_calls(), Vec::<String>::new(), "converged");
}

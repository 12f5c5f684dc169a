//! `berth agent --once` against real Git repositories on disk: fetch,
//! accept, reject a bad commit while keeping the last good one, and report
//! missing branches and unreachable remotes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use berth_qemu_tests::GitHost;
use common::{Run, TempDir, berth};

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  containers:\n    - name: main\n      image: busybox:1.37\n      command: [\"sleep\", \"1d\"]\n";

/// A bare "remote" and a work tree that pushes to it (the same helper the
/// QEMU tier serves to guests), in a temporary directory.
struct Repo {
    dir: TempDir,
    git: GitHost,
}

impl Repo {
    fn new() -> Self {
        let dir = TempDir::new("agent");
        let git = GitHost::new(dir.path(), "remote.git").expect("git repositories");
        Self { dir, git }
    }
    fn commit(&self, file: &str, text: &str, message: &str) -> String {
        self.git
            .push(&[(file, text)], message)
            .expect("commit and push")
    }
    fn config(&self, extra: &str) {
        let url = self.git.dir.join("remote.git");
        self.dir.write("esp/config.yaml", format!("node:\n  name: n1\ngit:\n  url: {}\n  path: manifests\n  pollInterval: 5s\n{extra}", url.display()));
    }
    fn agent_once(&self) -> Run {
        berth(&[
            "agent",
            "--once",
            "--plan-only",
            "--esp-config",
            &self.path("esp/config.yaml"),
            "--state-dir",
            &self.path("state"),
            "--kernel-cmdline",
            "/dev/null",
        ])
    }
    fn status(&self) -> serde_json::Value {
        let run = berth(&[
            "status",
            "--state-dir",
            &self.path("state"),
            "--esp-config",
            &self.path("esp/config.yaml"),
            "--output",
            "json",
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        serde_json::from_str(&run.stdout).expect("status JSON")
    }
    fn path(&self, rel: &str) -> String {
        self.dir
            .path()
            .join(rel)
            .to_str()
            .expect("utf-8")
            .to_string()
    }
}

#[test]
fn a_pushed_commit_is_fetched_and_accepted() {
    let repo = Repo::new();
    let rev = repo.commit("manifests/pod.yaml", POD, "first");
    repo.config("");
    let run = repo.agent_once();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "revision {} accepted: 1 objects, 1 pods for node n1",
            &rev[..12]
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("plan: start berth-default_hello_main.service"),
        "{}",
        run.stderr
    );
    assert_eq!(repo.status()["lastGood"]["revision"], rev);
}

#[test]
fn a_bad_commit_is_rejected_and_the_last_good_revision_kept() {
    let repo = Repo::new();
    let good = repo.commit("manifests/pod.yaml", POD, "good");
    repo.config("");
    assert_eq!(repo.agent_once().code, 0);
    let bad = repo.commit("manifests/broken.yaml", "kind: [unclosed\n", "bad");
    let run = repo.agent_once();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "revision {} rejected (1 errors); keeping {}",
            &bad[..12],
            &good[..12]
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("broken.yaml:1: error: invalid YAML"),
        "{}",
        run.stderr
    );
    let status = repo.status();
    assert_eq!(status["lastGood"]["revision"], good);
    assert_eq!(status["lastAttempted"]["revision"], bad);
    // The same bad revision is not evaluated again; a fix is.
    let again = repo.agent_once();
    assert_eq!(again.code, 1);
    assert!(
        !again.stderr.contains("rejected"),
        "re-evaluated: {}",
        again.stderr
    );
    let fixed = repo.commit(
        "manifests/broken.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fixed}\n",
        "fix",
    );
    assert_eq!(repo.agent_once().code, 0);
    assert_eq!(repo.status()["lastGood"]["revision"], fixed);
}

#[test]
fn a_missing_branch_and_an_unreachable_remote_fail_with_their_cause() {
    let repo = Repo::new();
    repo.commit("manifests/pod.yaml", POD, "first");
    repo.config("  branch: nope\n");
    let run = repo.agent_once();
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("has no branch \"nope\""),
        "{}",
        run.stderr
    );

    repo.dir.write(
        "esp/config.yaml",
        "git:\n  url: git://127.0.0.1:1/nothing.git\n",
    );
    let run = repo.agent_once();
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("fetching branch \"main\" from git://127.0.0.1:1/nothing.git failed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("keeping nothing yet; retrying"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_config_typo_and_a_missing_config_are_explained() {
    let repo = Repo::new();
    repo.dir
        .write("esp/config.yaml", "git:\n  url: /x\n  pollIntervall: 5s\n");
    let run = repo.agent_once();
    assert_eq!(run.code, 3);
    assert!(
        run.stderr.contains("config.yaml: (file): line 3") && run.stderr.contains("pollIntervall"),
        "{}",
        run.stderr
    );
    std::fs::remove_file(repo.dir.path().join("esp/config.yaml")).expect("rm");
    let run = repo.agent_once();
    assert_eq!(run.code, 3);
    assert!(
        run.stderr.contains("no Git URL is configured"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_fetch_cut_short_by_a_power_loss_leaves_a_usable_mirror() {
    let repo = Repo::new();
    repo.commit("manifests/pod.yaml", POD, "first");
    repo.config("");
    assert_eq!(repo.agent_once().code, 0);
    // What an interrupted fetch leaves behind: lock files and a partial pack.
    let mirror = repo.dir.path().join("state/mirror.git");
    std::fs::write(mirror.join("refs/berth/fetched/main.lock"), "partial").expect("lock");
    std::fs::write(mirror.join("packed-refs.lock"), "").expect("lock");
    std::fs::write(
        mirror.join("objects/pack/tmp_pack_XXXX"),
        b"PACK\0\0\0\x02garbage",
    )
    .expect("tmp pack");
    let second = repo.commit(
        "manifests/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        "second",
    );
    let run = repo.agent_once();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(repo.status()["lastGood"]["revision"], second);
}

//! `berth plan --actual` replays what a node recorded: on each snapshot
//! under `tests/data/replay/`, the plan printed is the plan the node
//! applied. Four cases are recorded by the agent's own tests
//! (`BERTH_BLESS=1 cargo test -p berth-agent --test reconcile_loop replay`
//! writes them, after checking that systemd saw exactly those actions):
//! a fresh node, a running node with drift, a pull under way, a claim not
//! ready. `unwired-pod` is `fresh-node` with the pod network of a node
//! whose wiring failed (tier 1 has no netlink to fail for real); its
//! `plan.json` was written by this command and reviewed (see its `DERIVED`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{berth, golden};

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/replay");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("replay cases")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("observed.json").is_file())
        .collect();
    cases.sort();
    cases
}

fn plan(case: &Path, output: &str) -> common::Run {
    let applied: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("plan.json")).unwrap()).unwrap();
    let revision = applied["revision"].as_str().unwrap().to_string();
    let run = berth(&[
        "plan",
        case.join("manifests").to_str().unwrap(),
        "--actual",
        case.join("observed.json").to_str().unwrap(),
        "--revision",
        &revision,
        "--output",
        output,
    ]);
    assert_eq!(
        run.code,
        0,
        "{}: {}{}",
        case.display(),
        run.stdout,
        run.stderr
    );
    run
}

#[test]
fn the_plan_printed_from_each_recorded_snapshot_is_the_plan_the_node_applied() {
    let cases = cases();
    assert!(cases.len() >= 5, "replay cases: {cases:?}");
    for case in cases {
        let run = plan(&case, "json");
        let printed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        if std::env::var_os("BERTH_BLESS").is_some() && case.join("DERIVED").is_file() {
            let text = serde_json::to_string_pretty(&printed["plan"]).unwrap();
            std::fs::write(case.join("plan.json"), text).unwrap();
        }
        let applied: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("plan.json")).unwrap())
                .unwrap();
        assert_eq!(printed["plan"], applied, "{}", case.display());
    }
}

#[test]
fn each_replayed_plan_reads_as_the_golden_text() {
    for case in cases() {
        let run = plan(&case, "text");
        let name = case.file_name().unwrap().to_str().unwrap();
        golden(&format!("replay/{name}/plan.txt"), &run.stdout);
    }
}

//! Every example under `manifests/` loads, validates, and plans exactly as
//! the golden files say, so the examples never rot.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Run, berth, golden, repo_root};

/// `berth plan` on a directory of the repository, for a fixed node.
fn plan(dir: &str, revision: &str, output: &str, extra: &[&str]) -> Run {
    let root = repo_root();
    let dir = root.join(dir);
    let images = root.join("image/images.yaml");
    let mut args = vec![
        "plan",
        dir.to_str().expect("utf-8"),
        "--images",
        images.to_str().expect("utf-8"),
        "--node-memory",
        "4Gi",
        "--node-cpus",
        "2",
        "--revision",
        revision,
        "--output",
        output,
    ];
    if !extra.contains(&"--node") {
        args.extend(["--node", "n1"]);
    }
    args.extend(extra);
    berth(&args)
}

fn actual_snapshot() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/web-running.actual.yaml");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn every_example_manifest_validates_without_errors() {
    let root = repo_root();
    let run = berth(&[
        "validate",
        root.join("manifests").to_str().expect("utf-8"),
        "--images",
        root.join("image/images.yaml").to_str().expect("utf-8"),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains(" 0 errors"), "{}", run.stdout);
    golden("manifests.validate.txt", &run.stdout);
}

#[test]
fn example_plan_matches_the_golden_text() {
    let run = plan("manifests", "example", "text", &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    golden("manifests.plan.txt", &run.stdout);
}

#[test]
fn example_plan_matches_the_golden_json_and_parses() {
    let run = plan("manifests", "example", "json", &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    assert_eq!(value["plan"]["node"], "n1");
    assert!(
        value["plan"]["actions"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    );
    assert!(
        !run.stdout.contains("s3cr3t-demo-token"),
        "a secret leaked into the plan"
    );
    golden("manifests.plan.json", &run.stdout);
}

#[test]
fn example_plan_in_yaml_parses_back() {
    let run = plan("manifests", "example", "yaml", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let value: serde_json::Value = serde_saphyr::from_str(&run.stdout).expect("valid YAML");
    assert_eq!(value["plan"]["revision"], "example");
}

#[test]
fn the_pinned_pods_run_only_on_their_node() {
    let run = plan(
        "manifests",
        "example",
        "json",
        &["--node", "edge-1", "--node-labels", "disk=ssd"],
    );
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    let actions = value["plan"]["actions"].as_array().expect("actions");
    let units: Vec<&str> = actions.iter().filter_map(|a| a["unit"].as_str()).collect();
    assert!(
        units.contains(&"berth-default_metrics-agent_agent.service"),
        "{units:?}"
    );
    assert!(
        units.contains(&"berth-default_cache_cache.service"),
        "{units:?}"
    );
    assert!(value["elsewhere"].as_array().is_some_and(Vec::is_empty));
}

#[test]
fn objects_rejected_for_a_missing_namespace_keep_their_units_running() {
    // manifests/web alone lacks the Namespace: every apps/ object is rejected...
    let run = plan(
        "manifests/web",
        "b7e1c2d",
        "text",
        &["--actual", &actual_snapshot()],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    // ...so their units are held, not pruned; the pod Git dropped is stopped,
    // and the admin's own unit is not even mentioned.
    let held =
        "berth-apps_web-0_httpd.service: Deployment/apps/web is not valid in revision b7e1c2d";
    assert!(run.stdout.contains(held), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("stop berth-default_old-job_main.service"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("berth-admin-debug.service"),
        "{}",
        run.stdout
    );
}

#[test]
fn planning_against_a_running_node_gives_the_reasons_a_person_would() {
    let run = plan(
        "manifests",
        "b7e1c2d",
        "text",
        &["--namespace", "apps", "--actual", &actual_snapshot()],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    golden("web-running.plan.txt", &run.stdout);
}

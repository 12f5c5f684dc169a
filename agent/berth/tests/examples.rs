//! Every example under `manifests/` loads, validates, and plans exactly as
//! the golden files say, so the examples never rot.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{berth, golden, repo_root};

fn plan_args(output: &str) -> Vec<String> {
    let root = repo_root();
    [
        "plan",
        root.join("manifests").to_str().expect("utf-8 path"),
        "--images",
        root.join("image/images.yaml").to_str().expect("utf-8 path"),
        "--node",
        "n1",
        "--node-memory",
        "4Gi",
        "--node-cpus",
        "2",
        "--revision",
        "example",
        "--output",
        output,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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
    let args = plan_args("text");
    let run = berth(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    golden("manifests.plan.txt", &run.stdout);
}

#[test]
fn example_plan_matches_the_golden_json_and_parses() {
    let args = plan_args("json");
    let run = berth(&args.iter().map(String::as_str).collect::<Vec<_>>());
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
    let args = plan_args("yaml");
    let run = berth(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let value: serde_json::Value = serde_saphyr::from_str(&run.stdout).expect("valid YAML");
    assert_eq!(value["plan"]["revision"], "example");
}

#[test]
fn the_pinned_pods_run_only_on_their_node() {
    let mut args = plan_args("json");
    let at = args.iter().position(|a| a == "n1").expect("node flag");
    args[at] = "edge-1".into();
    args.extend(["--node-labels".into(), "disk=ssd".into()]);
    let run = berth(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    let units: Vec<&str> = value["plan"]["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(|a| a["unit"].as_str())
        .collect();
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
fn planning_against_a_running_node_gives_the_reasons_a_person_would() {
    let root = repo_root();
    let actual =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/web-running.actual.yaml");
    let run = berth(&[
        "plan",
        root.join("manifests/web").to_str().expect("utf-8"),
        "--images",
        root.join("image/images.yaml").to_str().expect("utf-8"),
        "--node",
        "n1",
        "--node-memory",
        "4Gi",
        "--node-cpus",
        "2",
        "--revision",
        "b7e1c2d",
        "--actual",
        actual.to_str().expect("utf-8"),
    ]);
    // manifests/web alone lacks the Namespace: every apps/ object is rejected...
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    // ...so their units are held, not pruned; the pod Git dropped is stopped.
    assert!(
        run.stdout.contains(
            "berth-apps_web-0_httpd.service: Deployment/apps/web is not valid in revision b7e1c2d"
        ),
        "{}",
        run.stdout
    );
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

    let with_namespace = berth(&[
        "plan",
        root.join("manifests").to_str().expect("utf-8"),
        "--images",
        root.join("image/images.yaml").to_str().expect("utf-8"),
        "--node",
        "n1",
        "--node-memory",
        "4Gi",
        "--node-cpus",
        "2",
        "--revision",
        "b7e1c2d",
        "--namespace",
        "apps",
        "--actual",
        actual.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        with_namespace.code, 0,
        "{}{}",
        with_namespace.stdout, with_namespace.stderr
    );
    golden("web-running.plan.txt", &with_namespace.stdout);
}

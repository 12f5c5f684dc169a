//! Local ephemeral storage as the planner decides it: a pod over a limit
//! (by the usage the agent measured) is stopped and recorded as evicted;
//! the eviction keeps it down until Git changes it, a Deployment's replica
//! starts again fresh after its restart time, the other pods run on, and a
//! replay of the snapshot decides alike.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_manifest::{SourceFile, load_sources};
use berth_plan::actual::{ActualState, PodFacts};
use berth_plan::ephemeral::{REPLICA_RESTART_SECS, StorageUsage};
use berth_plan::plan::Verb;
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, plan_node};

mod common;

fn pods(command: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: filler}}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["sh", "-c", "{command}"]
      resources: {{limits: {{ephemeral-storage: 32Mi}}}}
  volumes:
    - {{name: scratch, emptyDir: {{sizeLimit: 16Mi}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
        - name: main
          image: busybox:1.37
          command: ["httpd", "-f"]
          resources: {{limits: {{ephemeral-storage: 8Mi}}}}
        - name: side
          image: busybox:1.37
          command: ["sleep", "3600"]
          resources: {{limits: {{ephemeral-storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: quiet}}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["sleep", "3600"]
"#
    )
}

fn plan(yaml: &str, actual: &ActualState) -> NodePlan {
    let catalog = load_sources(vec![SourceFile {
        path: "pods.yaml".into(),
        text: yaml.into(),
    }]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    let node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    plan_node(&catalog, &node, &ImageCatalog::default(), actual, "rev1")
}

/// The node after applying `plan`, at `now`, keeping its evictions.
fn applied(plan: &NodePlan, now: u64) -> ActualState {
    ActualState {
        observed_at: now,
        evictions: plan.evictions.clone(),
        ..common::applied(plan)
    }
}

fn usage(volume: u64, container: u64) -> PodFacts {
    PodFacts {
        storage: Some(StorageUsage {
            volumes: [("scratch".to_string(), volume)].into(),
            containers: [("main".to_string(), container)].into(),
        }),
        ..PodFacts::default()
    }
}

/// The pods that run, a Deployment's replicas as `<name>-<index>` (their
/// template hash left out).
fn running(plan: &NodePlan) -> Vec<String> {
    plan.pods
        .iter()
        .map(|p| {
            let name = match p.id.name.rsplit_once('-') {
                Some((rest, index)) => match rest.rsplit_once('-') {
                    Some((base, hash)) if hash.len() == 8 => format!("{base}-{index}"),
                    _ => p.id.name.clone(),
                },
                None => p.id.name.clone(),
            };
            format!("{}/{name}", p.id.namespace)
        })
        .collect()
}

#[test]
fn a_pod_over_its_limit_is_evicted_and_stays_down_until_git_changes_it() {
    let yaml = pods("while true; do echo x >> /scratch/f; done");
    let first = plan(&yaml, &ActualState::default());
    assert_eq!(
        running(&first),
        ["default/filler", "default/quiet", "default/web-0"]
    );
    let mut now = applied(&first, 1_000);

    // Under its limits: nothing happens.
    now.pods
        .insert("default/filler".into(), usage(16 << 20, 1 << 20));
    let calm = plan(&yaml, &now);
    assert!(calm.plan.actions.is_empty(), "{:#?}", calm.plan.actions);
    assert!(calm.evictions.is_empty());

    // The emptyDir one byte over its sizeLimit: stopped, and recorded.
    now.pods
        .insert("default/filler".into(), usage((16 << 20) + 1, 1 << 20));
    let evict = plan(&yaml, &now);
    let stops: Vec<_> = evict
        .plan
        .actions
        .iter()
        .filter(|a| a.verb == Verb::Stop)
        .collect();
    assert_eq!(stops.len(), 1, "{:#?}", evict.plan.actions);
    assert_eq!(stops[0].unit.as_str(), "berth-default_filler_main.service");
    assert!(
        stops[0].reason.starts_with(
            "pod default/filler is evicted: Usage of EmptyDir volume \"scratch\" exceeds the limit \"16Mi\""
        ),
        "{}",
        stops[0].reason
    );
    assert_eq!(running(&evict), ["default/quiet", "default/web-0"]);
    let refused = &evict.not_admitted[0];
    assert_eq!(
        (refused.pod.to_string().as_str(), refused.status),
        ("default/filler", "Evicted")
    );
    assert_eq!(evict.evictions.len(), 1);
    assert_eq!(evict.evictions[0].at, 1_000);
    assert!(!evict.evictions[0].replica);

    // Its units gone and its usage no longer measured, much later: still
    // evicted (a bare pod is never started again on this node).
    let mut later = applied(&evict, 1_000 + 10 * REPLICA_RESTART_SECS);
    let kept = plan(&yaml, &later);
    assert!(kept.plan.actions.is_empty(), "{:#?}", kept.plan.actions);
    assert_eq!(kept.evictions, evict.evictions);
    assert_eq!(kept.not_admitted[0].status, "Evicted");

    // Git changes the pod: it runs again, and the eviction is forgotten.
    let changed = pods("echo fixed; sleep 3600");
    later.observed_at += 1;
    let again = plan(&changed, &later);
    assert!(running(&again).contains(&"default/filler".to_string()));
    assert!(again.evictions.is_empty());
    assert!(again.not_admitted.is_empty());
}

#[test]
fn a_replica_over_its_container_limit_starts_again_fresh_after_its_restart_time() {
    let yaml = pods("sleep 3600");
    let first = plan(&yaml, &ActualState::default());
    let web0 = first
        .pods
        .iter()
        .find(|p| p.id.name.starts_with("web-"))
        .map(|p| p.id.to_string())
        .expect("a replica");
    let mut now = applied(&first, 5_000);
    now.pods.insert(
        web0,
        PodFacts {
            storage: Some(StorageUsage {
                containers: [("main".to_string(), (8 << 20) + 4096)].into(),
                ..StorageUsage::default()
            }),
            ..PodFacts::default()
        },
    );
    let evict = plan(&yaml, &now);
    assert!(!running(&evict).contains(&"default/web-0".to_string()));
    let e = &evict.evictions[0];
    assert!(e.replica);
    assert!(
        e.message
            .starts_with("Container main exceeded its local ephemeral storage limit \"8Mi\""),
        "{}",
        e.message
    );
    let mut after = applied(&evict, 5_000 + REPLICA_RESTART_SECS - 1);
    assert!(!running(&plan(&yaml, &after)).contains(&"default/web-0".to_string()));
    after.observed_at = 5_000 + REPLICA_RESTART_SECS;
    let back = plan(&yaml, &after);
    assert!(running(&back).contains(&"default/web-0".to_string()));
    assert!(back.evictions.is_empty());
}

#[test]
fn an_eviction_is_not_held_back_by_a_document_that_cannot_be_read() {
    let yaml = pods("sleep 3600");
    let mut now = applied(&plan(&yaml, &ActualState::default()), 7_000);
    now.pods.insert("default/filler".into(), usage(0, 40 << 20));
    let catalog = load_sources(vec![
        SourceFile {
            path: "pods.yaml".into(),
            text: yaml.clone(),
        },
        SourceFile {
            path: "broken.yaml".into(),
            text: "kind: [unclosed\n".into(),
        },
    ]);
    let node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    let p = plan_node(&catalog, &node, &ImageCatalog::default(), &now, "rev2");
    let stopped: Vec<&str> = p
        .plan
        .actions
        .iter()
        .filter(|a| a.verb == Verb::Stop)
        .map(|a| a.unit.as_str())
        .collect();
    assert_eq!(stopped, ["berth-default_filler_main.service"]);
    assert!(p.evictions[0].message.starts_with(
        "Pod ephemeral local storage usage exceeds the total limit of containers 32Mi"
    ));
}

#[test]
fn a_container_may_not_run_as_the_uid_of_the_var_reserve() {
    let catalog = load_sources(vec![SourceFile {
        path: "p.yaml".into(),
        text: "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37\n    securityContext: {runAsUser: 65533}\n".into(),
    }]);
    let node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    let p = plan_node(
        &catalog,
        &node,
        &ImageCatalog::default(),
        &Default::default(),
        "r",
    );
    assert!(p.pods.is_empty());
    let text: Vec<String> = p.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(
            |d| d.contains("spec.containers[0].securityContext.runAsUser")
                && d.contains("root reserve")
        ),
        "{text:?}"
    );
}

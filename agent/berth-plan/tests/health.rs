//! Probe results as the planner weighs them: a failed liveness or startup
//! probe kills the container (SIGTERM, then SIGKILL once the grace period
//! is over), once per container instance; readiness never kills; a replay
//! of the snapshot decides alike.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_manifest::probe::ProbeKind;
use berth_manifest::{SourceFile, load_sources};
use berth_plan::actual::{ActiveState, ActualState, PodFacts};
use berth_plan::health::{ContainerHealth, Killing, Outcome};
use berth_plan::plan::Verb;
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, plan_node};

mod common;

const YAML: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 20
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f", "-p", "8080"]
      ports: [{name: http, containerPort: 8080}]
      livenessProbe:
        httpGet: {port: http, path: /healthz}
        failureThreshold: 2
      readinessProbe:
        tcpSocket: {port: 8080}
      startupProbe:
        exec: {command: ["test", "-e", "/tmp/up"]}
        terminationGracePeriodSeconds: 4
"#;

fn plan(actual: &ActualState) -> NodePlan {
    let catalog = load_sources(vec![SourceFile {
        path: "pods.yaml".into(),
        text: YAML.into(),
    }]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    let node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    plan_node(&catalog, &node, &ImageCatalog::default(), actual, "rev1")
}

fn with_health(base: &ActualState, health: ContainerHealth, now: u64) -> ActualState {
    let mut actual = base.clone();
    actual.observed_at = now;
    actual.pods.insert(
        "default/web".into(),
        PodFacts {
            health: [("main".to_string(), health)].into(),
            ..PodFacts::default()
        },
    );
    actual
}

fn kills(plan: &NodePlan) -> Vec<(String, Option<u64>, String)> {
    plan.plan
        .actions
        .iter()
        .filter(|a| a.verb == Verb::Kill)
        .map(|a| (a.unit.to_string(), a.grace_seconds, a.reason.clone()))
        .collect()
}

#[test]
fn failed_liveness_and_startup_probes_kill_once_then_sigkill_after_the_grace_period() {
    let first = plan(&ActualState::default());
    let unit = first.pods[0].containers[0].name.to_string();
    let probes = first.pods[0].containers[0].probes.clone();
    let base = common::applied(&first);
    let mut health = ContainerHealth::new(&probes, 1_000_000);

    // Alive, not yet started: nothing to do.
    let calm = plan(&with_health(&base, health.clone(), 10));
    assert!(calm.plan.actions.is_empty(), "{:#?}", calm.plan.actions);

    // The startup probe fails its threshold (3): killed with its own grace.
    let startup = probes.startup.clone().unwrap();
    for _ in 0..3 {
        health.record(
            ProbeKind::Startup,
            &startup,
            &Outcome::Failure("command exited with 1".into()),
        );
    }
    let failed = plan(&with_health(&base, health.clone(), 20));
    assert_eq!(
        kills(&failed),
        [(
            unit.clone(),
            Some(4),
            "container main of pod default/web: Startup probe failed: command exited with 1; killed (grace period 4 s), restart policy Always".to_string()
        )]
    );
    // A replay of the snapshot without its secrets decides alike.
    let replay = plan(&with_health(&base, health.clone(), 20).without_secrets());
    assert_eq!(kills(&replay), kills(&failed));

    // Begun: not begun twice; SIGKILL once its grace period is over.
    health.killing = Some(Killing {
        at: 20,
        grace_seconds: 4,
    });
    assert!(kills(&plan(&with_health(&base, health.clone(), 23))).is_empty());
    let overdue = plan(&with_health(&base, health.clone(), 24));
    assert_eq!(
        kills(&overdue),
        [(
            unit.clone(),
            Some(0),
            "container main of pod default/web still runs 4 s after SIGTERM: SIGKILL".to_string()
        )]
    );
    // A container already on its way down (back-off) is left alone.
    let mut backing_off = with_health(&base, health.clone(), 24);
    for u in &mut backing_off.units {
        if u.name.as_str() == unit {
            u.active_state = ActiveState::Activating;
        }
    }
    assert!(kills(&plan(&backing_off)).is_empty());

    // A new instance: started, then liveness fails twice (its threshold),
    // killed with the pod's grace period; readiness failing never kills.
    let mut fresh = ContainerHealth::new(&probes, 30_000_000);
    fresh.record(ProbeKind::Startup, &startup, &Outcome::Success);
    let readiness = probes.readiness.clone().unwrap();
    for _ in 0..5 {
        fresh.record(
            ProbeKind::Readiness,
            &readiness,
            &Outcome::Failure("dial tcp: connection refused".into()),
        );
    }
    assert!(kills(&plan(&with_health(&base, fresh.clone(), 40))).is_empty());
    let liveness = probes.liveness.clone().unwrap();
    for _ in 0..2 {
        fresh.record(
            ProbeKind::Liveness,
            &liveness,
            &Outcome::Failure("HTTP probe failed with statuscode: 500".into()),
        );
    }
    assert_eq!(
        kills(&plan(&with_health(&base, fresh, 41))),
        [(
            unit,
            Some(20),
            "container main of pod default/web: Liveness probe failed: HTTP probe failed with statuscode: 500; killed (grace period 20 s), restart policy Always".to_string()
        )]
    );
}

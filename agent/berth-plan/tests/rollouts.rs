//! Rollouts pass by pass: a changed Deployment replaced within its bounds,
//! Recreate, paused, failed rollouts, and a rollback that touches only the
//! pods the failed revision changed.
#![allow(clippy::expect_used)]

use berth_manifest::Object;
use berth_manifest::{Catalog, SourceFile, load_sources};
use berth_plan::actual::{ActiveState, ActualState};
use berth_plan::plan::Verb;
use berth_plan::rollout::{DeploymentStatus, stops_beside_starts};
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, desire_with, plan_desired};

mod common;

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  STRATEGY
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: main
        image: busybox:1.37
        command: [httpd, -f, -p, "8080"]
        env: [{name: VERSION, value: "VALUE"}]
---
apiVersion: v1
kind: Pod
metadata: {name: bystander}
spec:
  containers: [{name: main, image: busybox:1.37, command: [sleep, "1d"]}]
"#;

fn catalog(strategy: &str, version: &str) -> Catalog {
    let text = WEB.replace("STRATEGY", strategy).replace("VALUE", version);
    let catalog = load_sources(vec![SourceFile {
        path: "web.yaml".into(),
        text,
    }]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    catalog
}

fn node() -> NodeInfo {
    NodeInfo::new("n1", Default::default(), 8 << 30, 4000)
}

fn pass(current: &Catalog, older: &[&Catalog], actual: &ActualState) -> NodePlan {
    let images = ImageCatalog::default();
    let desired = desire_with(current, older, &node(), &images, actual, "rev");
    plan_desired(desired, current, &node(), actual, "rev")
}

/// The node after `plan` applied, `seconds` later, every unit active.
fn after(plan: &NodePlan, before: &ActualState, seconds: u64) -> ActualState {
    let mut next = common::applied(plan);
    next.observed_at = before.observed_at + seconds;
    next.rollouts = plan.rollouts.clone();
    next
}

/// The node once `catalog` was applied on an empty node at `at`.
fn deployed(catalog: &Catalog, at: u64) -> ActualState {
    let empty = ActualState {
        observed_at: at,
        ..Default::default()
    };
    after(&pass(catalog, &[], &empty), &empty, 0)
}

fn web_pods(state: &ActualState) -> Vec<String> {
    let mut pods: Vec<String> = state
        .units
        .iter()
        .filter(|u| u.owner().is_some())
        .filter_map(|u| u.pod())
        .collect();
    pods.dedup();
    pods
}

fn status(plan: &NodePlan) -> &DeploymentStatus {
    plan.deployments
        .iter()
        .find(|d| d.deployment == "default/web")
        .expect("web's status")
}

fn verbs_on(plan: &NodePlan, pod: &str) -> Vec<Verb> {
    plan.plan
        .actions
        .iter()
        .filter(|a| a.pod.as_ref().is_some_and(|p| p.to_string() == pod))
        .map(|a| a.verb)
        .collect()
}

/// Runs passes until the rollout settles; checks the bounds at each.
fn roll(
    from: &Catalog,
    to: &Catalog,
    mut state: ActualState,
    max_pods: usize,
    min_up: usize,
) -> (ActualState, usize) {
    for n in 1..=20 {
        let plan = pass(to, &[from], &state);
        // Never more than the surge bound, never fewer than the bound up
        // (every pod here is ready as soon as it runs).
        let pods = plan
            .pods
            .iter()
            .filter(|p| p.id.name.starts_with("web-"))
            .count();
        assert!(
            pods <= max_pods,
            "pass {n}: {pods} pods: {:#?}",
            status(&plan)
        );
        let stopped: usize = web_pods(&state)
            .iter()
            .filter(|p| !plan.pods.iter().any(|d| d.id.to_string() == **p))
            .count();
        assert!(
            web_pods(&state).len() - stopped >= min_up,
            "pass {n}: below {min_up} pods up"
        );
        // The bystander is never touched.
        assert!(
            verbs_on(&plan, "default/bystander").is_empty() || n == 1 && state.units.is_empty()
        );
        let settled = status(&plan).settled();
        state = after(&plan, &state, 5);
        if settled {
            return (state, n);
        }
    }
    panic!("the rollout did not settle in 20 passes");
}

#[test]
fn a_rolling_update_replaces_pods_one_at_a_time_within_its_bounds() {
    let strategy =
        "strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let first = pass(&v1, &[], &ActualState::default());
    assert_eq!(status(&first).updated_replicas, 3);
    let state = after(
        &first,
        &ActualState {
            observed_at: 1000,
            ..Default::default()
        },
        0,
    );
    let old: Vec<String> = web_pods(&state);
    assert_eq!(old.len(), 3);

    // The first pass of the change: one new pod starts, beside the three.
    let plan = pass(&v2, &[&v1], &state);
    let s = status(&plan);
    assert_eq!((s.replicas, s.updated_replicas), (4, 1), "{s:#?}");
    assert_eq!(s.steps.len(), 1, "{:?}", s.steps);
    assert!(
        s.steps[0].starts_with("start default/web-"),
        "{:?}",
        s.steps
    );
    assert!(
        plan.plan
            .actions
            .iter()
            .all(|a| a.verb != Verb::Stop && a.verb != Verb::Restart)
    );
    assert_eq!(
        plan.plan
            .held
            .iter()
            .filter(|h| h.reason.as_str() == "Rollout")
            .count(),
        2,
        "two new pods wait: {:#?}",
        plan.plan.held
    );
    // Old pods keep running untouched.
    for pod in &old {
        assert!(
            verbs_on(&plan, pod).is_empty(),
            "{pod}: {:?}",
            verbs_on(&plan, pod)
        );
    }

    let (done, passes) = roll(&v1, &v2, state, 4, 3);
    // Three starts and three stops, paired: six passes at most.
    assert!(passes <= 7, "{passes} passes");
    let now = web_pods(&done);
    assert_eq!(now.len(), 3);
    assert!(now.iter().all(|p| !old.contains(p)), "{now:?}");
    let last = pass(&v2, &[&v1], &done);
    let s = status(&last);
    assert_eq!(
        (
            s.updated_replicas,
            s.available_replicas,
            s.conditions[0].reason.as_str()
        ),
        (3, 3, "NewReplicaSetAvailable")
    );
    assert!(last.plan.actions.is_empty(), "{:#?}", last.plan.actions);
}

#[test]
fn surge_zero_stops_an_old_pod_and_its_replacement_starts_in_the_room_it_leaves() {
    let strategy = "strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 0);
    let plan = pass(&v2, &[&v1], &state);
    let s = status(&plan);
    // Never more than 3 pods that are not on their way out.
    assert_eq!(s.updated_replicas, 1, "{s:#?}");
    assert_eq!(s.steps.iter().filter(|x| x.starts_with("stop ")).count(), 1);
    assert_eq!(
        s.steps.iter().filter(|x| x.starts_with("start ")).count(),
        1
    );
    assert_eq!(
        plan.pods
            .iter()
            .filter(|p| p.id.name.starts_with("web-"))
            .count(),
        3
    );
    let (_, passes) = roll(&v1, &v2, state, 3, 2);
    assert!(passes <= 7, "{passes}");
}

#[test]
fn percentages_that_round_to_zero_still_let_one_pod_go() {
    let strategy = "strategy: {rollingUpdate: {maxSurge: \"0%\", maxUnavailable: \"10%\"}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 0);
    // 10 % of 3 rounds down to 0, 0 % surge is 0: one may be unavailable.
    let (_, passes) = roll(&v1, &v2, state, 3, 2);
    assert!(passes <= 7, "{passes}");
}

#[test]
fn recreate_stops_every_old_pod_before_a_new_one_starts() {
    let (v1, v2) = (
        catalog("strategy: {type: Recreate}", "1"),
        catalog("strategy: {type: Recreate}", "2"),
    );
    let state = deployed(&v1, 0);
    let old = web_pods(&state);
    let plan = pass(&v2, &[&v1], &state);
    for pod in &old {
        assert!(verbs_on(&plan, pod).contains(&Verb::Stop), "{pod}");
    }
    assert!(
        plan.plan.actions.iter().all(|a| a.verb != Verb::Start),
        "{:#?}",
        plan.plan.actions
    );
    let state = after(&plan, &state, 1);
    assert!(web_pods(&state).is_empty());
    let plan = pass(&v2, &[&v1], &state);
    assert_eq!(status(&plan).updated_replicas, 3);
    assert_eq!(
        plan.plan
            .actions
            .iter()
            .filter(|a| a.verb == Verb::Start)
            .count(),
        3
    );
}

#[test]
fn min_ready_seconds_holds_the_old_pods_until_the_new_one_has_been_ready_that_long() {
    let strategy =
        "minReadySeconds: 30\n  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 100);
    // The old pods have been ready for 30 s too.
    let state = after(&pass(&v1, &[], &state), &state, 30);
    let state = after(&pass(&v1, &[], &state), &state, 0);
    let plan = pass(&v2, &[&v1], &state);
    let state = after(&plan, &state, 1);
    let plan = pass(&v2, &[&v1], &state);
    assert!(
        plan.plan.actions.iter().all(|a| a.verb != Verb::Stop),
        "ready 0 s"
    );
    let wake = plan.wake_at.expect("a wake for minReadySeconds");
    assert_eq!(wake, state.observed_at + 30);
    let state = after(&plan, &state, 30);
    let plan = pass(&v2, &[&v1], &state);
    assert_eq!(
        plan.plan
            .actions
            .iter()
            .filter(|a| a.verb == Verb::Stop)
            .count(),
        1,
        "ready 30 s: one old pod stops"
    );
}

#[test]
fn a_crash_looping_new_pod_fails_the_rollout_and_the_rollback_touches_only_it() {
    let strategy = "strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 0);
    let old = web_pods(&state);
    let plan = pass(&v2, &[&v1], &state);
    let mut state = after(&plan, &state, 20);
    let new: Vec<String> = web_pods(&state)
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(new.len(), 1);
    for u in state
        .units
        .iter_mut()
        .filter(|u| u.pod().as_deref() == Some(new[0].as_str()) && !u.name.is_slice())
    {
        u.restarts = 2;
        u.active_state = ActiveState::Activating;
    }
    let plan = pass(&v2, &[&v1], &state);
    let failed = status(&plan).failed.clone().expect("failed");
    assert_eq!(failed.reason, "CrashLoopBackOff");
    assert!(failed.message.contains(&new[0]), "{}", failed.message);
    // Failed: it moves no further; the old pods keep running.
    let state = after(&plan, &state, 1);
    let again = pass(&v2, &[&v1], &state);
    assert!(
        again
            .plan
            .actions
            .iter()
            .all(|a| a.verb != Verb::Stop && a.verb != Verb::Start)
    );
    // The rollback is the same machinery toward the old template: only the
    // new pod stops, the old ones are not touched.
    let back = pass(&v1, &[&v2], &state);
    for pod in &old {
        assert!(
            verbs_on(&back, pod).is_empty(),
            "{pod}: {:?}",
            verbs_on(&back, pod)
        );
    }
    assert!(verbs_on(&back, &new[0]).contains(&Verb::Stop));
    assert!(status(&back).failed.is_none());
}

#[test]
fn a_new_pod_that_never_becomes_ready_misses_the_progress_deadline() {
    let strategy = "progressDeadlineSeconds: 60\n  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 10);
    let old = web_pods(&state);
    let plan = pass(&v2, &[&v1], &state);
    let mut state = after(&plan, &state, 30);
    for u in state.units.iter_mut() {
        if u.pod()
            .is_some_and(|p| !old.contains(&p) && p.starts_with("default/web-"))
        {
            u.active_state = ActiveState::Activating;
        }
    }
    let plan = pass(&v2, &[&v1], &state);
    assert!(status(&plan).failed.is_none(), "30 s: still progressing");
    state.observed_at += 31;
    state.rollouts = plan.rollouts.clone();
    let plan = pass(&v2, &[&v1], &state);
    let s = status(&plan);
    assert_eq!(
        s.failed.as_ref().map(|f| f.reason.as_str()),
        Some("ProgressDeadlineExceeded")
    );
    assert_eq!(s.conditions[0].status, "False");
}

#[test]
fn a_paused_deployment_starts_no_rollout() {
    let (v1, v2) = (catalog("", "1"), catalog("paused: true", "2"));
    let state = deployed(&v1, 0);
    let plan = pass(&v2, &[&v1], &state);
    assert!(plan.plan.actions.is_empty(), "{:#?}", plan.plan.actions);
    assert_eq!(status(&plan).conditions[0].reason, "DeploymentPaused");
}

#[test]
fn without_the_old_revision_at_hand_old_pods_are_held_as_they_run() {
    let (v1, v2) = (catalog("", "1"), catalog("", "2"));
    let state = deployed(&v1, 0);
    // A replay with only the new manifests (`berth plan --actual`).
    let plan = pass(&v2, &[], &state);
    assert!(
        plan.plan
            .actions
            .iter()
            .all(|a| a.verb != Verb::Stop || a.unit.as_str().contains("web"))
    );
    let kept = plan
        .plan
        .held
        .iter()
        .filter(|h| h.reason.as_str() == "Rollout" && h.unit.ends_with(".service"))
        .count();
    // 25 % of 3: surge 1, unavailable 0: three old pods kept, one new starts.
    assert_eq!(kept, 3, "{:#?}", plan.plan.held);
    assert_eq!(status(&plan).updated_replicas, 1);
}

#[test]
fn both_bounds_zero_is_refused() {
    let text = WEB
        .replace(
            "STRATEGY",
            "strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: \"0%\"}}",
        )
        .replace("VALUE", "1");
    let catalog = load_sources(vec![SourceFile {
        path: "web.yaml".into(),
        text,
    }]);
    let errors: Vec<String> = catalog
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.strategy.rollingUpdate.maxUnavailable")
                && e.contains("may not be 0 when `maxSurge` is 0")),
        "{errors:#?}"
    );
}

#[test]
fn a_completed_rollout_stays_complete_when_its_pods_are_lost_later() {
    let strategy = "strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let state = deployed(&v1, 0);
    let (mut state, _) = roll(&v1, &v2, state, 4, 3);
    assert!(status(&pass(&v2, &[&v1], &state)).failed.is_none());
    // A reboot took one pod's units; another crash-loops since.
    let pods = web_pods(&state);
    state
        .units
        .retain(|u| u.pod().as_deref() != Some(pods[0].as_str()));
    for u in state
        .units
        .iter_mut()
        .filter(|u| u.pod().as_deref() == Some(pods[1].as_str()) && !u.name.is_slice())
    {
        u.restarts = 5;
    }
    state.observed_at += 3600;
    let plan = pass(&v2, &[&v1], &state);
    let s = status(&plan);
    assert!(s.failed.is_none(), "{s:#?}");
    assert_eq!(s.conditions[0].reason, "NewReplicaSetAvailable");
    assert!(
        verbs_on(&plan, &pods[0]).contains(&Verb::Start),
        "the lost pod starts again"
    );
}

#[test]
fn old_pods_stop_beside_the_starts_only_when_they_share_nothing_exclusive() {
    let strategy = "strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";
    // Rolled until a pass stops an old pod; which units stop beside.
    let beside_at_first_stop = |v1: &Catalog, v2: &Catalog| {
        let mut state = deployed(v1, 0);
        for _ in 0..5 {
            let plan = pass(v2, &[v1], &state);
            if plan.plan.actions.iter().any(|a| a.verb == Verb::Stop) {
                return plan.plan.beside.clone();
            }
            state = after(&plan, &state, 5);
        }
        panic!(
            "no old pod stopped: {:#?}",
            status(&pass(v2, &[v1], &state))
        );
    };
    let (v1, v2) = (catalog(strategy, "1"), catalog(strategy, "2"));
    let beside = beside_at_first_stop(&v1, &v2);
    assert!(
        beside.iter().any(|u| u.as_str().ends_with("_main.service"))
            && beside.iter().any(|u| u.is_slice()),
        "{beside:?}"
    );
    // On the host's network, or with a claim or a host port, old and new
    // pods would want the same thing at once: the stop goes first.
    let spec_with = |extra: &str, at: &str| {
        let text = WEB
            .replace("STRATEGY", strategy)
            .replace("VALUE", "1")
            .replace(at, &format!("{extra}{at}"));
        let c = load_sources(vec![SourceFile {
            path: "web.yaml".into(),
            text,
        }]);
        assert_eq!(c.error_count(), 0, "{:#?}", c.diagnostics);
        let Some(Object::Deployment(d)) = c
            .objects
            .iter()
            .map(|o| &o.object)
            .find(|o| matches!(o, Object::Deployment(_)))
            .cloned()
        else {
            panic!("no Deployment");
        };
        stops_beside_starts(d.spec.as_ref().expect("spec"))
    };
    let pod_level = "      containers:\n";
    let container_level = "        env:";
    assert!(spec_with("", pod_level));
    assert!(!spec_with("      hostNetwork: true\n", pod_level));
    assert!(!spec_with(
        "      volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]\n",
        pod_level
    ));
    assert!(!spec_with(
        "        ports: [{containerPort: 8080, hostPort: 8080}]\n",
        container_level
    ));
}

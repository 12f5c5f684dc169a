//! How plans react to what already runs: adoption, in-place resize,
//! restarts, pruning, and what is never touched.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_manifest::{SourceFile, load_sources};
use berth_plan::actual::{ActiveState, ActualState, ActualUnit};
use berth_plan::plan::Verb;
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, PropertyValue, UnitName, plan_node};

mod common;
use common::applied;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f"]
      env:
        - name: TOKEN
          valueFrom:
            secretKeyRef: {name: creds, key: token}
      resources:
        requests: {cpu: 250m, memory: 64Mi}
        limits: {cpu: 500m, memory: 64Mi}
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
stringData:
  token: hunter2-very-secret
"#;

fn node() -> NodeInfo {
    NodeInfo::new("n1", Default::default(), 4 << 30, 2000)
}

fn plan_for(files: &[(&str, &str)], actual: &ActualState) -> NodePlan {
    let sources = files
        .iter()
        .map(|(p, t)| SourceFile {
            path: p.into(),
            text: t.to_string(),
        })
        .collect();
    let catalog = load_sources(sources);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    plan_node(&catalog, &node(), &ImageCatalog::default(), actual, "rev1")
}

/// The plan's action on `unit`; the test fails if there is none.
fn action<'a>(plan: &'a NodePlan, unit: &str) -> &'a berth_plan::Action {
    plan.plan
        .actions
        .iter()
        .find(|a| a.unit.as_str() == unit)
        .unwrap_or_else(|| panic!("no action on {unit}: {:#?}", plan.plan.actions))
}

fn verbs(plan: &NodePlan) -> Vec<(Verb, String)> {
    plan.plan
        .actions
        .iter()
        .map(|a| (a.verb, a.unit.to_string()))
        .collect()
}

#[test]
fn a_node_that_runs_what_git_says_needs_no_actions() {
    let first = plan_for(&[("pod.yaml", POD)], &ActualState::default());
    assert_eq!(
        verbs(&first),
        [
            (Verb::CreateSlice, "berth-burstable.slice".to_string()),
            (
                Verb::CreateSlice,
                "berth-burstable-default_web.slice".to_string()
            ),
            (Verb::Start, "berth-default_web_main.service".to_string()),
        ]
    );
    let again = plan_for(&[("pod.yaml", POD)], &applied(&first));
    assert!(again.plan.actions.is_empty(), "{:#?}", again.plan.actions);
}

#[test]
fn a_memory_limit_change_resizes_in_place_by_default() {
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    let changed = POD.replace(
        "limits: {cpu: 500m, memory: 64Mi}",
        "limits: {cpu: 500m, memory: 128Mi}",
    );
    let plan = plan_for(&[("pod.yaml", &changed)], &before);
    let unit = action(&plan, "berth-default_web_main.service");
    assert_eq!(unit.verb, Verb::Update);
    assert!(
        unit.reason.contains("memory limit 64Mi → 128Mi"),
        "{}",
        unit.reason
    );
    let slice = action(&plan, "berth-burstable-default_web.slice");
    assert_eq!(slice.verb, Verb::UpdateSlice);
}

#[test]
fn a_resize_policy_of_restart_container_restarts_it() {
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    let changed = POD
        .replace("limits: {cpu: 500m, memory: 64Mi}", "limits: {cpu: 500m, memory: 128Mi}")
        .replace("      resources:", "      resizePolicy:\n        - {resourceName: memory, restartPolicy: RestartContainer}\n      resources:");
    let plan = plan_for(&[("pod.yaml", &changed)], &before);
    let unit = action(&plan, "berth-default_web_main.service");
    assert_eq!(unit.verb, Verb::Restart);
    assert!(
        unit.reason.contains("memory limit 64Mi → 128Mi"),
        "{}",
        unit.reason
    );
}

#[test]
fn an_image_change_restarts_the_container_and_says_so() {
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    let plan = plan_for(
        &[("pod.yaml", &POD.replace("busybox:1.37", "busybox:1.38"))],
        &before,
    );
    assert_eq!(
        verbs(&plan),
        [(Verb::Restart, "berth-default_web_main.service".to_string())]
    );
    assert_eq!(
        plan.plan.actions[0].reason,
        "image busybox:1.37 → busybox:1.38"
    );
}

/// Plans `pod` with its Secret rotated over `before`: the container is
/// restarted, and neither the old value nor the new one is in the plan.
fn rotated_without_showing_it(pod: &str, before: &ActualState) -> NodePlan {
    let rotated = pod.replace("hunter2-very-secret", "rotated-secret-value");
    let plan = plan_for(&[("pod.yaml", &rotated)], before);
    let json = serde_json::to_string(&plan).expect("serializes");
    assert!(
        !json.contains("hunter2") && !json.contains("rotated-secret-value"),
        "{json}"
    );
    assert_eq!(plan.plan.actions[0].verb, Verb::Restart);
    plan
}

#[test]
fn secret_values_never_appear_in_a_plan_or_its_reasons() {
    let first = plan_for(&[("pod.yaml", POD)], &ActualState::default());
    let json = serde_json::to_string(&first).expect("serializes");
    assert!(!json.contains("hunter2"), "{json}");
    // Not even in the unit: `Environment=` is readable by any local user
    // over D-Bus; the value goes in a root-only file systemd reads.
    let unit = first.pods[0].units().next().expect("one unit");
    let props = serde_json::to_string(unit.properties_for_apply()).expect("serializes");
    assert!(
        !props.contains("hunter2") && !props.contains("TOKEN="),
        "{props}"
    );
    let file = unit
        .environment_file_for_apply()
        .expect("an environment file");
    assert!(
        file.path
            .starts_with("/var/lib/berth/containers/default_web_main/environment-"),
        "{}",
        file.path
    );
    assert_eq!(
        unit.properties_for_apply().get("EnvironmentFiles"),
        Some(&PropertyValue::list([file.path.clone()]))
    );
    assert_eq!(file.body.0, b"TOKEN=\"hunter2-very-secret\"\n");
    let before = applied(&first);
    let plan = rotated_without_showing_it(POD, &before);
    assert_eq!(
        plan.plan.actions[0].reason,
        "environment from Secrets changed"
    );
    // The apply stage gets the new value, in a file of a new name.
    let unit = plan.pods[0].units().next().expect("one unit");
    let rotated = unit.environment_file_for_apply().expect("a file");
    assert_eq!(rotated.body.0, b"TOKEN=\"rotated-secret-value\"\n");
    assert_ne!(rotated.path, file.path);
}

#[test]
fn a_secret_expanded_into_the_command_line_or_another_variable_never_appears() {
    let pod = POD
        .replace(
            r#"command: ["httpd", "-f"]"#,
            r#"command: ["httpd", "-f"]
      args: ["--token=$(TOKEN)", "--plain=$(MODE)"]"#,
        )
        .replace(
            "      env:\n",
            "      env:\n        - {name: MODE, value: fast}\n",
        )
        .replace(
            "            secretKeyRef: {name: creds, key: token}\n",
            "            secretKeyRef: {name: creds, key: token}\n        - {name: HEADER, value: \"Bearer $(TOKEN)\"}\n",
        );
    let first = plan_for(&[("pod.yaml", &pod)], &ActualState::default());
    let json = serde_json::to_string(&first).expect("serializes");
    assert!(!json.contains("hunter2"), "{json}");
    assert!(
        json.contains(r#""--token=<secret default/creds key token>","--plain=fast""#),
        "{json}"
    );
    // A value built from a secret is a secret too.
    let unit = first.pods[0].units().next().expect("one unit");
    let file = unit.environment_file_for_apply().expect("a file");
    assert_eq!(
        file.body.0,
        b"TOKEN=\"hunter2-very-secret\"\nHEADER=\"Bearer hunter2-very-secret\"\n"
    );
    // The unit itself gets the values.
    let unit = first.pods[0].units().next().expect("one unit");
    let Some(PropertyValue::Exec(exec)) = unit.properties_for_apply().get("ExecStart") else {
        panic!("no command")
    };
    assert_eq!(
        exec[0].argv,
        ["httpd", "-f", "--token=hunter2-very-secret", "--plain=fast"]
    );
    // A rotated secret restarts the container; neither value is shown.
    let before = applied(&first);
    rotated_without_showing_it(&pod, &before);
    let rotated = pod.replace("hunter2-very-secret", "rotated-secret-value");
    // The snapshot that leaves the node holds digests of the command's
    // arguments too, and plans the same.
    let snapshot = before.without_secrets();
    let text = serde_json::to_string(&snapshot).expect("serializes");
    assert!(!text.contains("hunter2"), "{text}");
    let again = plan_for(&[("pod.yaml", &pod)], &snapshot);
    assert!(again.plan.actions.is_empty(), "{:#?}", again.plan.actions);
    let replanned = plan_for(&[("pod.yaml", &rotated)], &snapshot);
    assert_eq!(replanned.plan.actions[0].verb, Verb::Restart);
}

#[test]
fn pods_removed_from_git_are_stopped_and_their_slices_removed_last() {
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    let plan = plan_for(
        &[(
            "other.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        )],
        &before,
    );
    assert_eq!(
        verbs(&plan),
        [
            (Verb::Stop, "berth-default_web_main.service".to_string()),
            (
                Verb::RemoveSlice,
                "berth-burstable-default_web.slice".to_string()
            ),
            (Verb::RemoveSlice, "berth-burstable.slice".to_string()),
        ]
    );
    assert!(
        plan.plan.actions[0]
            .reason
            .contains("pod default/web is not in revision rev1"),
        "{}",
        plan.plan.actions[0].reason
    );
}

#[test]
fn units_berth_did_not_create_are_never_touched() {
    let mut actual = ActualState::default();
    actual.units.push(ActualUnit {
        name: UnitName::from_observed("berth-default_old_main.service"),
        active_state: ActiveState::Active,
        properties: Default::default(),
        restarts: 0,
    });
    actual.units.push(ActualUnit {
        name: UnitName::from_observed("berth-default_web_main.service"),
        active_state: ActiveState::Active,
        properties: [("Description", PropertyValue::text("the admin's own"))]
            .into_iter()
            .collect(),
        restarts: 0,
    });
    let plan = plan_for(&[("pod.yaml", POD)], &actual);
    assert!(
        plan.plan
            .actions
            .iter()
            .all(|a| !a.unit.as_str().contains("_old_")
                && a.pod.as_ref().is_none_or(|p| p.name != "web")),
        "{:#?}",
        plan.plan.actions
    );
    assert_eq!(plan.rejected.len(), 1);
    // A problem of the node, not of the revision: it does not reject a commit.
    assert!(plan.diagnostics.iter().all(|d| !d.is_error()));
    assert!(
        plan.conflicts[0]
            .message
            .contains("was not created by Berth"),
        "{}",
        plan.conflicts[0].message
    );
}

#[test]
fn nothing_is_pruned_while_a_document_cannot_be_read() {
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    let sources = vec![SourceFile {
        path: "broken.yaml".into(),
        text: "kind: [unclosed\n".into(),
    }];
    let catalog = load_sources(sources);
    assert_eq!(catalog.error_count(), 1);
    let plan = plan_node(&catalog, &node(), &ImageCatalog::default(), &before, "rev2");
    assert!(plan.plan.actions.is_empty(), "{:#?}", plan.plan.actions);
    assert_eq!(plan.plan.held.len(), 3);
}

#[test]
fn a_failed_container_restarts_only_when_its_restart_policy_allows() {
    let mut before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    for u in &mut before.units {
        if u.name.as_str().ends_with(".service") {
            u.active_state = ActiveState::Failed;
        }
    }
    let plan = plan_for(&[("pod.yaml", POD)], &before);
    assert_eq!(
        verbs(&plan),
        [(Verb::Restart, "berth-default_web_main.service".to_string())]
    );

    let never = POD.replace(
        "spec:\n  containers:",
        "spec:\n  restartPolicy: Never\n  containers:",
    );
    let mut before = applied(&plan_for(&[("pod.yaml", &never)], &ActualState::default()));
    for u in &mut before.units {
        if u.name.as_str().ends_with(".service") {
            u.active_state = ActiveState::Failed;
        }
    }
    let plan = plan_for(&[("pod.yaml", &never)], &before);
    assert!(plan.plan.actions.is_empty(), "{:#?}", plan.plan.actions);
}

#[test]
fn a_deployment_expands_into_stable_replica_names() {
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: srv, image: busybox, command: ["sleep", "1d"]}]
"#;
    let plan = plan_for(&[("d.yaml", deployment)], &ActualState::default());
    let names: Vec<String> = plan.pods.iter().map(|p| p.id.name.clone()).collect();
    // `<name>-<template hash>-<index>`, one hash for all three.
    let hash = names[0]
        .strip_prefix("api-")
        .and_then(|r| r.strip_suffix("-0"))
        .expect("api-<hash>-0")
        .to_string();
    assert_eq!(hash.len(), 8, "{names:?}");
    assert_eq!(
        names,
        [0, 1, 2].map(|i| format!("api-{hash}-{i}")),
        "stable across plans of one template"
    );
    // The same template scaled keeps its hash; a changed one gets another.
    let scaled = plan_for(
        &[("d.yaml", &deployment.replace("replicas: 3", "replicas: 4"))],
        &ActualState::default(),
    );
    assert!(scaled.pods.iter().all(|p| p.id.name.contains(&hash)));
    let changed = plan_for(
        &[("d.yaml", &deployment.replace("1d", "2d"))],
        &ActualState::default(),
    );
    assert!(changed.pods.iter().all(|p| !p.id.name.contains(&hash)));
    assert!(
        plan.pods
            .iter()
            .all(|p| p.qos == berth_plan::QosClass::BestEffort)
    );
}

#[test]
fn node_selection_honours_node_name_selectors_and_affinity() {
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: here}
spec:
  nodeSelector: {kubernetes.io/hostname: n1}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions: [{key: kubernetes.io/os, operator: In, values: [linux]}]
  containers: [{name: c, image: busybox, command: ["true"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned-elsewhere}
spec:
  nodeName: n2
  containers: [{name: c, image: busybox, command: ["true"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: wrong-arch}
spec:
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions: [{key: kubernetes.io/arch, operator: NotIn, values: [amd64]}]
  containers: [{name: c, image: busybox, command: ["true"]}]
"#;
    let plan = plan_for(&[("p.yaml", pods)], &ActualState::default());
    let here: Vec<&str> = plan.pods.iter().map(|p| p.id.name.as_str()).collect();
    assert_eq!(here, ["here"]);
    let elsewhere: Vec<String> = plan
        .elsewhere
        .iter()
        .map(|n| format!("{}: {}", n.object, n.reason))
        .collect();
    assert_eq!(
        elsewhere,
        [
            "Pod/default/pinned-elsewhere: spec.nodeName is n2",
            "Pod/default/wrong-arch: no required node affinity term matches this node's labels"
        ]
    );
}

#[test]
fn a_pod_and_a_deployment_replica_of_the_same_name_are_both_refused() {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: main, image: busybox:1.37, command: [sleep, \"1\"]}]\n";
    let alone = plan_for(&[("d.yaml", deployment)], &ActualState::default());
    let (first, second) = (alone.pods[0].id.name.clone(), alone.pods[1].id.name.clone());
    let race = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {first}}}\nspec:\n  containers: [{{name: main, image: busybox:1.37, command: [sleep, \"1\"]}}]\n---\n{deployment}"
    );
    let files = [("race.yaml", race.as_str())];
    let plan = plan_for(&files, &ActualState::default());
    let errors: Vec<String> = plan
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains(&format!("pod default/{first} is made by")),
        "{errors:#?}"
    );
    let ids: Vec<String> = plan.pods.iter().map(|p| p.id.to_string()).collect();
    assert_eq!(
        ids,
        vec![format!("default/{second}")],
        "the other replica still runs"
    );
}

#[test]
fn an_in_place_resize_leaves_the_oom_score_for_the_next_restart() {
    const UNIT: &str = "berth-default_web_main.service";
    let before = applied(&plan_for(&[("pod.yaml", POD)], &ActualState::default()));
    // A larger request lowers a Burstable pod's oom_score_adj, which systemd
    // cannot change on a running unit: the resize leaves it out.
    let resized = POD.replace(
        "requests: {cpu: 250m, memory: 64Mi}\n        limits: {cpu: 500m, memory: 64Mi}",
        "requests: {cpu: 250m, memory: 96Mi}\n        limits: {cpu: 500m, memory: 128Mi}",
    );
    let plan = plan_for(&[("pod.yaml", &resized)], &before);
    let unit = action(&plan, UNIT);
    assert_eq!(unit.verb, Verb::Update);
    let props: Vec<&str> = unit.changes.iter().map(|c| c.property.as_str()).collect();
    assert!(
        props.contains(&"MemoryMax") && props.contains(&"MemoryLow"),
        "{props:?}"
    );
    assert!(!props.contains(&"OOMScoreAdjust"), "{props:?}");
    // Once the resize is applied, the old score is no reason for an action.
    let old_score = before
        .units
        .iter()
        .find(|u| u.name.as_str() == UNIT)
        .and_then(|u| u.properties.get("OOMScoreAdjust").cloned())
        .expect("score");
    let mut after = applied(&plan_for(
        &[("pod.yaml", &resized)],
        &ActualState::default(),
    ));
    for u in after.units.iter_mut().filter(|u| u.name.as_str() == UNIT) {
        u.properties.insert("OOMScoreAdjust", old_score.clone());
    }
    let plan = plan_for(&[("pod.yaml", &resized)], &after);
    assert!(
        plan.plan.actions.iter().all(|a| a.unit.as_str() != UNIT),
        "{:?}",
        verbs(&plan)
    );
}

const NODE_IMAGE: &str = "apiVersion: berth.dev/v1alpha1\nkind: NodeImage\nmetadata: {name: os}\nspec:\n  version: '2'\n  bundle: {image: r.example/berth/os:2}\n";

#[test]
fn a_staged_os_update_stops_every_pod_then_reboots_and_plan_says_so() {
    use berth_plan::osupdate::{OsAction, OsFacts, UpdateFact};
    let files = [("pod.yaml", POD), ("os.yaml", NODE_IMAGE)];
    let mut running = applied(&plan_for(&files, &ActualState::default()));
    running.observed_at = 1_800_000_000;
    let facts = |update: Option<&str>, other: Option<&str>| OsFacts {
        version: "1".into(),
        slot: Some("A".into()),
        other_slot_version: other.map(Into::into),
        update: update.map(|state| UpdateFact {
            version: "2".into(),
            declaration: Some("2 from image r.example/berth/os:2".into()),
            state: state.into(),
            message: String::new(),
        }),
        staging_failed: None,
    };
    running.os = Some(facts(None, None));
    let plan = plan_for(&files, &running);
    assert!(plan.plan.actions.is_empty(), "{:#?}", plan.plan.actions);
    let os = plan.os.as_ref().expect("an OS decision");
    assert_eq!((os.action, os.stops.len()), (OsAction::Stage, 0));

    running.os = Some(facts(Some("Installed"), Some("2")));
    let plan = plan_for(&files, &running);
    let os = plan.os.as_ref().expect("an OS decision");
    assert_eq!(os.action, OsAction::Reboot, "{}", os.message);
    let stops: Vec<(Verb, &str)> = os.stops.iter().map(|a| (a.verb, a.unit.as_str())).collect();
    // The container, not the slices: they go with the system.
    assert_eq!(stops, [(Verb::Stop, "berth-default_web_main.service")]);
    assert!(os.stops[0].reason.contains("reboots into OS version 2"));
    // Nothing else changes on the pods.
    assert!(plan.plan.actions.is_empty(), "{:#?}", plan.plan.actions);
    // The NodeImage gone from Git before the reboot: the staged version is
    // withdrawn, and nothing stops.
    let plain = plan_for(&[("pod.yaml", POD)], &running);
    let os = plain.os.as_ref().expect("a withdrawal");
    assert_eq!((os.action, os.stops.len()), (OsAction::Withdraw, 0));
    // Without a NodeImage and nothing staged, there is no decision at all.
    running.os = Some(facts(None, None));
    assert!(plan_for(&[("pod.yaml", POD)], &running).os.is_none());
}

#[test]
fn two_node_images_for_one_node_are_an_error_of_the_revision() {
    let other = NODE_IMAGE
        .replace("name: os", "name: os-too")
        .replace("version: '2'", "version: '3'");
    // Planned as they load: the planner, not the loader, finds the clash.
    let plan_of = |files: [(&str, &str); 2]| {
        let sources = files
            .iter()
            .map(|(p, t)| SourceFile {
                path: p.into(),
                text: t.to_string(),
            })
            .collect();
        plan_node(
            &load_sources(sources),
            &node(),
            &ImageCatalog::default(),
            &ActualState::default(),
            "rev1",
        )
    };
    let plan = plan_of([("a.yaml", NODE_IMAGE), ("b.yaml", other.as_str())]);
    assert!(plan.os.is_none());
    let errors: Vec<String> = plan
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| format!("{}: {}", d.field.as_deref().unwrap_or(""), d.message))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("spec.nodeSelector")
            && errors[0].contains("NodeImages os, os-too all select node n1"),
        "{errors:#?}"
    );
    // One that selects other nodes does not count.
    let elsewhere = other.replace(
        "spec:\n",
        "spec:\n  nodeSelector: {matchLabels: {site: far}}\n",
    );
    let plan = plan_of([("a.yaml", NODE_IMAGE), ("b.yaml", elsewhere.as_str())]);
    assert_eq!(plan.os.as_ref().map(|o| o.version.as_str()), Some("2"));
}

#[test]
fn an_app_container_and_its_pod_slice_get_their_cpu_limit_once_running() {
    let init = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  initContainers:
    - name: setup
      image: busybox:1.37
      command: ["true"]
      resources: {limits: {cpu: 100m, memory: 32Mi}}
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f"]
      resources: {limits: {cpu: 500m, memory: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: free}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["httpd", "-f"]
      resources: {limits: {memory: 64Mi}}
"#;
    let plan = plan_for(&[("pod.yaml", init)], &ActualState::default());
    let later = |unit: &str| action(&plan, unit).after_start.clone();
    let cpu = vec![berth_plan::plan::AFTER_START.to_string()];
    assert_eq!(later("berth-default_web_main.service"), cpu);
    assert_eq!(later("berth-guaranteed-default_web.slice"), cpu);
    // An init container runs to completion inside its start job.
    assert_eq!(
        later("berth-default_web_setup.service"),
        Vec::<String>::new()
    );
    // No CPU limit: nothing to give later, to the container or its slice.
    assert_eq!(
        later("berth-default_free_main.service"),
        Vec::<String>::new()
    );
    assert_eq!(
        later("berth-burstable-default_free.slice"),
        Vec::<String>::new()
    );
    // The node's own slices have no limit of a pod's.
    for a in plan.plan.actions.iter().filter(|a| a.pod.is_none()) {
        assert!(a.after_start.is_empty(), "{a:?}");
    }
    // The properties still say the limit the unit ends with.
    assert!(
        action(&plan, "berth-default_web_main.service")
            .properties
            .get(berth_plan::plan::AFTER_START)
            .is_some()
    );
}

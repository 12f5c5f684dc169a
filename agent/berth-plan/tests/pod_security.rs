//! Pod Security as a node applies it: a pod that breaks its level is refused
//! with the level, the check and the field, the other pods run, and a
//! namespace may only make its pods' level stricter.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_manifest::{SourceFile, load_sources};
use berth_plan::podsecurity::Level;
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, plan_node, validate_pods};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: root-please, namespace: shop}
spec:
  securityContext:
    seccompProfile: {type: Unconfined}
  containers:
    - name: main
      image: busybox:1.37
      command: ["sleep", "3600"]
      securityContext:
        capabilities: {add: [SYS_ADMIN]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["sleep", "3600"]
"#;

fn namespace(labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{{labels}}}\n")
}

fn plan(level: Level, ns_labels: &str) -> NodePlan {
    let catalog = load_sources(vec![
        SourceFile {
            path: "ns.yaml".into(),
            text: namespace(ns_labels),
        },
        SourceFile {
            path: "pods.yaml".into(),
            text: PODS.into(),
        },
    ]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    let mut node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    node.pod_security = level;
    plan_node(
        &catalog,
        &node,
        &ImageCatalog::default(),
        &Default::default(),
        "rev1",
    )
}

fn running(plan: &NodePlan) -> Vec<String> {
    plan.pods.iter().map(|p| p.id.to_string()).collect()
}

#[test]
fn a_pod_asking_for_sys_admin_and_no_seccomp_is_refused_on_a_baseline_node_and_the_others_run() {
    let p = plan(Level::Baseline, "");
    assert_eq!(running(&p), ["shop/plain"]);
    let refused = &p.not_admitted[0];
    assert_eq!(refused.pod.to_string(), "shop/root-please");
    assert_eq!(refused.status, "Forbidden");
    // The level, where it comes from, each check and each field.
    assert!(
        refused.reason.starts_with(
            "violates Pod Security level \"baseline\" (the node's security.podSecurity): "
        ),
        "{}",
        refused.reason
    );
    assert!(
        refused.reason.contains(
            "seccompProfile_baseline (spec.securityContext.seccompProfile.type: \"Unconfined\""
        ),
        "{}",
        refused.reason
    );
    assert!(refused.reason.contains("capabilities_baseline (spec.containers[0].securityContext.capabilities.add[0]: \"SYS_ADMIN\""), "{}", refused.reason);
    // Each check is also a diagnostic at its own line, and none is an
    // error: the revision is not rejected for it.
    let lines: Vec<(Option<u32>, &str)> = p
        .diagnostics
        .iter()
        .filter(|d| d.message.contains("Pod Security"))
        .map(|d| (d.source.line, d.field.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        lines,
        [
            (Some(7), "spec.securityContext.seccompProfile.type"),
            (
                Some(13),
                "spec.containers[0].securityContext.capabilities.add[0]"
            ),
        ]
    );
    assert!(p.diagnostics.iter().all(|d| !d.is_error()));
    // No unit of the refused pod is planned.
    assert!(
        p.plan
            .actions
            .iter()
            .all(|a| !a.unit.as_str().contains("root-please"))
    );
}

#[test]
fn a_privileged_node_runs_it_and_a_namespace_can_only_tighten() {
    assert_eq!(
        running(&plan(Level::Privileged, "")),
        ["shop/plain", "shop/root-please"]
    );
    // A namespace asking for baseline on a privileged node: baseline.
    let p = plan(
        Level::Privileged,
        "pod-security.kubernetes.io/enforce: baseline",
    );
    assert_eq!(running(&p), ["shop/plain"]);
    assert!(
        p.not_admitted[0]
            .reason
            .contains("(the label pod-security.kubernetes.io/enforce of namespace shop)"),
        "{}",
        p.not_admitted[0].reason
    );
    // Asking for privileged on a baseline node changes nothing.
    assert_eq!(
        running(&plan(
            Level::Baseline,
            "pod-security.kubernetes.io/enforce: privileged"
        )),
        ["shop/plain"]
    );
    // Restricted: the plain pod runs as root with default capabilities.
    let p = plan(
        Level::Baseline,
        "pod-security.kubernetes.io/enforce: restricted",
    );
    assert!(running(&p).is_empty());
    let plain = p
        .not_admitted
        .iter()
        .find(|n| n.pod.name == "plain")
        .expect("refused");
    for check in [
        "allowPrivilegeEscalation",
        "capabilities_restricted",
        "runAsNonRoot",
        "seccompProfile_restricted",
    ] {
        assert!(plain.reason.contains(check), "{check}: {}", plain.reason);
    }
    // A label that names no level holds the namespace to restricted, and says so.
    let p = plan(
        Level::Privileged,
        "pod-security.kubernetes.io/enforce: strict",
    );
    assert!(running(&p).is_empty());
    assert!(
        p.diagnostics.iter().any(|d| d.field.as_deref()
            == Some("metadata.labels[\"pod-security.kubernetes.io/enforce\"]")
            && d.message.contains("held to restricted")),
        "{:#?}",
        p.diagnostics
    );
}

#[test]
fn berth_validate_calls_it_an_error() {
    let catalog = load_sources(vec![
        SourceFile {
            path: "ns.yaml".into(),
            text: namespace(""),
        },
        SourceFile {
            path: "pods.yaml".into(),
            text: PODS.into(),
        },
    ]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    let (diagnostics, rejected) =
        validate_pods(&catalog, &ImageCatalog::default(), Level::Baseline);
    let errors: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("pods.yaml:7") && errors[0].contains("seccompProfile_baseline"),
        "{errors:#?}"
    );
    assert_eq!(rejected.len(), 1);
    let (diagnostics, _) = validate_pods(&catalog, &ImageCatalog::default(), Level::Privileged);
    assert!(
        diagnostics.iter().all(|d| !d.is_error()),
        "{diagnostics:#?}"
    );
}

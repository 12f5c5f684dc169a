//! The planning stages chained: select → desired → diff → plan.

use std::collections::BTreeSet;

use berth_manifest::{Catalog, Diagnostic, FieldIssue, FieldPath, Rejected, Severity};
use serde::Serialize;

use crate::actual::ActualState;
use crate::desired::{self, Context, DesiredPod, SliceUnit};
use crate::images::ImageCatalog;
use crate::node::{self, NodeInfo, NotHere};
use crate::plan::{self, Plan, PlanInput, Protection};

/// Everything `berth plan` shows.
#[derive(Debug, Serialize)]
pub struct NodePlan {
    pub plan: Plan,
    #[serde(skip)]
    pub pods: Vec<DesiredPod>,
    #[serde(skip)]
    pub qos_slices: Vec<SliceUnit>,
    /// Pods and Deployments that belong to other nodes.
    pub elsewhere: Vec<NotHere>,
    /// Problems found while planning (on top of the catalog's own).
    pub diagnostics: Vec<Diagnostic>,
    /// Objects refused while planning.
    pub rejected: Vec<Rejected>,
}

/// Plans `node` from `catalog`, against what `actual` says runs.
pub fn plan_node(
    catalog: &Catalog,
    node: &NodeInfo,
    images: &ImageCatalog,
    actual: &ActualState,
    revision: &str,
) -> NodePlan {
    let selection = node::select(catalog, node);
    let ctx = Context::new(catalog, node, images);
    let mut diagnostics = Vec::new();
    let mut rejected = Vec::new();
    let mut protection = protection_from(catalog);
    let mut pods = Vec::new();
    let mut seen = BTreeSet::new();
    for instance in &selection.pods {
        match desired::resolve_pod(instance, &ctx) {
            Ok(resolved) => {
                push_unique(
                    &mut diagnostics,
                    &mut seen,
                    catalog,
                    instance.source,
                    &resolved.warnings,
                );
                pods.push(resolved.pod);
            }
            Err(errors) => {
                push_unique(
                    &mut diagnostics,
                    &mut seen,
                    catalog,
                    instance.source,
                    &errors,
                );
                protection.pods.insert(instance.id.to_string());
                if let Some(owner) = &instance.owner {
                    protection.owners.insert(owner.to_string());
                }
                let r = Rejected {
                    source: catalog.source_ref(&instance.source.source, &FieldPath::root()),
                    object: Some(instance.source.id.clone()),
                };
                if !rejected.contains(&r) {
                    rejected.push(r);
                }
            }
        }
    }
    let qos_slices = desired::qos_slices(&pods);
    let (plan, conflicts) = plan::plan(&PlanInput {
        node: &node.name,
        revision,
        pods: &pods,
        qos_slices: &qos_slices,
        actual,
        protection: &protection,
    });
    let conflicted: BTreeSet<_> = conflicts.iter().map(|c| c.pod.clone()).collect();
    for conflict in conflicts {
        if let Some(source) = catalog.objects.iter().find(|o| {
            pods.iter()
                .any(|p| p.id == conflict.pod && p.source == o.id)
        }) {
            let issue = FieldIssue::error(
                FieldPath::root().key("metadata").key("name"),
                format!(
                    "pod {} needs unit {}, which exists but was not created by Berth; Berth leaves it alone, so the pod cannot run here",
                    conflict.pod, conflict.unit
                ),
            );
            diagnostics.push(catalog.diagnostic(source, &issue));
            rejected.push(Rejected {
                source: catalog.source_ref(&source.source, &FieldPath::root()),
                object: Some(source.id.clone()),
            });
        }
    }
    pods.retain(|p| !conflicted.contains(&p.id));
    NodePlan {
        plan,
        pods,
        qos_slices,
        elsewhere: selection.elsewhere,
        diagnostics,
        rejected,
    }
}

fn push_unique(
    out: &mut Vec<Diagnostic>,
    seen: &mut BTreeSet<String>,
    catalog: &Catalog,
    source: &berth_manifest::LoadedObject,
    issues: &[FieldIssue],
) {
    for issue in issues {
        let key = format!("{}|{}|{}", source.id, issue.path, issue.message);
        if seen.insert(key) {
            out.push(catalog.diagnostic(source, issue));
        }
    }
}

/// What the catalog's rejections protect from pruning.
fn protection_from(catalog: &Catalog) -> Protection {
    let mut protection = Protection::default();
    let unidentified = catalog
        .rejected
        .iter()
        .filter(|r| r.object.is_none())
        .count();
    if unidentified > 0 {
        protection.hold_all = Some(format!(
            "{unidentified} document(s) could not be read, so nothing is pruned until they are fixed; the last good state keeps running"
        ));
    }
    for r in &catalog.rejected {
        let Some(object) = &r.object else { continue };
        match object.kind.as_str() {
            "Pod" => {
                protection.pods.insert(format!(
                    "{}/{}",
                    object.namespace.as_deref().unwrap_or("default"),
                    object.name
                ));
            }
            "Deployment" => {
                protection.owners.insert(object.to_string());
            }
            _ => {}
        }
    }
    protection
}

/// Resolves every pod of the catalog whatever its node, so that `berth
/// validate` reports broken references (a missing ConfigMap key, say)
/// without a node in mind.
pub fn validate_pods(catalog: &Catalog, images: &ImageCatalog) -> (Vec<Diagnostic>, Vec<Rejected>) {
    let node = NodeInfo::new("validate", Default::default(), 8 << 30, 2000);
    let ctx = Context::new(catalog, &node, images);
    let mut diagnostics = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = BTreeSet::new();
    for instance in node::all_pods(catalog) {
        let issues = match desired::resolve_pod(&instance, &ctx) {
            Ok(r) => r.warnings,
            Err(e) => {
                let r = Rejected {
                    source: catalog.source_ref(&instance.source.source, &FieldPath::root()),
                    object: Some(instance.source.id.clone()),
                };
                if !rejected.contains(&r) {
                    rejected.push(r);
                }
                e
            }
        };
        push_unique(
            &mut diagnostics,
            &mut seen,
            catalog,
            instance.source,
            &issues,
        );
    }
    diagnostics.sort_by(|a, b| {
        (a.severity != Severity::Error)
            .cmp(&(b.severity != Severity::Error))
            .then(a.source.cmp(&b.source))
    });
    (diagnostics, rejected)
}

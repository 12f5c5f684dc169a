//! The planning stages chained: select → desired → diff → plan.

use std::collections::BTreeSet;

use berth_manifest::{Catalog, Diagnostic, FieldIssue, FieldPath, Rejected, Severity};
use serde::Serialize;

use crate::actual::ActualState;
use crate::desired::{self, Context, DesiredPod, SliceUnit};
use crate::images::ImageCatalog;
use crate::node::{self, NodeInfo, NotHere};
use crate::plan::{self, Plan, PlanInput, Protection};
use crate::units::PodId;
use berth_manifest::quantity::{format_bytes, format_cpu_milli};

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
    /// Pods this node cannot fit: their requests exceed what is left.
    pub not_admitted: Vec<NotAdmitted>,
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
    // Two objects that make the same pod (a Pod `web-0` and replica 0 of a
    // Deployment `web`) would fight over its units: both are refused.
    let mut by_id: std::collections::BTreeMap<PodId, Vec<berth_manifest::ObjectRef>> =
        std::collections::BTreeMap::new();
    for p in &pods {
        by_id
            .entry(p.id.clone())
            .or_default()
            .push(p.source.clone());
    }
    for (id, sources) in by_id.iter().filter(|(_, s)| s.len() > 1) {
        let names: Vec<String> = sources.iter().map(ToString::to_string).collect();
        for source in sources {
            let Some(object) = catalog.objects.iter().find(|o| &o.id == source) else {
                continue;
            };
            let issue = FieldIssue::error(
                FieldPath::root().key("metadata").key("name"),
                format!(
                    "pod {id} is made by {} at once: each is refused, since they would share units; rename one",
                    names.join(" and ")
                ),
            );
            push_unique(&mut diagnostics, &mut seen, catalog, object, &[issue]);
            protection.pods.insert(id.to_string());
            let r = Rejected {
                source: catalog.source_ref(&object.source, &FieldPath::root()),
                object: Some(object.id.clone()),
            };
            if !rejected.contains(&r) {
                rejected.push(r);
            }
        }
    }
    pods.retain(|p| by_id.get(&p.id).is_none_or(|s| s.len() == 1));
    let (mut pods, not_admitted) = admit(pods, node, actual);
    for n in &not_admitted {
        if let Some(source) = catalog.objects.iter().find(|o| o.id == n.source) {
            let issue = FieldIssue::warning(
                FieldPath::parse(n.spec_path).key("containers"),
                format!("pod {} is not admitted: {}", n.pod, n.reason),
            );
            push_unique(&mut diagnostics, &mut seen, catalog, source, &[issue]);
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
        not_admitted,
        diagnostics,
        rejected,
    }
}

/// A pod left out because the node cannot fit its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotAdmitted {
    pub pod: PodId,
    #[serde(skip)]
    pub source: berth_manifest::ObjectRef,
    #[serde(skip)]
    pub spec_path: &'static str,
    pub reason: String,
}

/// The kubelet's admission: the sum of requests may not exceed the node's
/// allocatable CPU and memory. Pods that already run are admitted first, so
/// a new pod never pushes out a running one; the rest go in name order.
fn admit(
    mut pods: Vec<DesiredPod>,
    node: &NodeInfo,
    actual: &ActualState,
) -> (Vec<DesiredPod>, Vec<NotAdmitted>) {
    let running: BTreeSet<&str> = actual.units.iter().map(|u| u.name.as_str()).collect();
    pods.sort_by(|a, b| {
        let ra = running.contains(a.slice.name.as_str());
        let rb = running.contains(b.slice.name.as_str());
        rb.cmp(&ra).then_with(|| a.id.cmp(&b.id))
    });
    let (mut cpu, mut memory) = (0u64, 0u64);
    let mut admitted = Vec::with_capacity(pods.len());
    let mut refused = Vec::new();
    for pod in pods {
        let need_cpu = cpu.saturating_add(pod.cpu_request_milli);
        let need_memory = memory.saturating_add(pod.memory_request_bytes);
        let reason = if need_cpu > node.cpu_milli {
            Some(format!(
                "it requests {} CPU but only {} of the node's {} allocatable are left",
                format_cpu_milli(pod.cpu_request_milli),
                format_cpu_milli(node.cpu_milli.saturating_sub(cpu)),
                format_cpu_milli(node.cpu_milli)
            ))
        } else if need_memory > node.memory_bytes {
            Some(format!(
                "it requests {} of memory but only {} of the node's {} allocatable are left",
                format_bytes(pod.memory_request_bytes),
                format_bytes(node.memory_bytes.saturating_sub(memory)),
                format_bytes(node.memory_bytes)
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => refused.push(NotAdmitted {
                pod: pod.id.clone(),
                source: pod.source.clone(),
                spec_path: pod.spec_path,
                reason,
            }),
            None => {
                cpu = need_cpu;
                memory = need_memory;
                admitted.push(pod);
            }
        }
    }
    (admitted, refused)
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

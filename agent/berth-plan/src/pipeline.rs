//! The planning stages chained, each a function from values to values:
//!
//! 1. [`desire`]: select the objects for this node, resolve each into a
//!    [`DesiredPod`], refuse pods two objects make at once or whose units
//!    belong to someone else, and admit what fits (pods that run first).
//! 2. [`plan_desired`]: diff the desired node against what runs, classify
//!    each difference as a change from Git or drift (healed or held by its
//!    policy), and hold back the starts of pods whose images, network or
//!    volumes are not ready, asking for the pulls they need.
//!
//! [`plan_node`] is both. The agent runs the first, prepares the network
//! and volumes of the pods it returns (facts for the second), and runs the
//! second; `berth plan --actual` runs both on the snapshot the agent wrote.
//! Both give the same plan, since the first reads only the units.

use std::collections::{BTreeMap, BTreeSet};

use berth_manifest::{
    Catalog, Diagnostic, FieldIssue, FieldPath, LoadedObject, ObjectRef, Rejected, Severity,
};
use serde::Serialize;

use crate::actual::{ActualState, ActualUnit};
use crate::context::Context;
use crate::desired::{self, DesiredPod, SliceUnit};
use crate::drift::{self, DriftItem};
use crate::ephemeral::{self, Eviction};
use crate::images::ImageCatalog;
use crate::node::NodeInfo;
use crate::osupdate::{self, OsDecision};
use crate::plan::{self, Plan, PlanInput, Protection};
use crate::podsecurity;
use crate::pressure;
use crate::rollout::{self, DeploymentStatus, RolloutRecord, Steering};
use crate::select::{self, NotHere};
use crate::services::{self, ServicePlan};
use crate::units::PodId;
use crate::waits;
use berth_manifest::quantity::{format_bytes, format_cpu_milli};

/// Everything `berth plan` shows, and everything the node applies.
#[derive(Debug, Serialize)]
pub struct NodePlan {
    /// Pulls first, then the unit actions; what waits is in `plan.held`.
    pub plan: Plan,
    #[serde(skip)]
    pub pods: Vec<DesiredPod>,
    #[serde(skip)]
    pub qos_slices: Vec<SliceUnit>,
    /// Pods and Deployments that belong to other nodes.
    pub elsewhere: Vec<NotHere>,
    /// Pods this node cannot fit: their requests exceed what is left.
    pub not_admitted: Vec<NotAdmitted>,
    /// Problems of the revision found while planning (on top of the
    /// catalog's own): an error here rejects a new revision.
    pub diagnostics: Vec<Diagnostic>,
    /// Pods refused because a unit they need is not Berth's: a problem of
    /// the node, not of the revision.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Diagnostic>,
    /// Objects refused while planning.
    pub rejected: Vec<Rejected>,
    /// Where the node departs from the very units last applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<DriftItem>,
    /// The evictions in force after this pass (those of `actual` that
    /// still hold, and the pods this pass evicts): the agent keeps them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evictions: Vec<Eviction>,
    /// The Services this node programs, over its pods.
    #[serde(skip_serializing_if = "crate::services::ServicePlan::is_empty")]
    pub services: ServicePlan,
    /// Each Deployment's status after this pass, with its rollout's steps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<DeploymentStatus>,
    /// The rollouts after this pass: the agent keeps them for the next.
    #[serde(skip)]
    pub rollouts: Vec<RolloutRecord>,
    /// When the node must plan again although nothing else changes (a pod
    /// reaching `minReadySeconds`, a progress deadline), seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<u64>,
    /// The signals under pressure after this pass (their node conditions
    /// are true): the agent hands them back with the next measures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pressured: Vec<pressure::Signal>,
    /// What the node does about its OS version, when a NodeImage selects it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<OsDecision>,
}

/// The node as Git wants it, before it is compared with what runs.
#[derive(Debug)]
pub struct DesiredNode {
    pub pods: Vec<DesiredPod>,
    pub qos_slices: Vec<SliceUnit>,
    pub elsewhere: Vec<NotHere>,
    pub not_admitted: Vec<NotAdmitted>,
    pub diagnostics: Vec<Diagnostic>,
    pub conflicts: Vec<Diagnostic>,
    pub rejected: Vec<Rejected>,
    pub services: ServicePlan,
    /// The evictions of `actual` that still hold.
    pub evictions: Vec<Eviction>,
    protection: Protection,
    /// What the rollouts decided.
    pub rollout: Steering,
    /// The NodeImage that selects this node.
    pub node_image: Option<berth_manifest::nodeimage::NodeImage>,
}

/// Plans `node` from `catalog`, against what `actual` says the node has.
pub fn plan_node(
    catalog: &Catalog,
    node: &NodeInfo,
    images: &ImageCatalog,
    actual: &ActualState,
    revision: &str,
) -> NodePlan {
    let desired = desire(catalog, node, images, actual);
    plan_desired(desired, catalog, node, actual, revision)
}

/// Objects by identity, for the lookups every stage makes.
struct Index<'a>(std::collections::HashMap<&'a ObjectRef, &'a LoadedObject>);

impl<'a> Index<'a> {
    fn new(catalog: &'a Catalog) -> Self {
        Self(catalog.objects.iter().map(|o| (&o.id, o)).collect())
    }
    fn get(&self, id: &ObjectRef) -> Option<&'a LoadedObject> {
        self.0.get(id).copied()
    }
}

/// Diagnostics without repeats: the replicas of one Deployment share theirs.
struct Diagnostics<'a> {
    catalog: &'a Catalog,
    out: Vec<Diagnostic>,
    seen: BTreeSet<(ObjectRef, String, String)>,
}

impl<'a> Diagnostics<'a> {
    fn new(catalog: &'a Catalog) -> Self {
        Self {
            catalog,
            out: Vec::new(),
            seen: BTreeSet::new(),
        }
    }
    fn push(&mut self, source: &LoadedObject, issues: &[FieldIssue]) {
        self.push_with(source, issues, Catalog::diagnostic);
    }
    /// At the object's line: for issues that come by the thousand.
    fn push_at_object(&mut self, source: &LoadedObject, issues: &[FieldIssue]) {
        self.push_with(source, issues, Catalog::diagnostic_at_object);
    }
    fn push_with(
        &mut self,
        source: &LoadedObject,
        issues: &[FieldIssue],
        make: fn(&Catalog, &LoadedObject, &FieldIssue) -> Diagnostic,
    ) {
        for issue in issues {
            let key = (
                source.id.clone(),
                issue.path.to_string(),
                issue.message.clone(),
            );
            if self.seen.insert(key) {
                self.out.push(make(self.catalog, source, issue));
            }
        }
    }
}

fn reject(rejected: &mut Vec<Rejected>, catalog: &Catalog, object: &LoadedObject) {
    let r = Rejected {
        source: catalog.source_ref(&object.source, &FieldPath::root()),
        object: Some(object.id.clone()),
    };
    if !rejected.contains(&r) {
        rejected.push(r);
    }
}

/// `f` over `items` on the machine's cores, results in the order of
/// `items`. Each pod resolves on its own (the context is read-only), so a
/// large repository plans in a fraction of the time on a node with cores
/// to spare; a small one stays on the calling thread.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    const PER_THREAD: usize = 256;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len() / PER_THREAD)
        .max(1);
    if workers == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(workers);
    let (first, rest) = items.split_at(chunk.min(items.len()));
    std::thread::scope(|scope| {
        let handles: Vec<_> = rest
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        // This thread takes the first part: one thread (and one allocator
        // arena, whose freed memory only its threads reuse) fewer.
        let mut out = Vec::with_capacity(items.len());
        out.extend(first.iter().map(&f));
        for h in handles {
            match h.join() {
                Ok(done) => out.extend(done),
                // Only a bug panics here: surface it, never lose pods.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Stage 1: the pods this node runs, as Git wants them. Reads only the
/// units of `actual` (which are Berth's, which run), the evictions and
/// rollouts the agent keeps and the probe results, never facts the agent
/// gathers for the pods it returns.
pub fn desire(
    catalog: &Catalog,
    node: &NodeInfo,
    images: &ImageCatalog,
    actual: &ActualState,
) -> DesiredNode {
    desire_with(catalog, &[], node, images, actual, "")
}

/// [`desire`], with the catalogs of earlier revisions whose Deployment pods
/// may still run (newest first): a rollout keeps those pods as they were
/// made. `revision` names the revision in the rollouts it starts.
pub fn desire_with(
    catalog: &Catalog,
    older: &[&Catalog],
    node: &NodeInfo,
    images: &ImageCatalog,
    actual: &ActualState,
    revision: &str,
) -> DesiredNode {
    let (units, kept, now) = (&actual.units, &actual.evictions, actual.observed_at);
    let node_pressure = actual.pressure.as_ref();
    let index = Index::new(catalog);
    let selection = select::select(catalog, node);
    let ctx = Context::new(catalog, node, images);
    let mut diagnostics = Diagnostics::new(catalog);
    let mut rejected = Vec::new();
    let mut protection = protection_from(catalog);
    let mut pods = Vec::new();
    let mut forbidden = Vec::new();
    let (levels, level_problems) = podsecurity::namespace_levels(catalog);
    let resolved = in_parallel(&selection.pods, |instance| {
        desired::resolve_pod(instance, &ctx)
    });
    for (instance, outcome) in selection.pods.iter().zip(resolved) {
        match outcome {
            Ok(resolved) => {
                diagnostics.push(instance.source, &resolved.warnings);
                match pod_security(instance, node.pod_security, &levels) {
                    None => pods.push(resolved.pod),
                    Some((refusal, issues)) => {
                        diagnostics.push(instance.source, &issues);
                        forbidden.push(refusal);
                    }
                }
            }
            Err(errors) => {
                diagnostics.push(instance.source, &errors);
                protection.pods.insert(instance.id.to_string());
                if let Some(owner) = &instance.owner {
                    protection.owners.insert(owner.to_string());
                }
                reject(&mut rejected, catalog, instance.source);
            }
        }
    }
    // Rollouts: which new Deployment pods start now, which old ones stay.
    let not_here: BTreeSet<&ObjectRef> = selection.elsewhere.iter().map(|e| &e.object).collect();
    let deployments: Vec<&LoadedObject> = catalog
        .objects
        .iter()
        .filter(|o| o.id.kind == "Deployment")
        .filter(|o| !not_here.contains(&o.id))
        .filter(|o| !protection.owners.contains(&o.id.to_string()))
        .collect();
    let steering = rollout::steer(
        &rollout::SteerInput {
            catalog,
            older,
            actual,
            revision,
            deployments,
        },
        &mut pods,
        &|c, object, name| {
            let instance = select::replica_named(object, name)?;
            let ctx = Context::new(c, node, images);
            desired::resolve_pod(&instance, &ctx).ok().map(|r| r.pod)
        },
    );
    for pod in steering.kept_unresolved.keys() {
        protection.pods.insert(pod.clone());
    }
    // Two objects that make the same pod (a Pod `web-0` and replica 0 of a
    // Deployment `web`) would fight over its units: both are refused.
    let mut by_id: std::collections::HashMap<&PodId, Vec<&ObjectRef>> =
        std::collections::HashMap::with_capacity(pods.len());
    for p in &pods {
        by_id.entry(&p.id).or_default().push(&p.source);
    }
    let mut shared: Vec<(&PodId, Vec<&ObjectRef>)> =
        by_id.into_iter().filter(|(_, s)| s.len() > 1).collect();
    shared.sort();
    let refused: BTreeSet<PodId> = shared.iter().map(|(id, _)| (*id).clone()).collect();
    for (id, sources) in &shared {
        let names: Vec<String> = sources.iter().map(ToString::to_string).collect();
        for source in sources {
            let Some(object) = index.get(source) else {
                continue;
            };
            let issue = FieldIssue::error(
                FieldPath::root().key("metadata").key("name"),
                format!(
                    "pod {id} is made by {} at once: each is refused, since they would share units; rename one",
                    names.join(" and ")
                ),
            );
            diagnostics.push(object, &[issue]);
            protection.pods.insert(id.to_string());
            reject(&mut rejected, catalog, object);
        }
    }
    drop(shared);
    pods.retain(|p| !refused.contains(&p.id));
    // A pod whose unit names are taken by units Berth did not create is
    // refused as a whole; the foreign units are never touched.
    let actual: BTreeMap<&str, &ActualUnit> = units.iter().map(|u| (u.name.as_str(), u)).collect();
    let mut conflicts = Vec::new();
    pods.retain(|pod| {
        let found = plan::conflicts(pod, &actual);
        if found.is_empty() {
            return true;
        }
        protection.pods.insert(pod.id.to_string());
        if let Some(source) = index.get(&pod.source) {
            for conflict in found {
                let issue = FieldIssue::error(
                    FieldPath::root().key("metadata").key("name"),
                    format!(
                        "pod {} needs unit {}, which exists but was not created by Berth; Berth leaves it alone, so the pod cannot run here",
                        conflict.pod, conflict.unit
                    ),
                );
                conflicts.push(catalog.diagnostic(source, &issue));
            }
            reject(&mut rejected, catalog, source);
        }
        false
    });
    // Evicted pods stay down while their eviction holds; they do not count
    // against what the node admits.
    let mut evictions = Vec::new();
    let mut evicted = Vec::new();
    pods.retain(|pod| {
        if kept.is_empty() {
            return true;
        }
        let key = pod.id.to_string();
        let Some(e) = kept.iter().find(|e| e.pod == key) else {
            return true;
        };
        let pressured = |signal| node_pressure.is_some_and(|p| p.pressured(signal, now));
        if !e.holds(&ephemeral::pod_digest(pod), now, &pressured) {
            return true;
        }
        evicted.push(evicted_pod(pod, &e.message));
        evictions.push(e.clone());
        false
    });
    let (pods, mut not_admitted) = admit(pods, node, units);
    for n in &not_admitted {
        if let Some(source) = index.get(&n.source) {
            let issue = FieldIssue::warning(
                FieldPath::parse(n.spec_path).key("containers"),
                format!("pod {} is not admitted: {}", n.pod, n.reason),
            );
            diagnostics.push_at_object(source, &[issue]);
        }
    }
    not_admitted.extend(forbidden);
    not_admitted.extend(evicted);
    let qos_slices = desired::qos_slices(&pods);
    let (services, service_diagnostics) =
        services::plan_services(catalog, &pods, node.node_ports, services::Scope::Node);
    let mut diagnostics = diagnostics.out;
    diagnostics.extend(level_problems);
    diagnostics.extend(service_diagnostics);
    let node_image = osupdate::selected(catalog, node, &mut diagnostics).cloned();
    DesiredNode {
        node_image,
        pods,
        qos_slices,
        elsewhere: selection.elsewhere,
        not_admitted,
        diagnostics,
        conflicts,
        rejected,
        services,
        evictions,
        protection,
        rollout: steering,
    }
}

/// An evicted pod as its status shows it: `Failed`, reason `Evicted`.
fn evicted_pod(pod: &DesiredPod, message: &str) -> NotAdmitted {
    NotAdmitted {
        pod: pod.id.clone(),
        source: pod.source.clone(),
        spec_path: pod.spec_path,
        status: "Evicted",
        reason: message.to_string(),
    }
}

/// Stage 2's first step: pods whose local storage exceeds a limit (by the
/// usage `actual` reports) leave the desired node, so the plan stops them,
/// and are recorded as evicted.
fn evict_over_limits(desired: &mut DesiredNode, actual: &ActualState) {
    let mut kept = Vec::with_capacity(desired.pods.len());
    for pod in std::mem::take(&mut desired.pods) {
        let verdict = (pod.ephemeral.any())
            .then(|| actual.pods.get(&pod.id.to_string()))
            .flatten()
            .and_then(|f| f.storage.as_ref())
            .and_then(|usage| ephemeral::exceeded(&pod.ephemeral, usage));
        match verdict {
            None => kept.push(pod),
            Some(message) => {
                desired.evictions.push(Eviction {
                    pod: pod.id.to_string(),
                    at: actual.observed_at,
                    message: message.clone(),
                    digest: ephemeral::pod_digest(&pod),
                    replica: pod.source.kind == "Deployment",
                    pressure: None,
                });
                desired.not_admitted.push(evicted_pod(&pod, &message));
            }
        }
    }
    desired.pods = kept;
}

/// Stage 2's second step: when a memory threshold is met, the one pod the
/// kubelet's order picks leaves the desired node and is recorded as
/// evicted; a hard threshold kills it at once (`immediate`).
fn evict_under_pressure(
    desired: &mut DesiredNode,
    actual: &ActualState,
    immediate: &mut BTreeSet<String>,
) -> Vec<pressure::Signal> {
    let Some(p) = &actual.pressure else {
        return Vec::new();
    };
    let now = actual.observed_at;
    let met = p.met(now);
    // One pod a pass, for the first threshold met (hard ones first) that a
    // pod can relieve.
    if let Some((m, (pod, message))) = met
        .iter()
        .find_map(|m| Some((m, pressure::choose(&desired.pods, p, m)?)))
    {
        let id = pod.id.to_string();
        let pod = pod.clone();
        desired.pods.retain(|d| d.id.to_string() != id);
        desired.evictions.push(Eviction {
            pod: id.clone(),
            at: now,
            message: message.clone(),
            digest: ephemeral::pod_digest(&pod),
            replica: pod.source.kind == "Deployment",
            pressure: Some(m.signal),
        });
        desired.not_admitted.push(evicted_pod(&pod, &message));
        if m.hard {
            immediate.insert(id);
        }
    }
    pressure::Signal::ALL
        .into_iter()
        .filter(|s| p.pressured(*s, now))
        .collect()
}

/// Stage 2: the actions that take the node from `actual` to `desired`,
/// drift classified and starts held until their pods are ready.
pub fn plan_desired(
    mut desired: DesiredNode,
    catalog: &Catalog,
    node: &NodeInfo,
    actual: &ActualState,
    revision: &str,
) -> NodePlan {
    evict_over_limits(&mut desired, actual);
    let mut immediate = BTreeSet::new();
    let pressured = evict_under_pressure(&mut desired, actual, &mut immediate);
    let evicted: BTreeMap<String, String> = desired
        .not_admitted
        .iter()
        .filter(|n| n.status == "Evicted")
        .map(|n| (n.pod.to_string(), n.reason.clone()))
        .collect();
    let mut plan = plan::plan(&PlanInput {
        node: &node.name,
        revision,
        pods: &desired.pods,
        qos_slices: &desired.qos_slices,
        actual,
        protection: &desired.protection,
        evicted: &evicted,
        immediate: &immediate,
        retiring: &desired.rollout.retiring,
        beside: &desired.rollout.beside,
        kept: &desired.rollout.kept_unresolved,
    });
    let classified = drift::classify(
        std::mem::take(&mut plan.actions),
        &desired.pods,
        catalog,
        &actual.applied,
        &node.drift,
        actual.observed_at,
    );
    let gated = waits::gate(classified.actions, &desired.pods, actual, node);
    plan.actions = gated.pulls;
    plan.actions.extend(gated.actions);
    plan.held.extend(classified.held);
    plan.held.extend(gated.held);
    let mut steering = desired.rollout;
    for (pod, why) in &steering.waiting {
        plan.held.push(plan::Held {
            unit: pod.clone(),
            pod: plan::parse_pod_id(pod),
            reason: crate::reason::HoldReason::Rollout,
            message: why.clone(),
            units: Vec::new(),
        });
    }
    rollout::judge(&mut steering.statuses, &mut steering.records, &plan.held);
    let os = match &desired.node_image {
        Some(image) => {
            let settled = steering.statuses.iter().all(DeploymentStatus::settled);
            let facts = actual.os.clone().unwrap_or_default();
            let mut d = osupdate::decide(image, &facts, settled, actual.observed_at);
            if d.action == osupdate::OsAction::Reboot {
                d.stops = osupdate::stops_before_reboot(actual, &d.version);
            }
            Some(d)
        }
        None => actual.os.as_ref().and_then(osupdate::withdrawn),
    };
    let wake_at = [steering.wake_at, os.as_ref().and_then(|o| o.wake_at)]
        .into_iter()
        .flatten()
        .min();
    NodePlan {
        os,
        plan,
        pods: desired.pods,
        qos_slices: desired.qos_slices,
        elsewhere: desired.elsewhere,
        not_admitted: desired.not_admitted,
        diagnostics: desired.diagnostics,
        conflicts: desired.conflicts,
        rejected: desired.rejected,
        services: desired.services,
        drift: classified.items,
        evictions: desired.evictions,
        deployments: steering.statuses,
        rollouts: steering.records,
        wake_at,
        pressured,
    }
}

/// A pod left out because the node cannot fit its requests, or because it
/// asks for more than its Pod Security level allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotAdmitted {
    pub pod: PodId,
    #[serde(skip)]
    pub source: berth_manifest::ObjectRef,
    #[serde(skip)]
    pub spec_path: &'static str,
    /// Kubernetes' word for it: `OutOfcpu`, `OutOfmemory`, `Forbidden`.
    pub status: &'static str,
    pub reason: String,
}

/// A pod's Pod Security verdict: `None` when it may run; else its refusal
/// and one warning per broken check, at its field.
fn pod_security(
    instance: &select::PodInstance<'_>,
    node_level: podsecurity::Level,
    namespaces: &BTreeMap<&str, podsecurity::Level>,
) -> Option<(NotAdmitted, Vec<FieldIssue>)> {
    let asked = namespaces.get(instance.id.namespace.as_str()).copied();
    let level = podsecurity::effective(node_level, asked);
    let violations =
        podsecurity::check(instance.metadata, instance.spec, instance.spec_path, level);
    if violations.is_empty() {
        return None;
    }
    let origin = if asked.is_some_and(|a| a > node_level) {
        format!(
            "the label {} of namespace {}",
            podsecurity::ENFORCE_LABEL,
            instance.id.namespace
        )
    } else {
        "the node's security.podSecurity".to_string()
    };
    let issues = violations
        .iter()
        .map(|v| {
            FieldIssue::warning(
                v.path.clone(),
                format!(
                    "pod {} is refused: Pod Security level \"{level}\" ({origin}) forbids it, check {}: {}",
                    instance.id, v.check, v.detail
                ),
            )
        })
        .collect();
    Some((
        NotAdmitted {
            pod: instance.id.clone(),
            source: instance.source.id.clone(),
            spec_path: instance.spec_path,
            status: "Forbidden",
            reason: podsecurity::reason(level, &origin, &violations),
        },
        issues,
    ))
}

/// The kubelet's admission: the sum of requests may not exceed the node's
/// allocatable CPU and memory. Pods that already run are admitted first, so
/// a new pod never pushes out a running one; the rest go in name order.
fn admit(
    mut pods: Vec<DesiredPod>,
    node: &NodeInfo,
    units: &[ActualUnit],
) -> (Vec<DesiredPod>, Vec<NotAdmitted>) {
    let running: BTreeSet<&str> = units.iter().map(|u| u.name.as_str()).collect();
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
            Some((
                "OutOfcpu",
                format!(
                    "it requests {} CPU but only {} of the node's {} allocatable are left",
                    format_cpu_milli(pod.cpu_request_milli),
                    format_cpu_milli(node.cpu_milli.saturating_sub(cpu)),
                    format_cpu_milli(node.cpu_milli)
                ),
            ))
        } else if need_memory > node.memory_bytes {
            Some((
                "OutOfmemory",
                format!(
                    "it requests {} of memory but only {} of the node's {} allocatable are left",
                    format_bytes(pod.memory_request_bytes),
                    format_bytes(node.memory_bytes.saturating_sub(memory)),
                    format_bytes(node.memory_bytes)
                ),
            ))
        } else {
            None
        };
        match reason {
            Some((status, reason)) => refused.push(NotAdmitted {
                pod: pod.id.clone(),
                source: pod.source.clone(),
                spec_path: pod.spec_path,
                status,
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
///
/// A pod that breaks a check of its Pod Security level (`level`, or its
/// namespace's when stricter) is an error here: a node refuses to run it.
pub fn validate_pods(
    catalog: &Catalog,
    images: &ImageCatalog,
    level: podsecurity::Level,
) -> (Vec<Diagnostic>, Vec<Rejected>) {
    let node = NodeInfo::new("validate", Default::default(), 8 << 30, 2000);
    let (levels, level_problems) = podsecurity::namespace_levels(catalog);
    let ctx = Context::new(catalog, &node, images);
    let mut diagnostics = Diagnostics::new(catalog);
    let mut rejected = Vec::new();
    let mut pods = Vec::new();
    for instance in select::all_pods(catalog) {
        let issues = match desired::resolve_pod(&instance, &ctx) {
            Ok(r) => match pod_security(&instance, level, &levels) {
                None => {
                    pods.push(r.pod);
                    r.warnings
                }
                Some((_, refused)) => {
                    reject(&mut rejected, catalog, instance.source);
                    let mut issues = r.warnings;
                    issues.extend(
                        refused
                            .into_iter()
                            .map(|i| FieldIssue::error(i.path, i.message)),
                    );
                    issues
                }
            },
            Err(e) => {
                reject(&mut rejected, catalog, instance.source);
                e
            }
        };
        diagnostics.push(instance.source, &issues);
    }
    let mut diagnostics = diagnostics.out;
    diagnostics.extend(level_problems);
    let (_, service_diagnostics) =
        services::plan_services(catalog, &pods, node.node_ports, services::Scope::Repository);
    diagnostics.extend(service_diagnostics);
    diagnostics.sort_by(|a, b| {
        (a.severity != Severity::Error)
            .cmp(&(b.severity != Severity::Error))
            .then(a.source.cmp(&b.source))
    });
    (diagnostics, rejected)
}

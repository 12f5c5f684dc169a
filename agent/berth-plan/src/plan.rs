//! Diff the desired node against what runs, and order the actions that
//! close the gap. Every action carries the reason a person would give.

use std::collections::{BTreeMap, BTreeSet};

use berth_manifest::quantity::{format_bytes, format_cpu_milli};
use serde::Serialize;

use crate::actual::{ActiveState, ActualState, ActualUnit};
use crate::desired::{ContainerUnit, DesiredPod, RestartPolicy, SliceUnit};
use crate::reason::HoldReason;
use crate::units::{IMAGE_FIELD, PodId, Properties, PropertyValue, SharedProperties, UnitName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verb {
    /// Ask for an image to be pulled, in the background: the containers
    /// that need it wait (held) until it is here.
    Pull,
    /// Stop and forget a unit Git no longer wants.
    Stop,
    /// Create a slice with its properties.
    CreateSlice,
    /// Change a slice's properties in place.
    UpdateSlice,
    /// Start a transient service.
    Start,
    /// Stop the service and start it again with new properties.
    Restart,
    /// Change a running service's properties without restarting it.
    Update,
    /// Remove a slice that holds nothing any more.
    RemoveSlice,
    /// End a running container whose liveness or startup probe failed:
    /// SIGTERM, SIGKILL after the grace period; its restart policy (and
    /// back-off) decides what follows, as in the kubelet.
    Kill,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Pull => "pull",
            Verb::Stop => "stop",
            Verb::CreateSlice => "create slice",
            Verb::UpdateSlice => "update slice",
            Verb::Start => "start",
            Verb::Restart => "restart",
            Verb::Update => "update",
            Verb::RemoveSlice => "remove slice",
            Verb::Kill => "kill",
        }
    }
}

/// One property that differs, with secrets already redacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub property: String,
    pub from: Option<PropertyValue>,
    pub to: Option<PropertyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub verb: Verb,
    pub unit: UnitName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodId>,
    pub reason: String,
    /// For a pull: the image reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// For start, restart and create: every property, secrets redacted.
    #[serde(skip_serializing_if = "crate::units::no_properties")]
    pub properties: SharedProperties,
    /// For restart and update: what differs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// For a kill: seconds between SIGTERM and SIGKILL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u64>,
    /// For a start or a pod slice's creation: properties left out of the
    /// start and given (`SetUnitProperties`) the moment its job ends. See
    /// [`after_start`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after_start: Vec<String>,
}

/// The one property an app container and its pod slice start without and
/// get as soon as the container runs: its CPU limit. systemd's executor
/// sets up a container's sandbox inside the container's own cgroup, and a
/// limit of 100m throttled that setup (half a second of CPU under
/// emulation) to five seconds before the container's program ran. Memory
/// limits hold from the start; an init container keeps its CPU limit too
/// (it runs to completion within its start job). The node ends as the
/// properties say either way.
pub const AFTER_START: &str = "CPUQuotaPerSecUSec";

/// What of `properties` a unit gets once it runs ([`AFTER_START`], if set).
pub fn after_start(properties: &Properties) -> Vec<String> {
    properties
        .get(AFTER_START)
        .map(|_| vec![AFTER_START.to_string()])
        .unwrap_or_default()
}

/// What the plan leaves alone on purpose in this pass, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// The unit left alone, or for a pod that waits, what it waits on (its
    /// first container's unit for an image, its network namespace, its
    /// volumes): what its status names.
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodId>,
    pub reason: HoldReason,
    pub message: String,
    /// The starts and restarts this holds back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub node: String,
    pub revision: String,
    pub actions: Vec<Action>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<Held>,
    /// Units whose stops (and slice removals) run beside this plan's
    /// starts rather than before them: a rolling update's old pods winding
    /// down while their replacements start.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub beside: BTreeSet<UnitName>,
}

/// What must not be pruned in this pass.
#[derive(Debug, Clone, Default)]
pub struct Protection {
    /// Set when some document could not even be identified (unparsable
    /// YAML): nothing may be pruned, since it might be that document's.
    pub hold_all: Option<String>,
    /// Pods whose objects were rejected: their last good state keeps running.
    pub pods: BTreeSet<String>,
    /// `Deployment/ns/name` of rejected Deployments.
    pub owners: BTreeSet<String>,
}

#[derive(Debug)]
pub struct PlanInput<'a> {
    pub node: &'a str,
    pub revision: &'a str,
    pub pods: &'a [DesiredPod],
    pub qos_slices: &'a [SliceUnit],
    pub actual: &'a ActualState,
    pub protection: &'a Protection,
    /// Pods the node evicts (`namespace/name` → why): stopped whatever
    /// protects the rest.
    pub evicted: &'a BTreeMap<String, String>,
    /// Evicted pods killed at once (a hard eviction threshold: no grace
    /// period, as the kubelet does).
    pub immediate: &'a BTreeSet<String>,
    /// Old pods a rollout stops now (`namespace/name` → why).
    pub retiring: &'a BTreeMap<String, String>,
    /// Of those, the ones that may stop beside the starts.
    pub beside: &'a BTreeSet<String>,
    /// Old pods a rollout keeps as they run (no manifests at hand) → why.
    pub kept: &'a BTreeMap<String, String>,
}

/// A pod that cannot be planned because a unit it needs belongs to someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub pod: PodId,
    pub unit: UnitName,
}

/// The units of `pod` that exist on the node but are not Berth's: the pod
/// cannot run here, and the foreign units are never touched.
pub fn conflicts(pod: &DesiredPod, actual: &BTreeMap<&str, &ActualUnit>) -> Vec<Conflict> {
    std::iter::once(&pod.slice.name)
        .chain(pod.units().map(|u| &u.name))
        .filter(|n| actual.get(n.as_str()).is_some_and(|u| !u.is_berths()))
        .map(|unit| Conflict {
            pod: pod.id.clone(),
            unit: unit.clone(),
        })
        .collect()
}

/// The diff: the actions that take the node's units from what runs to what
/// Git wants, and the units left alone because their objects are invalid.
/// `input.pods` holds no conflicted pod (the desired stage took them out).
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let actual: BTreeMap<&str, &ActualUnit> = input
        .actual
        .units
        .iter()
        .map(|u| (u.name.as_str(), u))
        .collect();
    let mut wanted: BTreeSet<&str> = BTreeSet::new();
    let mut pods: Vec<&DesiredPod> = input.pods.iter().collect();
    pods.sort_by(|a, b| a.id.cmp(&b.id));
    let pod_ids: BTreeSet<String> = pods.iter().map(|p| p.id.to_string()).collect();
    for pod in &pods {
        wanted.insert(pod.slice.name.as_str());
        wanted.extend(pod.units().map(|u| u.name.as_str()));
    }
    for slice in input.qos_slices {
        wanted.insert(slice.name.as_str());
    }

    // A slice and its units per pod, at most: one allocation.
    let mut actions = Vec::with_capacity(wanted.len() + input.actual.units.len());
    let mut held = Vec::new();
    let mut removals = Vec::new();
    let mut beside = BTreeSet::new();
    for unit in input
        .actual
        .units
        .iter()
        .filter(|u| u.is_berths() && !wanted.contains(u.name.as_str()))
    {
        let pod = unit.pod();
        let evicted = pod.as_ref().and_then(|p| input.evicted.get(p));
        if let Some(why) = pod.as_ref().and_then(|p| input.kept.get(p)) {
            held.push(Held {
                unit: unit.name.to_string(),
                pod: pod.as_deref().and_then(parse_pod_id),
                reason: HoldReason::Rollout,
                message: why.clone(),
                units: Vec::new(),
            });
            continue;
        }
        let retiring = pod.as_ref().and_then(|p| input.retiring.get(p));
        let protected_by = if evicted.is_some() || retiring.is_some() {
            None
        } else if let Some(reason) = &input.protection.hold_all {
            Some(reason.clone())
        } else if let Some(p) = pod.as_ref().filter(|p| input.protection.pods.contains(*p)) {
            Some(format!(
                "pod {p} is not valid in revision {}; its last good state keeps running",
                input.revision
            ))
        } else {
            unit.owner()
                .filter(|o| input.protection.owners.contains(*o))
                .map(|o| {
                    format!(
                        "{o} is not valid in revision {}; its last good state keeps running",
                        input.revision
                    )
                })
        };
        if let Some(reason) = protected_by {
            held.push(Held {
                unit: unit.name.to_string(),
                pod: pod.as_deref().and_then(parse_pod_id),
                reason: HoldReason::LastGoodKept,
                message: reason,
                units: Vec::new(),
            });
            continue;
        }
        let still_wanted = pod.as_ref().is_some_and(|p| pod_ids.contains(p));
        let reason = match (&pod, still_wanted, unit.name.is_slice()) {
            (Some(p), _, _) if evicted.is_some() => {
                format!("pod {p} is evicted: {}", evicted.map_or("", String::as_str))
            }
            (Some(_), _, _) if retiring.is_some() => retiring.cloned().unwrap_or_default(),
            (Some(p), true, true) => format!("pod {p} moved to another QoS class slice"),
            (Some(p), true, false) => format!(
                "the container is no longer part of pod {p} in revision {}",
                input.revision
            ),
            (Some(p), false, _) => format!("pod {p} is not in revision {}", input.revision),
            (None, _, _) => format!("no pod in revision {} needs it", input.revision),
        };
        let action = Action {
            verb: if unit.name.is_slice() {
                Verb::RemoveSlice
            } else {
                Verb::Stop
            },
            unit: unit.name.clone(),
            pod: pod.as_deref().and_then(parse_pod_id),
            reason,
            image: None,
            properties: SharedProperties::default(),
            changes: Vec::new(),
            // A hard eviction: SIGKILL, no grace period.
            grace_seconds: pod
                .as_ref()
                .filter(|p| input.immediate.contains(*p) && !unit.name.is_slice())
                .map(|_| 0),
            after_start: Vec::new(),
        };
        if pod.as_ref().is_some_and(|p| input.beside.contains(p)) && retiring.is_some() {
            beside.insert(unit.name.clone());
        }
        if unit.name.is_slice() {
            removals.push(action)
        } else {
            actions.push(action)
        }
    }

    for slice in input.qos_slices {
        if let Some(a) = slice_action(
            slice,
            actual.get(slice.name.as_str()).copied(),
            None,
            "QoS class slice",
            input.revision,
        ) {
            actions.push(a);
        }
    }
    for pod in &pods {
        // Probe results, looked up once per pod (and only when there are any).
        let health = if input.actual.pods.is_empty() {
            None
        } else {
            input
                .actual
                .pods
                .get(&pod.id.to_string())
                .map(|f| &f.health)
                .filter(|h| !h.is_empty())
        };
        let is_new = std::iter::once(&pod.slice.name)
            .chain(pod.units().map(|u| &u.name))
            .all(|n| !actual.contains_key(n.as_str()));
        if let Some(a) = slice_action(
            &pod.slice,
            actual.get(pod.slice.name.as_str()).copied(),
            Some(pod),
            "pod slice",
            input.revision,
        ) {
            actions.push(a);
        }
        for unit in pod.units() {
            if let Some(a) = unit_action(
                pod,
                unit,
                actual.get(unit.name.as_str()).copied(),
                is_new,
                input.revision,
                input.actual,
                health.and_then(|h| h.get(&unit.container)),
            ) {
                actions.push(a);
            }
        }
    }
    // Children before parents: a slice's depth is its count of '-'.
    removals.sort_by_key(|a| std::cmp::Reverse(a.unit.as_str().matches('-').count()));
    actions.extend(removals);
    actions.shrink_to_fit();
    Plan {
        node: input.node.to_string(),
        revision: input.revision.to_string(),
        actions,
        held,
        beside,
    }
}

pub(crate) fn parse_pod_id(text: &str) -> Option<PodId> {
    text.split_once('/').map(|(ns, name)| PodId {
        namespace: ns.to_string(),
        name: name.to_string(),
    })
}

fn slice_action(
    slice: &SliceUnit,
    actual: Option<&ActualUnit>,
    pod: Option<&DesiredPod>,
    what: &str,
    revision: &str,
) -> Option<Action> {
    let pod_id = pod.map(|p| p.id.clone());
    match actual {
        None => Some(Action {
            verb: Verb::CreateSlice,
            unit: slice.name.clone(),
            pod: pod_id,
            reason: match pod {
                Some(p) => format!("pod {} is new in revision {revision} ({} QoS)", p.id, p.qos),
                None => format!("the {what} does not exist yet"),
            },
            image: None,
            properties: SharedProperties::clone(&slice.properties),
            changes: Vec::new(),
            grace_seconds: None,
            // A pod's slice: its CPU limit would throttle its containers'
            // sandbox setup too.
            after_start: match pod {
                Some(_) => after_start(&slice.properties),
                None => Vec::new(),
            },
        }),
        Some(a) => {
            let changes = diff(&slice.properties, &a.properties);
            (!changes.is_empty()).then(|| Action {
                verb: Verb::UpdateSlice,
                unit: slice.name.clone(),
                pod: pod_id,
                reason: describe_changes(&changes),
                image: None,
                properties: SharedProperties::default(),
                changes,
                grace_seconds: None,
                after_start: Vec::new(),
            })
        }
    }
}

fn unit_action(
    pod: &DesiredPod,
    unit: &ContainerUnit,
    actual: Option<&ActualUnit>,
    pod_is_new: bool,
    revision: &str,
    state: &ActualState,
    health: Option<&crate::health::ContainerHealth>,
) -> Option<Action> {
    let environment_digests = state.environment_digests;
    let now = state.observed_at;
    let what = if unit.init {
        "init container"
    } else {
        "container"
    };
    let base =
        |verb: Verb, reason: String, properties: SharedProperties, changes: Vec<Change>| Action {
            verb,
            unit: unit.name.clone(),
            pod: Some(pod.id.clone()),
            reason,
            image: None,
            after_start: match verb {
                Verb::Start | Verb::Restart if !unit.init => after_start(&properties),
                _ => Vec::new(),
            },
            properties,
            changes,
            grace_seconds: None,
        };
    let Some(actual) = actual else {
        let reason = if pod_is_new {
            format!("pod {} is new in revision {revision}", pod.id)
        } else {
            format!("{what} {} of pod {} has no unit", unit.container, pod.id)
        };
        return Some(base(
            Verb::Start,
            reason,
            unit.properties_redacted(),
            Vec::new(),
        ));
    };
    // A snapshot that left the node holds digests of environment values:
    // the desired ones are compared as digests too.
    let digested;
    let desired = if environment_digests {
        let mut p = unit.properties_for_apply().clone();
        crate::actual::digest_environment(&mut p);
        digested = p;
        &digested
    } else {
        unit.properties_for_apply()
    };
    let changes = diff(desired, &actual.properties);
    let restarts = pod.restart_policy != RestartPolicy::Never;
    if changes.is_empty() {
        return match actual.active_state {
            ActiveState::Failed if restarts => Some(base(
                Verb::Restart,
                format!(
                    "{what} {} of pod {} failed and its restart policy is {:?}",
                    unit.container, pod.id, pod.restart_policy
                ),
                unit.properties_redacted(),
                Vec::new(),
            )),
            ActiveState::Inactive if pod.restart_policy == RestartPolicy::Always => Some(base(
                Verb::Start,
                format!(
                    "{what} {} of pod {} is stopped and its restart policy is Always",
                    unit.container, pod.id
                ),
                unit.properties_redacted(),
                Vec::new(),
            )),
            ActiveState::Active if health.and_then(|h| h.killing).is_some_and(|k| k.overdue(now)) => {
                let grace = health.and_then(|h| h.killing).map_or(0, |k| k.grace_seconds);
                Some(Action {
                    grace_seconds: Some(0),
                    ..base(
                        Verb::Kill,
                        format!(
                            "{what} {} of pod {} still runs {grace} s after SIGTERM: SIGKILL",
                            unit.container, pod.id
                        ),
                        SharedProperties::default(),
                        Vec::new(),
                    )
                })
            }
            ActiveState::Active => health.and_then(|h| h.kill()).map(|(kind, message)| {
                let grace = crate::health::kill_grace(&unit.probes, kind, unit.grace_seconds);
                Action {
                    grace_seconds: Some(grace),
                    ..base(
                        Verb::Kill,
                        format!(
                            "{what} {} of pod {}: {message}; killed (grace period {grace} s), restart policy {:?}",
                            unit.container, pod.id, pod.restart_policy
                        ),
                        SharedProperties::default(),
                        Vec::new(),
                    )
                }
            }),
            _ => None,
        };
    }
    let mut redacted = redact_changes(changes);
    if !unit.sensitive_env.is_empty() {
        // The command line may hold a secret on either side: the new one
        // as plans show it, the old one not at all.
        let shown = unit.properties_redacted();
        for c in redacted.iter_mut().filter(|c| c.property == "ExecStart") {
            c.from = None;
            c.to = shown.get("ExecStart").cloned();
        }
    }
    let in_place = actual.active_state == ActiveState::Active
        && redacted.iter().all(|c| unit.resizable.allows(&c.property));
    let mut reason = describe_changes(&redacted);
    if actual.active_state == ActiveState::Failed {
        reason = format!(
            "{what} {} of pod {} failed; {reason}",
            unit.container, pod.id
        );
    }
    if in_place {
        // oom_score_adj is given to a process when it starts: systemd
        // refuses to change it on a running unit, and the kubelet's in-place
        // resize leaves it as well. It takes effect at the next restart.
        let live: Vec<Change> = redacted
            .into_iter()
            .filter(|c| c.property != "OOMScoreAdjust")
            .collect();
        if live.is_empty() {
            return None;
        }
        Some(base(
            Verb::Update,
            format!(
                "{} (resized in place: resizePolicy NotRequired)",
                describe_changes(&live)
            ),
            SharedProperties::default(),
            live,
        ))
    } else {
        Some(base(
            Verb::Restart,
            reason,
            unit.properties_redacted(),
            redacted,
        ))
    }
}

/// Numbers compare by value whatever their sign type, since a snapshot or a
/// D-Bus reading may carry either. Dependency lists read back from systemd
/// hold the implicit dependencies too, so the desired ones need only be
/// among them; a boolean may read back as `yes`/`no` from a newer systemd.
fn same(property: &str, desired: &PropertyValue, actual: &PropertyValue) -> bool {
    use PropertyValue::{Bool, List, Signed, Text, Unsigned};
    match (desired, actual) {
        (Unsigned(x), Signed(y)) | (Signed(y), Unsigned(x)) => i128::from(*x) == i128::from(*y),
        (List(want), List(have))
            if matches!(property, "After" | "Requires" | "RequiresMountsFor") =>
        {
            want.iter().all(|w| have.contains(w))
        }
        (Bool(b), Text(t)) => &**t == if *b { "yes" } else { "no" },
        _ => desired == actual,
    }
}

/// The desired properties that differ from the actual ones. Properties the
/// actual side has and Berth does not set are not Berth's business.
pub fn diff(desired: &Properties, actual: &Properties) -> Vec<Change> {
    desired
        .iter()
        .filter(|(k, _)| !crate::security::WRITE_ONLY.contains(k))
        .filter(|(k, v)| actual.get(k).is_none_or(|a| !same(k, v, a)))
        .map(|(k, v)| Change {
            property: k.to_string(),
            from: actual.get(k).cloned(),
            to: Some(v.clone()),
        })
        .collect()
}

fn redact_changes(changes: Vec<Change>) -> Vec<Change> {
    changes
        .into_iter()
        .map(|mut c| {
            if c.property == "Environment" {
                // Only names: values may be secrets, on either side.
                c.to = Some(PropertyValue::list(environment_changes(&c.from, &c.to)));
                c.from = None;
            }
            c
        })
        .collect()
}

/// `+NAME` added, `~NAME` changed, `-NAME` removed; new names in order,
/// then removed ones.
fn environment_changes(from: &Option<PropertyValue>, to: &Option<PropertyValue>) -> Vec<String> {
    // (name, whole entry): entries compare whole, as systemd holds them.
    fn entries(v: &Option<PropertyValue>) -> Vec<(&str, &str)> {
        match v {
            Some(PropertyValue::List(l)) => l
                .iter()
                .map(|e| (e.split('=').next().unwrap_or(""), e.as_str()))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn lookup<'a>(list: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
        list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
    let (old, new) = (entries(from), entries(to));
    let mut changed = Vec::new();
    for (name, _) in &new {
        match lookup(&old, name) {
            None => changed.push(format!("+{name}")),
            Some(before) if lookup(&new, name) != Some(before) => changed.push(format!("~{name}")),
            Some(_) => {}
        }
    }
    for (name, _) in &old {
        if lookup(&new, name).is_none() {
            changed.push(format!("-{name}"));
        }
    }
    changed
}

fn log_field(v: &Option<PropertyValue>, field: &str) -> Option<String> {
    match v {
        Some(PropertyValue::List(l)) => l.iter().find_map(|f| {
            f.strip_prefix(field)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_string)
        }),
        _ => None,
    }
}

/// `memory limit 128Mi → 256Mi, image busybox:1.36 → busybox:1.37`
/// The most telling changes first (image, command, environment, memory,
/// CPU), at most [`REASON_CHANGES`] of them; the action lists them all.
pub fn describe_changes(changes: &[Change]) -> String {
    let mut ordered: Vec<&Change> = changes.iter().collect();
    ordered.sort_by_key(|c| importance(&c.property));
    let mut text: Vec<String> = ordered
        .iter()
        .take(REASON_CHANGES)
        .map(|c| describe_change(c))
        .collect();
    if ordered.len() > REASON_CHANGES {
        text.push(format!(
            "and {} more properties",
            ordered.len() - REASON_CHANGES
        ));
    }
    text.join(", ")
}

pub const REASON_CHANGES: usize = 3;

fn importance(property: &str) -> u8 {
    match property {
        "LogExtraFields" => 0,
        "ExecStart" => 1,
        "Environment" => 2,
        "Slice" => 3,
        "MemoryMax" | "CPUQuotaPerSecUSec" => 4,
        "MemoryLow" | "CPUWeight" => 5,
        "MemoryHigh" | "OOMScoreAdjust" | "CPUQuotaPeriodUSec" => 6,
        _ => 7,
    }
}

fn describe_change(c: &Change) -> String {
    let num = |v: &Option<PropertyValue>| match v {
        Some(PropertyValue::Unsigned(n)) => Some(i128::from(*n)),
        Some(PropertyValue::Signed(n)) => Some(i128::from(*n)),
        _ => None,
    };
    let bytes =
        |v: &Option<PropertyValue>| num(v).map_or("unset".to_string(), |n| format_bytes(n as u64));
    let plain = |v: &Option<PropertyValue>| match v {
        None => "unset".to_string(),
        Some(PropertyValue::Text(t)) => t.to_string(),
        Some(PropertyValue::Exec(e)) => e
            .iter()
            .map(|x| format!("{:?}", x.argv))
            .collect::<Vec<_>>()
            .join("; "),
        Some(PropertyValue::List(l)) => format!("{l:?}"),
        Some(PropertyValue::Binds(b)) => crate::units::binds_text(b),
        Some(PropertyValue::Bool(b)) => b.to_string(),
        Some(PropertyValue::Unsigned(n)) => n.to_string(),
        Some(PropertyValue::Signed(n)) => n.to_string(),
    };
    match c.property.as_str() {
        "MemoryMax" => format!("memory limit {} → {}", bytes(&c.from), bytes(&c.to)),
        "MemoryLow" => format!("memory request {} → {}", bytes(&c.from), bytes(&c.to)),
        "MemoryHigh" => format!("memory.high {} → {}", bytes(&c.from), bytes(&c.to)),
        "CPUQuotaPerSecUSec" => {
            let cpu = |v: &Option<PropertyValue>| {
                num(v).map_or("unset".to_string(), |n| format_cpu_milli((n / 1000) as u64))
            };
            format!("cpu limit {} → {}", cpu(&c.from), cpu(&c.to))
        }
        "CPUWeight" => format!("cpu weight {} → {}", plain(&c.from), plain(&c.to)),
        "OOMScoreAdjust" => format!("OOM score adjustment {} → {}", plain(&c.from), plain(&c.to)),
        "ExecStart" => format!("command {} → {}", plain(&c.from), plain(&c.to)),
        "Environment" => match &c.to {
            Some(PropertyValue::List(l)) => format!("environment {}", l.join(" ")),
            _ => "environment changed".to_string(),
        },
        // Its name carries a digest of the values: only that they changed.
        "EnvironmentFiles" => "environment from Secrets changed".to_string(),
        "LogExtraFields" => {
            let (a, b) = (
                log_field(&c.from, IMAGE_FIELD),
                log_field(&c.to, IMAGE_FIELD),
            );
            if a != b {
                format!(
                    "image {} → {}",
                    a.unwrap_or_else(|| "unset".into()),
                    b.unwrap_or_else(|| "unset".into())
                )
            } else {
                "Berth's log fields changed".to_string()
            }
        }
        other => format!("{other} {} → {}", plain(&c.from), plain(&c.to)),
    }
}

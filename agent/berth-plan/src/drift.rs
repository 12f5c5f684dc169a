//! Drift: where what runs departs from what Git says, for reasons Git did
//! not give. A plan action is a *change* when the desired unit differs from
//! the one last applied (a new commit), and *drift* when the desired unit is
//! the very one applied and the machine moved away from it (`systemctl
//! set-property`, `systemctl stop`, an edited drop-in). The test is a digest
//! of each unit's desired properties, recorded when it was applied, so
//! defaulted or normalised values can never show as drift: both sides of the
//! comparison are what the planner itself produced.
//!
//! Each drifted object is healed (its action runs) or reported (its action
//! is held back, and the plan says so) by its policy. The planner classifies
//! while it plans, so `berth plan --actual` shows the same split the node
//! makes; the agent turns the findings into the status and drift branches.

use std::collections::BTreeMap;

use berth_manifest::quantity::{format_bytes, format_cpu_milli};
use berth_manifest::{Catalog, Object, ObjectRef};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::desired::DesiredPod;
use crate::plan::{Action, Held, Verb};
use crate::reason::HoldReason;
use crate::units::PropertyValue;

/// Per object: `heal` or `report`.
pub const POLICY_ANNOTATION: &str = "berth.dev/drift-policy";
/// Per object: comma-separated fields whose drift is the admin's business.
pub const IGNORE_ANNOTATION: &str = "berth.dev/drift-ignore";

pub use crate::node::{DriftPolicy as Policy, DriftSettings as Settings};

/// The pseudo-fields besides unit properties.
pub const FIELD_STATE: &str = "state";
pub const FIELD_RESTARTS: &str = "restarts";
pub const FIELD_APPLY: &str = "apply";

/// One drifted field of one unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftItem {
    /// The object in Git: `Pod/default/web` or `Deployment/default/web`.
    pub object: String,
    /// `namespace/name` of the pod.
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub unit: String,
    /// A systemd property, or `state`, `restarts`, `apply`.
    pub field: String,
    pub desired: String,
    pub actual: String,
    /// Seconds since the epoch when this pass first saw it.
    pub since: u64,
    pub policy: Policy,
    /// What the agent did about it.
    pub action: String,
    /// The manifest field that says this, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_field: Option<String>,
    /// The drifted value in manifest terms (`300Mi`, `500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<String>,
}

impl DriftItem {
    pub fn key(&self) -> String {
        format!("{}|{}", self.unit, self.field)
    }
}

/// A digest of a unit's desired properties: what "the unit as applied" means.
pub fn digest(properties: &crate::units::Properties) -> String {
    let bytes = serde_json::to_vec(properties).unwrap_or_default();
    let hash = sha2::Sha256::digest(&bytes);
    hash.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Every desired unit of the node with its digest: what the apply puts in
/// place, for the agent to record.
pub fn unit_digests(pods: &[DesiredPod]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pod in pods {
        out.insert(pod.slice.name.to_string(), digest(&pod.slice.properties));
        for unit in pod.units() {
            out.insert(unit.name.to_string(), digest(unit.properties_for_apply()));
        }
    }
    out
}

/// The desired properties of a unit, and the index of its pod.
fn desired_unit<'a>(
    pods: &'a [DesiredPod],
    units: &BTreeMap<&str, usize>,
    unit: &str,
) -> Option<(&'a crate::units::Properties, usize)> {
    let i = *units.get(unit)?;
    let pod = &pods[i];
    if pod.slice.name.as_str() == unit {
        return Some((&pod.slice.properties, i));
    }
    pod.units()
        .find(|u| u.name.as_str() == unit)
        .map(|u| (u.properties_for_apply(), i))
}

/// The outcome of classifying a plan.
#[derive(Debug, Default)]
pub struct Classified {
    /// The actions to apply: changes, and drift whose policy is heal.
    pub actions: Vec<Action>,
    /// Drift found in the plan, before the apply (`action` says what will be done).
    pub items: Vec<DriftItem>,
    /// The actions of drift left as found (policy `report`).
    pub held: Vec<Held>,
}

/// Splits a plan's actions into changes and drift, and holds back the
/// actions of drift whose policy is `report` or whose fields are ignored.
/// `applied` maps unit names to the digest last applied in this boot.
pub fn classify(
    actions: Vec<Action>,
    pods: &[DesiredPod],
    catalog: &Catalog,
    applied: &BTreeMap<String, String>,
    settings: &Settings,
    now: u64,
) -> Classified {
    let mut out = Classified::default();
    // Only a unit applied before can have drifted: a node's first plan, and
    // `berth plan` without a snapshot, digest nothing.
    if applied.is_empty() {
        out.actions = actions;
        return out;
    }
    let units: BTreeMap<&str, usize> = pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            std::iter::once((p.slice.name.as_str(), i))
                .chain(p.units().map(move |u| (u.name.as_str(), i)))
        })
        .collect();
    let objects: BTreeMap<&ObjectRef, &Object> =
        catalog.objects.iter().map(|o| (&o.id, &o.object)).collect();
    for mut action in actions {
        let Some(was) = applied.get(action.unit.as_str()) else {
            out.actions.push(action);
            continue;
        };
        let Some((properties, pod_index)) = desired_unit(pods, &units, action.unit.as_str()) else {
            out.actions.push(action);
            continue;
        };
        if digest(properties) != *was {
            out.actions.push(action);
            continue;
        }
        let pod = &pods[pod_index];
        let object = objects.get(&pod.source).copied();
        let annotations = object.and_then(annotations);
        let policy = annotations
            .and_then(|a| a.get(POLICY_ANNOTATION))
            .and_then(|p| Policy::parse(p))
            .unwrap_or(settings.policy);
        let ignored = |field: &str| is_ignored(settings, annotations, field);
        let container = pod
            .units()
            .find(|u| u.name == action.unit)
            .map(|u| u.container.clone());
        let item = |field: &str, desired: String, actual: String| DriftItem {
            object: pod.source.to_string(),
            pod: pod.id.to_string(),
            container: container.clone(),
            unit: action.unit.to_string(),
            field: field.to_string(),
            desired,
            actual,
            since: now,
            policy,
            action: match policy {
                Policy::Heal => "healed: put back as Git says".into(),
                Policy::Report => "reported: left as found (policy report)".into(),
            },
            manifest_field: None,
            adopt: None,
        };
        let found: Vec<DriftItem> = match action.verb {
            Verb::Update | Verb::UpdateSlice | Verb::Restart if !action.changes.is_empty() => {
                action.changes.retain(|c| !ignored(&c.property));
                action
                    .changes
                    .iter()
                    .map(|c| {
                        let mut i = item(
                            &c.property,
                            render(&c.property, c.to.as_ref()),
                            render(&c.property, c.from.as_ref()),
                        );
                        if let (Some(container), Some(object)) = (&container, object) {
                            adoptable(&mut i, pod, container, object, c.from.as_ref());
                        }
                        i
                    })
                    .collect()
            }
            Verb::Start | Verb::CreateSlice if ignored(FIELD_STATE) => Vec::new(),
            Verb::Start | Verb::CreateSlice => vec![item(
                FIELD_STATE,
                "running".into(),
                if action.verb == Verb::CreateSlice {
                    "the pod's slice was removed".into()
                } else {
                    "stopped or removed outside Berth".into()
                },
            )],
            // A failed container restarted by its restart policy is the
            // kubelet's ordinary work, not drift.
            _ => {
                out.actions.push(action);
                continue;
            }
        };
        if found.is_empty() {
            // Every drifted field is ignored: neither reported nor healed.
            continue;
        }
        out.items.extend(found);
        if policy == Policy::Heal {
            out.actions.push(action);
        } else {
            out.held.push(Held {
                unit: action.unit.to_string(),
                pod: action.pod.clone(),
                reason: HoldReason::DriftReported,
                message: format!("left as found (drift policy report): {}", action.reason),
                units: Vec::new(),
            });
        }
    }
    out
}

/// Keeps the `since` of drift already seen in an earlier pass.
pub fn carry_since(items: &mut [DriftItem], previous: &[DriftItem]) {
    let earlier: BTreeMap<String, u64> = previous.iter().map(|i| (i.key(), i.since)).collect();
    for item in items {
        if let Some(since) = earlier.get(&item.key()) {
            item.since = item.since.min(*since);
        }
    }
}

/// Whether the node's config or the object's annotation leaves `field` to
/// the admin.
pub fn is_ignored(
    settings: &Settings,
    annotations: Option<&BTreeMap<String, String>>,
    field: &str,
) -> bool {
    settings.ignore.contains(field)
        || annotations
            .and_then(|a| a.get(IGNORE_ANNOTATION))
            .is_some_and(|list| list.split(',').any(|f| f.trim() == field))
}

pub fn annotations(object: &Object) -> Option<&BTreeMap<String, String>> {
    match object {
        Object::Pod(p) => p.metadata.annotations.as_ref(),
        Object::Deployment(d) => d.metadata.annotations.as_ref(),
        _ => None,
    }
}

fn pod_spec(object: &Object) -> Option<&berth_manifest::model::PodSpec> {
    match object {
        Object::Pod(p) => p.spec.as_ref(),
        Object::Deployment(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        _ => None,
    }
}

/// Which manifest field a container property comes from, and the drifted
/// value in that field's terms.
fn manifest_value(property: &str, value: &PropertyValue) -> Option<(&'static str, String)> {
    let PropertyValue::Unsigned(n) = value else {
        return None;
    };
    if *n == u64::MAX {
        return None;
    }
    match property {
        "MemoryMax" => Some(("limits.memory", format_bytes(*n))),
        "MemoryLow" => Some(("requests.memory", format_bytes(*n))),
        // Berth writes CPU limits as a quota per second of CPU time.
        "CPUQuotaPerSecUSec" if n % 1000 == 0 => Some(("limits.cpu", format_cpu_milli(n / 1000))),
        _ => None,
    }
}

fn adoptable(
    item: &mut DriftItem,
    pod: &DesiredPod,
    container: &str,
    object: &Object,
    actual: Option<&PropertyValue>,
) {
    let Some((field, value)) = actual.and_then(|v| manifest_value(&item.field, v)) else {
        return;
    };
    let Some(spec) = pod_spec(object) else { return };
    let (list, index) = match spec.containers.iter().position(|c| c.name == container) {
        Some(i) => ("containers", i),
        None => match spec
            .init_containers
            .as_ref()
            .and_then(|l| l.iter().position(|c| c.name == container))
        {
            Some(i) => ("initContainers", i),
            None => return,
        },
    };
    item.manifest_field = Some(format!(
        "{}.{list}[{index}].resources.{field}",
        pod.spec_path
    ));
    item.adopt = Some(value);
}

/// A property value as a person reads it.
pub fn render(property: &str, value: Option<&PropertyValue>) -> String {
    match value {
        None => "(not set)".into(),
        Some(PropertyValue::Unsigned(u64::MAX)) => "infinity".into(),
        Some(PropertyValue::Unsigned(n)) if property.starts_with("Memory") => format_bytes(*n),
        Some(PropertyValue::Unsigned(n)) if property == "CPUQuotaPerSecUSec" => {
            format!("{} CPU", format_cpu_milli(n / 1000))
        }
        Some(PropertyValue::Unsigned(n)) => n.to_string(),
        Some(PropertyValue::Signed(n)) => n.to_string(),
        Some(PropertyValue::Bool(b)) => b.to_string(),
        Some(PropertyValue::Text(t)) => t.to_string(),
        Some(PropertyValue::List(l)) => l.join(" "),
        Some(PropertyValue::Exec(e)) => format!("{e:?}"),
        Some(PropertyValue::Binds(b)) => crate::units::binds_text(b),
    }
}

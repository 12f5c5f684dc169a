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
//! is held back) by its policy; the findings feed the status branch and the
//! drift branch, whose manifest edit adopts the drifted value.

use std::collections::{BTreeMap, BTreeSet};

use berth_manifest::quantity::{format_bytes, format_cpu_milli};
use berth_manifest::{Catalog, FieldPath, Object, ObjectRef};
use berth_plan::{Action, DesiredPod, PropertyValue, Verb};
use berth_runtime::ApplyFailure;
use berth_runtime::status::PodStatus;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Per object: `heal` or `report`.
pub const POLICY_ANNOTATION: &str = "berth.dev/drift-policy";
/// Per object: comma-separated fields whose drift is the admin's business.
pub const IGNORE_ANNOTATION: &str = "berth.dev/drift-ignore";

/// What the agent does about drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Put it back, and record that it happened.
    Heal,
    /// Leave it as found and report it.
    Report,
}

impl Policy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "heal" => Some(Policy::Heal),
            "report" => Some(Policy::Report),
            _ => None,
        }
    }
}

/// The node's drift settings (from its config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub policy: Policy,
    /// A container restarted more often than this is reported.
    pub restart_threshold: u32,
    /// Fields never reported or healed on any object.
    pub ignore: BTreeSet<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: Policy::Heal,
            restart_threshold: 5,
            ignore: BTreeSet::new(),
        }
    }
}

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
pub fn digest(properties: &berth_plan::Properties) -> String {
    let bytes = serde_json::to_vec(properties).unwrap_or_default();
    let hash = sha2::Sha256::digest(&bytes);
    hash.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Every desired unit of the node with its digest and pod.
fn desired_digests(pods: &[DesiredPod]) -> BTreeMap<String, (String, usize)> {
    let mut out = BTreeMap::new();
    for (i, pod) in pods.iter().enumerate() {
        out.insert(
            pod.slice.name.to_string(),
            (digest(&pod.slice.properties), i),
        );
        for unit in pod.units() {
            out.insert(
                unit.name.to_string(),
                (digest(unit.properties_for_apply()), i),
            );
        }
    }
    out
}

/// The outcome of classifying a plan.
#[derive(Debug, Default)]
pub struct Classified {
    /// The actions to apply: changes, and drift whose policy is heal.
    pub actions: Vec<Action>,
    /// Drift found in the plan, before the apply (`action` says what will be done).
    pub items: Vec<DriftItem>,
    /// Every desired unit's digest and pod index, for recording what the
    /// apply put in place.
    pub digests: BTreeMap<String, (String, usize)>,
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
    let digests = desired_digests(pods);
    let mut out = Classified::default();
    for mut action in actions {
        let Some((want, pod_index)) = digests.get(action.unit.as_str()) else {
            out.actions.push(action);
            continue;
        };
        if applied.get(action.unit.as_str()) != Some(want) {
            out.actions.push(action);
            continue;
        }
        let pod = &pods[*pod_index];
        let object = catalog.objects.iter().find(|o| o.id == pod.source);
        let annotations = object.and_then(|o| annotations(&o.object));
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
                            adoptable(&mut i, pod, container, &object.object, c.from.as_ref());
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
        }
    }
    out.digests = digests;
    out
}

/// Drift that no action can put back: containers restarting past the
/// threshold, and objects the node could not apply.
pub fn standing(
    statuses: &[PodStatus],
    failures: &[ApplyFailure],
    pods: &[DesiredPod],
    catalog: &Catalog,
    settings: &Settings,
    now: u64,
) -> Vec<DriftItem> {
    let mut out = Vec::new();
    let source = |pod: &str| {
        pods.iter()
            .find(|p| p.id.to_string() == pod)
            .map(|p| (p.source.clone(), p))
    };
    let ignored = |object: Option<&ObjectRef>, field: &str| {
        let found = object.and_then(|id| catalog.objects.iter().find(|o| &o.id == id));
        is_ignored(settings, found.and_then(|o| annotations(&o.object)), field)
    };
    for status in statuses {
        let pod = format!("{}/{}", status.namespace, status.name);
        let found = source(&pod);
        let object = found.as_ref().map(|(o, _)| o);
        if ignored(object, FIELD_RESTARTS) {
            continue;
        }
        for c in status
            .containers
            .iter()
            .filter(|c| c.restart_count > settings.restart_threshold)
        {
            out.push(DriftItem {
                object: object.map_or_else(|| format!("Pod/{pod}"), ToString::to_string),
                pod: pod.clone(),
                container: Some(c.name.clone()),
                unit: c.unit.clone(),
                field: FIELD_RESTARTS.into(),
                desired: format!("at most {}", settings.restart_threshold),
                actual: c.restart_count.to_string(),
                since: now,
                policy: Policy::Report,
                action: "reported: the container keeps failing (see `berth logs`)".into(),
                manifest_field: None,
                adopt: None,
            });
        }
    }
    for f in failures {
        // A pull under way or retrying is shown in status, not as drift.
        if f.reason.is_pulling() {
            continue;
        }
        let pod = f.pod.clone().unwrap_or_default();
        let found = source(&pod);
        let object = found.as_ref().map(|(o, _)| o);
        if ignored(object, FIELD_APPLY) {
            continue;
        }
        out.push(DriftItem {
            object: object.map_or_else(|| format!("Pod/{pod}"), ToString::to_string),
            pod,
            container: None,
            unit: f.unit.clone(),
            field: FIELD_APPLY.into(),
            desired: format!("{} done", f.verb),
            actual: format!("{:?}: {}", f.reason, f.message),
            since: now,
            policy: Policy::Report,
            action: "reported: retried on every pass".into(),
            manifest_field: None,
            adopt: None,
        });
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
fn is_ignored(
    settings: &Settings,
    annotations: Option<&BTreeMap<String, String>>,
    field: &str,
) -> bool {
    settings.ignore.contains(field)
        || annotations
            .and_then(|a| a.get(IGNORE_ANNOTATION))
            .is_some_and(|list| list.split(',').any(|f| f.trim() == field))
}

fn annotations(object: &Object) -> Option<&BTreeMap<String, String>> {
    match object {
        Object::Pod(p) => p.metadata.annotations.as_ref(),
        Object::Deployment(d) => d.metadata.annotations.as_ref(),
        _ => None,
    }
}

fn pod_spec(object: &Object) -> Option<&berth_manifest::k8s_openapi::api::core::v1::PodSpec> {
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
        Some(PropertyValue::Text(t)) => t.clone(),
        Some(PropertyValue::List(l)) => l.join(" "),
        Some(PropertyValue::Exec(e)) => format!("{e:?}"),
        Some(PropertyValue::Binds(b)) => berth_plan::units::binds_text(b),
    }
}

/// One file of the adopting change: its path in the repository, and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub path: String,
    pub text: String,
}

/// The manifest edits that adopt the drift: each adoptable item's value
/// written over the one in its file, in place. Replicas of one Deployment
/// that drifted to different values are left for a person to decide.
/// Returns the edited files and, per item key, why it was not written.
pub fn adopting_edits(
    items: &[DriftItem],
    catalog: &Catalog,
    repo_path: &str,
) -> (Vec<Edit>, BTreeMap<String, String>) {
    let mut notes = BTreeMap::new();
    // (file index, byte range) → (value, item keys)
    let mut wanted: BTreeMap<(usize, usize, usize), (String, Vec<String>)> = BTreeMap::new();
    let mut conflicts = BTreeSet::new();
    for item in items {
        let (Some(field), Some(value)) = (&item.manifest_field, &item.adopt) else {
            continue;
        };
        let Some(object) = catalog
            .objects
            .iter()
            .find(|o| o.id.to_string() == item.object)
        else {
            continue;
        };
        let mut path = object.source.prefix.clone();
        path.0.extend(FieldPath::parse(field).0);
        let file = &catalog.files[object.source.file];
        let Some(range) =
            berth_manifest::yaml::scalar_range(&file.text, &object.source.chunk, &path)
        else {
            notes.insert(
                item.key(),
                format!("{field} is not written in the manifest; add `{field}: {value}` to adopt"),
            );
            continue;
        };
        let key = (object.source.file, range.start, range.end);
        let entry = wanted
            .entry(key)
            .or_insert_with(|| (value.clone(), Vec::new()));
        if &entry.0 != value {
            conflicts.insert(key);
        }
        entry.1.push(item.key());
    }
    let mut by_file: BTreeMap<usize, Vec<(usize, usize, String)>> = BTreeMap::new();
    for (key, (value, keys)) in wanted {
        if conflicts.contains(&key) {
            for k in keys {
                notes.insert(
                    k,
                    "replicas of one template drifted to different values; not written".into(),
                );
            }
            continue;
        }
        by_file
            .entry(key.0)
            .or_default()
            .push((key.1, key.2, value));
    }
    let mut edits = Vec::new();
    for (file, mut spans) in by_file {
        let source = &catalog.files[file];
        let mut text = source.text.clone();
        spans.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (start, end, value) in spans {
            text.replace_range(start..end, &value);
        }
        let relative = source.path.to_string_lossy().replace('\\', "/");
        let base = repo_path.trim_matches('/');
        let path = if base.is_empty() || base == "." {
            relative
        } else {
            format!("{base}/{relative}")
        };
        edits.push(Edit { path, text });
    }
    (edits, notes)
}

/// How many items DRIFT.md lists one by one; beyond it, counts per field.
pub const REPORT_LIMIT: usize = 50;

/// The report a reviewer reads: what drifted, since when, on which node,
/// old → new, what the agent did, and what merging does.
pub fn report(
    node: &str,
    revision: &str,
    items: &[DriftItem],
    notes: &BTreeMap<String, String>,
    edits: &[Edit],
) -> String {
    let mut out = String::new();
    let objects: BTreeSet<&str> = items.iter().map(|i| i.object.as_str()).collect();
    out.push_str(&format!("# Drift on node {node}\n\n"));
    out.push_str(&format!(
        "{} drifted field{} on {} object{}, against revision `{}` of the desired state.\n\n",
        items.len(),
        if items.len() == 1 { "" } else { "s" },
        objects.len(),
        if objects.len() == 1 { "" } else { "s" },
        revision
    ));
    if edits.is_empty() {
        out.push_str("Nothing here can be written into the manifests: merging changes nothing but this report. Close the pull request and fix the node, or set the object's policy to `heal`.\n\n");
    } else {
        out.push_str(&format!(
            "**Merge** to adopt what the node runs now: this commit changes {} to match it. **Close** to keep Git as it is; set `{POLICY_ANNOTATION}: heal` on the object (or `drift.policy: heal` in the node's config) and the node puts it back.\n\n",
            edits
                .iter()
                .map(|e| format!("`{}`", e.path))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out.push_str(
        "| object | container | field | in Git | on the node | since | what the agent did |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for item in items.iter().take(REPORT_LIMIT) {
        let mut did = item.action.clone();
        if let Some(note) = notes.get(&item.key()) {
            did = format!("{did}; {note}");
        } else if let (Some(f), Some(v)) = (&item.manifest_field, &item.adopt) {
            did = format!("{did}; merge sets {f} to {v}");
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            item.object,
            item.container.as_deref().unwrap_or("-"),
            item.field,
            cell(&item.desired),
            cell(&item.actual),
            timestamp(item.since),
            cell(&did)
        ));
    }
    if items.len() > REPORT_LIMIT {
        let mut per_field: BTreeMap<&str, usize> = BTreeMap::new();
        for item in &items[REPORT_LIMIT..] {
            *per_field.entry(item.field.as_str()).or_default() += 1;
        }
        out.push_str(&format!(
            "\n…and {} more: {}. `berth drift --from-git` on a clone lists them all from status.yaml.\n",
            items.len() - REPORT_LIMIT,
            per_field
                .iter()
                .map(|(f, n)| format!("{n} × {f}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// `2026-11-29 22:10:05 UTC`, from seconds since the epoch.
pub fn timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

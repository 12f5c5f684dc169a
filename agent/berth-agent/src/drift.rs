//! Drift, reported: what the planner classified (see [`berth_plan::drift`])
//! plus what no action can put back (containers restarting past the
//! threshold, objects the node could not apply), written for a reviewer as
//! DRIFT.md and as the manifest edits that adopt the drifted values.

use std::collections::{BTreeMap, BTreeSet};

use berth_manifest::{Catalog, FieldPath, ObjectRef};
use berth_plan::DesiredPod;
use berth_runtime::ApplyFailure;
use berth_runtime::status::PodStatus;

pub use berth_plan::drift::{
    DriftItem, FIELD_APPLY, FIELD_RESTARTS, FIELD_STATE, IGNORE_ANNOTATION, POLICY_ANNOTATION,
    Policy, Settings, annotations, carry_since, digest, is_ignored, render,
};

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

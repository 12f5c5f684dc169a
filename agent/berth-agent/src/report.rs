//! The node's observed state as `status.yaml` on its status branch: node
//! info and conditions, every pod's status, the revisions, the last pass's
//! errors and the drift. Read back by `berth status --from-git` on any clone.

use std::collections::BTreeMap;
use std::path::Path;

use berth_runtime::status::PodStatus;
use serde::{Deserialize, Serialize};

use crate::drift::{DriftItem, Policy};
use crate::state::{Healed, RevisionRecord};

pub const API_VERSION: &str = "berth.dev/v1alpha1";
pub const KIND: &str = "NodeStatus";
/// The file on the status branch.
pub const STATUS_FILE: &str = "status.yaml";
/// How many drift items status.yaml lists; the count is always complete.
pub const STATUS_DRIFT_LIMIT: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusDoc {
    pub api_version: String,
    pub kind: String,
    pub node: NodeSection,
    /// The booted OS version and slot, the other slot's, and the last
    /// update's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<berth_update::OsStatus>,
    pub revisions: Revisions,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(default)]
    pub pods: Vec<PodStatus>,
    /// Each Deployment: replicas, updated, ready, available, conditions,
    /// and the rollout's next steps while one is under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<berth_plan::rollout::DeploymentStatus>,
    pub drift: DriftSection,
    /// Services as programmed, and what the network could not do.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: crate::state::NetworkRecord,
    /// Claims (phase, capacity, usage) and provisioned volumes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub storage: crate::storage::StorageRecord,
    /// Image pulls under way, and failing ones with their error. Byte counts
    /// are left to `berth images` and the pods' messages: here they would
    /// make every poll a change.
    #[serde(default, skip_serializing_if = "is_default")]
    pub images: ImagesSection,
    /// The last events of each object (`berth get events` has them all).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub events: BTreeMap<String, Vec<crate::events::Event>>,
    /// When this document was written (changes on every heartbeat).
    pub heartbeat: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSection {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: BTreeMap<String, String>,
    /// Capacity minus what the node keeps for itself (nothing reserved yet).
    pub allocatable: BTreeMap<String, String>,
    pub conditions: Vec<Condition>,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `"True"` or `"False"`, as Kubernetes writes them.
    pub status: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revisions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<RevisionRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempted: Option<RevisionRecord>,
    /// Who signed the applied revision, when signatures are required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// The last revision whose every rollout completed on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<RevisionRecord>,
    /// The last revision rejected because its rollout failed: why, and
    /// which revision the node went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<crate::state::RollbackRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftSection {
    pub policy: Policy,
    pub count: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<DriftItem>,
    /// Drift the agent put back, most recent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub healed: Vec<Healed>,
}

/// What the report is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub node: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub state_dir: &'a Path,
    pub applied: Option<&'a RevisionRecord>,
    pub attempted: Option<&'a RevisionRecord>,
    pub signed_by: Option<&'a str>,
    pub errors: &'a [String],
    pub pods: &'a [PodStatus],
    pub policy: Policy,
    pub drift: &'a [DriftItem],
    pub healed: &'a [Healed],
    pub network: &'a crate::state::NetworkRecord,
    pub storage: &'a crate::storage::StorageRecord,
    pub images: &'a crate::images::ImagesRecord,
    pub healthy: Option<&'a RevisionRecord>,
    pub rolled_back: Option<&'a crate::state::RollbackRecord>,
    pub deployments: &'a [berth_plan::rollout::DeploymentStatus],
    pub events: &'a crate::events::EventLog,
    /// The eviction thresholds, and the signals the last pass found under
    /// pressure: the node's pressure conditions.
    pub eviction: &'a berth_plan::pressure::Thresholds,
    pub pressured: &'a [berth_plan::pressure::Signal],
    pub os: Option<&'a berth_update::OsStatus>,
    pub now: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pulling: Vec<String>,
    /// By reference: the last error, after how many failures.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failing: BTreeMap<String, String>,
}

impl ImagesSection {
    fn from_record(r: &crate::images::ImagesRecord) -> Self {
        let mut out = Self::default();
        for (reference, p) in &r.pulls {
            match &p.error {
                Some(e) if p.phase == berth_registry::PullPhase::Failed => {
                    out.failing
                        .insert(reference.clone(), format!("{e} ({} failures)", p.failures));
                }
                _ => out.pulling.push(reference.clone()),
            }
        }
        out
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

pub fn build(inputs: &Inputs<'_>) -> NodeStatusDoc {
    let mut capacity = BTreeMap::new();
    capacity.insert(
        "cpu".to_string(),
        berth_manifest::quantity::format_cpu_milli(inputs.cpu_milli),
    );
    capacity.insert(
        "memory".to_string(),
        berth_manifest::quantity::format_bytes(inputs.memory_bytes),
    );
    let mut conditions = vec![ready(inputs)];
    // Memory, disk and PIDs: true while the node is under the signal's
    // eviction threshold (or has not yet reclaimed past it).
    let measured = crate::pressure::measure(inputs.state_dir);
    for signal in berth_plan::pressure::Signal::ALL {
        conditions.push(pressure_condition(
            signal,
            measured.get(&signal),
            inputs.eviction,
            inputs.pressured,
        ));
    }
    let mut pods = inputs.pods.to_vec();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    NodeStatusDoc {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        node: NodeSection {
            name: inputs.node.to_string(),
            labels: inputs.labels.clone(),
            allocatable: capacity.clone(),
            capacity,
            conditions,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
        os: inputs.os.cloned(),
        revisions: Revisions {
            applied: inputs.applied.cloned(),
            attempted: inputs.attempted.cloned(),
            signed_by: inputs.signed_by.map(str::to_string),
            healthy: inputs.healthy.cloned(),
            rolled_back: inputs.rolled_back.cloned(),
        },
        errors: inputs.errors.to_vec(),
        pods,
        deployments: inputs.deployments.to_vec(),
        events: inputs
            .events
            .last_per_object(crate::events::EVENTS_PER_OBJECT_IN_STATUS),
        drift: DriftSection {
            policy: inputs.policy,
            count: inputs.drift.len(),
            items: inputs
                .drift
                .iter()
                .take(STATUS_DRIFT_LIMIT)
                .cloned()
                .collect(),
            healed: inputs.healed.to_vec(),
        },
        network: crate::state::NetworkRecord {
            // Each pod carries its own IP.
            pod_ips: BTreeMap::new(),
            ..inputs.network.clone()
        },
        storage: inputs.storage.clone(),
        images: ImagesSection::from_record(inputs.images),
        heartbeat: crate::drift::timestamp(inputs.now),
    }
}

/// A pressure condition, as the kubelet words it: what it says changes
/// only when the condition does (not with every byte measured, which
/// would make each pass a status commit).
fn pressure_condition(
    signal: berth_plan::pressure::Signal,
    measured: Option<&berth_plan::pressure::Measure>,
    eviction: &berth_plan::pressure::Thresholds,
    pressured: &[berth_plan::pressure::Signal],
) -> Condition {
    use berth_plan::pressure::Signal;
    let kind = signal.condition();
    let (sufficient, insufficient) = match signal {
        Signal::MemoryAvailable => ("NodeHasSufficientMemory", "NodeHasInsufficientMemory"),
        Signal::NodefsAvailable => ("NodeHasNoDiskPressure", "NodeHasDiskPressure"),
        Signal::PidAvailable => ("NodeHasSufficientPID", "NodeHasInsufficientPID"),
    };
    let Some(m) = measured else {
        return condition(kind, false, "Unknown", format!("cannot measure {signal}"));
    };
    let Some(amount) = eviction.hard.get(&signal) else {
        let short = pressured.contains(&signal);
        let why = if short {
            format!("{signal} is under a soft eviction threshold")
        } else {
            format!("{signal} has no hard eviction threshold")
        };
        return condition(
            kind,
            short,
            if short { insufficient } else { sufficient },
            why,
        );
    };
    let written = amount.show(signal);
    if pressured.contains(&signal) || m.available < amount.of(m.capacity) {
        condition(
            kind,
            true,
            insufficient,
            format!(
                "{signal} is under its eviction threshold {written} (or not yet reclaimed past it)"
            ),
        )
    } else {
        condition(
            kind,
            false,
            sufficient,
            format!("{signal} is over its eviction threshold {written}"),
        )
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
    }
}

fn ready(inputs: &Inputs<'_>) -> Condition {
    match (inputs.applied, inputs.errors.first()) {
        (_, Some(e)) => condition("Ready", false, "PassFailed", e.clone()),
        (None, None) => condition(
            "Ready",
            false,
            "NoRevision",
            "no valid revision fetched yet".into(),
        ),
        (Some(_), None) => condition("Ready", true, "AgentReady", String::new()),
    }
}

impl NodeStatusDoc {
    /// The document without what changes on its own (the heartbeat time,
    /// usage counters, and what probes say: readiness, conditions, probe
    /// counts): two reports that agree here need no new commit, so a pod
    /// flapping between ready and not ready is committed at most once per
    /// heartbeat. A kill for a failed probe restarts the container, which
    /// is significant (its restart count).
    pub fn significant(&self) -> String {
        let mut quiet = self.clone();
        quiet.heartbeat.clear();
        for p in &mut quiet.pods {
            p.usage = Default::default();
            p.conditions.clear();
            for c in &mut p.containers {
                c.ready = false;
                c.started = None;
                c.probes.clear();
            }
        }
        for s in &mut quiet.network.services {
            s.endpoints.clear();
        }
        // A repeated event (a crash loop's next BackOff, a probe failing
        // again) rides along with the next commit; a new one is news.
        for e in quiet.events.values_mut().flatten() {
            e.count = 0;
            e.last_timestamp = 0;
        }
        serde_json::to_string(&quiet).unwrap_or_default()
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_plan::pressure::{Measure, Signal, Thresholds};

    #[test]
    fn a_pressure_condition_changes_with_the_condition_not_with_each_byte_measured() {
        let eviction = Thresholds::default();
        let at = |available: u64| Measure {
            available,
            capacity: 1000 << 20,
        };
        let a = pressure_condition(
            Signal::NodefsAvailable,
            Some(&at(500 << 20)),
            &eviction,
            &[],
        );
        let b = pressure_condition(
            Signal::NodefsAvailable,
            Some(&at(499 << 20)),
            &eviction,
            &[],
        );
        assert_eq!(a, b, "a status commit for every byte written");
        assert_eq!(a.status, "False");
        assert_eq!(
            a.message,
            "nodefs.available is over its eviction threshold 10%"
        );
        let short =
            pressure_condition(Signal::NodefsAvailable, Some(&at(50 << 20)), &eviction, &[]);
        assert_eq!(
            (short.status.as_str(), short.reason.as_str()),
            ("True", "NodeHasDiskPressure")
        );
        // Reclaimed past the threshold but not past the minimum: still true.
        let held = pressure_condition(
            Signal::NodefsAvailable,
            Some(&at(500 << 20)),
            &eviction,
            &[Signal::NodefsAvailable],
        );
        assert_eq!(held.status, "True");
        // No hard threshold for PIDs by default.
        let pids = pressure_condition(Signal::PidAvailable, Some(&at(5)), &eviction, &[]);
        assert_eq!(pids.status, "False");
        assert_eq!(pids.message, "pid.available has no hard eviction threshold");
        let unknown = pressure_condition(Signal::MemoryAvailable, None, &eviction, &[]);
        assert_eq!(unknown.reason, "Unknown");
    }
}

//! What the agent remembers between runs: the last revision that was valid
//! (what the node keeps running) and the last one it tried. Written
//! atomically, so a power cut leaves either the old or the new file.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::drift::DriftItem;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub node: Option<String>,
    pub last_good: Option<RevisionRecord>,
    pub last_attempted: Option<RevisionRecord>,
    /// When a fetch from Git last succeeded (seconds since the epoch): the
    /// health gate of an updated slot wants one on its boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<u64>,
    /// The errors of the last pass, empty when it went well.
    #[serde(default)]
    pub errors: Vec<String>,
    /// What the last apply could not do, per unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<berth_runtime::ApplyFailure>,
    /// Errors found while planning against what runs (a pod whose unit
    /// name an admin's unit holds): those pods do not run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_errors: Vec<String>,
    /// Pods the node cannot fit, refuses, or evicted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_admitted: Vec<NotAdmittedRecord>,
    /// Evictions in force: each pod stays down while its eviction holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evictions: Vec<berth_plan::ephemeral::Eviction>,
    /// The boot the `applied` digests belong to: transient units do not
    /// survive a reboot, so their absence after one is not drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Per unit, a digest of the properties last applied (see `drift`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<String, String>,
    /// The drift found by the last pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<DriftItem>,
    /// Drift the agent put back, most recent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub healed: Vec<Healed>,
    /// Who signed the applied revision, when signatures are required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// How pushing status and drift goes.
    #[serde(default)]
    pub publish: PublishRecord,
    /// The pod network and Services as last programmed.
    #[serde(default)]
    pub network: NetworkRecord,
    /// Claims and volumes as last reconciled.
    #[serde(default)]
    pub storage: crate::storage::StorageRecord,
    /// Image pulls under way or failed, and what collection removed.
    #[serde(default)]
    pub images: crate::images::ImagesRecord,
    /// Probe results of the running containers, by pod and container: the
    /// prober resumes from them when the agent restarts (a kill begun is
    /// not begun again), and `berth status` shows them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub health: BTreeMap<String, BTreeMap<String, berth_plan::health::ContainerHealth>>,
    /// The units whose containers have probes, with which: a running one
    /// the prober has no results for (just started, or restarted) shows
    /// the kubelet's initial results, never ready before its probe says so.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub probed: BTreeMap<String, Vec<berth_manifest::probe::ProbeKind>>,
    /// Why the node last killed a container (`namespace/pod/container`):
    /// the failed probe, with when.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kills: BTreeMap<String, String>,
    /// The `preStop` hooks of the running containers, by unit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pre_stop: BTreeMap<String, crate::hooks::PreStop>,
    /// When each pod condition took its status: pod → type → (status, time).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub transitions: BTreeMap<String, BTreeMap<String, (String, String)>>,
    /// Deployments' rollouts as the last pass left them: the planner
    /// takes them back (see `berth_plan::rollout::RolloutRecord`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<berth_plan::rollout::RolloutRecord>,
    /// Each Deployment's status after the last pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<berth_plan::rollout::DeploymentStatus>,
    /// What the node last saw of each container (restarts, OOM kills) and
    /// how each last ended: `lastState` in status.
    #[serde(default)]
    pub lifecycle: crate::events::Lifecycle,
    /// The signals under pressure after the last pass: evicted replicas
    /// stay down while they are, across a restart of the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pressured: Vec<berth_plan::pressure::Signal>,
    /// Revisions applied here, newest first, whose Deployment pods may
    /// still run: a rollout keeps those pods as these revisions made them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_revisions: Vec<String>,
    /// The last revision whose every rollout completed on this node: where
    /// a failed rollout returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healthy: Option<RevisionRecord>,
    /// The last revision rejected because its rollout failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RollbackRecord>,
}

/// A revision whose rollout failed, and what the node did about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackRecord {
    /// The revision that failed.
    pub revision: String,
    /// Seconds since the epoch.
    pub at: u64,
    /// `Deployment default/web: CrashLoopBackOff: ...`
    pub reason: String,
    /// The revision the node returned to; none when there was no healthy
    /// one (or `rollout.autoRollback` is off) and the failed one stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRecord {
    /// Why the node's pod network is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What Services could not get (a node port, an endpoint port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRecord>,
    /// Pod IPs by `namespace/name` (the lease book is the truth; this is
    /// what status shows).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_ips: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    /// `namespace/name`.
    pub name: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: String,
    /// `80/TCP`, `80:30080/TCP` as kubectl shows them.
    pub ports: Vec<String>,
    /// `ip:port` of each ready endpoint.
    pub endpoints: Vec<String>,
}

impl AgentState {
    /// Probe results, kills and condition times on one pod's status.
    pub fn health_of(&self, p: &mut berth_runtime::status::PodStatus) {
        let key = format!("{}/{}", p.namespace, p.name);
        // Each running container with probes: its results for this very
        // instance, else the initial ones.
        let mut health = BTreeMap::new();
        for c in &p.containers {
            let (berth_runtime::status::ContainerState::Running { started_usec }, Some(kinds)) =
                (&c.state, self.probed.get(&c.unit))
            else {
                continue;
            };
            let h = self
                .health
                .get(&key)
                .and_then(|m| m.get(&c.name))
                .filter(|h| h.since_usec == *started_usec)
                .cloned()
                .unwrap_or_else(|| {
                    berth_plan::health::ContainerHealth::initial(kinds, *started_usec)
                });
            health.insert(c.name.clone(), h);
        }
        if !health.is_empty() {
            berth_runtime::status::apply_health(p, &health);
        }
        for c in &mut p.containers {
            c.last_kill = self.kills.get(&format!("{key}/{}", c.name)).cloned();
        }
        let times = self.transitions.get(&key);
        for c in &mut p.conditions {
            c.last_transition = times
                .and_then(|t| t.get(&c.kind))
                .filter(|(status, _)| *status == c.status)
                .map(|(_, at)| at.clone());
        }
    }

    /// Stamps `now` on each condition whose status changed since the last
    /// time recorded, and keeps the records of these pods only.
    pub fn stamp_transitions(&mut self, pods: &mut [berth_runtime::status::PodStatus], now: u64) {
        let at = rfc3339(now);
        let mut next = BTreeMap::new();
        for p in pods.iter_mut() {
            let key = format!("{}/{}", p.namespace, p.name);
            let mut times = self.transitions.remove(&key).unwrap_or_default();
            for c in &mut p.conditions {
                let same = times.get(&c.kind).is_some_and(|(s, _)| *s == c.status);
                if !same {
                    times.insert(c.kind.clone(), (c.status.clone(), at.clone()));
                }
                c.last_transition = times.get(&c.kind).map(|(_, t)| t.clone());
            }
            times.retain(|kind, _| p.conditions.iter().any(|c| c.kind == *kind));
            next.insert(key, times);
        }
        self.transitions = next;
    }

    /// Every pod's status: those with units as observed, those the last
    /// apply could not start, and those the node could not admit.
    pub fn pod_statuses(
        &self,
        observed: &berth_runtime::Observed,
        cgroup_root: &Path,
    ) -> Vec<berth_runtime::status::PodStatus> {
        let mut pods = berth_runtime::status::pod_statuses(observed, &self.failures, cgroup_root);
        for p in pods.iter_mut() {
            let key = format!("{}/{}", p.namespace, p.name);
            p.pod_ip = self.network.pod_ips.get(&key).cloned();
            self.health_of(p);
        }
        self.lifecycle.annotate(&mut pods);
        for n in &self.not_admitted {
            let (ns, name) = n.pod.split_once('/').unwrap_or(("", &n.pod));
            pods.push(berth_runtime::status::PodStatus::not_admitted(
                ns,
                name,
                n.status(),
                &n.reason,
            ));
        }
        pods
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotAdmittedRecord {
    pub pod: String,
    /// `OutOfcpu`, `OutOfmemory`, `Forbidden`; absent in older state files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    pub reason: String,
}

impl NotAdmittedRecord {
    /// Its status word; an older record is read from its reason.
    pub fn status(&self) -> &str {
        match self.status.as_str() {
            "" if self.reason.contains("CPU") => "OutOfcpu",
            "" => "OutOfmemory",
            s => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    pub revision: String,
    /// Seconds since the epoch.
    pub at: u64,
    #[serde(default)]
    pub objects: usize,
    #[serde(default)]
    pub pods: usize,
    #[serde(default)]
    pub actions: usize,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; a missing or unreadable file (say, from a crash
    /// before the first save) is an empty state, never a failure. A state
    /// of a newer schema reads as empty here too: the agent checks every
    /// file's schema before it starts ([`check_schemas`]) and refuses to
    /// run on one; readers such as `berth get pods` only show less.
    pub fn load(&self) -> AgentState {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| {
                berth_schema::decode(&b, &self.path, STATE_SCHEMA, |_, _| Ok(()))
                    .ok()
                    .map(|(state, _)| state)
            })
            .unwrap_or_default()
    }

    pub fn save(&self, state: &AgentState) -> std::io::Result<()> {
        berth_schema::save(&self.path, state, STATE_SCHEMA)
    }

    /// `observed.json`: what the last pass planned from, for `berth
    /// observe` and `berth plan --actual`.
    pub fn observed_path(&self) -> PathBuf {
        self.path.with_file_name(OBSERVED_FILE)
    }

    /// `plan.json`: the plan the last pass applied.
    pub fn plan_path(&self) -> PathBuf {
        self.path.with_file_name(PLAN_FILE)
    }

    /// Records what a pass planned from and what it applied. Both are for
    /// people and tests; neither is read back by the agent, so they are
    /// written whole but not synced. Neither holds a secret: the plan's
    /// properties are redacted, the snapshot's environment values digested.
    pub fn save_pass(
        &self,
        observed: &berth_plan::ActualState,
        plan: &berth_plan::Plan,
    ) -> std::io::Result<()> {
        // Environment values may come from Secrets: the file holds digests.
        write_file(&self.observed_path(), &observed.without_secrets(), false)?;
        write_file(&self.plan_path(), plan, false)
    }
}

pub const OBSERVED_FILE: &str = "observed.json";
pub const PLAN_FILE: &str = "plan.json";

/// The schema of `state.json` (see [`berth_schema`]).
pub const STATE_SCHEMA: u32 = 1;
/// The schema of `events.json`.
pub const EVENTS_SCHEMA: u32 = 1;

/// Every file under the state directory that carries a schema, with the
/// newest schema this Berth reads: the agent's own, the pod network's
/// leases, the volume book, the image store's references, the update
/// record. The Git mirror is a repository in libgit2's format, and the
/// pass records (`observed.json`, `plan.json`) are rewritten every pass.
pub fn schema_files(state_dir: &Path) -> Vec<(PathBuf, u32)> {
    vec![
        (state_dir.join("state.json"), STATE_SCHEMA),
        (state_dir.join("events.json"), EVENTS_SCHEMA),
        (
            state_dir.join("network/leases.json"),
            berth_net::ipam::LEASES_SCHEMA,
        ),
        (
            state_dir.join("storage/volumes.json"),
            berth_storage::book::BOOK_SCHEMA,
        ),
        (
            state_dir.join("images/refs.json"),
            berth_images::REFS_SCHEMA,
        ),
        (
            state_dir.join(berth_update::record::FILE),
            berth_update::record::SCHEMA,
        ),
    ]
}

/// Refuses, by name, a state directory holding a file of a newer schema
/// than this Berth reads (a rollback onto an older slot after a newer one
/// wrote it): nothing is read or written then, so nothing is lost.
pub fn check_schemas(state_dir: &Path) -> Result<(), berth_schema::SchemaError> {
    for (path, supported) in schema_files(state_dir) {
        berth_schema::check_file(&path, supported)?;
    }
    Ok(())
}

/// Written whole (a reader never sees half a file) but not synced: for
/// records a power cut may lose the last of (events).
pub(crate) fn write_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_bytes(path, bytes, false)
}

fn write_file(path: &Path, value: &impl Serialize, sync: bool) -> std::io::Result<()> {
    write_bytes(
        path,
        &serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?,
        sync,
    )
}

/// Written to a temporary file and renamed over, so a reader never sees
/// half a file; with `sync`, a power cut leaves the old or the new one.
fn write_bytes(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// How many heal records status.yaml keeps.
pub const HEALED_KEPT: usize = 20;

/// Drift the agent put back: what it found, and what Git says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Healed {
    pub at: u64,
    pub object: String,
    pub unit: String,
    pub field: String,
    /// What the node had.
    pub found: String,
    /// What Git says, which the agent put back.
    pub restored: String,
}

/// How publishing goes, for `berth status` and the agent's state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_commit: Option<String>,
    /// Seconds since the epoch of the last push the server took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_push: Option<u64>,
    /// Commits made locally and not yet on the server.
    #[serde(default)]
    pub pending: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed pushes in a row.
    #[serde(default)]
    pub failures: u32,
    /// Pushes tried and failed since the agent started (for metrics).
    #[serde(default, skip_serializing)]
    pub attempts_total: u64,
    #[serde(default, skip_serializing)]
    pub failures_total: u64,
}

/// `2026-11-29T22:10:05Z`, as Kubernetes writes times.
pub fn rfc3339(secs: u64) -> String {
    crate::drift::timestamp(secs)
        .replacen(' ', "T", 1)
        .replace(" UTC", "Z")
}

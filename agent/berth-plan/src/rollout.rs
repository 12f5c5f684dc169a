//! Rollouts: how a Deployment's pods move from one template to the next.
//!
//! A Deployment's replicas are named `<deployment>-<hash>-<index>`, where
//! the hash is a digest of the pod template and of the ConfigMaps and
//! Secrets it reads (see [`template_hash`]): a changed template makes pods
//! under new names, so old and new pods run side by side without sharing a
//! unit, and a pod's name says which template it runs. (Kubernetes names a
//! ReplicaSet by its template's hash the same way; a ConfigMap change rolls
//! here too, where Kubernetes needs a checksum annotation for that.)
//!
//! Each pass, for each Deployment, [`steer`] decides which of the new
//! pods start and which old pods stop, with Kubernetes' arithmetic:
//! `RollingUpdate` never has more than `replicas + maxSurge` pods nor fewer
//! than `replicas - maxUnavailable` available (ready for `minReadySeconds`),
//! stopping pods that are not available first; `Recreate` stops every old
//! pod before a new one starts. Old pods stay desired pods (resolved from
//! the revision that made them), so their network, volumes, probes and
//! endpoints stay as they were until they stop.
//!
//! What a rollout has seen (when each pod became ready, when it last made
//! progress) is a [`RolloutRecord`] the agent keeps and hands back, as it
//! does evictions: the planner stays a function of its inputs.

use std::collections::{BTreeMap, BTreeSet};

use berth_manifest::model::{DeploymentSpec, IntOrPercent, Strategy};
use berth_manifest::{Catalog, LoadedObject, Object};
use serde::{Deserialize, Serialize};

use crate::actual::{ActiveState, ActualState, ActualUnit};
use crate::desired::DesiredPod;

/// Hex digits of the template hash in a pod's name.
pub const HASH_LEN: usize = 8;

/// A new pod whose container restarted this often crash-loops: the
/// revision that made it failed.
pub const CRASH_LOOP_RESTARTS: u32 = 2;

/// The hash in the names of a Deployment's pods: its template, and the
/// content of every ConfigMap and Secret the template reads (a missing one
/// counts as missing). Only Git's content goes in, never a fact of the
/// node, so it changes exactly when a commit changes what the pods run.
pub fn template_hash(spec: &DeploymentSpec, namespace: &str, catalog: &Catalog) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(spec.template_digest.as_bytes());
    for (kind, name) in &spec.template_refs {
        hash.update(format!("\n{kind}/{name}=").as_bytes());
        match catalog
            .config_object(kind, namespace, name)
            .map(|o| &o.object)
        {
            // Debug of sorted maps: one content, one text.
            Some(Object::ConfigMap(c)) => hash.update(format!("{c:?}").as_bytes()),
            Some(Object::Secret(s)) => hash.update(format!("{s:?}").as_bytes()),
            _ => hash.update(b"missing"),
        }
    }
    hash.finalize()
        .iter()
        .take(HASH_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `web-1a2b3c4d-0`
pub fn replica_name(deployment: &str, hash: &str, index: u32) -> String {
    format!("{deployment}-{hash}-{index}")
}

/// A pod of a Deployment, as its name tells: its template hash (none for
/// a pod named `<deployment>-<index>` by Berth before rollouts) and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica<'a> {
    pub hash: Option<&'a str>,
    pub index: u32,
}

pub fn replica_of<'a>(deployment: &str, pod: &'a str) -> Option<Replica<'a>> {
    let rest = pod.strip_prefix(deployment)?.strip_prefix('-')?;
    let (hash, index) = match rest.split_once('-') {
        Some((hash, index)) => (Some(hash), index),
        None => (None, rest),
    };
    if hash.is_some_and(|h| h.len() != HASH_LEN || !h.bytes().all(|b| b.is_ascii_hexdigit())) {
        return None;
    }
    let index = index.parse().ok()?;
    Some(Replica { hash, index })
}

/// Kubernetes' bounds for a rolling update of `replicas`: `maxSurge`
/// rounded up, `maxUnavailable` rounded down, and when both come to zero,
/// one pod may be unavailable (else the rollout could never move).
pub fn fenceposts(surge: IntOrPercent, unavailable: IntOrPercent, replicas: u32) -> (u32, u32) {
    let s = surge.scaled(replicas, true);
    let u = unavailable.scaled(replicas, false);
    if s == 0 && u == 0 { (0, 1) } else { (s, u) }
}

/// One pod of a Deployment as the rollout weighs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Its units exist (it counts toward the total, ready or not).
    pub exists: bool,
    pub ready: bool,
    /// Ready for at least `minReadySeconds`.
    pub available: bool,
}

/// What one pass does to a Deployment's pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// New pods (by index) that start now.
    pub start: Vec<u32>,
    /// Old pods that stop now.
    pub stop: Vec<String>,
}

/// One pass of a rolling update, as Kubernetes' deployment controller
/// takes it: scale the new pods up within `replicas + maxSurge`, then
/// scale the old ones down while `replicas - maxUnavailable` stay
/// available, pods that are not available first, then scale up again into
/// the room the stopped pods leave. `new` holds the
/// `replicas` new pods by index; `old` every other pod of the Deployment,
/// the ones to stop first first.
pub fn rolling_step(
    replicas: u32,
    surge: u32,
    unavailable: u32,
    new: &[PodView],
    old: &[PodView],
) -> Step {
    let mut step = Step::default();
    let new_existing = new.iter().filter(|p| p.exists).count() as u32;
    let old_existing = old.iter().filter(|p| p.exists).count() as u32;
    let total = new_existing + old_existing;
    let max_total = replicas + surge;
    let scale_up = max_total
        .saturating_sub(total)
        .min(replicas.saturating_sub(new_existing));
    step.start = new
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.exists)
        .take(scale_up as usize)
        .map(|(i, _)| i as u32)
        .collect();
    let all = total + scale_up;
    let min_available = replicas.saturating_sub(unavailable);
    let new_available = new.iter().filter(|p| p.exists && p.available).count() as u32;
    let new_unavailable = (new_existing + scale_up).saturating_sub(new_available);
    let mut budget = i64::from(all) - i64::from(min_available) - i64::from(new_unavailable);
    // Old pods that are not available go first: stopping them costs no
    // availability.
    for p in old.iter().filter(|p| p.exists && !p.available) {
        if budget <= 0 {
            break;
        }
        step.stop.push(p.name.clone());
        budget -= 1;
    }
    let old_available = old.iter().filter(|p| p.exists && p.available).count() as u32;
    let available = i64::from(old_available + new_available);
    let mut room = (available - i64::from(min_available)).min(budget);
    for p in old.iter().filter(|p| p.exists && p.available) {
        if room <= 0 {
            break;
        }
        step.stop.push(p.name.clone());
        room -= 1;
    }
    // A pod on its way out no longer counts (Kubernetes does not count
    // terminating pods in a ReplicaSet): the room it leaves is taken at
    // once, as the controller's next sync would, not a pass later. Starting
    // takes no availability away, so the stops above stay within bounds.
    let left = all - step.stop.len() as u32;
    let more = max_total
        .saturating_sub(left)
        .min(replicas.saturating_sub(new_existing + scale_up));
    step.start.extend(
        new.iter()
            .enumerate()
            .filter(|(i, p)| !p.exists && !step.start.contains(&(*i as u32)))
            .take(more as usize)
            .map(|(i, _)| i as u32)
            .collect::<Vec<_>>(),
    );
    step
}

/// What the agent keeps of a Deployment's rollout between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutRecord {
    /// `namespace/name`.
    pub deployment: String,
    /// The template hash it rolls to.
    pub hash: String,
    /// The revision that asked for this template.
    pub revision: String,
    /// Seconds since the epoch: when this template was first wanted.
    pub started_at: u64,
    /// When it last made progress (a pod started, became available or
    /// stopped): the progress deadline counts from here.
    pub progressed_at: u64,
    /// New pods started, new pods available, old pods left: a change is progress.
    pub progress: [u32; 3],
    /// Pods seen ready, since when (seconds since the epoch).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ready_since: BTreeMap<String, u64>,
    /// Every new pod is available and no old one is left.
    #[serde(default)]
    pub complete: bool,
    /// Why the rollout failed, once it has: it moves no further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failure {
    /// `ProgressDeadlineExceeded`, `ImagePullBackOff`, `CrashLoopBackOff`, ...
    pub reason: String,
    pub message: String,
}

/// A Deployment's status on this node, under Kubernetes' names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// `namespace/name`.
    pub deployment: String,
    pub strategy: String,
    pub template_hash: String,
    /// The revision whose template the new pods run.
    pub revision: String,
    /// Desired replicas.
    pub desired: u32,
    /// Pods of the Deployment with units on the node, old and new.
    pub replicas: u32,
    pub updated_replicas: u32,
    pub ready_replicas: u32,
    pub available_replicas: u32,
    pub unavailable_replicas: u32,
    pub conditions: Vec<Condition>,
    /// What this pass does, in order: for `berth plan` and the log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl DeploymentStatus {
    /// Whether the rollout is over: complete, failed, or paused.
    pub fn settled(&self) -> bool {
        self.failed.is_some()
            || self.paused
            || self
                .conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.reason == "NewReplicaSetAvailable")
    }
}

/// What [`steer`] gives the rest of the plan.
#[derive(Debug, Default)]
pub struct Steering {
    /// Old pods that stop now, with why.
    pub retiring: BTreeMap<String, String>,
    /// Of those, the ones whose stop may run beside the new pods' starts:
    /// a rolling update whose template shares nothing exclusive between
    /// old and new pods (see [`stops_beside_starts`]).
    pub beside: BTreeSet<String>,
    /// Old pods kept running whose manifests are not at hand (a replay
    /// without the revision that made them): held as they run.
    pub kept_unresolved: BTreeMap<String, String>,
    /// New pods that wait for the rollout, with why.
    pub waiting: BTreeMap<String, String>,
    pub records: Vec<RolloutRecord>,
    pub statuses: Vec<DeploymentStatus>,
    /// When the planner must look again although nothing else changes:
    /// a pod reaching `minReadySeconds`, a progress deadline.
    pub wake_at: Option<u64>,
}

/// Whether the pod's units say it runs, and whether it is ready: every
/// container active and, where it has probe results, ready.
fn pod_state(
    units: &[&ActualUnit],
    actual: &ActualState,
    pod: &str,
    probed: &BTreeSet<String>,
) -> (bool, bool) {
    let services: Vec<&&ActualUnit> = units.iter().filter(|u| !u.name.is_slice()).collect();
    let exists = !services.is_empty();
    let health = actual.pods.get(pod).map(|f| &f.health);
    let ready = exists
        && services.iter().all(|u| {
            // An init container that finished stays active (RemainAfterExit).
            let container = u.container().unwrap_or_default();
            u.active_state == ActiveState::Active
                && match health.and_then(|h| h.get(container)) {
                    Some(h) => h.ready(),
                    // A container with probes and no result yet is not ready.
                    None => !probed.contains(u.name.as_str()),
                }
        });
    (exists, ready)
}

/// Whether a rolling update's old pods may finish stopping while its new
/// pods start, as Kubernetes lets a terminating pod wind down beside its
/// replacement. Not when old and new pods would share something only one
/// may hold: a claim, the host's network or a host port. Then the stop
/// completes first, as before any other start.
pub fn stops_beside_starts(spec: &DeploymentSpec) -> bool {
    let Some(pod) = &spec.template.spec else {
        return false;
    };
    let claims = pod
        .volumes
        .iter()
        .flatten()
        .any(|v| v.persistent_volume_claim.is_some() || v.ephemeral.is_some());
    let host_ports = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .any(|p| p.host_port.is_some());
    !claims && !host_ports && pod.host_network != Some(true)
}

/// The inputs of [`steer`].
#[derive(Debug)]
pub struct SteerInput<'a> {
    pub catalog: &'a Catalog,
    /// Catalogs of earlier revisions whose pods may still run, newest first.
    pub older: &'a [&'a Catalog],
    pub actual: &'a ActualState,
    pub revision: &'a str,
    /// The Deployments this node runs.
    pub deployments: Vec<&'a LoadedObject>,
}

/// Decides, for each Deployment, which of its pods in `pods` start and
/// which old pods stay (added to `pods`, resolved by `resolve_old` from the
/// revision that made them) or stop.
pub fn steer(
    input: &SteerInput<'_>,
    pods: &mut Vec<DesiredPod>,
    resolve_old: &dyn Fn(&Catalog, &LoadedObject, &str) -> Option<DesiredPod>,
) -> Steering {
    let mut out = Steering::default();
    let now = input.actual.observed_at;
    let mut by_owner: BTreeMap<&str, BTreeMap<String, Vec<&ActualUnit>>> = BTreeMap::new();
    let mut pod_units: BTreeMap<String, Vec<&ActualUnit>> = BTreeMap::new();
    for u in input.actual.units.iter().filter(|u| u.is_berths()) {
        if let Some(p) = u.pod() {
            pod_units.entry(p).or_default().push(u);
        }
    }
    for u in input
        .actual
        .units
        .iter()
        .filter(|u| u.is_berths() && !u.name.is_slice())
    {
        if let (Some(owner), Some(pod)) = (u.owner(), u.pod()) {
            by_owner
                .entry(owner)
                .or_default()
                .entry(pod)
                .or_default()
                .push(u);
        }
    }
    let probed: BTreeSet<String> = pods
        .iter()
        .flat_map(|p| p.units())
        .filter(|u| u.probes.readiness.is_some() || u.probes.startup.is_some())
        .map(|u| u.name.to_string())
        .collect();
    let kept_records: BTreeMap<&str, &RolloutRecord> = input
        .actual
        .rollouts
        .iter()
        .map(|r| (r.deployment.as_str(), r))
        .collect();
    for object in &input.deployments {
        let Object::Deployment(d) = &object.object else {
            continue;
        };
        let Some(spec) = &d.spec else { continue };
        let namespace = object.id.namespace.as_deref().unwrap_or("");
        let name = object.id.name.as_str();
        let key = format!("{namespace}/{name}");
        let owner = format!("Deployment/{namespace}/{name}");
        let hash = template_hash(spec, namespace, input.catalog);
        let replicas = spec.replicas.unwrap_or(1).max(0) as u32;
        let existing = by_owner.remove(owner.as_str()).unwrap_or_default();
        let previous = kept_records.get(key.as_str()).copied();
        let mut record = match previous {
            Some(r) if r.hash == hash => r.clone(),
            _ => RolloutRecord {
                deployment: key.clone(),
                hash: hash.clone(),
                revision: input.revision.to_string(),
                started_at: now,
                progressed_at: now,
                progress: [0; 3],
                ready_since: previous.map(|r| r.ready_since.clone()).unwrap_or_default(),
                complete: false,
                failed: None,
            },
        };
        // Readiness, and for how long.
        let mut view = |pod: &str| -> PodView {
            let units = pod_units.get(&format!("{namespace}/{pod}"));
            let (exists, ready) = match units {
                Some(u) => pod_state(u, input.actual, &format!("{namespace}/{pod}"), &probed),
                None => (false, false),
            };
            let available = if ready {
                let since = *record.ready_since.entry(pod.to_string()).or_insert(now);
                now >= since + u64::from(spec.min_ready_seconds)
            } else {
                record.ready_since.remove(pod);
                false
            };
            PodView {
                name: pod.to_string(),
                exists,
                ready,
                available,
            }
        };
        let new: Vec<PodView> = (0..replicas)
            .map(|i| view(&replica_name(name, &hash, i)))
            .collect();
        let new_names: BTreeSet<&str> = new.iter().map(|p| p.name.as_str()).collect();
        // Old pods: those of other templates (unknown first, as Kubernetes
        // scales down its oldest ReplicaSets first), then this template's
        // beyond `replicas`, highest index first.
        let mut old_names: Vec<(u8, u32, String)> = existing
            .keys()
            .filter_map(|p| p.split_once('/').map(|(_, n)| n))
            .filter(|n| !new_names.contains(n))
            .map(|n| {
                let r = replica_of(name, n);
                let rank = match r.and_then(|r| r.hash) {
                    None => 0,
                    Some(h) if h == hash => 2,
                    Some(_) => 1,
                };
                (rank, r.map_or(0, |r| r.index), n.to_string())
            })
            .collect();
        old_names.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let old: Vec<PodView> = old_names.iter().map(|(_, _, n)| view(n)).collect();
        // Not ready pods lose their readiness clock (done in `view`); pods
        // gone lose it too.
        let known: BTreeSet<&str> = new.iter().chain(&old).map(|p| p.name.as_str()).collect();
        record.ready_since.retain(|p, _| known.contains(p.as_str()));

        // A new pod that crash-loops fails the rollout before it could
        // count as available between two crashes.
        // A rollout that completed stays so: a pod of its template lost
        // later (a reboot, a crash) is started again, not a failed rollout.
        let settled = record.complete;
        if record.failed.is_none() && !settled {
            record.failed = new.iter().filter(|p| p.exists).find_map(|p| {
                let units = pod_units.get(&format!("{namespace}/{}", p.name))?;
                let u = units
                    .iter()
                    .find(|u| !u.name.is_slice() && u.restarts >= CRASH_LOOP_RESTARTS)?;
                Some(Failure {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "pod {namespace}/{}: container {} restarted {} times",
                        p.name,
                        u.container().unwrap_or("?"),
                        u.restarts
                    ),
                })
            });
        }
        let (strategy_name, step, bounds) = if spec.paused {
            ("paused", Step::default(), String::new())
        } else if record.failed.is_some() {
            // A failed rollout moves no further: the node rolls back (a
            // new revision) or a fix arrives (a new template).
            ("failed", Step::default(), String::new())
        } else {
            match spec.strategy {
                Strategy::Recreate => {
                    let running: Vec<String> = old
                        .iter()
                        .filter(|p| p.exists)
                        .map(|p| p.name.clone())
                        .collect();
                    let step = if running.is_empty() {
                        Step {
                            start: (0..replicas).filter(|i| !new[*i as usize].exists).collect(),
                            stop: Vec::new(),
                        }
                    } else {
                        Step {
                            start: Vec::new(),
                            stop: running,
                        }
                    };
                    ("Recreate", step, String::new())
                }
                Strategy::RollingUpdate {
                    max_surge,
                    max_unavailable,
                } => {
                    let (s, u) = fenceposts(max_surge, max_unavailable, replicas);
                    let step = if old.iter().all(|p| !p.exists) {
                        // Nothing to replace: every missing pod starts.
                        Step {
                            start: (0..replicas).filter(|i| !new[*i as usize].exists).collect(),
                            stop: Vec::new(),
                        }
                    } else {
                        rolling_step(replicas, s, u, &new, &old)
                    };
                    (
                        "RollingUpdate",
                        step,
                        format!(
                            "at most {} pods (maxSurge {max_surge} = {s}), at least {} available (maxUnavailable {max_unavailable} = {u})",
                            replicas + s,
                            replicas.saturating_sub(u)
                        ),
                    )
                }
            }
        };
        let mut steps = Vec::new();
        let starting: BTreeSet<u32> = step.start.iter().copied().collect();
        let new_available = new.iter().filter(|p| p.available).count() as u32;
        let stopping: BTreeSet<&str> = step.stop.iter().map(String::as_str).collect();
        for (i, p) in new.iter().enumerate() {
            if p.exists {
                if !p.available {
                    steps.push(format!(
                        "wait for {namespace}/{} to be {}",
                        p.name,
                        if p.ready {
                            format!("ready for {} s (minReadySeconds)", spec.min_ready_seconds)
                        } else {
                            "ready".to_string()
                        }
                    ));
                }
                continue;
            }
            let pod_key = format!("{namespace}/{}", p.name);
            if starting.contains(&(i as u32)) {
                steps.push(format!("start {pod_key}"));
            } else {
                let why = if spec.paused {
                    format!("Deployment {key} is paused")
                } else if let Some(f) = &record.failed {
                    format!("the rollout of {key} failed: {}", f.message)
                } else if strategy_name == "Recreate" {
                    "waits for every old pod to stop (strategy Recreate)".to_string()
                } else {
                    format!("waits for the rollout: {bounds}")
                };
                out.waiting.insert(pod_key, why);
            }
        }
        for p in &old {
            let pod_key = format!("{namespace}/{}", p.name);
            if !p.exists {
                continue;
            }
            if stopping.contains(p.name.as_str()) {
                let why = match (strategy_name, p.available) {
                    ("Recreate", _) => format!(
                        "Deployment {key} is recreated with template {hash}: every old pod stops first"
                    ),
                    (_, false) => format!(
                        "Deployment {key} rolls to template {hash}: an old pod that is not available stops first"
                    ),
                    (_, true) => format!(
                        "Deployment {key} rolls to template {hash}: {new_available} of {replicas} new pods available; {bounds}"
                    ),
                };
                steps.push(format!("stop {pod_key}"));
                if strategy_name != "Recreate" && stops_beside_starts(spec) {
                    out.beside.insert(pod_key.clone());
                }
                out.retiring.insert(pod_key, why);
                continue;
            }
            // Kept: as the revision that made it has it.
            let hash_of = replica_of(name, &p.name).and_then(|r| r.hash);
            // A pod named before rollouts came from the newest older
            // revision; one with a hash from whichever has its template.
            let current = hash_of.map(|_| &input.catalog);
            let found = input.older.iter().chain(current).find_map(|c| {
                let o = c.objects.iter().find(|o| o.id == object.id)?;
                let Object::Deployment(od) = &o.object else {
                    return None;
                };
                let os = od.spec.as_ref()?;
                let matches = match hash_of {
                    Some(h) => template_hash(os, namespace, c) == h,
                    // Named before rollouts: the newest older revision made it.
                    None => true,
                };
                if matches {
                    resolve_old(c, o, &p.name)
                } else {
                    None
                }
            });
            match found {
                Some(pod) => pods.push(pod),
                None => {
                    out.kept_unresolved.insert(
                        pod_key,
                        format!(
                            "old pod of Deployment {key} kept as it runs until the rollout replaces it (the revision that made it is not at hand)"
                        ),
                    );
                }
            }
        }
        // The new pods that do not start yet leave the desired node.
        pods.retain(|p| !out.waiting.contains_key(&p.id.to_string()));

        // Counts after this pass's step, as the status shows them.
        let updated = new.iter().filter(|p| p.exists).count() as u32 + step.start.len() as u32;
        let old_left = old.iter().filter(|p| p.exists).count() as u32 - step.stop.len() as u32;
        let progress = [updated, new_available, old_left];
        if progress != record.progress {
            record.progress = progress;
            record.progressed_at = now;
        }
        let ready = new
            .iter()
            .chain(&old)
            .filter(|p| p.ready && !stopping.contains(p.name.as_str()))
            .count() as u32;
        let available = new
            .iter()
            .chain(&old)
            .filter(|p| p.available && !stopping.contains(p.name.as_str()))
            .count() as u32;
        let total = updated + old_left;
        let complete = settled || new_available == replicas && old_left == 0;
        let deadline = u64::from(spec.progress_deadline_seconds);
        if !complete
            && !spec.paused
            && record.failed.is_none()
            && now > record.progressed_at + deadline
        {
            record.failed = Some(Failure {
                reason: "ProgressDeadlineExceeded".into(),
                message: format!(
                    "Deployment {key} made no progress for {deadline} s (progressDeadlineSeconds): {new_available} of {replicas} new pods available"
                ),
            });
        }
        record.complete = complete;
        // Look again when a pod reaches minReadySeconds, or the deadline.
        let mut wake = Vec::new();
        for p in new.iter().chain(&old).filter(|p| p.ready && !p.available) {
            if let Some(since) = record.ready_since.get(&p.name) {
                wake.push(since + u64::from(spec.min_ready_seconds));
            }
        }
        if !complete && record.failed.is_none() && !spec.paused {
            wake.push(record.progressed_at + deadline + 1);
        }
        if let Some(w) = wake.into_iter().min() {
            out.wake_at = Some(out.wake_at.map_or(w, |x| x.min(w)));
        }
        let min_available = match spec.strategy {
            Strategy::RollingUpdate {
                max_surge,
                max_unavailable,
            } => replicas.saturating_sub(fenceposts(max_surge, max_unavailable, replicas).1),
            Strategy::Recreate => replicas,
        };
        let progressing = if spec.paused {
            cond(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                format!("Deployment {key} is paused"),
            )
        } else if let Some(f) = &record.failed {
            cond("Progressing", "False", &f.reason, f.message.clone())
        } else if complete {
            cond(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("pods of template {hash} are available"),
            )
        } else {
            cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!(
                    "rolling to template {hash}: {new_available} of {replicas} new pods available, {old_left} old left"
                ),
            )
        };
        let available_cond = if available >= min_available {
            cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                format!("{available} of {replicas} pods available"),
            )
        } else {
            cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                format!(
                    "{available} of {replicas} pods available; at least {min_available} wanted"
                ),
            )
        };
        out.statuses.push(DeploymentStatus {
            deployment: key,
            strategy: match spec.strategy {
                Strategy::Recreate => "Recreate".into(),
                Strategy::RollingUpdate { .. } => "RollingUpdate".into(),
            },
            template_hash: hash,
            revision: record.revision.clone(),
            desired: replicas,
            replicas: total,
            updated_replicas: updated,
            ready_replicas: ready,
            available_replicas: available,
            unavailable_replicas: replicas.saturating_sub(available),
            conditions: vec![progressing, available_cond],
            steps,
            failed: record.failed.clone(),
            paused: spec.paused,
        });
        out.records.push(record);
    }
    out
}

fn cond(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
    }
}

/// After the gates: a new pod that cannot pull or cannot mount fails its
/// Deployment's rollout at once (a crash loop is caught before the step,
/// in [`steer`]; the deadline is for pods that merely never become ready).
pub fn judge(
    statuses: &mut [DeploymentStatus],
    records: &mut [RolloutRecord],
    held: &[crate::plan::Held],
) {
    use crate::reason::{FailureReason as F, HoldReason};
    for (status, record) in statuses.iter_mut().zip(records.iter_mut()) {
        if record.failed.is_some() || record.complete {
            continue;
        }
        let (namespace, name) = record.deployment.split_once('/').unwrap_or(("", ""));
        let is_new = |pod: &str| {
            pod.split_once('/').is_some_and(|(ns, n)| {
                ns == namespace
                    && replica_of(name, n).is_some_and(|r| r.hash == Some(record.hash.as_str()))
            })
        };
        let failure = held.iter().find_map(|h| {
            let pod = h.pod.as_ref()?.to_string();
            let HoldReason::Waiting(reason) = h.reason else {
                return None;
            };
            let fatal = matches!(
                reason,
                F::ErrImagePull
                    | F::ImagePullBackOff
                    | F::ErrImageNeverPull
                    | F::InvalidImageName
                    | F::FailedMount
                    | F::CreateContainerError
                    | F::CreateContainerConfigError
            );
            (fatal && is_new(&pod)).then(|| Failure {
                reason: reason.as_str().to_string(),
                message: format!("pod {pod}: {}", h.message),
            })
        });
        if let Some(f) = failure {
            status.conditions.retain(|c| c.type_ != "Progressing");
            status.conditions.insert(
                0,
                cond("Progressing", "False", &f.reason, f.message.clone()),
            );
            status.failed = Some(f.clone());
            record.failed = Some(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(prefix: &str, states: &str) -> Vec<PodView> {
        // '-' missing, 'r' exists not ready, 'R' ready (not yet available), 'A' available
        states
            .chars()
            .enumerate()
            .map(|(i, c)| PodView {
                name: format!("{prefix}{i}"),
                exists: c != '-',
                ready: matches!(c, 'R' | 'A'),
                available: c == 'A',
            })
            .collect()
    }

    #[test]
    fn fenceposts_round_as_kubernetes_does() {
        use IntOrPercent::{Int, Percent};
        // (surge, unavailable, replicas) → (surge, unavailable)
        let table = [
            (Percent(25), Percent(25), 3, (1, 0)),
            (Percent(25), Percent(25), 4, (1, 1)),
            (Percent(25), Percent(25), 10, (3, 2)),
            (Percent(25), Percent(25), 1, (1, 0)),
            (Int(1), Int(0), 3, (1, 0)),
            (Int(0), Int(1), 3, (0, 1)),
            (Percent(10), Percent(10), 5, (1, 0)),
            // Both round to zero: one pod may be unavailable.
            (Percent(0), Percent(10), 5, (0, 1)),
            (Percent(1), Percent(1), 0, (0, 1)),
            (Percent(50), Percent(50), 3, (2, 1)),
            (Percent(100), Percent(100), 3, (3, 3)),
            (Int(2), Percent(34), 3, (2, 1)),
        ];
        for (s, u, n, want) in table {
            assert_eq!(fenceposts(s, u, n), want, "{s} {u} {n}");
        }
    }

    #[test]
    fn rolling_steps_follow_the_deployment_controllers_arithmetic() {
        // (replicas, surge, unavailable, new, old) → (start, stop)
        type Row = (
            u32,
            u32,
            u32,
            &'static str,
            &'static str,
            &'static [u32],
            &'static [&'static str],
        );
        let table: &[Row] = &[
            // maxSurge 1, maxUnavailable 0: one new pod, then one old stops
            // only when it is available.
            (3, 1, 0, "---", "AAA", &[0], &[]),
            (3, 1, 0, "r--", "AAA", &[], &[]),
            (3, 1, 0, "R--", "AAA", &[], &[]),
            // The next new pod starts in the pass its room opens.
            (3, 1, 0, "A--", "AAA", &[1], &["o0"]),
            (3, 1, 0, "A--", "AA-", &[1], &[]),
            (3, 1, 0, "AA-", "AA-", &[2], &["o0"]),
            (3, 1, 0, "AAA", "A--", &[], &["o0"]),
            // maxSurge 0, maxUnavailable 1: stop first, the start beside it.
            (3, 0, 1, "---", "AAA", &[0], &["o0"]),
            (3, 0, 1, "---", "-AA", &[0], &[]),
            (3, 0, 1, "r--", "-AA", &[], &[]),
            (3, 0, 1, "A--", "-AA", &[1], &["o1"]),
            // Defaults for 4 replicas (1 surge, 1 unavailable): two start
            // (one surging, one into the stopped pod's room), one stops.
            (4, 1, 1, "----", "AAAA", &[0, 1], &["o0"]),
            // Old pods that are not available go first, without touching
            // availability.
            (3, 1, 0, "A--", "rAA", &[1], &["o0"]),
            (3, 1, 0, "r--", "rAA", &[], &[]),
            (3, 1, 1, "---", "rAA", &[0, 1], &["o0"]),
            // New pods not available hold the old ones.
            (3, 3, 0, "---", "AAA", &[0, 1, 2], &[]),
            (3, 3, 0, "rrr", "AAA", &[], &[]),
            (3, 3, 0, "AAr", "AAA", &[], &["o0", "o1"]),
            // More old pods than replicas (a scale-down with the change).
            (2, 1, 0, "--", "AAAA", &[0], &["o0", "o1"]),
            (2, 1, 0, "--", "AAA", &[0], &["o0"]),
            (2, 1, 0, "--", "AA", &[0], &[]),
        ];
        for (n, s, u, new, old, start, stop) in table {
            let step = rolling_step(*n, *s, *u, &pods("n", new), &pods("o", old));
            assert_eq!(
                (
                    step.start.as_slice(),
                    step.stop.iter().map(String::as_str).collect::<Vec<_>>()
                ),
                (*start, stop.to_vec()),
                "replicas {n} surge {s} unavailable {u} new {new} old {old}"
            );
        }
    }

    #[test]
    fn rolling_never_breaks_its_bounds() {
        // Every mix of states for 3 replicas and up to 3 old pods.
        let states = ['-', 'r', 'R', 'A'];
        for (s, u) in [(1, 0), (0, 1), (1, 1), (2, 0), (3, 3)] {
            for code in 0..(4u32.pow(6)) {
                let mut c = code;
                let mut text = String::new();
                for _ in 0..6 {
                    text.push(states[(c % 4) as usize]);
                    c /= 4;
                }
                let (new, old) = (pods("n", &text[..3]), pods("o", &text[3..]));
                let step = rolling_step(3, s, u, &new, &old);
                let before = new.iter().chain(&old).filter(|p| p.exists).count() as u32;
                let after = before + step.start.len() as u32 - step.stop.len() as u32;
                // Never above the surge bound by starting (pods on their
                // way out do not count, as in Kubernetes).
                if !step.start.is_empty() {
                    assert!(
                        before + step.start.len() as u32 - step.stop.len() as u32 <= 3 + s,
                        "{text} {s} {u}"
                    );
                }
                // No new pod started twice.
                let mut starts = step.start.clone();
                starts.dedup();
                assert_eq!(starts.len(), step.start.len(), "{text} {s} {u}");
                assert!(
                    step.start.iter().all(|i| !new[*i as usize].exists),
                    "{text}"
                );
                let available_before =
                    new.iter().chain(&old).filter(|p| p.available).count() as i64;
                let stopped_available = old
                    .iter()
                    .filter(|p| p.available && step.stop.contains(&p.name))
                    .count() as i64;
                if stopped_available > 0 {
                    assert!(
                        available_before - stopped_available >= 3 - i64::from(u),
                        "{text} {s} {u}: availability below the bound"
                    );
                }
                assert!(after <= before.max(3 + s), "{text}");
                // Something always moves unless the new pods are waited on.
                let new_pending = new.iter().any(|p| p.exists && !p.available);
                let done = new.iter().all(|p| p.available) && old.iter().all(|p| !p.exists);
                if !done && !new_pending && old.iter().all(|p| !p.exists || p.available) {
                    assert!(
                        !step.start.is_empty()
                            || !step.stop.is_empty()
                            || new.iter().all(|p| p.exists),
                        "{text} {s} {u}: stuck"
                    );
                }
            }
        }
    }

    #[test]
    fn replica_names_parse_back() {
        assert_eq!(
            replica_of("web", "web-0a1b2c3d-2"),
            Some(Replica {
                hash: Some("0a1b2c3d"),
                index: 2
            })
        );
        assert_eq!(
            replica_of("web", "web-2"),
            Some(Replica {
                hash: None,
                index: 2
            })
        );
        assert_eq!(replica_of("web", "webx-2"), None);
        assert_eq!(replica_of("web", "web-zz-2"), None);
        assert_eq!(replica_of("web-a", "web-0a1b2c3d-2"), None);
        assert_eq!(replica_name("web", "0a1b2c3d", 2), "web-0a1b2c3d-2");
    }
}

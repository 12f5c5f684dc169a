//! Local ephemeral storage, checked as the kubelet's eviction manager checks
//! it: a disk `emptyDir` over its `sizeLimit`, a pod over the sum of its
//! containers' `limits.ephemeral-storage` (its emptyDirs and every
//! container's writable layer counted), or a container's writable layer
//! over its own limit gets the pod evicted. An evicted pod does not run
//! again on this node until Git changes it; a Deployment's replica is
//! started again, fresh, after [`REPLICA_RESTART_SECS`], as a ReplicaSet
//! would make a new pod.
//!
//! The agent measures what each limited pod holds ([`StorageUsage`], a fact
//! of the snapshot) and keeps the evictions in force ([`Eviction`], read
//! back by the planner), so the decision itself is made here, and a replay
//! of the snapshot decides alike.

use std::collections::BTreeMap;

use berth_manifest::quantity::format_bytes;
use serde::{Deserialize, Serialize};

use crate::desired::DesiredPod;
use crate::volumes::VolumeSource;

/// How long an evicted replica of a Deployment stays down before a fresh
/// one starts (the kubelet's longest restart back-off): a workload that
/// fills its limit again does not churn the disk.
pub const REPLICA_RESTART_SECS: u64 = 300;

/// A pod's local storage limits, from its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EphemeralLimits {
    /// Disk `emptyDir`s with a `sizeLimit`, by volume name.
    pub empty_dirs: Vec<(String, u64)>,
    /// App containers with `limits.ephemeral-storage`, by container name.
    pub containers: Vec<(String, u64)>,
    /// The pod's: the app containers' limits summed, or the largest init
    /// container's when that is larger; absent when no container has one.
    pub pod: Option<u64>,
}

impl EphemeralLimits {
    /// The limits of a pod: `app` and `init` are its containers' names and
    /// `limits.ephemeral-storage`.
    pub fn of(
        app: &[(String, Option<u64>)],
        init: &[(String, Option<u64>)],
        volumes: &[crate::volumes::PodVolume],
    ) -> Self {
        let containers: Vec<(String, u64)> = app
            .iter()
            .filter_map(|(name, limit)| limit.filter(|l| *l > 0).map(|l| (name.clone(), l)))
            .collect();
        let sum = containers
            .iter()
            .map(|(_, l)| *l)
            .fold(0u64, u64::saturating_add);
        let init_max = init.iter().filter_map(|(_, l)| *l).max().unwrap_or(0);
        let pod = (!containers.is_empty() || init_max > 0).then_some(sum.max(init_max));
        let empty_dirs = volumes
            .iter()
            .filter_map(|v| match v.source {
                VolumeSource::EmptyDir {
                    memory: false,
                    size_bytes: Some(limit),
                } if limit > 0 => Some((v.name.clone(), limit)),
                _ => None,
            })
            .collect();
        Self {
            empty_dirs,
            containers,
            pod,
        }
    }

    /// Whether the node must measure this pod at all.
    pub fn any(&self) -> bool {
        !self.empty_dirs.is_empty() || !self.containers.is_empty() || self.pod.is_some()
    }
}

/// What a pod's local storage holds, in bytes of disk, as the agent
/// measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageUsage {
    /// Disk `emptyDir`s, by volume name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, u64>,
    /// Writable layers, by container name (init containers included).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub containers: BTreeMap<String, u64>,
}

/// A pod the node evicted: recorded by the agent, in force until Git
/// changes the pod (or, for a Deployment's replica, until its restart time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Eviction {
    /// `namespace/name`.
    pub pod: String,
    /// Seconds since the epoch.
    pub at: u64,
    pub message: String,
    /// The pod as desired when it was evicted (see [`pod_digest`]).
    pub digest: String,
    /// A Deployment's replica: started again after [`REPLICA_RESTART_SECS`],
    /// or, evicted for node pressure, once the pressure is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replica: bool,
    /// The signal a node-pressure eviction relieved (absent for a pod over
    /// its own storage limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<crate::pressure::Signal>,
}

impl Eviction {
    /// Whether the eviction still keeps `pod` (desired as `digest`) down at
    /// `now`; `pressured` says whether a signal is still under pressure.
    pub fn holds(
        &self,
        digest: &str,
        now: u64,
        pressured: &dyn Fn(crate::pressure::Signal) -> bool,
    ) -> bool {
        if self.digest != digest {
            return false;
        }
        match (self.replica, self.pressure) {
            (false, _) => true,
            (true, Some(signal)) => pressured(signal),
            (true, None) => now < self.at + REPLICA_RESTART_SECS,
        }
    }
}

/// A digest of everything the node runs for a pod: its slice and units.
pub fn pod_digest(pod: &DesiredPod) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(crate::drift::digest(&pod.slice.properties));
    for unit in pod.units() {
        hash.update(crate::drift::digest(unit.properties_for_apply()));
    }
    hash.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why `usage` gets the pod evicted, in the kubelet's order of checks
/// (emptyDirs, the pod, each container), or `None`.
pub fn exceeded(limits: &EphemeralLimits, usage: &StorageUsage) -> Option<String> {
    for (volume, limit) in &limits.empty_dirs {
        if let Some(used) = usage.volumes.get(volume).filter(|u| *u > limit) {
            return Some(format!(
                "Usage of EmptyDir volume {volume:?} exceeds the limit {:?} ({} used).",
                format_bytes(*limit),
                used_bytes(*used)
            ));
        }
    }
    if let Some(limit) = limits.pod {
        let total = usage
            .volumes
            .values()
            .chain(usage.containers.values())
            .fold(0u64, |a, b| a.saturating_add(*b));
        if total > limit {
            return Some(format!(
                "Pod ephemeral local storage usage exceeds the total limit of containers {} ({} used).",
                format_bytes(limit),
                used_bytes(total)
            ));
        }
    }
    for (container, limit) in &limits.containers {
        if let Some(used) = usage.containers.get(container).filter(|u| *u > limit) {
            return Some(format!(
                "Container {container} exceeded its local ephemeral storage limit {:?} ({} used).",
                format_bytes(*limit),
                used_bytes(*used)
            ));
        }
    }
    None
}

fn used_bytes(bytes: u64) -> String {
    format!("{:.1}Mi", bytes as f64 / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volumes::PodVolume;

    fn disk(name: &str, limit: Option<u64>, memory: bool) -> PodVolume {
        PodVolume {
            name: name.into(),
            source: VolumeSource::EmptyDir {
                memory,
                size_bytes: limit,
            },
            host_path: format!("/v/{name}"),
        }
    }

    fn named(list: &[(&str, Option<u64>)]) -> Vec<(String, Option<u64>)> {
        list.iter().map(|(n, l)| ((*n).to_string(), *l)).collect()
    }

    #[test]
    fn limits_follow_the_kubelet_sum_and_init_maximum() {
        let l = EphemeralLimits::of(
            &named(&[("a", Some(10)), ("b", None), ("c", Some(5))]),
            &named(&[("i", Some(12))]),
            &[
                disk("d", Some(7), false),
                disk("m", Some(9), true),
                disk("u", None, false),
            ],
        );
        assert_eq!(l.pod, Some(15));
        assert_eq!(l.containers, [("a".to_string(), 10), ("c".to_string(), 5)]);
        // A memory emptyDir is a tmpfs of its size: nothing to measure.
        assert_eq!(l.empty_dirs, [("d".to_string(), 7)]);
        let bigger_init =
            EphemeralLimits::of(&named(&[("a", Some(10))]), &named(&[("i", Some(30))]), &[]);
        assert_eq!(bigger_init.pod, Some(30));
        let none = EphemeralLimits::of(&named(&[("a", None)]), &[], &[disk("u", None, false)]);
        assert!(!none.any());
        assert_eq!(none.pod, None);
    }

    #[test]
    fn each_check_evicts_with_the_kubelet_words_and_in_its_order() {
        let limits = EphemeralLimits {
            empty_dirs: vec![("scratch".into(), 100)],
            containers: vec![("app".into(), 50)],
            pod: Some(200),
        };
        let usage = |v: u64, app: u64, init: u64| StorageUsage {
            volumes: [("scratch".to_string(), v)].into(),
            containers: [("app".to_string(), app), ("init".to_string(), init)].into(),
        };
        assert_eq!(
            exceeded(&limits, &usage(100, 50, 50)),
            None,
            "at the limits"
        );
        let m = exceeded(&limits, &usage(101, 0, 0)).expect("emptyDir");
        assert!(
            m.starts_with("Usage of EmptyDir volume \"scratch\" exceeds the limit \"100\""),
            "{m}"
        );
        // The init container's layer counts towards the pod.
        let m = exceeded(&limits, &usage(90, 40, 71)).expect("pod");
        assert!(
            m.starts_with(
                "Pod ephemeral local storage usage exceeds the total limit of containers 200"
            ),
            "{m}"
        );
        let m = exceeded(&limits, &usage(0, 51, 0)).expect("container");
        assert!(
            m.starts_with("Container app exceeded its local ephemeral storage limit \"50\""),
            "{m}"
        );
        // Everything over at once: the emptyDir is named, as the kubelet does.
        assert!(exceeded(&limits, &usage(500, 500, 500)).is_some_and(|m| m.contains("EmptyDir")));
    }

    #[test]
    fn an_eviction_holds_until_git_changes_the_pod_or_a_replica_is_due() {
        let e = Eviction {
            pod: "default/p".into(),
            at: 1000,
            message: "m".into(),
            digest: "d1".into(),
            replica: false,
            pressure: None,
        };
        assert!(e.holds("d1", 1_000_000, &|_| false));
        assert!(!e.holds("d2", 1001, &|_| false));
        let r = Eviction {
            replica: true,
            ..e.clone()
        };
        assert!(r.holds("d1", 1000 + REPLICA_RESTART_SECS - 1, &|_| false));
        assert!(!r.holds("d1", 1000 + REPLICA_RESTART_SECS, &|_| false));
        // A replica evicted for memory stays down while the memory is short,
        // whatever the time; a bare pod until Git changes it.
        let m = Eviction {
            pressure: Some(crate::pressure::Signal::MemoryAvailable),
            ..r.clone()
        };
        assert!(m.holds("d1", 1_000_000, &|_| true));
        assert!(!m.holds("d1", 1001, &|_| false));
        let bare = Eviction {
            replica: false,
            ..m.clone()
        };
        assert!(bare.holds("d1", 1_000_000, &|_| false));
    }
}

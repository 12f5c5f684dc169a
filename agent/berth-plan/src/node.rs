//! The node a plan is for: its name, labels and capacity, and its
//! settings (where volumes live, the drift policy, the node port range).
//! A leaf: every stage reads it, it reads nothing of theirs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the planner knows about the node: its config and capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInfo {
    pub name: String,
    /// Including the well-known labels every Kubernetes node carries.
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: u64,
    pub cpu_milli: u64,
    /// `TasksMax=` of each pod slice, like the kubelet's `podPidsLimit`.
    pub pod_pids_limit: u64,
    /// Only these namespaces run here; empty means all.
    pub namespaces: Vec<String>,
    /// Where container roots are mounted (`<dir>/<ns>_<pod>_<container>/rootfs`).
    pub containers_dir: String,
    /// The node's systemd major version: properties newer than it are left out.
    pub systemd_version: u32,
    /// Where pods' network namespaces are bound (`/run/netns`); `None` runs
    /// every pod in the node's namespace (a node without pod networking).
    pub netns_dir: Option<String>,
    /// Where pod volumes live, and which host paths pods may bind.
    pub volumes: VolumeDirs,
    /// The Pod Security Standard pods are held to (`security.podSecurity`);
    /// a namespace may ask for a stricter one.
    #[serde(default)]
    pub pod_security: crate::podsecurity::Level,
    /// What drift is healed, what reported, what ignored.
    #[serde(default)]
    pub drift: DriftSettings,
    /// Node ports a Service may name (`network.nodePortRange`).
    #[serde(default)]
    pub node_ports: NodePortRange,
}

pub const DEFAULT_POD_PIDS_LIMIT: u64 = 4096;
/// Berth's appliance: `/var/lib/berth/containers`, systemd 257 (Debian 13).
pub const DEFAULT_CONTAINERS_DIR: &str = "/var/lib/berth/containers";
pub const DEFAULT_SYSTEMD_VERSION: u32 = 257;
/// Where `ip netns` looks too, so `ip netns exec <ns>_<pod>` works on a node.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

impl NodeInfo {
    pub fn new(
        name: &str,
        extra_labels: BTreeMap<String, String>,
        memory_bytes: u64,
        cpu_milli: u64,
    ) -> Self {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), name.to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ]);
        labels.extend(extra_labels);
        Self {
            name: name.to_string(),
            labels,
            memory_bytes,
            cpu_milli,
            pod_pids_limit: DEFAULT_POD_PIDS_LIMIT,
            namespaces: Vec::new(),
            containers_dir: DEFAULT_CONTAINERS_DIR.to_string(),
            systemd_version: DEFAULT_SYSTEMD_VERSION,
            netns_dir: Some(DEFAULT_NETNS_DIR.to_string()),
            volumes: VolumeDirs::default(),
            pod_security: crate::podsecurity::Level::default(),
            drift: DriftSettings::default(),
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

/// Where volumes of every pod live on the node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeDirs {
    /// Disk-backed `emptyDir`s: `<dir>/<ns>_<pod>/<volume>`.
    pub disk_dir: String,
    /// tmpfs-backed volumes (memory `emptyDir`, ConfigMaps, Secrets).
    pub run_dir: String,
    /// Staged `subPath` binds: `<dir>/<ns>_<pod>/<container>/<n>`.
    pub sub_path_dir: String,
    /// Claims' mount points: `<dir>/<ns>_<claim>`.
    pub claims_dir: String,
    /// `hostPath` volumes must lie under one of these.
    pub host_path_prefixes: Vec<String>,
}

/// The uid `/var`'s root reserve belongs to (ext4's `resuid`, set when
/// the image is built): besides the agent, which holds CAP_SYS_RESOURCE,
/// only this uid may write into the reserve, and no container runs as it.
pub const VAR_RESERVE_UID: i64 = 65533;

pub const DEFAULT_DISK_DIR: &str = "/var/lib/berth/volumes";
pub const DEFAULT_RUN_DIR: &str = "/run/berth/volumes";
pub const DEFAULT_SUB_PATH_DIR: &str = "/run/berth/subpaths";
pub const DEFAULT_CLAIMS_DIR: &str = "/var/lib/berth/storage/claims";

impl Default for VolumeDirs {
    fn default() -> Self {
        Self {
            disk_dir: DEFAULT_DISK_DIR.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            sub_path_dir: DEFAULT_SUB_PATH_DIR.into(),
            claims_dir: DEFAULT_CLAIMS_DIR.into(),
            host_path_prefixes: Vec::new(),
        }
    }
}

/// What the agent does about drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Put it back, and record that it happened.
    Heal,
    /// Leave it as found and report it.
    Report,
}

impl DriftPolicy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "heal" => Some(DriftPolicy::Heal),
            "report" => Some(DriftPolicy::Report),
            _ => None,
        }
    }
}

/// The node's drift settings (from its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DriftSettings {
    pub policy: DriftPolicy,
    /// A container restarted more often than this is reported.
    pub restart_threshold: u32,
    /// Fields never reported or healed on any object.
    pub ignore: BTreeSet<String>,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            policy: DriftPolicy::Heal,
            restart_threshold: 5,
            ignore: BTreeSet::new(),
        }
    }
}

/// The node port range Kubernetes uses by default (`--service-node-port-range`).
pub const DEFAULT_NODE_PORTS: NodePortRange = NodePortRange {
    first: 30000,
    last: 32767,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl NodePortRange {
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Default for NodePortRange {
    fn default() -> Self {
        DEFAULT_NODE_PORTS
    }
}

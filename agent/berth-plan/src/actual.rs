//! What the node knows before it decides, as `observe` reports it: the
//! units that run and their properties, and every fact the planner weighs
//! besides them (which images are here or coming, how each pod's network
//! and volumes stand, which unit was last applied as which digest). The
//! agent writes it to `observed.yaml` in its state directory each pass
//! (`berth observe` prints it), and `berth plan --actual` replays it: the
//! same snapshot gives the same plan the node applied.
//!
//! A fact left out is taken as satisfied: a plan from YAML alone (no
//! snapshot) shows the node's steady state, every image present and every
//! pod wired.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::units::{
    ExecCommand, MARKER_FIELD, OWNER_FIELD, POD_FIELD, Properties, PropertyValue, UnitName,
};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActualState {
    /// The node as its agent planned for it (its config and capacity); a
    /// replay uses it unless the command line says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<crate::node::NodeInfo>,
    /// Seconds since the epoch when this was observed: the planner's only clock.
    #[serde(default)]
    pub observed_at: u64,
    #[serde(default)]
    pub units: Vec<ActualUnit>,
    /// Per unit, the digest of the desired properties Berth last applied to
    /// it in this boot: a unit that departs from the very properties
    /// applied has drifted; one whose desired properties changed has not.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<String, String>,
    /// Images by the name a container gives (`busybox:1.37`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, ImageFact>,
    /// The configs of the images in the node's store (entrypoint, command,
    /// environment, user), which the planner merges into containers; a
    /// replay uses them unless `--images` is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_configs: Vec<crate::images::ImageConfig>,
    /// Per pod (`namespace/name`): what the node prepared for it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pods: BTreeMap<String, PodFacts>,
    /// The units' `Environment` values are digests (see
    /// [`ActualState::without_secrets`]): the planner compares the desired
    /// values by the same digest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub environment_digests: bool,
    /// Pods the node evicted, as the agent keeps them: each stays down
    /// while its eviction holds (see [`crate::ephemeral::Eviction::holds`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evictions: Vec<crate::ephemeral::Eviction>,
    /// The rollouts the agent keeps (see [`crate::rollout::RolloutRecord`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<crate::rollout::RolloutRecord>,
    /// The node's pressure signals and eviction thresholds, when the agent
    /// measured them (see [`crate::pressure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<crate::pressure::NodePressure>,
    /// The booted OS and the last update, for the OS update decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<crate::osupdate::OsFacts>,
}

impl ActualState {
    /// The snapshot as it may leave the node: every `Environment` value and
    /// every `ExecStart` argument of every unit replaced by a digest of it
    /// (values may come from Secrets, and a snapshot is meant to be copied
    /// into bug reports and CI jobs).
    /// Planning on it gives the same plan, since the planner then digests
    /// the desired values alike.
    pub fn without_secrets(&self) -> Self {
        let mut out = self.clone();
        if !out.environment_digests {
            for unit in &mut out.units {
                digest_environment(&mut unit.properties);
            }
            out.environment_digests = true;
        }
        out
    }
}

/// `NAME=value` → `NAME=sha256:<first 16 bytes, hex>`, and every argument
/// of `ExecStart` after the program (a `$(VAR)` of a Secret in `args` puts
/// its value there) → `sha256:<...>`, in place.
pub fn digest_environment(properties: &mut Properties) {
    use sha2::Digest as _;
    let digest = |value: &str| {
        let hash = sha2::Sha256::digest(value.as_bytes());
        let hex: String = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    if let Some(PropertyValue::List(env)) = properties.get_mut("Environment") {
        *env = env
            .iter()
            .map(|entry| {
                let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
                format!("{name}={}", digest(value))
            })
            .collect();
    }
    if let Some(PropertyValue::Exec(commands)) = properties.get_mut("ExecStart") {
        *commands = commands
            .iter()
            .map(|command| ExecCommand {
                path: command.path.clone(),
                argv: command
                    .argv
                    .iter()
                    .enumerate()
                    .map(|(i, arg)| if i == 0 { arg.clone() } else { digest(arg) })
                    .collect(),
            })
            .collect();
    }
}

/// An image as the node has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageFact {
    /// The reference as a registry reads it (`docker.io/library/busybox:1.37`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Why the name is not a reference at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// In the node's image store.
    #[serde(default)]
    pub present: bool,
    /// The latest pull of the reference since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullFact>,
    /// For `imagePullPolicy: Always`: the number of the pull asked for the
    /// start that is pending; a container starts on a pull at least as new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh_pull: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPhase {
    Queued,
    Pulling,
    Done,
    Failed,
}

/// A pull of an image, as the puller reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullFact {
    pub phase: PullPhase,
    /// Grows with every pull asked.
    pub seq: u64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// A failed pull is not tried again before this (seconds since the epoch).
    #[serde(default)]
    pub retry_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The credentials were missing or refused.
    #[serde(default)]
    pub auth_error: bool,
}

/// What the node prepared for one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodFacts {
    /// Its own network namespace: wired, or why not. Absent for a pod on
    /// the node's network, or a node without pod networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Wiring>,
    /// Its volumes: absent when it has none, or they are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_not_ready: Option<String>,
    /// What its local storage holds, for a pod with storage limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::ephemeral::StorageUsage>,
    /// Its running containers' probe results, by container name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub health: BTreeMap<String, crate::health::ContainerHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Wiring {
    /// Namespace, veth and address are in place.
    Wired { ip: String },
    /// Why the pod could not be wired.
    Failed { message: String },
}

/// systemd's `ActiveState`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    #[default]
    Active,
    Activating,
    Deactivating,
    Reloading,
    Inactive,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActualUnit {
    pub name: UnitName,
    #[serde(default)]
    pub active_state: ActiveState,
    #[serde(default)]
    pub properties: Properties,
    /// systemd's `NRestarts`: automatic restarts since the unit started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ActualUnit {
    fn text(&self, key: &str) -> Option<&str> {
        match self.properties.get(key) {
            Some(PropertyValue::Text(t)) => Some(t),
            _ => None,
        }
    }

    fn log_field(&self, field: &str) -> Option<&str> {
        match self.properties.get("LogExtraFields") {
            Some(PropertyValue::List(fields)) => fields.iter().find_map(|f| {
                f.strip_prefix(field)
                    .and_then(|rest| rest.strip_prefix('='))
            }),
            _ => None,
        }
    }

    /// Whether Berth created this unit: a service carries the marker log
    /// field, a slice Berth's name prefix and description. Nothing else is
    /// ever stopped or changed.
    pub fn is_berths(&self) -> bool {
        if !self.name.as_str().starts_with("berth-") {
            return false;
        }
        if self.name.is_slice() {
            return self
                .text("Description")
                .is_some_and(|d| d.starts_with("berth "));
        }
        matches!(self.properties.get("LogExtraFields"), Some(PropertyValue::List(f)) if f.iter().any(|x| x == MARKER_FIELD))
    }

    /// `namespace/name` of the pod a Berth unit belongs to.
    pub fn pod(&self) -> Option<String> {
        if let Some(pod) = self.log_field(POD_FIELD) {
            return Some(pod.to_string());
        }
        let description = self.text("Description")?;
        let rest = description.strip_prefix(crate::units::SLICE_DESCRIPTION_PREFIX)?;
        Some(rest.split(' ').next().unwrap_or(rest).to_string())
    }

    /// The container a Berth service runs.
    pub fn container(&self) -> Option<&str> {
        self.log_field(crate::units::CONTAINER_FIELD)
    }

    /// `Deployment/namespace/name` for the replicas of a Deployment.
    pub fn owner(&self) -> Option<&str> {
        self.log_field(OWNER_FIELD)
    }
}

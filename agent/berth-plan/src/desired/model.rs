//! The desired node's model: a pod, its slice and its container units,
//! with every property computed; what the diff and the apply work on.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_manifest::ObjectRef;
use serde::Serialize;

use crate::resources::QosClass;
use crate::units::{ExecCommand, PodId, Properties, PropertyValue, SharedProperties, UnitName};
use crate::volumes::{PodVolume, SubPathBind};

/// The `PATH` container runtimes set when the image does not.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
/// The kubelet's crash-loop back-off: 10 s doubling up to 5 min.
pub const RESTART_INITIAL_USEC: u64 = 10_000_000;
pub const RESTART_MAX_USEC: u64 = 300_000_000;
pub const RESTART_STEPS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// A slice unit with its properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SliceUnit {
    pub name: UnitName,
    pub properties: SharedProperties,
}

/// One container as a transient service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUnit {
    pub name: UnitName,
    pub container: String,
    pub init: bool,
    pub image: String,
    pub(crate) properties: SharedProperties,
    /// Environment entries that hold secret values, by variable name, with
    /// where they come from; every rendering shows this instead of the value.
    pub(crate) sensitive_env: BTreeMap<String, String>,
    /// The command line with each secret `$(VAR)` as a placeholder, when
    /// one went into it: what plans show instead of `ExecStart`'s argv.
    pub(crate) exec_shown: Option<Vec<String>>,
    /// Its environment from Secrets, written by the apply stage to the
    /// root-only file `EnvironmentFiles=` names.
    pub(crate) environment_file: Option<EnvironmentFile>,
    /// Resource properties that may change without a restart, by the
    /// container's `resizePolicy`.
    pub resizable: Resizable,
    /// `subPath` mounts the agent stages before the container starts.
    pub sub_paths: Vec<SubPathBind>,
    /// `imagePullPolicy`, defaulted as the API server does.
    pub pull_policy: PullPolicy,
    /// `runAsNonRoot` with the user left to the image: checked against the
    /// resolved user when the container starts.
    pub verify_non_root: bool,
    /// Its probes, which the agent's prober runs (not unit properties: a
    /// changed probe applies to the running container).
    pub probes: berth_manifest::probe::Probes,
    /// Its lifecycle hooks.
    pub hooks: berth_manifest::probe::Hooks,
    /// The pod's `terminationGracePeriodSeconds`, defaulted.
    pub grace_seconds: u64,
}

/// When the image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Before every start of the container (the tag is resolved again).
    Always,
    IfNotPresent,
    /// Only the local store; a missing image is `ErrImageNeverPull`.
    Never,
}

impl PullPolicy {
    /// The API server's default: `Always` for `:latest` or no tag, else `IfNotPresent`.
    pub fn resolve(field: Option<&str>, image: &str) -> Self {
        match field {
            Some("Always") => Self::Always,
            Some("Never") => Self::Never,
            Some(_) => Self::IfNotPresent,
            None => {
                let last = image.rsplit('/').next().unwrap_or("");
                let latest = !image.contains('@')
                    && last.split_once(':').is_none_or(|(_, tag)| tag == "latest");
                if latest {
                    Self::Always
                } else {
                    Self::IfNotPresent
                }
            }
        }
    }
}

/// A container's environment from Secrets, as systemd's `EnvironmentFile=`
/// reads it. Its name carries a digest of its content, so a changed Secret
/// changes the unit's `EnvironmentFiles=` and restarts the container, as a
/// changed `Environment=` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentFile {
    pub path: String,
    pub body: crate::volumes::Sensitive,
}

impl EnvironmentFile {
    /// The file for `entries` in the container's directory `dir`.
    pub fn new(dir: &str, entries: &[&(String, String)]) -> Self {
        use sha2::Digest as _;
        // Double quotes, with the characters systemd's parser treats
        // specially inside them escaped: the value arrives as written.
        let mut body = String::new();
        for (k, v) in entries {
            body.push_str(k);
            body.push_str("=\"");
            for ch in v.chars() {
                if matches!(ch, '\\' | '"' | '`' | '$') {
                    body.push('\\');
                }
                body.push(ch);
            }
            body.push_str("\"\n");
        }
        let hash = sha2::Sha256::digest(body.as_bytes());
        let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
        Self {
            path: format!("{dir}/environment-{hex}"),
            body: crate::volumes::Sensitive(body.into_bytes()),
        }
    }
}

impl ContainerUnit {
    /// The exact properties to send to systemd. Only the apply stage may
    /// call this (secret values are not among them: see
    /// [`ContainerUnit::environment_file_for_apply`]).
    pub fn properties_for_apply(&self) -> &Properties {
        &self.properties
    }

    /// The file of secret environment the unit's `EnvironmentFiles=` names,
    /// for the apply stage to write before the container starts.
    pub fn environment_file_for_apply(&self) -> Option<&EnvironmentFile> {
        self.environment_file.as_ref()
    }

    /// The properties with secret values replaced by where they come from:
    /// what every plan, log and status shows.
    pub fn properties_redacted(&self) -> SharedProperties {
        if self.sensitive_env.is_empty() && self.exec_shown.is_none() {
            return Arc::clone(&self.properties);
        }
        let mut props = (*self.properties).clone();
        if let (Some(shown), Some(PropertyValue::Exec(exec))) =
            (&self.exec_shown, props.get_mut("ExecStart"))
        {
            *exec = exec
                .iter()
                .map(|_| ExecCommand {
                    path: shown.first().cloned().unwrap_or_default(),
                    argv: shown.clone(),
                })
                .collect();
        }
        if let Some(PropertyValue::List(env)) = props.get_mut("Environment") {
            *env = env
                .iter()
                .map(|entry| {
                    let name = entry.split('=').next().unwrap_or("");
                    match self.sensitive_env.get(name) {
                        Some(origin) => format!("{name}=<{origin}>"),
                        None => entry.clone(),
                    }
                })
                .collect();
        }
        Arc::new(props)
    }

    pub fn is_sensitive(&self, env_name: &str) -> bool {
        self.sensitive_env.contains_key(env_name)
    }
}

/// Which resources a running container may change without a restart, by
/// its `resizePolicy` (Kubernetes' in-place resize; `NotRequired` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resizable {
    pub cpu: bool,
    pub memory: bool,
}

impl Resizable {
    pub fn allows(self, property: &str) -> bool {
        match property {
            "CPUWeight" | "CPUQuotaPerSecUSec" | "CPUQuotaPeriodUSec" => self.cpu,
            "MemoryMax" | "MemoryLow" | "MemoryHigh" | "OOMScoreAdjust" => self.memory,
            _ => false,
        }
    }
}

/// A pod, ready to be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPod {
    pub id: PodId,
    /// The object it was declared by (a Pod, or the Deployment of a replica).
    pub source: ObjectRef,
    /// Where the pod spec sits inside its source object.
    pub spec_path: &'static str,
    pub qos: QosClass,
    pub restart_policy: RestartPolicy,
    pub slice: SliceUnit,
    /// In the order they run.
    pub init_containers: Vec<ContainerUnit>,
    pub containers: Vec<ContainerUnit>,
    /// Requests after defaulting: for the node's QoS slices.
    pub cpu_request_milli: u64,
    pub memory_request_bytes: u64,
    /// The pod's labels, for Service selectors.
    pub labels: berth_manifest::model::Labels,
    /// Ports its containers declare, for a Service's named `targetPort`.
    pub ports: Vec<DeclaredPort>,
    /// `spec.hostNetwork`: the node's network namespace instead of its own.
    pub host_network: bool,
    /// `spec.volumes`, resolved; made ready by the agent before containers start.
    pub volumes: Vec<PodVolume>,
    /// `spec.imagePullSecrets` that exist and hold a Docker config.
    pub pull_secrets: Vec<PullSecret>,
    /// Its local storage limits, which the node measures it against.
    pub ephemeral: crate::ephemeral::EphemeralLimits,
}

/// A Docker config from an image pull Secret: `.dockerconfigjson` (type
/// `kubernetes.io/dockerconfigjson`) or `.dockercfg` (`kubernetes.io/dockercfg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSecret {
    pub name: String,
    pub key: &'static str,
    pub data: crate::volumes::Sensitive,
}

/// A container port as the pod spec declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredPort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`, as written (TCP when absent).
    pub protocol: String,
}

impl DesiredPod {
    pub fn units(&self) -> impl Iterator<Item = &ContainerUnit> {
        self.init_containers.iter().chain(self.containers.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_file_quotes_what_systemd_would_read_otherwise() {
        let entries = [
            ("A".to_string(), "plain".to_string()),
            ("B".to_string(), "q\"b\\s$HOME `x` #no comment".to_string()),
            ("C".to_string(), "two\nlines".to_string()),
        ];
        let refs: Vec<&(String, String)> = entries.iter().collect();
        let f = EnvironmentFile::new("/c/k", &refs);
        assert_eq!(
            String::from_utf8(f.body.0.clone()).expect("text"),
            "A=\"plain\"\nB=\"q\\\"b\\\\s\\$HOME \\`x\\` #no comment\"\nC=\"two\nlines\"\n"
        );
        assert!(
            f.path.starts_with("/c/k/environment-")
                && f.path.len() == "/c/k/environment-".len() + 12
        );
        // The name follows the content.
        let other = EnvironmentFile::new("/c/k", &refs[..1]);
        assert_ne!(other.path, f.path);
        assert!(
            !format!("{f:?}").contains("plain"),
            "no value in a debug print"
        );
    }
}

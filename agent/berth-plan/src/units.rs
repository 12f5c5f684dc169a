//! systemd unit names and properties for pods, and the marker that tells
//! Berth's units from everyone else's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::resources::QosClass;

/// systemd refuses unit names longer than this.
pub const UNIT_NAME_MAX: usize = 255;

/// The root slice of everything Berth runs.
pub const ROOT_SLICE: &str = "berth.slice";

/// A pod's identity on the node: namespace and name, both already validated
/// as DNS names (lowercase letters, digits, `-` and `.`; never `_` or `/`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PodId {
    /// `<namespace>_<name>`: `_` cannot occur in either part, so the key is
    /// unambiguous, and it is safe as a path component.
    pub fn key(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

/// A systemd unit name that is known to be valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnitName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error(
        "unit name {name:?} is {len} characters long; systemd allows {UNIT_NAME_MAX}: shorten the namespace, pod or container name"
    )]
    TooLong { name: String, len: usize },
}

impl UnitName {
    fn new(name: String) -> Result<Self, UnitNameError> {
        if name.len() > UNIT_NAME_MAX {
            return Err(UnitNameError::TooLong {
                len: name.len(),
                name,
            });
        }
        Ok(Self(name))
    }

    /// Accepts a name read back from systemd or a snapshot.
    pub fn from_observed(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_slice(&self) -> bool {
        self.0.ends_with(".slice")
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Escapes a name for use inside a slice name, where `-` means "child of".
/// Kubernetes names only contain `[a-z0-9.-]`, so only `-` needs escaping,
/// exactly as `systemd-escape` would do it.
pub fn escape_for_slice(component: &str) -> String {
    component.replace('-', "\\x2d")
}

/// `berth-burstable.slice`
pub fn qos_slice(qos: QosClass) -> UnitName {
    UnitName(format!("berth-{}.slice", qos.slice_word()))
}

/// `berth-burstable-default_web\x2d0.slice`: a child of the QoS slice.
pub fn pod_slice(qos: QosClass, pod: &PodId) -> Result<UnitName, UnitNameError> {
    UnitName::new(format!(
        "berth-{}-{}_{}.slice",
        qos.slice_word(),
        escape_for_slice(&pod.namespace),
        escape_for_slice(&pod.name)
    ))
}

/// `berth-default_web-0_nginx.service`: one per container.
pub fn container_service(pod: &PodId, container: &str) -> Result<UnitName, UnitNameError> {
    UnitName::new(format!(
        "berth-{}_{}_{}.service",
        pod.namespace, pod.name, container
    ))
}

/// The `LogExtraFields=` entries that mark a unit as Berth's and say which
/// pod and container it runs. They also let `journalctl BERTH_POD=ns/name`
/// find a pod's logs.
pub const MARKER_FIELD: &str = "BERTH_MANAGED=1";
pub const POD_FIELD: &str = "BERTH_POD";
pub const CONTAINER_FIELD: &str = "BERTH_CONTAINER";
pub const IMAGE_FIELD: &str = "BERTH_IMAGE";
pub const OWNER_FIELD: &str = "BERTH_OWNER";

/// Slices cannot carry log fields; their description is their marker.
pub const SLICE_DESCRIPTION_PREFIX: &str = "berth pod ";

/// One executable line of `ExecStart=`: systemd's `a(sasb)` without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCommand {
    pub path: String,
    /// argv, including argv[0].
    pub argv: Vec<String>,
}

/// A unit property value, in the types systemd's D-Bus API uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Text(String),
    Exec(Vec<ExecCommand>),
    List(Vec<String>),
}

/// Properties by their systemd names, sorted, for stable output and diffs.
pub type Properties = BTreeMap<String, PropertyValue>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_names_escape_dashes_so_the_hierarchy_stays_three_levels() {
        let pod = PodId {
            namespace: "kube-system".into(),
            name: "web-0".into(),
        };
        let slice = pod_slice(QosClass::Burstable, &pod).expect("short");
        assert_eq!(
            slice.as_str(),
            "berth-burstable-kube\\x2dsystem_web\\x2d0.slice"
        );
        // systemd derives the parent by cutting at the last unescaped '-'.
        let stem = slice.as_str().trim_end_matches(".slice");
        let parent = &stem[..stem.rfind('-').expect("has a dash")];
        assert_eq!(
            format!("{parent}.slice"),
            qos_slice(QosClass::Burstable).as_str()
        );
        assert_eq!(
            container_service(&pod, "nginx").expect("short").as_str(),
            "berth-kube-system_web-0_nginx.service"
        );
    }

    #[test]
    fn names_longer_than_systemd_allows_are_refused() {
        let pod = PodId {
            namespace: "default".into(),
            name: "a".repeat(250),
        };
        assert!(matches!(
            container_service(&pod, "c"),
            Err(UnitNameError::TooLong { .. })
        ));
        assert!(matches!(
            pod_slice(QosClass::BestEffort, &pod),
            Err(UnitNameError::TooLong { .. })
        ));
    }
}

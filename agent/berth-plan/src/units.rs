//! systemd unit names and properties for pods, and the marker that tells
//! Berth's units from everyone else's.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

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

/// One entry of `BindPaths=` or `BindReadOnlyPaths=`: systemd's `a(ssbt)`
/// (source, destination, ignore a missing source, mount flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    /// `rbind`, systemd's default: mounts below the source come along.
    pub recursive: bool,
}

/// As a unit file writes it: `source:destination`, `:norbind` when flat.
impl fmt::Display for BindMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.destination)?;
        if !self.recursive {
            f.write_str(":norbind")?;
        }
        Ok(())
    }
}

/// Binds the way a unit file lists them, space-separated.
pub fn binds_text(binds: &[BindMount]) -> String {
    binds
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `MS_REC`, the flag systemd reports for a recursive bind.
pub const MS_REC: u64 = 16384;

/// A unit property value, in the types systemd's D-Bus API uses. Text and
/// lists are reference-counted: a value many units share (a seccomp filter,
/// a search path) is held once, and a plan, its drift and its snapshot
/// clone values without copying them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Text(Arc<str>),
    Exec(Arc<[ExecCommand]>),
    Binds(Arc<[BindMount]>),
    List(Arc<[String]>),
}

impl PropertyValue {
    pub fn text(s: impl Into<Arc<str>>) -> Self {
        Self::Text(s.into())
    }

    pub fn list(items: impl Into<Arc<[String]>>) -> Self {
        Self::List(items.into())
    }

    pub fn exec(commands: impl Into<Arc<[ExecCommand]>>) -> Self {
        Self::Exec(commands.into())
    }

    pub fn binds(binds: impl Into<Arc<[BindMount]>>) -> Self {
        Self::Binds(binds.into())
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            Self::List(l) => Some(l),
            _ => None,
        }
    }
}

/// One property: its systemd name (mostly a static string; only snapshots
/// read from disk own theirs) and its value.
pub type Property = (Cow<'static, str>, PropertyValue);

/// Properties by their systemd names, sorted, for stable output and diffs.
///
/// A sorted vector rather than a B-tree: a unit has a few dozen properties,
/// and ten thousand units should not pay for half-empty tree nodes. Most of
/// a container's properties (its isolation, restart policy, sandbox) are
/// the same for every container with the same security context, so a unit
/// may rest on a shared sorted set ([`Properties::on`]) and hold only its
/// own properties; its own win over the shared ones of the same name.
/// Everything that reads properties sees one sorted set either way.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    own: Vec<Property>,
    shared: Option<Arc<[Property]>>,
}

fn find(list: &[Property], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|(k, _)| k.as_ref().cmp(name))
}

impl Properties {
    pub fn new() -> Self {
        Self::default()
    }

    /// Properties resting on `shared` (sorted by name, as [`Properties::share`] makes it).
    pub fn on(shared: Arc<[Property]>) -> Self {
        Self {
            own: Vec::new(),
            shared: Some(shared),
        }
    }

    /// These properties as a shared set for [`Properties::on`].
    pub fn share(&self) -> Arc<[Property]> {
        self.iter()
            .map(|(k, v)| (self.name_of(k), v.clone()))
            .collect()
    }

    /// The stored name for `k`, borrowed when it is static.
    fn name_of(&self, k: &str) -> Cow<'static, str> {
        let stored = |list: &[Property]| find(list, k).ok().map(|i| list[i].0.clone());
        stored(&self.own)
            .or_else(|| self.shared.as_deref().and_then(stored))
            .unwrap_or_else(|| Cow::Owned(k.to_string()))
    }

    /// Sets a property, replacing an earlier value of the same name.
    pub fn insert(&mut self, name: impl Into<Cow<'static, str>>, value: PropertyValue) {
        let name = name.into();
        match find(&self.own, &name) {
            Ok(i) => self.own[i].1 = value,
            Err(i) => self.own.insert(i, (name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&PropertyValue> {
        let at = |list: &'_ [Property]| find(list, name).ok();
        match at(&self.own) {
            Some(i) => Some(&self.own[i].1),
            None => {
                let shared = self.shared.as_deref()?;
                at(shared).map(|i| &shared[i].1)
            }
        }
    }

    /// A value to change in place: a shared one is copied into this unit's
    /// own first.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut PropertyValue> {
        if find(&self.own, name).is_err() {
            let shared = self.shared.as_deref()?;
            let i = find(shared, name).ok()?;
            let (k, v) = shared[i].clone();
            self.insert(k, v);
        }
        let i = find(&self.own, name).ok()?;
        Some(&mut self.own[i].1)
    }

    /// In name order; a unit's own value hides a shared one of the same name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PropertyValue)> {
        Merged {
            own: &self.own,
            shared: self.shared.as_deref().unwrap_or(&[]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.own.is_empty() && self.shared.as_deref().is_none_or(<[_]>::is_empty)
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Sets every property of `other`, replacing earlier values.
    pub fn extend_from(&mut self, other: &Properties) {
        for (k, v) in other.iter() {
            let name = other.name_of(k);
            self.insert(name, v.clone());
        }
    }

    /// Keeps the properties whose names pass `keep`. A shared set that
    /// loses one becomes this unit's own.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        if let Some(shared) = &self.shared
            && shared.iter().any(|(k, _)| !keep(k))
        {
            let mut all = Properties::new();
            all.extend_from(self);
            *self = all;
        }
        self.own.retain(|(k, _)| keep(k));
    }

    pub fn shrink_to_fit(&mut self) {
        self.own.shrink_to_fit();
    }
}

/// Two sorted lists as one; the first wins on equal names.
struct Merged<'p> {
    own: &'p [Property],
    shared: &'p [Property],
}

impl<'p> Iterator for Merged<'p> {
    type Item = (&'p str, &'p PropertyValue);

    fn next(&mut self) -> Option<Self::Item> {
        let take = |list: &mut &'p [Property]| {
            let ((k, v), rest) = list.split_first()?;
            *list = rest;
            Some((k.as_ref(), v))
        };
        match (self.own.first(), self.shared.first()) {
            (Some((a, _)), Some((b, _))) => match a.as_ref().cmp(b.as_ref()) {
                std::cmp::Ordering::Less => take(&mut self.own),
                std::cmp::Ordering::Greater => take(&mut self.shared),
                std::cmp::Ordering::Equal => {
                    take(&mut self.shared);
                    take(&mut self.own)
                }
            },
            (Some(_), None) => take(&mut self.own),
            (None, _) => take(&mut self.shared),
        }
    }
}

/// Equal when they list the same properties, however they are stored.
impl PartialEq for Properties {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Properties {}

impl<K: Into<Cow<'static, str>>> FromIterator<(K, PropertyValue)> for Properties {
    fn from_iter<I: IntoIterator<Item = (K, PropertyValue)>>(iter: I) -> Self {
        let mut props = Self::new();
        for (k, v) in iter {
            props.insert(k, v);
        }
        props
    }
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, PropertyValue>::deserialize(deserializer)?;
        Ok(Self {
            own: map.into_iter().map(|(k, v)| (Cow::Owned(k), v)).collect(),
            shared: None,
        })
    }
}

/// Properties that appeared in a systemd version later than 249 (Berth's
/// floor), with that version: the planner leaves them out for an older
/// manager, since one unknown property fails a whole `StartTransientUnit`.
pub fn introduced_in(property: &str) -> Option<u32> {
    match property {
        "PrivatePIDs" => Some(257),
        "RestartSteps" | "RestartMaxDelayUSec" => Some(254),
        "ExecSearchPath" => Some(250),
        _ => None,
    }
}

/// Properties shared between the desired model and the plan's actions, so a
/// plan for ten thousand pods holds each unit's properties once.
pub type SharedProperties = Arc<Properties>;

pub fn no_properties(p: &SharedProperties) -> bool {
    p.is_empty()
}

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

    #[test]
    fn properties_on_a_shared_set_read_as_one_sorted_set() {
        let shared: Properties = [
            ("Restart", PropertyValue::text("always")),
            ("PrivateTmp", PropertyValue::Bool(true)),
            ("Type", PropertyValue::text("exec")),
        ]
        .into_iter()
        .collect();
        let set = shared.share();
        let mut p = Properties::on(Arc::clone(&set));
        p.insert("Description", PropertyValue::text("own"));
        p.insert("Type", PropertyValue::text("oneshot"));
        let names: Vec<&str> = p.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["Description", "PrivateTmp", "Restart", "Type"]);
        assert_eq!(p.len(), 4);
        // The unit's own value wins over the shared one, which is untouched.
        assert_eq!(
            p.get("Type").and_then(PropertyValue::as_text),
            Some("oneshot")
        );
        assert_eq!(
            set.iter()
                .find(|(k, _)| k == "Type")
                .map(|(_, v)| v.as_text()),
            Some(Some("exec"))
        );
        // The same properties stored flat compare equal and serialize the same.
        let flat: Properties = p.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert_eq!(p, flat);
        assert_eq!(
            serde_json::to_string(&p).expect("json"),
            serde_json::to_string(&flat).expect("json")
        );
        // Changing a shared value in place changes this unit only.
        let mut q = Properties::on(Arc::clone(&set));
        if let Some(PropertyValue::Text(t)) = q.get_mut("Restart") {
            *t = "no".into();
        }
        assert_eq!(
            q.get("Restart").and_then(PropertyValue::as_text),
            Some("no")
        );
        assert_eq!(
            Properties::on(Arc::clone(&set))
                .get("Restart")
                .and_then(PropertyValue::as_text),
            Some("always")
        );
        // Dropping a shared property leaves the rest.
        q.retain(|k| k != "PrivateTmp");
        let names: Vec<&str> = q.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["Restart", "Type"]);
        assert!(!q.is_empty());
        assert!(Properties::on(Arc::from([])).is_empty());
    }
}

//! What is running on the node, as `observe` reports it: units and their
//! properties. Until the agent observes systemd, it comes from a snapshot file.

use serde::{Deserialize, Serialize};

use crate::units::{MARKER_FIELD, OWNER_FIELD, POD_FIELD, Properties, PropertyValue, UnitName};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActualState {
    #[serde(default)]
    pub units: Vec<ActualUnit>,
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

    /// `Deployment/namespace/name` for the replicas of a Deployment.
    pub fn owner(&self) -> Option<&str> {
        self.log_field(OWNER_FIELD)
    }
}

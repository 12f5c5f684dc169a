//! What the node tells about its OS in `status.yaml`: the version and slot
//! it booted, the other slot's version, and the last update's outcome.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::record::{Outcome, UpdateRecord};
use crate::slots::{Layout, Slot, booted_slot};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsStatus {
    /// The booted slot's version (`unknown` for a slot the ESP has no
    /// manifest of: an image built before bundles).
    pub version: String,
    /// `A` or `B`; empty when the node did not boot from a slot.
    pub slot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_slot_version: Option<String>,
    /// The last update, installed here by hand or from Git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
    /// What the node is doing about its OS now (a NodeImage's update
    /// being downloaded, written, waiting for its window, rebooting into).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
    /// What could not be read (the ESP, the update record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStatus {
    pub version: String,
    pub slot: String,
    /// `Installed`, `Incomplete`, `Gating`, `Promoted` or `RolledBack`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The NodeImage declaration that asked for it; none by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declaration: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    /// `Downloading`, `Writing`, `Staging`, `Waiting`, `Rebooting`,
    /// `Refused` or `Unsupported`.
    pub phase: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The node's OS status: the ESP mounted at `esp`, the kernel command line,
/// and the update record in `state_dir`.
pub fn os_status(esp: &Path, cmdline: &str, state_dir: &Path) -> OsStatus {
    let layout = Layout::esp_only(esp);
    let Some(booted) = booted_slot(cmdline) else {
        return OsStatus {
            version: "unknown".into(),
            ..OsStatus::default()
        };
    };
    let version = |slot: Slot| layout.installed(slot).map(|m| m.version);
    let mut out = OsStatus {
        version: version(booted).unwrap_or_else(|| "unknown".into()),
        slot: booted.to_string(),
        other_slot_version: version(booted.other()),
        ..OsStatus::default()
    };
    let record = match UpdateRecord::load(state_dir) {
        Ok(Some(r)) => r,
        Ok(None) => return out,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let entry = match layout.newest_entry(record.to_slot) {
        Ok(e) => e,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let (state, message) =
        if entry.is_none() && record.attempts.is_empty() && booted == record.from_slot {
            (
                "Incomplete",
                format!(
                    "the install into slot {} did not finish (no boot entry)",
                    record.to_slot
                ),
            )
        } else {
            let counted = entry.as_ref().is_some_and(|e| e.tries_left.is_some());
            let bad = entry.as_ref().is_none_or(|e| e.is_bad());
            match record.outcome(booted, counted, bad) {
                Outcome::Installed => ("Installed", "boots next".to_string()),
                Outcome::Gating => (
                    "Gating",
                    record
                        .last_attempt()
                        .map(|a| a.detail.clone())
                        .unwrap_or_default(),
                ),
                Outcome::Promoted => (
                    "Promoted",
                    record
                        .attempts
                        .iter()
                        .rev()
                        .find(|a| a.passed)
                        .map(|a| a.detail.clone())
                        .unwrap_or_default(),
                ),
                Outcome::RolledBack { reason } => ("RolledBack", reason),
            }
        };
    out.update = Some(UpdateStatus {
        version: record.version,
        slot: record.to_slot.to_string(),
        state: state.into(),
        message,
        declaration: record.declaration,
    });
    out
}

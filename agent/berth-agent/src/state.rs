//! What the agent remembers between runs: the last revision that was valid
//! (what the node keeps running) and the last one it tried. Written
//! atomically, so a power cut leaves either the old or the new file.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub node: Option<String>,
    pub last_good: Option<RevisionRecord>,
    pub last_attempted: Option<RevisionRecord>,
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
    /// Pods the node cannot fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_admitted: Vec<NotAdmittedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotAdmittedRecord {
    pub pod: String,
    pub reason: String,
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
    /// before the first save) is an empty state, never a failure.
    pub fn load(&self) -> AgentState {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, state: &AgentState) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

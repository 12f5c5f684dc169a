//! The update record, `/var/lib/berth/update.json`: what was installed into
//! which slot, what the gate on the new slot must see, and what each boot of
//! it found. `/var` is shared by both slots, so the old slot's agent reads
//! here why the new one was given up.
//!
//! It carries a schema version: a newer agent reads an older record (and
//! writes its own schema back); an older agent refuses a newer record by
//! name instead of misreading it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::slots::Slot;

pub const FILE: &str = "update.json";
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRecord {
    pub schema: u32,
    /// The OS version installed, and the one it replaces.
    pub version: String,
    pub from_version: String,
    #[serde(with = "slot_letter")]
    pub from_slot: Slot,
    #[serde(with = "slot_letter")]
    pub to_slot: Slot,
    /// Seconds since the epoch.
    pub installed_at: u64,
    /// Boots the new slot was given (systemd-boot's counter).
    pub tries: u32,
    /// The gate's deadline on each boot of the new slot, in seconds.
    pub gate_seconds: u64,
    /// Pods (`namespace/name`) running and ready when the update was
    /// installed: the new slot passes only when each is again (or is no
    /// longer declared).
    #[serde(default)]
    pub pods: Vec<String>,
    /// What each boot of the new slot found, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The NodeImage declaration that asked for this update (its version
    /// and bundle); none for one installed by hand. A declaration whose
    /// update rolled back is not tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declaration: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub boot_id: String,
    pub at: u64,
    pub passed: bool,
    /// The check that failed, or what passing took.
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

mod slot_letter {
    use crate::slots::Slot;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(slot: &Slot, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(slot.letter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
        let s = String::deserialize(d)?;
        Slot::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("slot {s:?} is not a or b")))
    }
}

impl UpdateRecord {
    /// The record in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, RecordError> {
        let path = dir.join(FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        let invalid = |why: String| RecordError::Invalid {
            path: path.clone(),
            why,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        match value.get("schema").and_then(serde_json::Value::as_u64) {
            Some(s) if s <= u64::from(SCHEMA) => {}
            Some(s) => {
                return Err(invalid(format!(
                    "schema {s} was written by a newer Berth than this one (schema {SCHEMA}); left as it is"
                )));
            }
            None => return Err(invalid("has no schema".into())),
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| invalid(e.to_string()))
    }

    /// Writes the record (temporary file, synced, renamed).
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(FILE);
        let tmp = dir.join(format!("{FILE}.tmp"));
        let io_err = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(&Self {
            schema: SCHEMA,
            ..self.clone()
        })
        .map_err(|e| RecordError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        text.push(b'\n');
        let mut f = fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&text).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err)
    }

    pub fn last_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }
}

/// What became of the update in the record, seen from the slot that booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new slot booted and its gate has not decided yet.
    Gating,
    /// The new slot passed its gate (and is blessed, or is being).
    Promoted,
    /// The old slot booted again: the new one was given up. The reason is
    /// the last failed check the new slot recorded, or that it never got
    /// as far as recording one.
    RolledBack { reason: String },
    /// Installed, not booted yet.
    Installed,
}

impl UpdateRecord {
    /// The update's outcome, for the node booted into `booted`, where
    /// `new_slot_counted` says whether the new slot's entry still counts
    /// tries (not yet blessed) and `new_slot_bad` whether it has none left.
    pub fn outcome(&self, booted: Slot, new_slot_counted: bool, new_slot_bad: bool) -> Outcome {
        let passed = self.last_attempt().is_some_and(|a| a.passed);
        if booted == self.to_slot {
            return if passed || !new_slot_counted {
                Outcome::Promoted
            } else {
                Outcome::Gating
            };
        }
        if self.attempts.is_empty() && !new_slot_bad {
            return Outcome::Installed;
        }
        let reason = match self.attempts.iter().rev().find(|a| !a.passed) {
            Some(a) => format!(
                "slot {} failed its health gate: {} ({} of {} boots tried)",
                self.to_slot,
                a.detail,
                self.attempts.len(),
                self.tries
            ),
            None if passed => format!(
                "slot {} passed its gate but slot {booted} booted again",
                self.to_slot
            ),
            None => format!(
                "slot {} never reached its health gate in {} boots (kernel, initrd or early boot failed)",
                self.to_slot, self.tries
            ),
        };
        Outcome::RolledBack { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UpdateRecord {
        UpdateRecord {
            schema: SCHEMA,
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
            from_slot: Slot::A,
            to_slot: Slot::B,
            installed_at: 1,
            tries: 3,
            gate_seconds: 300,
            pods: vec!["default/web".into()],
            attempts: Vec::new(),
            declaration: None,
        }
    }

    #[test]
    fn the_record_round_trips_and_a_newer_schema_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("berth-update-record-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        assert_eq!(UpdateRecord::load(&dir).expect("none"), None);
        let r = record();
        r.save(&dir).expect("save");
        assert_eq!(UpdateRecord::load(&dir).expect("load"), Some(r));
        let text = fs::read_to_string(dir.join(FILE)).expect("read");
        assert!(text.contains("\"toSlot\": \"b\""), "{text}");
        fs::write(
            dir.join(FILE),
            text.replace("\"schema\": 1", "\"schema\": 7"),
        )
        .expect("write");
        let e = UpdateRecord::load(&dir).expect_err("newer");
        assert!(
            e.to_string()
                .contains("schema 7 was written by a newer Berth"),
            "{e}"
        );
        fs::write(dir.join(FILE), text.replace("\"b\"", "\"c\"")).expect("write");
        let e = UpdateRecord::load(&dir).expect_err("bad slot");
        assert!(e.to_string().contains("slot \"c\" is not a or b"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_outcome_follows_the_slot_that_booted_and_names_the_failed_check() {
        let mut r = record();
        assert_eq!(r.outcome(Slot::A, true, false), Outcome::Installed);
        assert_eq!(r.outcome(Slot::B, true, false), Outcome::Gating);
        // Never got to a gate: the kernel or the agent did not come up.
        match r.outcome(Slot::A, true, true) {
            Outcome::RolledBack { reason } => assert!(
                reason.contains("never reached its health gate in 3 boots"),
                "{reason}"
            ),
            o => panic!("{o:?}"),
        }
        r.attempts.push(Attempt {
            boot_id: "x".into(),
            at: 2,
            passed: false,
            detail: "pod default/web not ready within 300 s".into(),
        });
        match r.outcome(Slot::A, true, true) {
            Outcome::RolledBack { reason } => {
                assert!(
                    reason.contains("pod default/web not ready within 300 s (1 of 3 boots tried)"),
                    "{reason}"
                )
            }
            o => panic!("{o:?}"),
        }
        r.attempts.push(Attempt {
            boot_id: "y".into(),
            at: 3,
            passed: true,
            detail: "1 pod ready".into(),
        });
        assert_eq!(r.outcome(Slot::B, true, false), Outcome::Promoted);
        assert_eq!(r.outcome(Slot::B, false, false), Outcome::Promoted);
    }
}

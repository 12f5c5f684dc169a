//! The boundary where a CSI plugin would plug in.
//!
//! The calls follow CSI's split: `create`/`delete`/`expand` are the
//! controller's (`CreateVolume`, `DeleteVolume`, `ControllerExpandVolume`),
//! `stage`/`unstage` the node's (`NodeStageVolume`, `NodeUnstageVolume`,
//! with `NodeExpandVolume` folded into `expand`), and `free_bytes` is
//! `GetCapacity`. Publishing a staged volume at a claim's mount point is a
//! bind the agent makes itself, the same for every driver. Every call is
//! idempotent, as CSI requires: the agent repeats calls after a crash.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tool(String),
}

impl DriverError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Space as the volume's own filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct VolumeStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

pub trait VolumeDriver: Send + Sync {
    /// The `provisioner` a StorageClass names to use this driver.
    fn provisioner(&self) -> &str;
    /// Space left for new volumes, after what existing ones may still fill.
    fn free_bytes(&self) -> Result<u64, DriverError>;
    /// Makes a volume of at least `bytes`; returns its capacity. A call for
    /// a volume that exists returns it unchanged; one left half-made by a
    /// crash is made again.
    fn create(&self, name: &str, bytes: u64) -> Result<u64, DriverError>;
    /// Removes a volume and its data. Unstages it first.
    fn delete(&self, name: &str) -> Result<(), DriverError>;
    /// Grows a volume (online, while staged); returns its new capacity.
    fn expand(&self, name: &str, bytes: u64) -> Result<u64, DriverError>;
    /// Makes the volume's filesystem available on the node; returns where.
    fn stage(&self, name: &str) -> Result<PathBuf, DriverError>;
    fn unstage(&self, name: &str) -> Result<(), DriverError>;
    /// The volumes this driver holds and the space each takes
    /// (`ListVolumes`), sorted by name.
    fn list(&self) -> Result<Vec<(String, u64)>, DriverError>;
    /// Capacity and usage of a staged volume (`NodeGetVolumeStats`).
    fn stats(&self, name: &str) -> Result<VolumeStats, DriverError>;
}

//! What the agent runs on: the host paths it reads and writes, and the
//! machine a pod runs on (systemd, the image store, container roots).
//! Built in `main` and passed in, so tests run the agent on temporary
//! directories and the in-memory systemd.

use std::path::PathBuf;

use berth_runtime::Systemd;
use berth_runtime::images::ImageStore;
use berth_runtime::rootfs::{ContainerRoots, UserRecords};

use crate::config::ConfigSources;

/// Everything on the host the agent reads or writes.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub config: ConfigSources,
    /// `/var/lib/berth`: the mirror and the state file.
    pub state_dir: PathBuf,
    pub node_memory_bytes: u64,
    pub node_cpu_milli: u64,
    /// `/proc/net`: whether the node has a default route yet, so a fetch
    /// tried before the network is up says so instead of failing.
    pub proc_net: PathBuf,
}

/// The machine a pod runs on: systemd, the image store, container roots.
/// Without one the agent only fetches and plans (`--plan-only`).
pub struct Runtime {
    pub systemd: Box<dyn Systemd>,
    pub images: ImageStore,
    pub roots: ContainerRoots,
    pub users: UserRecords,
    /// `/sys/fs/cgroup`, for usage in status.
    pub cgroup_root: PathBuf,
    /// Where the containers' roots are, as the planner writes it into units.
    pub containers_dir: String,
    /// OCI archives imported at start (the appliance's air-gap images).
    pub image_archives: Option<PathBuf>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("images", &self.images)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

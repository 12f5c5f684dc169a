//! A volume driver that keeps each volume as a plain directory and its
//! size as a number: everything [`LoopDriver`](crate::loopfs::LoopDriver)
//! does but the loop device, ext4 and the mount, so the storage logic runs
//! in tests without root. It is complete: every call keeps the contract
//! in [`crate::contract`], which runs on it in `cargo test` and on the real
//! driver as root, so the two cannot drift apart. A volume's data survives
//! unstaging, as on a real filesystem; its size is not enforced on writes
//! (nothing but a real filesystem can do that).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::driver::{DriverError, VolumeDriver, VolumeStats};
use crate::loopfs::{PROVISIONER, round_up};

#[derive(Debug, Clone, Copy)]
struct Volume {
    capacity: u64,
    staged: bool,
}

#[derive(Debug)]
pub struct FakeDriver {
    dir: PathBuf,
    /// Bytes the node has for volumes.
    space: u64,
    volumes: Mutex<BTreeMap<String, Volume>>,
}

impl FakeDriver {
    /// Volumes live under `dir` (`<dir>/<name>`); `space` is what the node
    /// has for them in all.
    pub fn new(dir: impl Into<PathBuf>, space: u64) -> Self {
        Self {
            dir: dir.into(),
            space,
            volumes: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Volume>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn free(volumes: &BTreeMap<String, Volume>, space: u64) -> u64 {
        space.saturating_sub(volumes.values().map(|v| v.capacity).sum())
    }
}

fn used(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

impl VolumeDriver for FakeDriver {
    fn provisioner(&self) -> &str {
        PROVISIONER
    }

    fn free_bytes(&self) -> Result<u64, DriverError> {
        Ok(Self::free(&self.lock(), self.space))
    }

    fn create(&self, name: &str, bytes: u64) -> Result<u64, DriverError> {
        let size = round_up(bytes);
        let mut volumes = self.lock();
        if volumes.contains_key(name) {
            return Ok(size);
        }
        let free = Self::free(&volumes, self.space);
        if size > free {
            return Err(crate::no_room_to_create(size, free));
        }
        let path = self.path(name);
        std::fs::create_dir_all(&path)
            .map_err(|e| DriverError::io(path.display().to_string(), e))?;
        volumes.insert(
            name.to_string(),
            Volume {
                capacity: size,
                staged: false,
            },
        );
        Ok(size)
    }

    fn delete(&self, name: &str) -> Result<(), DriverError> {
        self.unstage(name)?;
        self.lock().remove(name);
        let path = self.path(name);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::io(path.display().to_string(), e)),
        }
    }

    fn expand(&self, name: &str, bytes: u64) -> Result<u64, DriverError> {
        self.stage(name)?;
        let size = round_up(bytes);
        let mut volumes = self.lock();
        let free = Self::free(&volumes, self.space);
        let Some(v) = volumes.get_mut(name) else {
            return Err(DriverError::NotFound(format!("volume {name} is missing")));
        };
        if size <= v.capacity {
            return Ok(size);
        }
        let missing = size - v.capacity;
        if missing > free {
            return Err(crate::no_room_to_grow(size, missing, free));
        }
        v.capacity = size;
        Ok(size)
    }

    fn stage(&self, name: &str) -> Result<PathBuf, DriverError> {
        let mut volumes = self.lock();
        let Some(v) = volumes.get_mut(name) else {
            return Err(DriverError::NotFound(format!("volume {name} is missing")));
        };
        v.staged = true;
        Ok(self.path(name))
    }

    fn unstage(&self, name: &str) -> Result<(), DriverError> {
        if let Some(v) = self.lock().get_mut(name) {
            v.staged = false;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<(String, u64)>, DriverError> {
        Ok(self
            .lock()
            .iter()
            .map(|(name, v)| (name.clone(), v.capacity))
            .collect())
    }

    fn stats(&self, name: &str) -> Result<VolumeStats, DriverError> {
        let capacity = match self.lock().get(name) {
            Some(v) if v.staged => v.capacity,
            _ => {
                return Err(DriverError::NotFound(format!(
                    "volume {name} is not staged"
                )));
            }
        };
        let used = used(&self.path(name)).min(capacity);
        Ok(VolumeStats {
            capacity_bytes: capacity,
            used_bytes: used,
            available_bytes: capacity - used,
        })
    }
}

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

/// A mount table imitated in the filesystem, without root: mounting moves
/// what was at the target aside (into a stash directory of the fake's own,
/// so nothing new appears beside the target) and puts the mount's
/// view in its place (a symlink to a bind's source, an empty directory for
/// a tmpfs); unmounting puts the original back. So a file written through
/// a bound claim lands in its volume, a tmpfs' files go when it is
/// unmounted, and what was under a mount point reappears, as with the
/// kernel. Nested mounts and mounts stacked on one point are kept in order.
#[derive(Debug, Clone)]
pub struct FakeMounts {
    /// Where covered targets wait; on the same filesystem as the mounts.
    stash: PathBuf,
    /// Clones share one table, so a test keeps a handle on what it gave
    /// the storage pass.
    table: std::sync::Arc<Mutex<(Vec<FakeMount>, u64)>>,
}

#[derive(Debug, Clone)]
struct FakeMount {
    target: PathBuf,
    /// Where the target's original went while mounted over.
    aside: PathBuf,
    /// `Some(bytes)` for a tmpfs (its size), `None` for a bind.
    tmpfs_size: Option<u64>,
}

/// tmpfs' own default: half of memory; a fixed figure here.
const FAKE_TMPFS_DEFAULT: u64 = 1 << 30;

/// The mount table, and a counter naming stashed targets.
type Table = (Vec<FakeMount>, u64);

impl FakeMounts {
    /// Covered targets are kept under `stash`, which must be on the same
    /// filesystem as the targets.
    pub fn new(stash: impl Into<PathBuf>) -> Self {
        Self {
            stash: stash.into(),
            table: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every mount point, in the order mounted.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.lock().0.iter().map(|m| m.target.clone()).collect()
    }

    fn cover(&self, target: &Path, tmpfs_size: Option<u64>) -> nix::Result<PathBuf> {
        std::fs::symlink_metadata(target).map_err(|_| nix::errno::Errno::ENOENT)?;
        std::fs::create_dir_all(&self.stash).map_err(errno)?;
        let mut table = self.lock();
        table.1 += 1;
        let aside = self.stash.join(format!("covered-{}", table.1));
        std::fs::rename(target, &aside).map_err(errno)?;
        table.0.push(FakeMount {
            target: target.to_path_buf(),
            aside: aside.clone(),
            tmpfs_size,
        });
        Ok(aside)
    }
}

fn errno(e: std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

impl crate::mounts::Mounts for FakeMounts {
    fn is_mount_point(&self, path: &Path) -> bool {
        self.lock().0.iter().any(|m| m.target == path)
    }

    fn bind(&self, source: &Path, target: &Path) -> nix::Result<()> {
        let source = std::fs::canonicalize(source).map_err(errno)?;
        self.cover(target, None)?;
        std::os::unix::fs::symlink(&source, target).map_err(errno)
    }

    fn bind_fd(&self, fd: std::os::fd::BorrowedFd<'_>, target: &Path) -> nix::Result<()> {
        use std::os::fd::AsRawFd;
        let source =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(errno)?;
        self.bind(&source, target)
    }

    fn unmount(&self, target: &Path) -> nix::Result<()> {
        let mut table = self.lock();
        let Some(i) = table.0.iter().rposition(|m| m.target == target) else {
            return Ok(());
        };
        let m = table.0.remove(i);
        drop(table);
        // The mount's view goes (a tmpfs' files with it); the original
        // comes back.
        let view = std::fs::symlink_metadata(target).map_err(errno)?;
        if view.is_dir() {
            std::fs::remove_dir_all(target).map_err(errno)?;
        } else {
            std::fs::remove_file(target).map_err(errno)?;
        }
        std::fs::rename(&m.aside, target).map_err(errno)
    }

    fn unmount_below(&self, dir: &Path) -> std::io::Result<()> {
        loop {
            // Deepest first; of one point, the last mounted first.
            let next = {
                let table = self.lock();
                table
                    .0
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.target.starts_with(dir))
                    .max_by_key(|(i, m)| (m.target.components().count(), *i))
                    .map(|(_, m)| m.target.clone())
            };
            let Some(target) = next else {
                return Ok(());
            };
            self.unmount(&target).map_err(std::io::Error::from)?;
        }
    }

    fn mount_tmpfs(&self, target: &Path, size: Option<u64>, mode: u32) -> nix::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if !target.is_dir() {
            return Err(nix::errno::Errno::ENOTDIR);
        }
        self.cover(target, Some(size.unwrap_or(FAKE_TMPFS_DEFAULT)))?;
        std::fs::create_dir(target).map_err(errno)?;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode)).map_err(errno)
    }

    fn resize_tmpfs(&self, target: &Path, size: u64) -> nix::Result<()> {
        let mut table = self.lock();
        let m = table
            .0
            .iter_mut()
            .rev()
            .find(|m| m.target == target && m.tmpfs_size.is_some())
            .ok_or(nix::errno::Errno::EINVAL)?;
        if size < used(target) {
            return Err(nix::errno::Errno::EBUSY);
        }
        m.tmpfs_size = Some(size);
        Ok(())
    }

    fn fs_size(&self, path: &Path) -> std::io::Result<(u64, u64)> {
        let table = self.lock();
        // The latest of the deepest mounts holding the path.
        let tmpfs = table
            .0
            .iter()
            .filter(|m| path.starts_with(&m.target))
            .max_by_key(|m| m.target.components().count())
            .and_then(|m| m.tmpfs_size.map(|size| (m.target.clone(), size)));
        drop(table);
        match tmpfs {
            Some((root, size)) => Ok((size, size.saturating_sub(used(&root)))),
            None => crate::mounts::fs_size(path),
        }
    }
}

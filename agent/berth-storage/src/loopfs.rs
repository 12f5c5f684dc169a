//! The built-in provisioner: an ext4 filesystem image per volume, attached
//! to a loop device with direct I/O and mounted `nosuid,nodev`.
//!
//! Layout under the driver's directory (on the data partition):
//! `images/<name>.img` (allocated in full, so that a claim's space is its
//! own even when pods fill the rest of `/var`), `staged/<name>` (mount point).
//! An image is made as `<name>.img.new` and renamed only once `mkfs` has
//! finished, so a crash never leaves a half-made image under a real name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::MsFlags;

use crate::driver::{DriverError, VolumeDriver, VolumeStats};
use crate::mounts;

pub const PROVISIONER: &str = "berth.dev/local";

/// Allocates `len` bytes of `file` from `offset` (growing it): the blocks
/// are the volume's from now on, so a full `/var` never fails its writes.
fn allocate(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), offset, len)
        .map_err(std::io::Error::from)
}

/// ext4's smallest sensible size with a journal.
pub const MIN_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct LoopDriver {
    dir: PathBuf,
}

impl LoopDriver {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join("images").join(format!("{name}.img"))
    }

    pub fn staging(&self, name: &str) -> PathBuf {
        self.dir.join("staged").join(name)
    }

    /// The loop device a file is attached to.
    fn loop_of(file: &Path) -> Option<PathBuf> {
        loop_devices()
            .into_iter()
            .find(|(_, backing)| backing == file)
            .map(|(dev, _)| dev)
    }

    fn attach(file: &Path) -> Result<PathBuf, DriverError> {
        if let Some(dev) = Self::loop_of(file) {
            return Ok(dev);
        }
        let out = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on", "--nooverlap"])
            .arg(file))?;
        Ok(PathBuf::from(out.trim()))
    }

    fn detach(file: &Path) -> Result<(), DriverError> {
        match Self::loop_of(file) {
            Some(dev) => detach_device(&dev),
            None => Ok(()),
        }
    }
}

/// Every attached loop device and its backing file, from sysfs.
pub fn loop_devices() -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end();
            (!backing.is_empty()).then(|| {
                (
                    PathBuf::from("/dev").join(e.file_name()),
                    PathBuf::from(backing),
                )
            })
        })
        .collect()
}

/// Detaches a loop device (a busy one is detached once released).
pub fn detach_device(dev: &Path) -> Result<(), DriverError> {
    match run(Command::new("losetup").arg("-d").arg(dev)) {
        Ok(_) => Ok(()),
        // Detached already: the kernel tears a released device down in
        // the background and sysfs still shows its backing file for a
        // moment, so a second unstage can find it and get ENXIO (seen
        // on the appliance by the driver contract).
        Err(DriverError::Tool(m)) if m.contains("No such device or address") => Ok(()),
        Err(e) => Err(e),
    }
}

fn run(cmd: &mut Command) -> Result<String, DriverError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| DriverError::io(format!("running {shown}"), e))?;
    if !out.status.success() {
        return Err(DriverError::Tool(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Free bytes of an unmounted ext4 image, from its superblock.
fn ext4_free_bytes(image: &Path) -> Result<u64, DriverError> {
    let out = run(Command::new("dumpe2fs").arg("-h").arg(image))?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Free blocks:"), field("Block size:")) {
        (Some(free), Some(size)) => Ok(free * size),
        _ => Err(DriverError::Tool(format!(
            "dumpe2fs -h {} did not report free blocks",
            image.display()
        ))),
    }
}

pub(crate) fn round_up(bytes: u64) -> u64 {
    bytes.max(MIN_BYTES).div_ceil(1 << 20) * (1 << 20)
}

impl VolumeDriver for LoopDriver {
    fn provisioner(&self) -> &str {
        PROVISIONER
    }

    fn free_bytes(&self) -> Result<u64, DriverError> {
        std::fs::create_dir_all(self.dir.join("images"))
            .map_err(|e| DriverError::io(self.dir.display().to_string(), e))?;
        let (_, free) = mounts::fs_size(&self.dir)
            .map_err(|e| DriverError::io(self.dir.display().to_string(), e))?;
        // Sparse images may still grow to their full size: that space is promised.
        let mut promised = 0u64;
        for e in std::fs::read_dir(self.dir.join("images"))
            .map_err(|e| DriverError::io("listing images", e))?
            .flatten()
        {
            if let Ok(m) = e.metadata() {
                promised += m.len().saturating_sub(m.blocks() * 512);
            }
        }
        Ok(free.saturating_sub(promised))
    }

    fn create(&self, name: &str, bytes: u64) -> Result<u64, DriverError> {
        let image = self.image(name);
        let size = round_up(bytes);
        if image.exists() {
            return Ok(size);
        }
        let free = self.free_bytes()?;
        if size > free {
            return Err(crate::no_room_to_create(size, free));
        }
        let new = image.with_extension("img.new");
        let _ = std::fs::remove_file(&new);
        let make = || -> Result<(), DriverError> {
            let f = std::fs::File::create(&new)
                .map_err(|e| DriverError::io(new.display().to_string(), e))?;
            allocate(&f, 0, size).map_err(|e| DriverError::io(new.display().to_string(), e))?;
            // No reserved blocks: the claim's size is all the pod's.
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-E", "nodiscard", "-L"])
                .arg(name.chars().take(16).collect::<String>())
                .arg(&new))?;
            // ext4's own overhead (journal, inode tables) comes on top, so
            // the pod can store what the claim asked for.
            // (Plus room for the file's own extent blocks.)
            let want = size + size / 64 + (1 << 20);
            let mut len = size;
            for _ in 0..3 {
                let free = ext4_free_bytes(&new)?;
                if free >= want {
                    break;
                }
                let grown = (len + want - free).div_ceil(1 << 20) * (1 << 20);
                allocate(&f, len, grown - len)
                    .map_err(|e| DriverError::io(new.display().to_string(), e))?;
                len = grown;
                run(Command::new("resize2fs").arg("-f").arg(&new))?;
            }
            f.sync_all()
                .map_err(|e| DriverError::io(new.display().to_string(), e))?;
            std::fs::rename(&new, &image)
                .map_err(|e| DriverError::io(image.display().to_string(), e))?;
            if let Some(dir) = image.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(())
        };
        make().inspect_err(|_| {
            let _ = std::fs::remove_file(&new);
        })?;
        Ok(size)
    }

    fn delete(&self, name: &str) -> Result<(), DriverError> {
        self.unstage(name)?;
        let image = self.image(name);
        for f in [image.clone(), image.with_extension("img.new")] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DriverError::io(f.display().to_string(), e)),
            }
        }
        Ok(())
    }

    fn expand(&self, name: &str, bytes: u64) -> Result<u64, DriverError> {
        let image = self.image(name);
        let size = round_up(bytes);
        self.stage(name)?;
        let dev = Self::attach(&image)?;
        for _ in 0..4 {
            let stats = self.stats(name)?;
            let usable = stats.available_bytes + stats.used_bytes;
            if usable >= size {
                return Ok(size);
            }
            let missing = (size - usable).div_ceil(1 << 20) * (1 << 20);
            let free = self.free_bytes()?;
            if missing > free {
                return Err(crate::no_room_to_grow(size, missing, free));
            }
            let len = std::fs::metadata(&image)
                .map_err(|e| DriverError::io(image.display().to_string(), e))?
                .len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .and_then(|f| allocate(&f, len, missing))
                .map_err(|e| DriverError::io(image.display().to_string(), e))?;
            run(Command::new("losetup").arg("-c").arg(&dev))?;
            // Online resize of the mounted filesystem.
            run(Command::new("resize2fs").arg(&dev))?;
        }
        Err(DriverError::Tool(format!(
            "{name} did not reach {} after growing it",
            crate::format_size(size)
        )))
    }

    fn stage(&self, name: &str) -> Result<PathBuf, DriverError> {
        let image = self.image(name);
        if !image.exists() {
            return Err(DriverError::NotFound(format!(
                "volume image {} is missing",
                image.display()
            )));
        }
        let target = self.staging(name);
        if mounts::is_mount_point(&target) {
            return Ok(target);
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| DriverError::io(target.display().to_string(), e))?;
        let dev = Self::attach(&image)?;
        nix::mount::mount(
            Some(dev.as_path()),
            &target,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(|e| {
            DriverError::io(
                format!("mounting {} at {}", dev.display(), target.display()),
                e.into(),
            )
        })?;
        Ok(target)
    }

    fn unstage(&self, name: &str) -> Result<(), DriverError> {
        let target = self.staging(name);
        if mounts::is_mount_point(&target) {
            nix::mount::umount2(&target, nix::mount::MntFlags::empty()).map_err(|e| {
                DriverError::io(format!("unmounting {}", target.display()), e.into())
            })?;
        }
        Self::detach(&self.image(name))?;
        let _ = std::fs::remove_dir(&target);
        Ok(())
    }

    fn list(&self) -> Result<Vec<(String, u64)>, DriverError> {
        let dir = self.dir.join("images");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DriverError::io(dir.display().to_string(), e)),
        };
        let mut volumes: Vec<(String, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".img")?.to_string();
                Some((name, e.metadata().ok()?.len()))
            })
            .collect();
        volumes.sort();
        Ok(volumes)
    }

    fn stats(&self, name: &str) -> Result<VolumeStats, DriverError> {
        let target = self.staging(name);
        let s = nix::sys::statvfs::statvfs(&target)
            .map_err(|e| DriverError::io(target.display().to_string(), e.into()))?;
        let unit = s.fragment_size();
        Ok(VolumeStats {
            capacity_bytes: s.blocks() * unit,
            used_bytes: (s.blocks() - s.blocks_free()) * unit,
            available_bytes: s.blocks_available() * unit,
        })
    }
}

//! Mount table reads and the few mounts storage makes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Mount points as `/proc/self/mountinfo` lists them (octal escapes undone).
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    Ok(parse_mount_points(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The mount points of a `mountinfo` text: its fifth field, with the
/// kernel's octal escapes (space, tab, newline, backslash) undone.
pub fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    mount_points().is_ok_and(|m| m.iter().any(|p| p == path))
}

/// A tmpfs of `size` bytes (tmpfs' own default when `None`), mode 0755 or
/// 0700, never executable as setuid or with device nodes.
pub fn mount_tmpfs(target: &Path, size: Option<u64>, mode: u32) -> nix::Result<()> {
    let mut data = format!("mode={mode:o}");
    if let Some(size) = size {
        data.push_str(&format!(",size={size}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
}

/// Binds what an open file descriptor refers to (through `/proc/self/fd`,
/// so no path is resolved a second time) onto `target`.
pub fn bind_fd(fd: &impl AsRawFd, target: &Path) -> nix::Result<()> {
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

pub fn bind(source: &Path, target: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// Unmounts whatever is mounted at `target`, lazily (a container that
/// still holds it keeps its view until it exits). Not mounted is fine.
pub fn unmount(target: &Path) -> nix::Result<()> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unmounts every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) -> std::io::Result<()> {
    let mut below: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below.dedup();
    for p in below {
        unmount(&p).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Bytes of a filesystem: (total, free for unprivileged users).
pub fn fs_size(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let unit = s.fragment_size();
    Ok((s.blocks() * unit, s.blocks_available() * unit))
}

/// The mounts the storage pass and pod volumes make, as one trait:
/// [`KernelMounts`] calls the kernel, [`FakeMounts`](crate::fake::FakeMounts)
/// imitates it in a scratch directory without root. The cases in
/// [`contract::MOUNT_CASES`](crate::contract::MOUNT_CASES) hold both to the
/// same behaviour.
pub trait Mounts: Send + Sync + std::fmt::Debug {
    /// Whether something is mounted exactly at `path`.
    fn is_mount_point(&self, path: &Path) -> bool;
    /// Shows `source` (a directory or a file) at `target`, which exists.
    fn bind(&self, source: &Path, target: &Path) -> nix::Result<()>;
    /// Shows what an open descriptor refers to at `target`.
    fn bind_fd(&self, fd: BorrowedFd<'_>, target: &Path) -> nix::Result<()>;
    /// Unmounts `target`, showing what was under it again; not mounted is
    /// fine.
    fn unmount(&self, target: &Path) -> nix::Result<()>;
    /// Unmounts every mount at or below `dir`, deepest first.
    fn unmount_below(&self, dir: &Path) -> std::io::Result<()>;
    /// A tmpfs of `size` bytes (tmpfs' default when `None`) at `target`.
    fn mount_tmpfs(&self, target: &Path, size: Option<u64>, mode: u32) -> nix::Result<()>;
    /// Gives the tmpfs at `target` a new size, keeping its files.
    fn resize_tmpfs(&self, target: &Path, size: u64) -> nix::Result<()>;
    /// Bytes of the filesystem holding `path`: (total, free).
    fn fs_size(&self, path: &Path) -> std::io::Result<(u64, u64)>;
}

/// The node's own mount table.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelMounts;

impl Mounts for KernelMounts {
    fn is_mount_point(&self, path: &Path) -> bool {
        is_mount_point(path)
    }
    fn bind(&self, source: &Path, target: &Path) -> nix::Result<()> {
        bind(source, target)
    }
    fn bind_fd(&self, fd: BorrowedFd<'_>, target: &Path) -> nix::Result<()> {
        bind_fd(&fd, target)
    }
    fn unmount(&self, target: &Path) -> nix::Result<()> {
        unmount(target)
    }
    fn unmount_below(&self, dir: &Path) -> std::io::Result<()> {
        unmount_below(dir)
    }
    fn mount_tmpfs(&self, target: &Path, size: Option<u64>, mode: u32) -> nix::Result<()> {
        mount_tmpfs(target, size, mode)
    }
    fn resize_tmpfs(&self, target: &Path, size: u64) -> nix::Result<()> {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size}").as_str()),
        )
    }
    fn fs_size(&self, path: &Path) -> std::io::Result<(u64, u64)> {
        fs_size(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn mount_points_are_the_fifth_field_unescaped() {
        let text = "36 35 98:0 / /var/lib/berth/containers/a_b_c/rootfs rw,nodev - overlay overlay rw\n\
                    37 35 98:0 / /mnt/with\\040space rw - ext4 /dev/vda rw\n";
        assert_eq!(
            parse_mount_points(text),
            [
                PathBuf::from("/var/lib/berth/containers/a_b_c/rootfs"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }
}

//! Mount table reads and the few mounts storage makes.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Mount points as `/proc/self/mountinfo` lists them (octal escapes undone).
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}

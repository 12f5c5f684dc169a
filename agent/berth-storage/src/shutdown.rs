//! What the node's shutdown needs from storage once its pods have stopped:
//! every mount under Berth's directories undone (claims, their staging,
//! staged `subPath` binds, pod volumes) and every loop device backed by a
//! volume image detached. Left to the end of shutdown, those loop devices
//! keep their image files open and `/var` cannot be unmounted (`Failed
//! unmounting var.mount` on every reboot). `berth storage-teardown` runs
//! this from `berth-storage-teardown.service`, which stops after the pods
//! and the agent and before `/var` is unmounted.

use std::path::{Path, PathBuf};

/// Mount points of this process's mount table, in mount order.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as
/// three octal digits.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts to undo, deepest first: those at or below any of `roots`.
pub fn to_unmount(points: &[PathBuf], roots: &[&Path]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = points
        .iter()
        .filter(|p| roots.iter().any(|r| p.starts_with(r)))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Unmounts everything below `roots` and detaches the loop devices whose
/// backing file lies under `images`. Returns what it did and what failed,
/// for the journal; it never stops at the first failure.
pub fn teardown(roots: &[&Path], images: &Path) -> Vec<String> {
    let mut log = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // A mount stacked more than once needs as many unmounts.
    for point in to_unmount(&mount_points(&mountinfo), roots) {
        match nix::mount::umount2(&point, nix::mount::MntFlags::empty()) {
            Ok(()) => log.push(format!("unmounted {}", point.display())),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                // Still busy: detach it from the tree, so /var can go.
                let lazy = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
                log.push(format!(
                    "unmounting {}: {e}; {}",
                    point.display(),
                    if lazy.is_ok() {
                        "detached lazily"
                    } else {
                        "left"
                    }
                ));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let backing =
                std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            let backing = backing.trim_end();
            if backing.is_empty() || !Path::new(backing).starts_with(images) {
                continue;
            }
            let dev = Path::new("/dev").join(&name);
            let done = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .output();
            match done {
                Ok(o) if o.status.success() => {
                    log.push(format!("detached {} ({backing})", dev.display()))
                }
                Ok(o) => log.push(format!(
                    "detaching {}: {}",
                    dev.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => log.push(format!("detaching {}: {e}", dev.display())),
            }
        }
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn berths_mounts_are_found_and_undone_deepest_first() {
        let mountinfo = "\
22 1 254:1 / / ro,relatime shared:1 - ext4 /dev/vda2 ro
30 22 254:4 / /var rw,relatime shared:5 - ext4 /dev/vda4 rw
41 30 7:0 / /var/lib/berth/storage/staging/pvc_a rw - ext4 /dev/loop0 rw
42 30 7:0 / /var/lib/berth/storage/claims/default_a rw - ext4 /dev/loop0 rw
43 25 7:0 /nested/dir /run/berth/subpaths/default_w/main/0 rw - ext4 /dev/loop0 rw
44 30 0:50 / /var/lib/berth/containers/default_w_main/rootfs rw - overlay overlay rw
45 30 0:51 / /var/lib/other\\040dir rw - tmpfs tmpfs rw
46 25 0:52 / /run/user/0 rw - tmpfs tmpfs rw
";
        let points = mount_points(mountinfo);
        assert_eq!(points[6], PathBuf::from("/var/lib/other dir"));
        let undo = to_unmount(
            &points,
            &[Path::new("/var/lib/berth"), Path::new("/run/berth")],
        );
        assert_eq!(
            undo,
            [
                "/run/berth/subpaths/default_w/main/0",
                "/var/lib/berth/containers/default_w_main/rootfs",
                "/var/lib/berth/storage/claims/default_a",
                "/var/lib/berth/storage/staging/pvc_a",
            ]
            .map(PathBuf::from)
        );
    }
}

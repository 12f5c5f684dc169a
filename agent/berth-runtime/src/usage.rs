//! What a pod's local storage holds on disk, counted as `du` counts it (the
//! kubelet's way when it has no filesystem quotas): the allocated blocks of
//! every file and directory in the tree, a file with several links once,
//! without crossing into other filesystems (a claim or tmpfs mounted
//! inside is not the pod's ephemeral storage).

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use berth_plan::DesiredPod;
use berth_plan::ephemeral::StorageUsage;
use berth_plan::volumes::VolumeSource;

use crate::rootfs::ContainerRoots;

/// Bytes allocated under `root`; 0 when it does not exist. Entries that
/// vanish during the walk (the pod deletes files meanwhile) are skipped.
pub fn disk_usage(root: &Path) -> io::Result<u64> {
    let top = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let device = top.dev();
    let mut total = top.blocks() * 512;
    let mut linked = HashSet::new();
    let mut stack: Vec<PathBuf> = Vec::new();
    if top.is_dir() {
        stack.push(root.to_path_buf());
    }
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            if m.dev() != device {
                continue;
            }
            if m.is_dir() {
                stack.push(entry.path());
            } else if m.nlink() > 1 && !linked.insert(m.ino()) {
                continue;
            }
            total = total.saturating_add(m.blocks() * 512);
        }
    }
    Ok(total)
}

/// What `pod`'s disk `emptyDir`s and its containers' writable layers hold.
pub fn pod_usage(roots: &ContainerRoots, pod: &DesiredPod) -> StorageUsage {
    let measure = |path: &Path| disk_usage(path).unwrap_or(0);
    StorageUsage {
        volumes: pod
            .volumes
            .iter()
            .filter(|v| matches!(v.source, VolumeSource::EmptyDir { memory: false, .. }))
            .map(|v| (v.name.clone(), measure(Path::new(&v.host_path))))
            .collect(),
        containers: pod
            .units()
            .map(|u| {
                let key = crate::reconcile::container_key(&pod.id, &u.container);
                (u.container.clone(), measure(&roots.dir(&key).join("upper")))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_blocks_once_per_file_and_stays_on_its_filesystem() {
        let base = std::env::temp_dir().join(format!("berth-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("tree");
        std::fs::create_dir_all(root.join("a/b")).expect("dirs");
        let empty = disk_usage(&root).expect("empty");
        // Written data, not a sparse length, is what counts.
        std::fs::write(root.join("a/b/data"), vec![7u8; 1 << 20]).expect("write");
        let sparse = std::fs::File::create(root.join("sparse")).expect("create");
        sparse.set_len(1 << 30).expect("set_len");
        let written = disk_usage(&root).expect("written");
        assert!(written >= empty + (1 << 20), "{written} {empty}");
        assert!(
            written < empty + (2 << 20),
            "the sparse GiB does not count: {written}"
        );
        // A second link to the same file adds nothing.
        std::fs::hard_link(root.join("a/b/data"), root.join("again")).expect("link");
        assert_eq!(disk_usage(&root).expect("linked"), written);
        // A symlink out of the tree is not followed.
        std::os::unix::fs::symlink("/usr", root.join("out")).expect("symlink");
        assert!(disk_usage(&root).expect("symlink") < written + 8192);
        assert_eq!(disk_usage(&base.join("missing")).expect("missing"), 0);
        let _ = std::fs::remove_dir_all(&base);
    }
}

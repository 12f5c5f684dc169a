//! What the node's shutdown needs from storage once its pods have stopped:
//! every mount under Berth's directories undone (claims, their staging,
//! staged `subPath` binds, pod volumes) and every loop device backed by a
//! volume image detached. Left to the end of shutdown, those loop devices
//! keep their image files open and `/var` cannot be unmounted (`Failed
//! unmounting var.mount` on every reboot). `berth storage-teardown` runs
//! this from `berth-storage-teardown.service`, which stops after the pods
//! and the agent and before `/var` is unmounted.

use std::path::Path;

/// Unmounts everything at or below `roots`, deepest first, and detaches the
/// loop devices whose backing file lies under `images`. Returns what failed,
/// for the journal; it never stops at the first failure.
pub fn teardown(roots: &[&Path], images: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for root in roots {
        if let Err(e) = crate::mounts::unmount_below(root) {
            problems.push(format!("unmounting below {}: {e}", root.display()));
        }
    }
    for (dev, backing) in crate::loopfs::loop_devices() {
        if backing.starts_with(images)
            && let Err(e) = crate::loopfs::detach_device(&dev)
        {
            problems.push(format!(
                "detaching {} ({}): {e}",
                dev.display(),
                backing.display()
            ));
        }
    }
    problems
}

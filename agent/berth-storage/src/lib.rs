//! Local storage for pods, with the kernel's own primitives.
//!
//! - [`podvol`]: a pod's own volumes (`emptyDir` on disk or as a sized
//!   tmpfs, `hostPath`, ConfigMap and Secret files swapped atomically) and
//!   `subPath` binds resolved without following symlinks out of the volume.
//! - [`driver`]: the boundary where a CSI node plugin would plug in, and
//!   [`loopfs::LoopDriver`], the built-in provisioner: one ext4 filesystem
//!   image per claim on a loop device, so a claim's size is a hard limit
//!   (`ENOSPC`, not `EDQUOT`) and one full volume cannot touch another.
//! - [`book`]: which volumes exist and whose they are, kept across crashes.
//! - [`binder`]: pure binding of claims to volumes, as Kubernetes does it.
//! - [`fake::FakeDriver`]: the driver without root (directories and
//!   numbers), and [`contract`]: the cases both drivers must pass.

pub mod binder;
pub mod book;
pub mod contract;
pub mod driver;
pub mod fake;
pub mod loopfs;
pub mod mounts;
pub mod podvol;
pub mod shutdown;

/// `1073741824` → `1Gi`, for messages.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// A volume the node cannot make: what was asked, and what is free.
pub fn no_room_to_create(size: u64, free: u64) -> driver::DriverError {
    driver::DriverError::NoSpace(format!(
        "requested {} but the node has {} free for volumes",
        format_size(size),
        format_size(free)
    ))
}

/// A volume the node cannot grow: to what, what it lacks, and what is free.
pub fn no_room_to_grow(size: u64, missing: u64, free: u64) -> driver::DriverError {
    driver::DriverError::NoSpace(format!(
        "growing to {} needs {} more but the node has {} free for volumes",
        format_size(size),
        format_size(missing),
        format_size(free)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_quantities() {
        assert_eq!(format_size(1 << 30), "1Gi");
        assert_eq!(format_size(64 << 20), "64Mi");
        assert_eq!(format_size(1536 << 20), "1.5Gi");
        assert_eq!(format_size(100), "100");
    }
}

//! What every [`VolumeDriver`] must do, as cases any driver can be run
//! through: the in-memory [`FakeDriver`](crate::fake::FakeDriver) in
//! `cargo test`, the loop-device driver as root (tier 2). A case returns
//! what went wrong instead of panicking, so the caller names the driver.

use crate::driver::{DriverError, VolumeDriver};
use crate::mounts::Mounts;

/// A case: its name, and the check, given a driver with no volumes.
pub type Case = (&'static str, fn(&dyn VolumeDriver) -> Result<(), String>);

pub const CASES: &[Case] = &[
    (
        "a created volume is listed with at least its size, and creating it again changes nothing",
        created_is_listed_and_create_is_idempotent,
    ),
    (
        "a volume larger than the free space is refused and nothing is left",
        too_big_is_refused_and_leaves_nothing,
    ),
    (
        "staging is idempotent and a staged volume holds its size",
        stage_is_idempotent_and_holds_the_size,
    ),
    (
        "data survives unstaging and staging again",
        data_survives_unstage,
    ),
    (
        "a staged volume grows and keeps its data",
        expand_grows_and_keeps_data,
    ),
    (
        "unstage and delete are idempotent, and a deleted volume is gone",
        unstage_and_delete_are_idempotent,
    ),
];

/// Runs every case on fresh drivers from `make`; returns the failures.
pub fn run(make: &dyn Fn(&str) -> Box<dyn VolumeDriver>) -> Vec<String> {
    CASES
        .iter()
        .filter_map(|(name, case)| {
            let driver = make(name);
            case(driver.as_ref()).err().map(|e| format!("{name}: {e}"))
        })
        .collect()
}

const MIB: u64 = 1 << 20;

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn e(err: DriverError) -> String {
    err.to_string()
}

fn created_is_listed_and_create_is_idempotent(d: &dyn VolumeDriver) -> Result<(), String> {
    let size = d.create("vol-a", 20 * MIB).map_err(e)?;
    check(size >= 20 * MIB, || format!("capacity {size} < 20 MiB"))?;
    let again = d.create("vol-a", 20 * MIB).map_err(e)?;
    check(again == size, || {
        format!("second create: {again} != {size}")
    })?;
    let listed = d.list().map_err(e)?;
    check(
        listed.len() == 1 && listed[0].0 == "vol-a" && listed[0].1 >= 20 * MIB,
        || format!("listed {listed:?}"),
    )
}

fn too_big_is_refused_and_leaves_nothing(d: &dyn VolumeDriver) -> Result<(), String> {
    let free = d.free_bytes().map_err(e)?;
    match d.create("vol-big", free + 1024 * MIB) {
        Err(DriverError::NoSpace(_)) => {}
        other => return Err(format!("expected NoSpace, got {other:?}")),
    }
    let listed = d.list().map_err(e)?;
    check(listed.is_empty(), || format!("left behind: {listed:?}"))
}

fn stage_is_idempotent_and_holds_the_size(d: &dyn VolumeDriver) -> Result<(), String> {
    d.create("vol-s", 16 * MIB).map_err(e)?;
    let at = d.stage("vol-s").map_err(e)?;
    let again = d.stage("vol-s").map_err(e)?;
    check(at == again, || format!("staged at {at:?}, then {again:?}"))?;
    let stats = d.stats("vol-s").map_err(e)?;
    check(
        stats.available_bytes + stats.used_bytes >= 16 * MIB
            && stats.available_bytes <= stats.capacity_bytes,
        || format!("stats {stats:?} for a 16 MiB volume"),
    )?;
    d.unstage("vol-s").map_err(e)?;
    check(d.stats("vol-s").is_err(), || {
        "an unstaged volume has stats".into()
    })
}

fn data_survives_unstage(d: &dyn VolumeDriver) -> Result<(), String> {
    d.create("vol-d", 16 * MIB).map_err(e)?;
    let at = d.stage("vol-d").map_err(e)?;
    std::fs::write(at.join("kept"), b"data").map_err(|err| err.to_string())?;
    d.unstage("vol-d").map_err(e)?;
    let at = d.stage("vol-d").map_err(e)?;
    let read = std::fs::read(at.join("kept")).map_err(|err| err.to_string())?;
    check(read == b"data", || format!("read back {read:?}"))?;
    d.unstage("vol-d").map_err(e)
}

fn expand_grows_and_keeps_data(d: &dyn VolumeDriver) -> Result<(), String> {
    d.create("vol-x", 16 * MIB).map_err(e)?;
    let at = d.stage("vol-x").map_err(e)?;
    std::fs::write(at.join("kept"), b"data").map_err(|err| err.to_string())?;
    let grown = d.expand("vol-x", 40 * MIB).map_err(e)?;
    check(grown >= 40 * MIB, || format!("grew to {grown}"))?;
    let stats = d.stats("vol-x").map_err(e)?;
    check(stats.available_bytes + stats.used_bytes >= 40 * MIB, || {
        format!("stats after growing to 40 MiB: {stats:?}")
    })?;
    let read = std::fs::read(at.join("kept")).map_err(|err| err.to_string())?;
    check(read == b"data", || format!("read back {read:?}"))?;
    d.unstage("vol-x").map_err(e)
}

fn unstage_and_delete_are_idempotent(d: &dyn VolumeDriver) -> Result<(), String> {
    d.create("vol-g", 16 * MIB).map_err(e)?;
    d.stage("vol-g").map_err(e)?;
    d.unstage("vol-g").map_err(e)?;
    d.unstage("vol-g").map_err(e)?;
    d.delete("vol-g").map_err(e)?;
    d.delete("vol-g").map_err(e)?;
    let listed = d.list().map_err(e)?;
    check(listed.is_empty(), || format!("still listed: {listed:?}"))?;
    match d.stage("vol-g") {
        Err(DriverError::NotFound(_)) => Ok(()),
        other => Err(format!("staging a deleted volume: {other:?}")),
    }
}

/// A mount case: its name, and the check, given the mount table and an
/// empty scratch directory nothing is mounted under.
pub type MountCase = (
    &'static str,
    fn(&dyn Mounts, &std::path::Path) -> Result<(), String>,
);

pub const MOUNT_CASES: &[MountCase] = &[
    (
        "a bind shows its source at the target, writes land in the source, and unmounting shows what was under it",
        bind_shows_the_source,
    ),
    (
        "a tmpfs has its size, keeps its files when resized, and they go when it is unmounted",
        tmpfs_is_sized_and_private,
    ),
    (
        "binding an open descriptor binds the file it refers to",
        bind_fd_binds_the_file,
    ),
    (
        "everything mounted below a directory is unmounted, nested and stacked mounts too",
        unmount_below_takes_everything,
    ),
];

/// Runs every mount case in its own directory under `scratch`; returns the
/// failures. Whatever a case leaves mounted is unmounted after it.
pub fn run_mounts(m: &dyn Mounts, scratch: &std::path::Path) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, (name, case)) in MOUNT_CASES.iter().enumerate() {
        let dir = scratch.join(format!("case-{i}"));
        let outcome = std::fs::create_dir_all(&dir)
            .map_err(|e| format!("scratch {}: {e}", dir.display()))
            .and_then(|()| case(m, &dir));
        let _ = m.unmount_below(&dir);
        if let Err(e) = outcome {
            failures.push(format!("{name}: {e}"));
        }
    }
    failures
}

fn io_e(e: std::io::Error) -> String {
    e.to_string()
}

fn bind_shows_the_source(m: &dyn Mounts, dir: &std::path::Path) -> Result<(), String> {
    let (source, target) = (dir.join("source"), dir.join("target"));
    std::fs::create_dir_all(&source).map_err(io_e)?;
    std::fs::create_dir_all(&target).map_err(io_e)?;
    std::fs::write(source.join("a"), "from the source").map_err(io_e)?;
    std::fs::write(target.join("under"), "hidden").map_err(io_e)?;
    check(!m.is_mount_point(&target), || {
        "a plain directory is a mount point".into()
    })?;
    m.bind(&source, &target).map_err(|e| format!("bind: {e}"))?;
    check(m.is_mount_point(&target), || {
        "not a mount point after bind".into()
    })?;
    let seen = std::fs::read_to_string(target.join("a")).map_err(io_e)?;
    check(seen == "from the source", || format!("read {seen:?}"))?;
    check(!target.join("under").exists(), || {
        "the target's own file shows through".into()
    })?;
    std::fs::write(target.join("b"), "through the mount").map_err(io_e)?;
    check(source.join("b").is_file(), || {
        "a write did not land in the source".into()
    })?;
    m.unmount(&target).map_err(|e| format!("unmount: {e}"))?;
    check(!m.is_mount_point(&target), || "still a mount point".into())?;
    check(
        target.join("under").is_file() && !target.join("a").exists(),
        || "the target's own files are not back".into(),
    )?;
    m.unmount(&target)
        .map_err(|e| format!("a second unmount: {e}"))
}

fn tmpfs_is_sized_and_private(m: &dyn Mounts, dir: &std::path::Path) -> Result<(), String> {
    let target = dir.join("tmp");
    std::fs::create_dir_all(&target).map_err(io_e)?;
    m.mount_tmpfs(&target, Some(MIB), 0o755)
        .map_err(|e| format!("mount: {e}"))?;
    check(m.is_mount_point(&target), || "not a mount point".into())?;
    let (total, free) = m.fs_size(&target).map_err(io_e)?;
    check(total == MIB && free <= total, || {
        format!("size {total}, free {free}")
    })?;
    std::fs::write(target.join("f"), vec![7u8; 4096]).map_err(io_e)?;
    let (_, after) = m.fs_size(&target).map_err(io_e)?;
    check(after < free, || {
        format!("free {free} → {after} after a write")
    })?;
    m.resize_tmpfs(&target, 2 * MIB)
        .map_err(|e| format!("resize: {e}"))?;
    let (grown, _) = m.fs_size(&target).map_err(io_e)?;
    check(grown == 2 * MIB, || format!("resized to {grown}"))?;
    check(target.join("f").is_file(), || "a resize lost a file".into())?;
    m.unmount(&target).map_err(|e| format!("unmount: {e}"))?;
    check(!target.join("f").exists(), || {
        "a tmpfs file outlived its mount".into()
    })?;
    check(m.resize_tmpfs(&target, MIB).is_err(), || {
        "resized a tmpfs that is not there".into()
    })
}

fn bind_fd_binds_the_file(m: &dyn Mounts, dir: &std::path::Path) -> Result<(), String> {
    let (source, target) = (dir.join("config"), dir.join("staged"));
    std::fs::write(&source, "key=value").map_err(io_e)?;
    std::fs::write(&target, "").map_err(io_e)?;
    let fd = nix::fcntl::open(
        &source,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open: {e}"))?;
    use std::os::fd::AsFd;
    m.bind_fd(fd.as_fd(), &target)
        .map_err(|e| format!("bind_fd: {e}"))?;
    drop(fd);
    let seen = std::fs::read_to_string(&target).map_err(io_e)?;
    check(seen == "key=value", || format!("read {seen:?}"))?;
    m.unmount(&target).map_err(|e| format!("unmount: {e}"))?;
    let empty = std::fs::read_to_string(&target).map_err(io_e)?;
    check(empty.is_empty(), || format!("after unmount: {empty:?}"))
}

fn unmount_below_takes_everything(m: &dyn Mounts, dir: &std::path::Path) -> Result<(), String> {
    let (outer, source) = (dir.join("pod"), dir.join("volume"));
    std::fs::create_dir_all(&outer).map_err(io_e)?;
    std::fs::create_dir_all(&source).map_err(io_e)?;
    m.mount_tmpfs(&outer, Some(MIB), 0o755)
        .map_err(|e| format!("tmpfs: {e}"))?;
    let inner = outer.join("data");
    std::fs::create_dir_all(&inner).map_err(io_e)?;
    m.bind(&source, &inner)
        .map_err(|e| format!("nested bind: {e}"))?;
    m.mount_tmpfs(&inner, Some(MIB), 0o755)
        .map_err(|e| format!("stacked tmpfs: {e}"))?;
    m.unmount_below(dir).map_err(io_e)?;
    check(
        !m.is_mount_point(&outer) && !m.is_mount_point(&inner),
        || "something is still mounted".into(),
    )?;
    std::fs::remove_dir(&outer).map_err(|e| format!("the emptied mount point: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fake_mounts_keep_the_mount_contract() {
        let root = std::env::temp_dir().join(format!("berth-fake-mounts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mounts = crate::fake::FakeMounts::new(root.join("stash"));
        let failures = super::run_mounts(&mounts, &root.join("cases"));
        let _ = std::fs::remove_dir_all(&root);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_fake_driver_keeps_the_driver_contract() {
        let root = std::env::temp_dir().join(format!("berth-fake-driver-{}", std::process::id()));
        let failures = super::run(&|case| {
            let dir = root.join(case.replace(' ', "-"));
            let _ = std::fs::remove_dir_all(&dir);
            Box::new(crate::fake::FakeDriver::new(dir, 1 << 30))
        });
        let _ = std::fs::remove_dir_all(&root);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

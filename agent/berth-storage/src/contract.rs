//! What every [`VolumeDriver`] must do, as cases any driver can be run
//! through: the in-memory [`FakeDriver`](crate::fake::FakeDriver) in
//! `cargo test`, the loop-device driver as root (tier 2). A case returns
//! what went wrong instead of panicking, so the caller names the driver.

use crate::driver::{DriverError, VolumeDriver};

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

#[cfg(test)]
mod tests {
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

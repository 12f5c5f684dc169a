//! Privileged tests (root): real loop devices, ext4, tmpfs and bind mounts,
//! each in a scratch directory of its own. `scripts/test.sh` runs them in
//! tier 2 with `--ignored`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_plan::volumes::{
    HostPathType, PodVolume, ProjectedFile, Sensitive, SubPathBind, VolumeSource,
};
use berth_storage::driver::{DriverError, VolumeDriver};
use berth_storage::loopfs::LoopDriver;
use berth_storage::{mounts, podvol};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/var/tmp/berth-storage-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let driver = LoopDriver::new(self.0.join("storage"));
        for (v, _) in driver.list().unwrap_or_default() {
            let _ = driver.delete(&v);
        }
        let _ = mounts::unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(driver: &LoopDriver) -> Vec<String> {
    driver.list().unwrap().into_iter().map(|(n, _)| n).collect()
}

/// Writes 1 MiB blocks until the filesystem refuses; returns bytes written
/// and the error that stopped it.
fn fill(path: &Path, limit_mib: usize) -> (u64, std::io::Error) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    for _ in 0..limit_mib {
        if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
            return (written, e);
        }
        written += block.len() as u64;
    }
    panic!("{} took {limit_mib} MiB without refusing", path.display());
}

#[test]
#[ignore = "privileged: loop devices, mkfs.ext4 and mounts (root)"]
fn a_provisioned_volume_holds_its_size_and_keeps_its_data() {
    let scratch = Scratch::new("loop");
    let driver = LoopDriver::new(scratch.0.join("storage"));
    let size = driver.create("pvc_t_a_0", 32 << 20).expect("create");
    assert_eq!(size, 32 << 20);
    // Asked again (as after a crash): the same volume, not a second one.
    assert_eq!(driver.create("pvc_t_a_0", 32 << 20).unwrap(), 32 << 20);
    driver.create("pvc_t_b_0", 16 << 20).expect("create b");
    assert_eq!(names(&driver), ["pvc_t_a_0", "pvc_t_b_0"]);

    let a = driver.stage("pvc_t_a_0").expect("stage");
    assert_eq!(
        driver.stage("pvc_t_a_0").unwrap(),
        a,
        "staging twice is one mount"
    );
    let b = driver.stage("pvc_t_b_0").expect("stage b");
    std::fs::write(b.join("keep"), b"other volume").unwrap();

    let (written, err) = fill(&a.join("big"), 64);
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC, not {err}");
    assert!(
        ((32 << 20)..=(36 << 20)).contains(&written),
        "wrote {written} bytes into a 32 MiB volume: all it asked for, and little more"
    );
    // The other volume and the data partition are untouched.
    assert_eq!(std::fs::read(b.join("keep")).unwrap(), b"other volume");
    std::fs::write(b.join("more"), vec![1u8; 1 << 20]).expect("volume b still has room");
    std::fs::write(scratch.0.join("outside"), b"x").expect("the partition still has room");

    let stats = driver.stats("pvc_t_a_0").unwrap();
    assert!(stats.used_bytes >= written, "{stats:?}");
    std::fs::remove_file(a.join("big")).unwrap();
    std::fs::write(a.join("keep-me"), b"survives").unwrap();

    // Online growth needs CAP_SYS_RESOURCE, which this sandbox withholds
    // from root; the QEMU tier grows a claim on a real node.
    // Unstage and stage again (a reboot): the data is still there.
    driver.unstage("pvc_t_a_0").unwrap();
    assert!(!mounts::is_mount_point(&a));
    let again = driver.stage("pvc_t_a_0").unwrap();
    assert_eq!(std::fs::read(again.join("keep-me")).unwrap(), b"survives");

    driver.delete("pvc_t_a_0").unwrap();
    assert!(!driver.image("pvc_t_a_0").exists());
    assert_eq!(names(&driver), ["pvc_t_b_0"]);
    driver.delete("pvc_t_a_0").expect("deleting twice is fine");
}

#[test]
#[ignore = "privileged: loop devices, mkfs.ext4 and mounts (root)"]
fn too_big_a_claim_leaves_nothing_behind_and_a_half_made_image_is_made_again() {
    let scratch = Scratch::new("space");
    let driver = LoopDriver::new(scratch.0.join("storage"));
    let free = driver.free_bytes().unwrap();
    match driver.create("pvc_t_huge_0", free + (1 << 30)) {
        Err(DriverError::NoSpace(m)) => assert!(m.contains("free for volumes"), "{m}"),
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(names(&driver).is_empty());
    assert!(
        std::fs::read_dir(scratch.0.join("storage/images"))
            .unwrap()
            .next()
            .is_none()
    );

    // A crash during mkfs leaves `<name>.img.new`; the next create starts over.
    std::fs::write(driver.image("pvc_t_c_0").with_extension("img.new"), b"torn").unwrap();
    driver.create("pvc_t_c_0", 16 << 20).unwrap();
    let staged = driver.stage("pvc_t_c_0").expect("a clean filesystem");
    assert!(staged.join("lost+found").is_dir());
    assert!(!driver.image("pvc_t_c_0").with_extension("img.new").exists());
}

fn sub(volume: &str, sub_path: &str, stage: &Path, create: bool) -> SubPathBind {
    SubPathBind {
        volume: volume.into(),
        sub_path: sub_path.into(),
        stage: stage.display().to_string(),
        create,
    }
}

#[test]
#[ignore = "privileged: bind mounts (root)"]
fn sub_paths_stay_inside_their_volume_even_through_planted_symlinks() {
    let scratch = Scratch::new("subpath");
    let volume = scratch.0.join("vol");
    std::fs::create_dir_all(volume.join("app/conf")).unwrap();
    std::fs::write(volume.join("app/conf/a.txt"), b"inside").unwrap();
    let secret_dir = scratch.0.join("host-secret");
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("key"), b"host only").unwrap();
    // What a pod could plant in its own volume.
    std::os::unix::fs::symlink(&secret_dir, volume.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../host-secret", volume.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("app/conf", volume.join("inner-link")).unwrap();

    let stages = scratch.0.join("stages");
    for (i, bad) in ["abs-link", "rel-link", "rel-link/key", "abs-link/new/dir"]
        .iter()
        .enumerate()
    {
        let err = podvol::stage_sub_path(
            &volume,
            &sub("data", bad, &stages.join(i.to_string()), true),
            &mounts::KernelMounts,
        )
        .expect_err(bad)
        .to_string();
        assert!(err.contains("leads outside the volume"), "{bad}: {err}");
        assert!(!mounts::is_mount_point(&stages.join(i.to_string())));
    }
    assert!(!secret_dir.join("new").exists(), "nothing was made outside");

    // A symlink that stays inside is followed, like any path in the volume.
    let ok = stages.join("ok");
    podvol::stage_sub_path(
        &volume,
        &sub("data", "inner-link", &ok, false),
        &mounts::KernelMounts,
    )
    .unwrap();
    assert_eq!(std::fs::read(ok.join("a.txt")).unwrap(), b"inside");
    // A file subPath, and a missing directory made inside.
    let file = stages.join("file");
    podvol::stage_sub_path(
        &volume,
        &sub("data", "app/conf/a.txt", &file, false),
        &mounts::KernelMounts,
    )
    .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"inside");
    let made = stages.join("made");
    podvol::stage_sub_path(
        &volume,
        &sub("data", "new/deeper", &made, true),
        &mounts::KernelMounts,
    )
    .unwrap();
    assert!(volume.join("new/deeper").is_dir());
    std::fs::write(made.join("x"), b"1").unwrap();
    assert_eq!(std::fs::read(volume.join("new/deeper/x")).unwrap(), b"1");
}

fn files(pairs: &[(&str, &str, u32)]) -> Vec<ProjectedFile> {
    pairs
        .iter()
        .map(|(p, d, m)| ProjectedFile {
            path: (*p).into(),
            mode: *m,
            data: Sensitive(d.as_bytes().to_vec()),
        })
        .collect()
}

#[test]
#[ignore = "privileged: tmpfs mounts (root)"]
fn config_files_are_swapped_whole_on_tmpfs_and_memory_volumes_are_sized() {
    let scratch = Scratch::new("files");
    let dir = scratch.0.join("cfg");
    let volume = PodVolume {
        name: "cfg".into(),
        source: VolumeSource::Files {
            files: files(&[("token", "v1", 0o400), ("conf/app.yaml", "a: 1", 0o644)]),
            secret: true,
        },
        host_path: dir.display().to_string(),
    };
    podvol::prepare(&volume, &[], &mounts::KernelMounts).unwrap();
    assert!(
        mounts::is_mount_point(&dir),
        "secret files live on their own tmpfs"
    );
    assert_eq!(std::fs::read_to_string(dir.join("token")).unwrap(), "v1");
    assert_eq!(
        std::fs::metadata(dir.join("token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o400
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("conf/app.yaml")).unwrap(),
        "a: 1"
    );
    // Unchanged content: nothing is rewritten.
    assert!(
        !podvol::write_projected(
            &dir,
            &files(&[("token", "v1", 0o400), ("conf/app.yaml", "a: 1", 0o644)])
        )
        .unwrap()
    );
    // A new version: one switch of ..data; the removed name disappears.
    let before = std::fs::read_link(dir.join("..data")).unwrap();
    assert!(podvol::write_projected(&dir, &files(&[("token", "v2", 0o400)])).unwrap());
    assert_ne!(std::fs::read_link(dir.join("..data")).unwrap(), before);
    assert_eq!(std::fs::read_to_string(dir.join("token")).unwrap(), "v2");
    assert!(!dir.join("conf").exists());
    assert!(!dir.join(&before).exists(), "the old version is removed");

    let mem = scratch.0.join("mem");
    let memory = PodVolume {
        name: "mem".into(),
        source: VolumeSource::EmptyDir {
            memory: true,
            size_bytes: Some(4 << 20),
        },
        host_path: mem.display().to_string(),
    };
    podvol::prepare(&memory, &[], &mounts::KernelMounts).unwrap();
    let (written, err) = fill(&mem.join("fill"), 16);
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    assert!(written <= 4 << 20, "{written}");
}

#[test]
#[ignore = "privileged: checks paths as root"]
fn host_paths_are_checked_where_they_really_lead() {
    let scratch = Scratch::new("hostpath");
    let allowed = scratch.0.join("srv");
    std::fs::create_dir_all(&allowed).unwrap();
    std::os::unix::fs::symlink("/etc", allowed.join("etc-link")).unwrap();
    let prefixes = [allowed.display().to_string()];
    let vol = |path: PathBuf, kind| PodVolume {
        name: "h".into(),
        source: VolumeSource::HostPath { kind },
        host_path: path.display().to_string(),
    };
    let err = podvol::prepare(
        &vol(allowed.join("etc-link"), HostPathType::Any),
        &prefixes,
        &mounts::KernelMounts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("outside the prefixes"), "{err}");
    podvol::prepare(
        &vol(allowed.join("made/here"), HostPathType::DirectoryOrCreate),
        &prefixes,
        &mounts::KernelMounts,
    )
    .unwrap();
    assert!(allowed.join("made/here").is_dir());
    let err = podvol::prepare(
        &vol(allowed.join("made"), HostPathType::File),
        &prefixes,
        &mounts::KernelMounts,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is not a file"), "{err}");
}

/// The same cases the in-memory driver passes in `cargo test`, on real loop
/// devices and ext4, so the fake cannot drift from the real driver. All but
/// one: growing a mounted ext4 needs `CAP_SYS_RESOURCE`, which the build
/// machines' sandbox withholds even from root (`resize2fs` says "Permission
/// denied"); the QEMU storage scenario runs every case, that one included,
/// on the appliance (`berth storage-contract`).
#[test]
#[ignore = "privileged: loop devices, mkfs.ext4 and mounts (root)"]
fn the_loop_driver_keeps_the_driver_contract() {
    const NEEDS_CAP_SYS_RESOURCE: &str = "a staged volume grows and keeps its data";
    let scratch = Scratch::new("contract");
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, case) in berth_storage::contract::CASES {
        if *name == NEEDS_CAP_SYS_RESOURCE {
            continue;
        }
        let driver = LoopDriver::new(scratch.0.join(name.replace(' ', "-")));
        if let Err(e) = case(&driver) {
            failures.push(format!("{name}: {e}"));
        }
        for (v, _) in driver.list().unwrap_or_default() {
            let _ = driver.delete(&v);
        }
        ran += 1;
    }
    assert_eq!(ran, berth_storage::contract::CASES.len() - 1);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mount cases the fake mount table passes in `cargo test`, on the
/// kernel's: so the storage pass's tier-1 tests (on the fake) mean what
/// they say about real mounts.
#[test]
#[ignore = "privileged: tmpfs and bind mounts (root)"]
fn the_kernel_mounts_keep_the_mount_contract() {
    let scratch = Scratch::new("mount-contract");
    assert!(!berth_storage::contract::MOUNT_CASES.is_empty());
    let failures = berth_storage::contract::run_mounts(&mounts::KernelMounts, &scratch.0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

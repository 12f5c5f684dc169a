//! A pod's own volumes on the node, made ready before its containers start.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_plan::volumes::{
    HostPathType, PodVolume, ProjectedFile, SubPathBind, VolumeSource, under_prefix,
};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag};

use crate::mounts;

/// tmpfs size of a ConfigMap or Secret volume: room for its files and
/// their next version side by side during a swap.
fn files_tmpfs_size(files: &[ProjectedFile]) -> u64 {
    let bytes: u64 = files.iter().map(|f| f.data.0.len() as u64 + 4096).sum();
    (bytes * 2 + (1 << 20)).div_ceil(4096) * 4096
}

/// Makes one volume ready at its host path. `claim_ready` is checked for
/// claims, which the storage pass publishes before pods are prepared.
pub fn prepare(volume: &PodVolume, host_path_prefixes: &[String]) -> Result<(), String> {
    let path = Path::new(&volume.host_path);
    match &volume.source {
        VolumeSource::EmptyDir { memory, size_bytes } => {
            make_dir(path, 0o777)?;
            if *memory && !mounts::is_mount_point(path) {
                mounts::mount_tmpfs(path, *size_bytes, 0o777)
                    .map_err(|e| format!("mounting a tmpfs at {}: {e}", path.display()))?;
            }
            Ok(())
        }
        VolumeSource::Files { files, .. } => {
            make_dir(path, 0o755)?;
            if !mounts::is_mount_point(path) {
                // Secrets never touch a disk, whatever is under /run.
                mounts::mount_tmpfs(path, Some(files_tmpfs_size(files)), 0o755)
                    .map_err(|e| format!("mounting a tmpfs at {}: {e}", path.display()))?;
            } else if let Ok((total, _)) = mounts::fs_size(path)
                && total < files_tmpfs_size(files)
            {
                remount_size(path, files_tmpfs_size(files))?;
            }
            write_projected(path, files).map(|_| ())
        }
        VolumeSource::HostPath { kind } => host_path(path, *kind, host_path_prefixes),
        VolumeSource::Claim { claim, .. } => {
            if mounts::is_mount_point(path) {
                Ok(())
            } else {
                Err(format!("claim {claim} has no volume mounted yet"))
            }
        }
    }
}

fn remount_size(path: &Path, size: u64) -> Result<(), String> {
    nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV,
        Some(format!("size={size}").as_str()),
    )
    .map_err(|e| format!("resizing the tmpfs at {}: {e}", path.display()))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), String> {
    if !path.is_dir() {
        std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("setting the mode of {}: {e}", path.display()))?;
    }
    Ok(())
}

fn host_path(path: &Path, kind: HostPathType, prefixes: &[String]) -> Result<(), String> {
    let shown = path.display();
    match kind {
        HostPathType::DirectoryOrCreate if !path.exists() => {
            std::fs::create_dir_all(path).map_err(|e| format!("creating {shown}: {e}"))?;
        }
        HostPathType::FileOrCreate if !path.exists() => {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("creating {shown}: {e}"))?;
        }
        _ => {}
    }
    // A symlink under an allowed prefix must not lead out of it.
    let real = std::fs::canonicalize(path).map_err(|e| format!("hostPath {shown}: {e}"))?;
    let real_text = real.to_string_lossy();
    if !prefixes.iter().any(|p| under_prefix(&real_text, p)) {
        return Err(format!(
            "hostPath {shown} resolves to {real_text}, outside the prefixes this node allows ({})",
            prefixes.join(", ")
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("hostPath {shown}: {e}"))?;
    let ft = meta.file_type();
    let (ok, want) = match kind {
        HostPathType::Any => (true, ""),
        HostPathType::Directory | HostPathType::DirectoryOrCreate => (ft.is_dir(), "a directory"),
        HostPathType::File | HostPathType::FileOrCreate => (ft.is_file(), "a file"),
        HostPathType::Socket => (ft.is_socket(), "a socket"),
        HostPathType::CharDevice => (ft.is_char_device(), "a character device"),
        HostPathType::BlockDevice => (ft.is_block_device(), "a block device"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("hostPath {shown} is not {want}"))
    }
}

/// Writes a ConfigMap or Secret volume the way the kubelet does, so a
/// reader never sees half an update: the files go into a new hidden
/// directory, `..data` is switched to it with one rename, and each
/// top-level name is a symlink through `..data`. Returns whether anything
/// changed.
pub fn write_projected(dir: &Path, files: &[ProjectedFile]) -> Result<bool, String> {
    let data_link = dir.join("..data");
    if let Ok(current) = std::fs::read_link(&data_link)
        && same_content(&dir.join(&current), files)
    {
        return Ok(false);
    }
    let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let new_dir = dir.join(&stamp);
    std::fs::create_dir(&new_dir).map_err(|e| err("creating", &new_dir, e))?;
    std::fs::set_permissions(&new_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| err("setting the mode of", &new_dir, e))?;
    for f in files {
        let target = new_dir.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err("creating", parent, e))?;
        }
        std::fs::write(&target, &f.data.0).map_err(|e| err("writing", &target, e))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(f.mode))
            .map_err(|e| err("setting the mode of", &target, e))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(|e| err("linking", &tmp_link, e))?;
    let old = std::fs::read_link(&data_link).ok();
    std::fs::rename(&tmp_link, &data_link).map_err(|e| err("switching", &data_link, e))?;
    // Top-level names through ..data; names no longer present are removed.
    let top: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.path.split('/').next().map(str::to_string))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(&format!("..data/{name}"))) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)
                .map_err(|e| err("linking", &link, e))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !top.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

fn same_content(current: &Path, files: &[ProjectedFile]) -> bool {
    let mut count = 0usize;
    let walk_ok = count_files(current, &mut count).is_ok();
    walk_ok
        && count == files.len()
        && files.iter().all(|f| {
            let p = current.join(&f.path);
            std::fs::read(&p).is_ok_and(|d| d == f.data.0)
                && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == f.mode)
        })
}

fn count_files(dir: &Path, count: &mut usize) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            count_files(&e.path(), count)?;
        } else {
            *count += 1;
        }
    }
    Ok(())
}

fn open_beneath(root: &OwnedFd, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    openat2(
        root,
        path,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )
}

/// Stages a `subPath`: resolved inside the volume by the kernel
/// (`openat2` with `RESOLVE_BENEATH`, so no `..` or symlink can lead out,
/// even one the pod planted), then bound from the open descriptor, so
/// nothing can swap the path between the check and the mount.
pub fn stage_sub_path(volume_root: &Path, bind: &SubPathBind) -> Result<(), String> {
    let stage = PathBuf::from(&bind.stage);
    if mounts::is_mount_point(&stage) {
        return Ok(());
    }
    let root = nix::fcntl::open(
        volume_root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening volume {}: {e}", volume_root.display()))?;
    let escape = |e: Errno| match e {
        Errno::EXDEV | Errno::ELOOP => format!(
            "subPath {:?} of volume {} leads outside the volume; refused",
            bind.sub_path, bind.volume
        ),
        other => format!(
            "subPath {:?} of volume {}: {other}",
            bind.sub_path, bind.volume
        ),
    };
    let target = match open_beneath(&root, &bind.sub_path, OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if bind.create => {
            // Made one component at a time, each beneath the root.
            let mut made = String::new();
            for part in bind.sub_path.split('/').filter(|p| !p.is_empty()) {
                let parent = if made.is_empty() {
                    ".".to_string()
                } else {
                    made.clone()
                };
                let dirfd = open_beneath(&root, &parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .map_err(escape)?;
                match nix::sys::stat::mkdirat(&dirfd, part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(escape(e)),
                }
                made = if made.is_empty() {
                    part.to_string()
                } else {
                    format!("{made}/{part}")
                };
            }
            open_beneath(&root, &bind.sub_path, OFlag::O_PATH).map_err(escape)?
        }
        Err(e) => return Err(escape(e)),
    };
    let is_dir = nix::sys::stat::fstat(&target)
        .map(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
        .map_err(|e| format!("subPath {:?}: {e}", bind.sub_path))?;
    if let Some(parent) = stage.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    if is_dir {
        std::fs::create_dir_all(&stage)
            .map_err(|e| format!("creating {}: {e}", stage.display()))?;
    } else if !stage.exists() {
        std::fs::write(&stage, b"").map_err(|e| format!("creating {}: {e}", stage.display()))?;
    }
    mounts::bind_fd(&target, &stage).map_err(|e| {
        format!(
            "binding subPath {:?} at {}: {e}",
            bind.sub_path,
            stage.display()
        )
    })
}

/// Removes what a pod's volumes left on the node: staged subPaths, tmpfs
/// mounts and disk `emptyDir`s (their data ends with the pod, as in
/// Kubernetes). `key` is `<namespace>_<pod>`.
pub fn remove_pod(dirs: &berth_plan::volumes::VolumeDirs, key: &str) -> Result<(), String> {
    for base in [&dirs.sub_path_dir, &dirs.run_dir, &dirs.disk_dir] {
        let dir = Path::new(base).join(key);
        if !dir.exists() {
            continue;
        }
        mounts::unmount_below(&dir)
            .map_err(|e| format!("unmounting below {}: {e}", dir.display()))?;
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// `<namespace>_<pod>` keys that have volume directories on the node.
pub fn pods_on_disk(dirs: &berth_plan::volumes::VolumeDirs) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for base in [&dirs.sub_path_dir, &dirs.run_dir, &dirs.disk_dir] {
        if let Ok(entries) = std::fs::read_dir(base) {
            keys.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    keys
}

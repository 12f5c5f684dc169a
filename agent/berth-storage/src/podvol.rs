//! A pod's own volumes on the node, made ready before its containers start.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_plan::volumes::{
    HostPathType, PodVolume, ProjectedFile, SubPathBind, VolumeSource, under_prefix,
};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag};

use crate::mounts::Mounts;

/// Why a pod's volume could not be made ready; the pod shows `FailedMount`
/// with this message.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file or directory could not be made, written or removed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A mount, remount, bind or unmount failed.
    #[error("{what} {}: {source}", path.display())]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// The claim's volume is not published yet: the pod waits for it.
    #[error("claim {0} has no volume mounted yet")]
    ClaimNotReady(String),
    /// A `hostPath` that leads outside what the node allows.
    #[error("hostPath {} resolves to {real}, outside the prefixes this node allows ({allowed})", path.display())]
    HostPathOutside {
        path: PathBuf,
        real: String,
        allowed: String,
    },
    /// A `hostPath` of the wrong type.
    #[error("hostPath {} is not {want}", path.display())]
    HostPathType { path: PathBuf, want: &'static str },
    /// A `subPath` whose resolution leaves its volume (`..`, a symlink).
    #[error("subPath {sub_path:?} of volume {volume} leads outside the volume; refused")]
    Escape { sub_path: String, volume: String },
    /// A `subPath` that could not be resolved for another reason.
    #[error("subPath {sub_path:?} of volume {volume}: {source}")]
    SubPath {
        sub_path: String,
        volume: String,
        #[source]
        source: Errno,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

fn mount(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Mount { what, path, source }
}

/// tmpfs size of a ConfigMap or Secret volume: room for its files and
/// their next version side by side during a swap.
fn files_tmpfs_size(files: &[ProjectedFile]) -> u64 {
    let bytes: u64 = files.iter().map(|f| f.data.0.len() as u64 + 4096).sum();
    (bytes * 2 + (1 << 20)).div_ceil(4096) * 4096
}

/// Makes one volume ready at its host path. `claim_ready` is checked for
/// claims, which the storage pass publishes before pods are prepared.
pub fn prepare(
    volume: &PodVolume,
    host_path_prefixes: &[String],
    mounts: &dyn Mounts,
) -> Result<(), VolumeError> {
    let path = Path::new(&volume.host_path);
    match &volume.source {
        VolumeSource::EmptyDir { memory, size_bytes } => {
            make_dir(path, 0o777)?;
            if *memory && !mounts.is_mount_point(path) {
                mounts
                    .mount_tmpfs(path, *size_bytes, 0o777)
                    .map_err(mount("mounting a tmpfs at", path))?;
            }
            Ok(())
        }
        VolumeSource::Files { files, .. } => {
            make_dir(path, 0o755)?;
            if !mounts.is_mount_point(path) {
                // Secrets never touch a disk, whatever is under /run.
                mounts
                    .mount_tmpfs(path, Some(files_tmpfs_size(files)), 0o755)
                    .map_err(mount("mounting a tmpfs at", path))?;
            } else if let Ok((total, _)) = mounts.fs_size(path)
                && total < files_tmpfs_size(files)
            {
                mounts
                    .resize_tmpfs(path, files_tmpfs_size(files))
                    .map_err(mount("resizing the tmpfs at", path))?;
            }
            write_projected(path, files).map(|_| ())
        }
        VolumeSource::HostPath { kind } => host_path(path, *kind, host_path_prefixes),
        VolumeSource::Claim { claim, .. } => {
            if mounts.is_mount_point(path) {
                Ok(())
            } else {
                Err(VolumeError::ClaimNotReady(claim.to_string()))
            }
        }
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), VolumeError> {
    if !path.is_dir() {
        std::fs::create_dir_all(path).map_err(io("creating", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode of", path))?;
    }
    Ok(())
}

fn host_path(path: &Path, kind: HostPathType, prefixes: &[String]) -> Result<(), VolumeError> {
    match kind {
        HostPathType::DirectoryOrCreate if !path.exists() => {
            std::fs::create_dir_all(path).map_err(io("creating", path))?;
        }
        HostPathType::FileOrCreate if !path.exists() => {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io("creating", path))?;
        }
        _ => {}
    }
    // A symlink under an allowed prefix must not lead out of it.
    let real = std::fs::canonicalize(path).map_err(io("hostPath", path))?;
    let real_text = real.to_string_lossy();
    if !prefixes.iter().any(|p| under_prefix(&real_text, p)) {
        return Err(VolumeError::HostPathOutside {
            path: path.to_path_buf(),
            real: real_text.into_owned(),
            allowed: prefixes.join(", "),
        });
    }
    let meta = std::fs::metadata(&real).map_err(io("hostPath", path))?;
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
        Err(VolumeError::HostPathType {
            path: path.to_path_buf(),
            want,
        })
    }
}

/// Writes a ConfigMap or Secret volume the way the kubelet does, so a
/// reader never sees half an update: the files go into a new hidden
/// directory, `..data` is switched to it with one rename, and each
/// top-level name is a symlink through `..data`. Returns whether anything
/// changed.
pub fn write_projected(dir: &Path, files: &[ProjectedFile]) -> Result<bool, VolumeError> {
    let data_link = dir.join("..data");
    if let Ok(current) = std::fs::read_link(&data_link)
        && same_content(&dir.join(&current), files)
    {
        return Ok(false);
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let new_dir = dir.join(&stamp);
    std::fs::create_dir(&new_dir).map_err(io("creating", &new_dir))?;
    std::fs::set_permissions(&new_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io("setting the mode of", &new_dir))?;
    for f in files {
        let target = new_dir.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::write(&target, &f.data.0).map_err(io("writing", &target))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(f.mode))
            .map_err(io("setting the mode of", &target))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(io("linking", &tmp_link))?;
    let old = std::fs::read_link(&data_link).ok();
    std::fs::rename(&tmp_link, &data_link).map_err(io("switching", &data_link))?;
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
                .map_err(io("linking", &link))?;
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
pub fn stage_sub_path(
    volume_root: &Path,
    bind: &SubPathBind,
    mounts: &dyn Mounts,
) -> Result<(), VolumeError> {
    let stage = PathBuf::from(&bind.stage);
    if mounts.is_mount_point(&stage) {
        return Ok(());
    }
    let root = nix::fcntl::open(
        volume_root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(mount("opening volume", volume_root))?;
    let escape = |e: Errno| match e {
        Errno::EXDEV | Errno::ELOOP => VolumeError::Escape {
            sub_path: bind.sub_path.clone(),
            volume: bind.volume.clone(),
        },
        source => VolumeError::SubPath {
            sub_path: bind.sub_path.clone(),
            volume: bind.volume.clone(),
            source,
        },
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
        .map_err(escape)?;
    if let Some(parent) = stage.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    if is_dir {
        std::fs::create_dir_all(&stage).map_err(io("creating", &stage))?;
    } else if !stage.exists() {
        std::fs::write(&stage, b"").map_err(io("creating", &stage))?;
    }
    mounts
        .bind_fd(target.as_fd(), &stage)
        .map_err(mount("binding the subPath at", &stage))
}

/// Removes what a pod's volumes left on the node: staged subPaths, tmpfs
/// mounts and disk `emptyDir`s (their data ends with the pod, as in
/// Kubernetes). `key` is `<namespace>_<pod>`.
pub fn remove_pod(
    dirs: &berth_plan::volumes::VolumeDirs,
    key: &str,
    mounts: &dyn Mounts,
) -> Result<(), VolumeError> {
    for base in [&dirs.sub_path_dir, &dirs.run_dir, &dirs.disk_dir] {
        let dir = Path::new(base).join(key);
        if !dir.exists() {
            continue;
        }
        mounts
            .unmount_below(&dir)
            .map_err(io("unmounting below", &dir))?;
        std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
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

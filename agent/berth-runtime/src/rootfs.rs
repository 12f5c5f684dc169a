//! Per-container root filesystems: an overlay of the image's unpacked root
//! (read-only, shared) and the container's own writable layer.
//!
//! The agent mounts each overlay itself, with one `mount(2)` in PID 1's
//! mount namespace (a short-lived thread joins it), so the mount is visible
//! to the container's service whatever namespace the agent runs in, and
//! vanishes at reboot like the service itself. It used to be a transient
//! `.mount` unit: a systemd job that forks and executes `mount(8)`, about
//! a third of a pod's start under emulation; systemd still lists the mount
//! (as it lists every mount it finds) and orders the service after it
//! through the service's `RequiresMountsFor=`.
//!
//! `/var/lib/berth/containers/<ns>_<pod>_<container>/{upper,work,rootfs}`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How a container's root is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootMode {
    /// `readOnlyRootFilesystem`: the overlay is mounted `ro`.
    pub read_only: bool,
    /// Where volumes are bound inside the container.
    pub mount_points: Vec<String>,
}

/// Where systemd mounts inside a container's root (API filesystems,
/// `PrivateTmp=`).
const API_MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "var/tmp"];

/// An overlay to mount: `lowerdir=...,upperdir=...,workdir=...[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub options: String,
    pub read_only: bool,
}

/// Who mounts container roots: [`KernelRootMounter`] on the node, [`FakeRootMounter`]
/// in memory for the loop's unit tests. [`root_mounter_contract`] holds both to
/// the same behaviour.
pub trait RootMounter: Send + Sync {
    /// Mounts `overlay` on `target`; a target that already has a mount is
    /// refused (the caller unmounts first), never stacked on.
    fn mount(&self, target: &Path, overlay: &Overlay) -> io::Result<()>;
    /// Unmounts `target` (lazily: a process still inside keeps its view);
    /// a target with nothing mounted is not an error.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Every mount point at or below `under`.
    fn mounted(&self, under: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The node's kernel. Each call runs on a thread of its own that leaves
/// the agent's file system context (`unshare(CLONE_FS)`), joins PID 1's
/// mount namespace (`setns`), and drops `CAP_SYS_RESOURCE` before
/// mounting: an overlay writes to its upper directory with the credentials
/// of whoever mounted it, and without that capability a container's writes
/// cannot reach the root reserve of `/var` the agent keeps.
#[derive(Debug, Clone)]
pub struct KernelRootMounter {
    /// The mount namespace joined; `None`: the agent's own.
    namespace: Option<PathBuf>,
}

impl KernelRootMounter {
    /// In PID 1's mount namespace: what the node's agent uses.
    pub fn node() -> Self {
        Self {
            namespace: Some(PathBuf::from("/proc/1/ns/mnt")),
        }
    }

    /// In the caller's own mount namespace: for tests on a host whose
    /// PID 1 is not systemd (and may hide its namespaces).
    pub fn own_namespace() -> Self {
        Self { namespace: None }
    }

    fn in_node_namespace<T: Send>(
        &self,
        what: &str,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> io::Result<T> {
        use nix::sched::CloneFlags;
        use std::os::fd::AsFd as _;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(path) = &self.namespace {
                        nix::sched::unshare(CloneFlags::CLONE_FS)?;
                        let ns = fs::File::open(path).map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                        })?;
                        nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNS)?;
                    }
                    let mut caps = rustix::thread::capabilities(None)?;
                    caps.effective
                        .remove(rustix::thread::CapabilitySet::SYS_RESOURCE);
                    caps.permitted
                        .remove(rustix::thread::CapabilitySet::SYS_RESOURCE);
                    rustix::thread::set_capabilities(None, caps)?;
                    f()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(io::Error::other(format!("the thread for {what} panicked")))
                })
        })
    }
}

impl RootMounter for KernelRootMounter {
    fn mount(&self, target: &Path, overlay: &Overlay) -> io::Result<()> {
        use nix::mount::MsFlags;
        let mut flags = MsFlags::MS_NODEV;
        if overlay.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let options = overlay.options.as_str();
        // Checked and mounted on one thread, in the namespace it mounts in.
        self.in_node_namespace("a container root mount", || {
            if is_mount_point(target)? {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is already mounted", target.display()),
                ));
            }
            nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                flags,
                Some(options),
            )
            .map_err(io::Error::from)
        })
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.in_node_namespace("a container root unmount", || {
            match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
                // Not a mount point, or gone with its directory.
                Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(io::Error::from(e)),
            }
        })
    }

    fn mounted(&self, under: &Path) -> io::Result<Vec<PathBuf>> {
        let text = self.in_node_namespace("reading the node's mounts", || {
            fs::read_to_string("/proc/thread-self/mountinfo")
        })?;
        Ok(berth_storage::mounts::parse_mount_points(&text)
            .into_iter()
            .filter(|p| p.starts_with(under))
            .collect())
    }
}

/// Whether `target` is the root of a mount in the calling thread's mount
/// namespace: `statx` says so since Linux 5.8, the mount table otherwise.
fn is_mount_point(target: &Path) -> io::Result<bool> {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        target,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::empty(),
    )?;
    if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
    }
    let text = fs::read_to_string("/proc/thread-self/mountinfo")?;
    Ok(berth_storage::mounts::parse_mount_points(&text)
        .iter()
        .any(|m| m == target))
}

/// Mounts kept in memory, with the kernel's rules: one mount per target,
/// unmounting nothing is fine, a target must be a directory.
#[derive(Debug, Default)]
pub struct FakeRootMounter {
    mounted: Mutex<BTreeSet<PathBuf>>,
}

impl FakeRootMounter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        self.mounted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RootMounter for FakeRootMounter {
    fn mount(&self, target: &Path, _overlay: &Overlay) -> io::Result<()> {
        if !target.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", target.display()),
            ));
        }
        if !self.lock().insert(target.to_path_buf()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is already mounted", target.display()),
            ));
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.lock().remove(target);
        Ok(())
    }

    fn mounted(&self, under: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(self
            .lock()
            .iter()
            .filter(|p| p.starts_with(under))
            .cloned()
            .collect())
    }
}

impl<T: RootMounter + ?Sized> RootMounter for Arc<T> {
    fn mount(&self, target: &Path, overlay: &Overlay) -> io::Result<()> {
        (**self).mount(target, overlay)
    }
    fn unmount(&self, target: &Path) -> io::Result<()> {
        (**self).unmount(target)
    }
    fn mounted(&self, under: &Path) -> io::Result<Vec<PathBuf>> {
        (**self).mounted(under)
    }
}

/// What both [`RootMounter`] must do, on a scratch directory with a lower
/// directory holding `hello`. Returns what went wrong.
pub fn root_mounter_contract(mounts: &dyn RootMounter, scratch: &Path) -> Result<(), String> {
    fn e(what: &'static str) -> impl Fn(io::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let lower = scratch.join("lower");
    fs::create_dir_all(&lower).map_err(e("lower"))?;
    fs::write(lower.join("hello"), b"hi").map_err(e("lower file"))?;
    for d in ["upper", "work", "rootfs"] {
        fs::create_dir_all(scratch.join(d)).map_err(e(d))?;
    }
    let target = scratch.join("rootfs");
    let overlay = Overlay {
        options: format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            scratch.join("upper").display(),
            scratch.join("work").display()
        ),
        read_only: false,
    };
    let listed = |m: &dyn RootMounter| m.mounted(scratch).map_err(e("mounted"));
    if !listed(mounts)?.is_empty() {
        return Err("a fresh scratch directory already has mounts".into());
    }
    mounts.mount(&target, &overlay).map_err(e("mount"))?;
    if listed(mounts)? != vec![target.clone()] {
        return Err(format!("after a mount: {:?}", listed(mounts)?));
    }
    if mounts.mount(&target, &overlay).is_ok() {
        return Err("a second mount on the same target was not refused".into());
    }
    if !mounts
        .mounted(&scratch.join("elsewhere"))
        .map_err(e("mounted"))?
        .is_empty()
    {
        return Err("a mount was listed under another directory".into());
    }
    mounts.unmount(&target).map_err(e("unmount"))?;
    mounts.unmount(&target).map_err(e("a second unmount"))?;
    if !listed(mounts)?.is_empty() {
        return Err(format!("after the unmount: {:?}", listed(mounts)?));
    }
    if mounts.mount(&scratch.join("missing"), &overlay).is_ok() {
        return Err("a mount on a missing directory was not refused".into());
    }
    Ok(())
}

/// Where containers' layers live, and who mounts them.
#[derive(Clone)]
pub struct ContainerRoots {
    base: PathBuf,
    mounts: Arc<dyn RootMounter>,
}

impl std::fmt::Debug for ContainerRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRoots")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ContainerRoots {
    pub fn new(base: &Path, mounts: Arc<dyn RootMounter>) -> Self {
        Self {
            base: base.to_path_buf(),
            mounts,
        }
    }

    pub fn dir(&self, key: &str) -> PathBuf {
        self.base.join(key)
    }

    pub fn rootfs(&self, key: &str) -> PathBuf {
        self.dir(key).join("rootfs")
    }

    /// Makes the directories, with an empty writable layer, and returns the
    /// overlay to mount. The writable layer's root is 0755: it becomes the
    /// container's `/`, which a non-root user must traverse.
    pub fn prepare(&self, key: &str, image_root: &Path) -> io::Result<Overlay> {
        self.prepare_with(key, image_root, &RootMode::default())
    }

    /// As [`ContainerRoots::prepare`]; a read-only root is mounted `ro`, with
    /// the directories systemd mounts on made beforehand in the writable
    /// layer (a read-only root cannot have them made at start). The root
    /// must not be mounted ([`ContainerRoots::unmount`] first).
    pub fn prepare_with(
        &self,
        key: &str,
        image_root: &Path,
        mode: &RootMode,
    ) -> io::Result<Overlay> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir(key);
        // A container created anew starts from its image, as in Kubernetes:
        // the previous writable layer goes (the mount is already stopped).
        for sub in ["upper", "work"] {
            match fs::remove_dir_all(dir.join(sub)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for sub in ["upper", "work", "rootfs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::set_permissions(dir.join("upper"), fs::Permissions::from_mode(0o755))?;
        if mode.read_only {
            for point in API_MOUNT_POINTS
                .iter()
                .copied()
                .chain(mode.mount_points.iter().map(String::as_str))
            {
                let rel = point.trim_start_matches('/');
                if rel.is_empty() || rel.split('/').any(|c| c == "..") {
                    continue;
                }
                // Already in the image (or a file there): nothing to make.
                if fs::symlink_metadata(image_root.join(rel)).is_ok() {
                    continue;
                }
                let mut cur = dir.join("upper");
                for c in rel.split('/').filter(|c| !c.is_empty()) {
                    cur.push(c);
                    if fs::symlink_metadata(&cur).is_err() {
                        fs::create_dir(&cur)?;
                        fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))?;
                    }
                }
            }
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}{}",
            image_root.display(),
            dir.join("upper").display(),
            dir.join("work").display(),
            if mode.read_only { ",ro" } else { "" }
        );
        if options.contains(['\n', ' ']) || image_root.to_string_lossy().contains([',', ':']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay paths may not contain ',', ':' or spaces: {options}"),
            ));
        }
        Ok(Overlay {
            options,
            read_only: mode.read_only,
        })
    }

    /// Mounts a prepared root.
    pub fn mount(&self, key: &str, overlay: &Overlay) -> io::Result<()> {
        self.mounts.mount(&self.rootfs(key), overlay)
    }

    /// Unmounts a container's root; nothing mounted is fine.
    pub fn unmount(&self, key: &str) -> io::Result<()> {
        self.mounts.unmount(&self.rootfs(key))
    }

    /// Containers whose root is mounted now.
    pub fn mounted_keys(&self) -> io::Result<BTreeSet<String>> {
        Ok(self
            .mounts
            .mounted(&self.base)?
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "rootfs"))
            .filter_map(|p| {
                let key = p.parent()?;
                let name = key.file_name()?.to_string_lossy().into_owned();
                (key.parent()? == self.base).then_some(name)
            })
            .collect())
    }

    /// Records the manifest digest of the image a container's root is made
    /// of: written whole or not at all (a temporary file, synced, renamed).
    pub fn record_image(&self, key: &str, manifest: &str) -> io::Result<()> {
        use std::io::Write as _;
        let dir = self.dir(key);
        let tmp = dir.join(".image.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(manifest.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join("image"))
    }

    /// The images of every container that has a root here: these are in
    /// use, whatever tags point at now. A record that is missing, cannot
    /// be read or is not a digest is an error: collection must then keep
    /// everything rather than believe that image unused.
    pub fn images_in_use(&self) -> Result<std::collections::HashSet<String>, String> {
        self.keys()
            .iter()
            .map(|k| {
                let path = self.dir(k).join("image");
                let text =
                    fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let digest = text.trim();
                if berth_images::valid_digest(digest).is_none() {
                    return Err(format!(
                        "{}: {digest:?} is not an image digest",
                        path.display()
                    ));
                }
                Ok(digest.to_string())
            })
            .collect()
    }

    /// Deletes a container's layers once its mount is gone.
    pub fn remove(&self, key: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.dir(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Container keys that have a directory here.
    pub fn keys(&self) -> Vec<String> {
        fs::read_dir(&self.base)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// JSON user and group records in `/run/userdb`, so systemd (and
/// `nss-systemd`) can resolve a numeric `User=` that only the image knows.
#[derive(Debug, Clone)]
pub struct UserRecords {
    dir: PathBuf,
    /// Containers are prepared on several threads; the records are
    /// written by one at a time.
    writing: Arc<Mutex<()>>,
}

impl UserRecords {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            writing: Arc::default(),
        }
    }

    /// Makes sure uid (and gid) resolve; uid 0 and gid 0 always do.
    pub fn ensure(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let _one_at_a_time = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let primary = gid.or(uid).unwrap_or(0);
        if let Some(uid) = uid.filter(|u| *u != 0) {
            let name = format!("berth-{uid}");
            let record = serde_json::json!({
                "userName": name, "uid": uid, "gid": primary,
                "disposition": "container", "homeDirectory": "/", "shell": "/bin/sh",
            });
            self.write(&format!("{name}.user"), &record)?;
            self.link(&format!("{uid}.user"), &format!("{name}.user"))?;
        }
        for gid in [gid, uid.filter(|_| gid.is_none())].into_iter().flatten() {
            if gid == 0 {
                continue;
            }
            let name = format!("berth-{gid}");
            let record = serde_json::json!({
                "groupName": name, "gid": gid, "disposition": "container",
            });
            self.write(&format!("{name}.group"), &record)?;
            self.link(&format!("{gid}.group"), &format!("{name}.group"))?;
        }
        Ok(())
    }

    fn write(&self, file: &str, record: &serde_json::Value) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(file);
        let body = serde_json::to_vec(record).unwrap_or_default();
        if fs::read(&path).is_ok_and(|old| old == body) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, &body)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
        fs::rename(&tmp, &path)
    }

    fn link(&self, link: &str, target: &str) -> io::Result<()> {
        let path = self.dir.join(link);
        if fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
            return Ok(());
        }
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(base: &Path) -> ContainerRoots {
        ContainerRoots::new(base, FakeRootMounter::new())
    }

    #[test]
    fn the_fake_mounts_keep_the_contract() {
        let scratch =
            std::env::temp_dir().join(format!("berth-mounts-fake-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        let result = root_mounter_contract(&*FakeRootMounter::new(), &scratch);
        let _ = fs::remove_dir_all(&scratch);
        result.unwrap_or_else(|e| panic!("{e}"));
    }

    /// The same contract against the kernel: a real overlay in a scratch
    /// directory (in the test's own mount namespace: the host's PID 1 may
    /// hide its own; the QEMU tier mounts in PID 1's on every pod start).
    #[test]
    #[ignore = "privileged: needs root and overlayfs (tier 2)"]
    fn the_kernel_mounts_keep_the_contract() {
        let scratch =
            std::env::temp_dir().join(format!("berth-mounts-kernel-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        let kernel = KernelRootMounter::own_namespace();
        let result = root_mounter_contract(&kernel, &scratch);
        let _ = kernel.unmount(&scratch.join("rootfs"));
        let _ = fs::remove_dir_all(&scratch);
        result.unwrap_or_else(|e| panic!("{e}"));
    }

    /// A mounted root's file is the image's, writes land in the upper
    /// layer, and the roots' view of what is mounted follows.
    #[test]
    #[ignore = "privileged: needs root and overlayfs (tier 2)"]
    fn a_container_root_is_an_overlay_of_its_image() {
        let base = std::env::temp_dir().join(format!("berth-roots-kernel-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let image = base.join("image");
        fs::create_dir_all(image.join("bin")).expect("image");
        fs::write(image.join("bin/hello"), b"hi").expect("file");
        let roots = ContainerRoots::new(
            &base.join("containers"),
            Arc::new(KernelRootMounter::own_namespace()),
        );
        let overlay = roots.prepare("ns_p_c", &image).expect("prepare");
        roots.mount("ns_p_c", &overlay).expect("mount");
        let root = roots.rootfs("ns_p_c");
        let seen = fs::read(root.join("bin/hello"));
        let written = fs::write(root.join("made-here"), b"x");
        let keys = roots.mounted_keys();
        roots.unmount("ns_p_c").expect("unmount");
        let after = roots.mounted_keys();
        let upper_has = roots.dir("ns_p_c").join("upper/made-here").exists();
        let _ = fs::remove_dir_all(&base);
        assert_eq!(seen.expect("read through the overlay"), b"hi");
        written.expect("write through the overlay");
        assert!(upper_has, "the write is in the upper layer");
        assert_eq!(
            keys.expect("listed"),
            BTreeSet::from(["ns_p_c".to_string()])
        );
        assert!(after.expect("listed").is_empty());
    }

    #[test]
    fn mounted_keys_are_the_containers_whose_rootfs_is_mounted() {
        let base = std::env::temp_dir().join(format!("berth-roots-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let fake = FakeRootMounter::new();
        let roots = ContainerRoots::new(&base.join("containers"), fake.clone());
        let image = base.join("image");
        fs::create_dir_all(&image).expect("image");
        for key in ["ns_a_c", "ns_b_c"] {
            let overlay = roots.prepare(key, &image).expect("prepare");
            roots.mount(key, &overlay).expect("mount");
        }
        // Something else mounted below the base is not a container root.
        fs::create_dir_all(base.join("containers/ns_b_c/extra")).expect("dir");
        fake.mount(
            &base.join("containers/ns_b_c/extra"),
            &Overlay {
                options: String::new(),
                read_only: false,
            },
        )
        .expect("extra");
        roots.unmount("ns_a_c").expect("unmount");
        let keys = roots.mounted_keys().expect("listed");
        let _ = fs::remove_dir_all(&base);
        assert_eq!(keys, BTreeSet::from(["ns_b_c".to_string()]));
    }

    #[test]
    fn a_read_only_root_is_mounted_ro_with_its_mount_points_made_first() {
        let base = std::env::temp_dir().join(format!("berth-roots-ro-{}", std::process::id()));
        let roots = roots(&base.join("containers"));
        let image = base.join("image");
        fs::create_dir_all(image.join("tmp")).expect("image dir");
        let mode = RootMode {
            read_only: true,
            mount_points: vec!["/data/cache".into(), "/../escape".into()],
        };
        let overlay = roots
            .prepare_with("ns_p_c", &image, &mode)
            .expect("prepare");
        let upper = roots.dir("ns_p_c").join("upper");
        for made in ["dev", "proc", "sys", "run", "var/tmp", "data/cache"] {
            assert!(upper.join(made).is_dir(), "{made}");
        }
        // What the image has is not shadowed; nothing climbs out.
        assert!(!upper.join("tmp").exists());
        assert!(
            !base.join("containers/escape").exists()
                && !roots.dir("ns_p_c").join("escape").exists()
        );
        assert!(
            overlay.read_only && overlay.options.ends_with(",ro"),
            "{overlay:?}"
        );
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn a_container_created_anew_starts_with_an_empty_writable_layer() {
        let base = std::env::temp_dir().join(format!("berth-roots-{}", std::process::id()));
        let roots = roots(&base.join("containers"));
        let image = base.join("image");
        fs::create_dir_all(&image).expect("image dir");
        roots.prepare("ns_p_c", &image).expect("first");
        fs::write(roots.dir("ns_p_c").join("upper/left-behind"), b"x").expect("write");
        let overlay = roots.prepare("ns_p_c", &image).expect("again");
        assert!(!roots.dir("ns_p_c").join("upper/left-behind").exists());
        assert_eq!(
            overlay.options,
            format!(
                "lowerdir={},upperdir={}/containers/ns_p_c/upper,workdir={}/containers/ns_p_c/work",
                image.display(),
                base.display(),
                base.display()
            )
        );
        assert_eq!(roots.keys(), vec!["ns_p_c".to_string()]);
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn an_unknown_container_image_makes_collection_keep_everything() {
        let base = std::env::temp_dir().join(format!("berth-roots-records-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let roots = roots(&base);
        let digest = format!("sha256:{}", "a".repeat(64));
        for key in ["ns_a_c", "ns_b_c"] {
            fs::create_dir_all(roots.dir(key)).expect("dir");
        }
        roots.record_image("ns_a_c", &digest).expect("record");
        assert!(!roots.dir("ns_a_c").join(".image.tmp").exists());
        // One container without its record (a start cut short): unknown.
        let err = roots.images_in_use().expect_err("b's image is unknown");
        assert!(err.contains("ns_b_c/image"), "{err}");
        // A record cut short or overwritten: not a digest, unknown too.
        fs::write(roots.dir("ns_b_c").join("image"), "sha256:abc").expect("write");
        let err = roots.images_in_use().expect_err("not a digest");
        assert!(err.contains("is not an image digest"), "{err}");
        roots.record_image("ns_b_c", &digest).expect("record");
        assert_eq!(
            roots.images_in_use().expect("known"),
            std::collections::HashSet::from([digest])
        );
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn user_records_make_numeric_ids_resolvable() {
        let dir = std::env::temp_dir().join(format!("berth-userdb-{}", std::process::id()));
        let records = UserRecords::new(&dir);
        records.ensure(Some(1000), Some(2000)).expect("writes");
        let user: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("1000.user")).expect("link")).expect("json");
        assert_eq!(user["uid"], 1000);
        assert_eq!(user["gid"], 2000);
        assert!(dir.join("2000.group").exists());
        assert!(!dir.join("1000.group").exists());
        records.ensure(Some(0), None).expect("root needs nothing");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

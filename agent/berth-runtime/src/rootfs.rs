//! Per-container root filesystems: an overlay of the image's unpacked root
//! (read-only, shared) and the container's own writable layer, mounted by
//! PID 1 as a transient `.mount` unit so the mount is visible to the
//! container's service whatever mount namespace the agent runs in, and
//! vanishes at reboot like the service itself.
//!
//! `/var/lib/berth/containers/<ns>_<pod>_<container>/{upper,work,rootfs}`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use berth_plan::{Properties, PropertyValue};

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

/// Where containers' layers live.
#[derive(Debug, Clone)]
pub struct ContainerRoots {
    base: PathBuf,
}

/// systemd's path escaping (`systemd-escape --path`), for mount unit names.
/// Every capability up to `CAP_CHECKPOINT_RESTORE` (40) but
/// `CAP_SYS_RESOURCE` (24): the bounding set of `mount` for a container root.
pub const MOUNT_CAPABILITIES: u64 = ((1 << 41) - 1) & !(1 << 24);

pub fn escape_path(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, b) in trimmed.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

impl ContainerRoots {
    pub fn new(base: &Path) -> Self {
        Self {
            base: base.to_path_buf(),
        }
    }

    pub fn dir(&self, key: &str) -> PathBuf {
        self.base.join(key)
    }

    pub fn rootfs(&self, key: &str) -> PathBuf {
        self.dir(key).join("rootfs")
    }

    /// `var-lib-berth-containers-apps_web\x2d0_httpd-rootfs.mount`
    pub fn mount_unit(&self, key: &str) -> String {
        format!("{}.mount", escape_path(&self.rootfs(key).to_string_lossy()))
    }

    /// The pattern that finds every container mount Berth made.
    pub fn mount_pattern(&self) -> String {
        format!("{}-*.mount", escape_path(&self.base.to_string_lossy()))
    }

    /// Makes the directories, with an empty writable layer, and returns the
    /// mount unit's properties. The writable layer's root is 0755: it
    /// becomes the container's `/`, which a non-root user must traverse.
    pub fn prepare(&self, key: &str, image_root: &Path) -> io::Result<Properties> {
        self.prepare_with(key, image_root, &RootMode::default())
    }

    /// As [`ContainerRoots::prepare`]; a read-only root is mounted `ro`, with
    /// the directories systemd mounts on made beforehand in the writable
    /// layer (a read-only root cannot have them made at start).
    pub fn prepare_with(
        &self,
        key: &str,
        image_root: &Path,
        mode: &RootMode,
    ) -> io::Result<Properties> {
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
        Ok([
            (
                "Description",
                PropertyValue::text(format!("berth container root {key}")),
            ),
            ("What", PropertyValue::text("overlay")),
            ("Type", PropertyValue::text("overlay")),
            ("Options", PropertyValue::text(options)),
            // The overlay writes to its upper directory with the
            // credentials of whoever mounted it: without CAP_SYS_RESOURCE
            // (and not as the reserve's uid), a container's writes cannot
            // reach the root reserve of `/var` that the agent keeps.
            (
                "CapabilityBoundingSet",
                PropertyValue::Unsigned(MOUNT_CAPABILITIES),
            ),
        ]
        .into_iter()
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
}

impl UserRecords {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Makes sure uid (and gid) resolve; uid 0 and gid 0 always do.
    pub fn ensure(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
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

    #[test]
    fn mount_unit_names_escape_like_systemd_escape_path() {
        let roots = ContainerRoots::new(Path::new("/var/lib/berth/containers"));
        assert_eq!(
            roots.mount_unit("apps_web-0_httpd"),
            "var-lib-berth-containers-apps_web\\x2d0_httpd-rootfs.mount"
        );
        assert_eq!(roots.mount_pattern(), "var-lib-berth-containers-*.mount");
        assert_eq!(escape_path("/.hidden/a b"), "\\x2ehidden-a\\x20b");
    }

    #[test]
    fn a_read_only_root_is_mounted_ro_with_its_mount_points_made_first() {
        let base = std::env::temp_dir().join(format!("berth-roots-ro-{}", std::process::id()));
        let roots = ContainerRoots::new(&base.join("containers"));
        let image = base.join("image");
        fs::create_dir_all(image.join("tmp")).expect("image dir");
        let mode = RootMode {
            read_only: true,
            mount_points: vec!["/data/cache".into(), "/../escape".into()],
        };
        let props = roots
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
        assert!(matches!(props.get("Options"), Some(PropertyValue::Text(o)) if o.ends_with(",ro")));
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn a_container_created_anew_starts_with_an_empty_writable_layer() {
        let base = std::env::temp_dir().join(format!("berth-roots-{}", std::process::id()));
        let roots = ContainerRoots::new(&base.join("containers"));
        let image = base.join("image");
        fs::create_dir_all(&image).expect("image dir");
        roots.prepare("ns_p_c", &image).expect("first");
        fs::write(roots.dir("ns_p_c").join("upper/left-behind"), b"x").expect("write");
        let props = roots.prepare("ns_p_c", &image).expect("again");
        assert!(!roots.dir("ns_p_c").join("upper/left-behind").exists());
        assert_eq!(
            props.get("Options"),
            Some(&PropertyValue::text(format!(
                "lowerdir={},upperdir={}/containers/ns_p_c/upper,workdir={}/containers/ns_p_c/work",
                image.display(),
                base.display(),
                base.display()
            )))
        );
        // Mounted without CAP_SYS_RESOURCE, every other capability kept.
        let Some(PropertyValue::Unsigned(caps)) = props.get("CapabilityBoundingSet") else {
            panic!("no bounding set: {props:?}");
        };
        assert_eq!(caps & (1 << 24), 0);
        assert_eq!(caps.count_ones(), 40);
        assert_eq!(roots.keys(), vec!["ns_p_c".to_string()]);
        fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn an_unknown_container_image_makes_collection_keep_everything() {
        let base = std::env::temp_dir().join(format!("berth-roots-records-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let roots = ContainerRoots::new(&base);
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

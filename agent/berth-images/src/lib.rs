//! The local OCI image store under `/var/lib/berth/images`.
//!
//! - `blobs/sha256/<hex>`: content-addressed blobs, each verified against
//!   its digest before it is renamed into place;
//! - `rootfs/<manifest hex>/`: an image's layers applied in order (whiteouts
//!   and opaque directories honoured), written under a `.partial-` name and
//!   renamed when complete, so a crash never leaves a half image in use;
//! - `refs.json`: image reference → manifest digest.
//!
//! Images arrive as OCI image-layout archives (`oci-layout`, `index.json`,
//! `blobs/`), as the appliance ships them for air-gapped nodes. Layer
//! entries that would land outside the root (`..`, absolute paths, writes
//! through symlinks) are refused.
//!
//! Its own crate, so that the registry client that fills it and the
//! runtime that mounts its roots share it without one depending on the
//! other (the registry needs no D-Bus).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use berth_plan::ImageConfig;
use berth_plan::images::normalize;
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{archive}: {message}")]
    Archive { archive: PathBuf, message: String },
    #[error("{archive}: blob {digest} does not match its content (got sha256:{actual})")]
    Digest {
        archive: PathBuf,
        digest: String,
        actual: String,
    },
    #[error("{archive}: layer {layer}: entry {entry:?} {why}; the image is refused")]
    Escape {
        archive: PathBuf,
        layer: String,
        entry: String,
        why: &'static str,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What an import added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub reference: String,
    pub manifest: String,
    /// False when the store had it already.
    pub new: bool,
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// `refs.json` is read, changed and written by the agent's loop (import,
    /// collection) and by the puller's thread (a finished pull).
    refs_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// Bounds on what unpacking one image may write: a layer that inflates
/// past them (a decompression bomb, or simply a full disk) fails the
/// image cleanly, with its partial root removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The most bytes of file content one image may unpack to.
    pub max_bytes: u64,
    /// Unpacking stops when the store's filesystem has less free than this.
    pub min_free_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 30,
            min_free_bytes: 64 << 20,
        }
    }
}

/// One image in the store, for `berth images` and collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub reference: String,
    pub manifest: String,
    /// Bytes of its unpacked root (file contents, as `du` counts blocks).
    pub size: u64,
    /// When a container last started from it (or it was unpacked), Unix seconds.
    pub last_used: u64,
}

/// What one collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub images: Vec<String>,
    pub bytes: u64,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An index entry's platform, as OCI indexes and Docker manifest lists
/// write it.
#[derive(Debug, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

impl Platform {
    /// Whether this is Linux on `architecture`.
    pub fn is(&self, architecture: &str) -> bool {
        self.os == "linux" && self.architecture == architecture
    }
}

/// The node's platform in OCI's words: the image of an index a node takes.
pub fn node_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RuntimeConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 4 << 20;

/// The hex of a `sha256:` digest as the store names its files (64
/// lowercase hex digits), or `None`.
/// The schema of the store's references (`refs.json`, see
/// [`berth_schema`]): 1 is `{"schema": 1, "refs": {reference: digest}}`;
/// 0, before schema versions, was the bare map.
pub const REFS_SCHEMA: u32 = 1;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RefsFile {
    refs: BTreeMap<String, String>,
}

pub fn valid_digest(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(hex)
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        for dir in ["blobs/sha256", "rootfs"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            refs_lock: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the store holds this blob, verified.
    pub fn has_blob(&self, digest: &str) -> bool {
        valid_digest(digest).is_some_and(|hex| self.blob(hex).is_file())
    }

    /// Where a stored (verified) blob's bytes are, if the store has it.
    pub fn blob_file(&self, digest: &str) -> Option<PathBuf> {
        let path = self.blob(valid_digest(digest)?);
        path.is_file().then_some(path)
    }

    /// Where a blob being downloaded is kept until it is whole: a pull cut
    /// short resumes from what is there.
    pub fn partial_blob(&self, digest: &str) -> Option<PathBuf> {
        let hex = valid_digest(digest)?;
        Some(
            self.root
                .join("blobs/sha256")
                .join(format!(".partial-{hex}")),
        )
    }

    /// Checks a downloaded blob against its digest and moves it into the
    /// store; a blob that does not match is deleted.
    pub fn commit_blob(&self, source: &str, digest: &str) -> Result<(), ImageError> {
        let bad = |message: String| ImageError::Archive {
            archive: PathBuf::from(source),
            message,
        };
        let hex = valid_digest(digest).ok_or_else(|| bad(format!("bad digest {digest:?}")))?;
        let partial = self
            .root
            .join("blobs/sha256")
            .join(format!(".partial-{hex}"));
        let mut file = File::open(&partial).map_err(io_err(&partial))?;
        let actual = sha256_hex(&mut file).map_err(io_err(&partial))?;
        if actual != hex {
            let _ = fs::remove_file(&partial);
            return Err(ImageError::Digest {
                archive: PathBuf::from(source),
                digest: digest.to_string(),
                actual,
            });
        }
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&partial))?;
        let dest = self.blob(hex);
        fs::rename(&partial, &dest).map_err(io_err(&dest))
    }

    /// Stores a small blob held in memory (a manifest), verified.
    pub fn put_blob(&self, source: &str, digest: &str, body: &[u8]) -> Result<(), ImageError> {
        let hex = valid_digest(digest).ok_or_else(|| ImageError::Archive {
            archive: PathBuf::from(source),
            message: format!("bad digest {digest:?}"),
        })?;
        self.store_blob(Path::new(source), hex, &mut &body[..])
    }

    /// The manifest digest a reference points to in the store.
    pub fn resolve(&self, reference: &str) -> Option<String> {
        let _guard = self.lock();
        self.refs().ok()?.remove(&normalize(reference))
    }

    /// Unpacks a manifest whose blobs are all stored (unless its root is
    /// unpacked already) and points `reference` at it. True when the root
    /// was unpacked now.
    pub fn install(
        &self,
        source: &str,
        reference: &str,
        manifest_digest: &str,
        limits: UnpackLimits,
    ) -> Result<bool, ImageError> {
        let hex = valid_digest(manifest_digest).ok_or_else(|| ImageError::Archive {
            archive: PathBuf::from(source),
            message: format!("bad digest {manifest_digest:?}"),
        })?;
        let dir = self.root.join("rootfs").join(hex);
        let new = !dir.is_dir();
        if new {
            self.unpack_limited(Path::new(source), manifest_digest, &dir, limits)?;
        }
        let _guard = self.lock();
        let mut refs = self.refs()?;
        refs.insert(normalize(reference), manifest_digest.to_string());
        self.save_refs(&refs)?;
        Ok(new)
    }

    /// Marks an image as used now (a container started from it), for
    /// collection by age.
    pub fn touch(&self, manifest_digest: &str) {
        if let Some(hex) = valid_digest(manifest_digest) {
            let dir = self.root.join("rootfs").join(hex);
            if let Ok(f) = File::open(&dir) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
    }

    /// Every image in the store.
    pub fn list(&self) -> Vec<StoredImage> {
        // A listing only: an unreadable reference file lists nothing (and
        // collection, which reads it again, refuses to run).
        let refs = {
            let _guard = self.lock();
            self.refs().unwrap_or_default()
        };
        refs.into_iter()
            .filter_map(|(reference, manifest)| {
                let dir = self.root.join("rootfs").join(valid_digest(&manifest)?);
                let last_used = fs::metadata(&dir)
                    .ok()?
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                Some(StoredImage {
                    size: disk_usage(&dir),
                    reference,
                    manifest,
                    last_used,
                })
            })
            .collect()
    }

    /// Removes the images for which `remove` says yes, oldest use first,
    /// and never one whose manifest is in `keep`; then every blob and root
    /// no remaining image needs. `remove` sees each candidate with the
    /// bytes freed so far and returns whether to go on.
    pub fn collect(
        &self,
        keep: &HashSet<String>,
        mut remove: impl FnMut(&StoredImage, u64) -> bool,
    ) -> Result<Collected, ImageError> {
        // Unreadable references mean "nothing is known to be in use", which
        // must never become "delete everything": keep all, and say why.
        {
            let _guard = self.lock();
            self.refs()?;
        }
        let mut images = self.list();
        images.sort_by_key(|i| i.last_used);
        let mut out = Collected::default();
        let mut gone: HashSet<String> = HashSet::new();
        for image in &images {
            if keep.contains(&image.manifest) || !remove(image, out.bytes) {
                continue;
            }
            gone.insert(image.reference.clone());
            out.images.push(image.reference.clone());
        }
        let _guard = self.lock();
        let mut refs = self.refs()?;
        if !gone.is_empty() {
            refs.retain(|r, _| !gone.contains(r));
            self.save_refs(&refs)?;
        }
        // What the remaining images and the kept ones (a running container's
        // image whose tag has since moved) need: manifests, configs, layers.
        // Roots and blobs nothing needs (such an old image once its last
        // container is gone) are swept.
        let mut needed: HashSet<String> = HashSet::new();
        for digest in refs.values().chain(keep) {
            needed.insert(digest.clone());
            if let Some(hex) = valid_digest(digest)
                && let Ok(m) = read_json::<Manifest>(&self.blob(hex))
            {
                needed.insert(m.config.digest);
                needed.extend(m.layers.into_iter().map(|l| l.digest));
            }
        }
        let roots = self.root.join("rootfs");
        for entry in fs::read_dir(&roots).map_err(io_err(&roots))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || needed.contains(&format!("sha256:{name}")) {
                continue;
            }
            out.bytes += disk_usage(&entry.path());
            fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        }
        let blobs = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || needed.contains(&format!("sha256:{name}")) {
                continue;
            }
            out.bytes += entry.metadata().map_or(0, |m| m.len());
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.refs_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn blob(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// The references file: none yet is an empty store; one that cannot be
    /// read or parsed is an error, so nothing is collected or rewritten
    /// from a partial view.
    fn refs(&self) -> Result<BTreeMap<String, String>, ImageError> {
        let path = self.refs_path();
        let body = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        // Schema 0 (before schema versions) was the bare map of references.
        let migrate = |_: u64, v: &mut serde_json::Value| {
            *v = serde_json::json!({ "refs": v.take() });
            Ok(())
        };
        berth_schema::decode::<RefsFile>(&body, &path, REFS_SCHEMA, migrate)
            .map(|(file, _)| file.refs)
            .map_err(|e| ImageError::Archive {
                archive: path.clone(),
                message: format!(
                    "cannot be read ({e}): no image is collected and no reference changed until it is repaired (removing it forgets the store's tags, and then only images no container uses are collected)"
                ),
            })
    }

    fn save_refs(&self, refs: &BTreeMap<String, String>) -> Result<(), ImageError> {
        let path = self.refs_path();
        berth_schema::save(&path, &RefsFile { refs: refs.clone() }, REFS_SCHEMA)
            .map_err(io_err(&path))
    }

    /// The unpacked root of an image, if the store has it complete.
    pub fn rootfs(&self, reference: &str) -> Option<PathBuf> {
        let digest = self.refs().ok()?.remove(&normalize(reference))?;
        let hex = valid_digest(&digest)?;
        let dir = self.root.join("rootfs").join(hex);
        dir.is_dir().then_some(dir)
    }

    /// Every image in the store with the config parts pods merge with.
    pub fn catalog(&self) -> Vec<ImageConfig> {
        let mut out = Vec::new();
        for (reference, digest) in self.refs().unwrap_or_default() {
            let Some(config) = self.image_config(&digest) else {
                continue;
            };
            let rc = config.config.unwrap_or_default();
            out.push(ImageConfig {
                reference,
                entrypoint: rc.entrypoint.unwrap_or_default(),
                cmd: rc.cmd.unwrap_or_default(),
                env: rc.env.unwrap_or_default(),
                working_dir: rc.working_dir.filter(|w| !w.is_empty()),
                user: rc.user.filter(|u| !u.is_empty()),
            });
        }
        out
    }

    fn image_config(&self, manifest_digest: &str) -> Option<ConfigFile> {
        let manifest: Manifest = read_json(&self.blob(valid_digest(manifest_digest)?)).ok()?;
        read_json(&self.blob(valid_digest(&manifest.config.digest)?)).ok()
    }

    /// Imports every image of an OCI image-layout archive. Blobs are
    /// verified; an image whose root is already unpacked is not unpacked again.
    pub fn import_archive(&self, archive: &Path) -> Result<Vec<Imported>, ImageError> {
        let bad = |message: String| ImageError::Archive {
            archive: archive.to_path_buf(),
            message,
        };
        let file = File::open(archive).map_err(io_err(archive))?;
        let mut tar = tar::Archive::new(file);
        let mut index: Option<Index> = None;
        let mut layout_seen = false;
        for entry in tar.entries().map_err(io_err(archive))? {
            let mut entry = entry.map_err(io_err(archive))?;
            if entry.header().entry_type().is_dir() {
                continue;
            }
            let path = entry.path().map_err(io_err(archive))?.into_owned();
            let name = path.to_string_lossy().trim_start_matches("./").to_string();
            if name == "index.json" {
                let mut body = Vec::new();
                (&mut entry)
                    .take(MAX_JSON)
                    .read_to_end(&mut body)
                    .map_err(io_err(archive))?;
                index = Some(
                    serde_json::from_slice(&body).map_err(|e| bad(format!("index.json: {e}")))?,
                );
            } else if name == "oci-layout" {
                layout_seen = true;
            } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                if valid_digest(&format!("sha256:{hex}")).is_none() {
                    return Err(bad(format!("{name} is not a sha256 blob name")));
                }
                self.store_blob(archive, hex, &mut entry)?;
            }
        }
        if !layout_seen {
            return Err(bad("not an OCI image layout (no oci-layout file)".into()));
        }
        let index = index.ok_or_else(|| bad("no index.json".into()))?;
        let mut imported = Vec::new();
        let mut refs = self.refs()?;
        for m in &index.manifests {
            let Some(reference) = m
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| m.annotations.get("org.opencontainers.image.ref.name"))
            else {
                continue;
            };
            let manifest_digest = self.pick_manifest(archive, m)?;
            let hex = valid_digest(&manifest_digest)
                .ok_or_else(|| bad(format!("bad digest {manifest_digest:?}")))?;
            let dir = self.root.join("rootfs").join(hex);
            let new = !dir.is_dir();
            if new {
                self.unpack(archive, &manifest_digest, &dir)?;
            }
            let reference = normalize(reference);
            refs.insert(reference.clone(), manifest_digest.clone());
            imported.push(Imported {
                reference,
                manifest: manifest_digest,
                new,
            });
        }
        if imported.is_empty() {
            return Err(bad(
                "index.json names no image (no org.opencontainers.image.ref.name annotation)"
                    .into(),
            ));
        }
        self.save_refs(&refs)?;
        Ok(imported)
    }

    /// A manifest, or for a multi-platform index the node's platform's one.
    fn pick_manifest(&self, archive: &Path, d: &Descriptor) -> Result<String, ImageError> {
        if !d.media_type.ends_with("image.index.v1+json")
            && !d.media_type.ends_with("manifest.list.v2+json")
        {
            return Ok(d.digest.clone());
        }
        let hex = valid_digest(&d.digest).ok_or_else(|| ImageError::Archive {
            archive: archive.to_path_buf(),
            message: format!("bad digest {:?}", d.digest),
        })?;
        let nested: Index = read_json(&self.blob(hex))?;
        let arch = node_architecture();
        nested
            .manifests
            .into_iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.is(arch)))
            .map(|m| m.digest)
            .ok_or_else(|| ImageError::Archive {
                archive: archive.to_path_buf(),
                message: format!("image index {} has no linux/{arch} image", d.digest),
            })
    }

    fn store_blob(
        &self,
        archive: &Path,
        hex: &str,
        from: &mut impl Read,
    ) -> Result<(), ImageError> {
        let dest = self.blob(hex);
        if dest.is_file() {
            return Ok(());
        }
        let tmp = self
            .root
            .join("blobs/sha256")
            .join(format!(".partial-{hex}"));
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).map_err(io_err(archive))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        }
        out.sync_all().map_err(io_err(&tmp))?;
        let actual = hex_string(&hasher.finalize());
        if actual != hex {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::Digest {
                archive: archive.to_path_buf(),
                digest: format!("sha256:{hex}"),
                actual,
            });
        }
        fs::rename(&tmp, &dest).map_err(io_err(&dest))
    }

    fn unpack(&self, archive: &Path, manifest_digest: &str, dir: &Path) -> Result<(), ImageError> {
        self.unpack_limited(archive, manifest_digest, dir, UnpackLimits::default())
    }

    fn unpack_limited(
        &self,
        archive: &Path,
        manifest_digest: &str,
        dir: &Path,
        limits: UnpackLimits,
    ) -> Result<(), ImageError> {
        let bad = |message: String| ImageError::Archive {
            archive: archive.to_path_buf(),
            message,
        };
        let hex = valid_digest(manifest_digest)
            .ok_or_else(|| bad(format!("bad digest {manifest_digest:?}")))?;
        let manifest: Manifest = read_json(&self.blob(hex))?;
        let partial = self.root.join("rootfs").join(format!(".partial-{hex}"));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
        }
        fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        set_mode(&partial, 0o755)?;
        let budget = std::cell::Cell::new(0u64);
        let applied = manifest.layers.iter().try_for_each(|layer| {
            let lhex = valid_digest(&layer.digest)
                .ok_or_else(|| bad(format!("bad layer digest {:?}", layer.digest)))?;
            let blob = self.blob(lhex);
            if !blob.is_file() {
                return Err(bad(format!("layer {} is not in the archive", layer.digest)));
            }
            let file = File::open(&blob).map_err(io_err(&blob))?;
            let decoded: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(file))
            } else if layer.media_type.ends_with("zstd") {
                return Err(bad(format!(
                    "layer {} is zstd-compressed, which Berth does not unpack yet",
                    layer.digest
                )));
            } else {
                Box::new(file)
            };
            let limited = Limited {
                inner: decoded,
                used: &budget,
                limits,
                dest: &partial,
                next_check: 0,
            };
            apply_layer(archive, limited, &blob, &layer.digest, &partial)
        });
        if let Err(e) = applied {
            let _ = fs::remove_dir_all(&partial);
            return Err(e);
        }
        // On disk before it has its name, and its name on disk before the
        // store's record says the image is there: a node that loses power
        // just after must not run containers from files that came back
        // empty. One syncfs flushes the whole tree (and whatever else is
        // dirty on the filesystem, which an unpack outweighs).
        syncfs(&partial)?;
        fs::rename(&partial, dir).map_err(io_err(dir))?;
        syncfs(dir)
    }
}

fn syncfs(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|f| rustix::fs::syncfs(&f).map_err(io::Error::from))
        .map_err(io_err(path))
}

/// Bytes a tree takes on disk (allocated blocks), not following symlinks;
/// hard links inside the tree are counted once.
pub fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// The sha256 of a stream, in hex.
pub fn sha256_hex(from: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(hex_string(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let mut body = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_JSON).read_to_end(&mut body))
        .map_err(io_err(path))?;
    serde_json::from_slice(&body).map_err(|e| ImageError::Archive {
        archive: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A layer entry's path, relative and with no `..`; `None` for the root itself.
fn clean_entry_path(raw: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("climbs out with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Refuses a path whose existing parents include a symlink: writing
/// through it could land anywhere on the host.
fn parents_are_real(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return true;
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return false,
            _ => {}
        }
    }
    true
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The decompressed stream of a layer, counted against the image's budget
/// and the filesystem's free space.
struct Limited<'a, R> {
    inner: R,
    used: &'a std::cell::Cell<u64>,
    limits: UnpackLimits,
    dest: &'a Path,
    next_check: u64,
}

/// How often (in bytes unpacked) free space is read again.
const FREE_CHECK_EVERY: u64 = 32 << 20;

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let used = self.used.get() + n as u64;
        self.used.set(used);
        if used > self.limits.max_bytes {
            return Err(io::Error::other(format!(
                "the image unpacks to more than {} bytes (a decompression bomb, or an image bigger than the node allows); refused",
                self.limits.max_bytes
            )));
        }
        if used >= self.next_check {
            self.next_check = used + FREE_CHECK_EVERY;
            if let Ok(st) = rustix::fs::statvfs(self.dest) {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if free < self.limits.min_free_bytes {
                    return Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        format!(
                            "the disk is nearly full ({free} bytes free, {} kept free); the image is not unpacked",
                            self.limits.min_free_bytes
                        ),
                    ));
                }
            }
        }
        Ok(n)
    }
}

/// Applies one layer's tar stream (already decompressed) to `dest`.
fn apply_layer(
    archive: &Path,
    reader: impl Read,
    blob: &Path,
    digest: &str,
    dest: &Path,
) -> Result<(), ImageError> {
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_preserve_mtime(true);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    let escape = |entry: &Path, why: &'static str| ImageError::Escape {
        archive: archive.to_path_buf(),
        layer: digest.to_string(),
        entry: entry.display().to_string(),
        why,
    };
    // Paths this layer created: an opaque marker hides lower layers only.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in tar.entries().map_err(io_err(blob))? {
        let mut entry = entry.map_err(io_err(blob))?;
        let raw = entry.path().map_err(io_err(blob))?.into_owned();
        let rel = match clean_entry_path(&raw) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(why) => return Err(escape(&raw, why)),
        };
        if !parents_are_real(dest, &rel) {
            return Err(escape(&raw, "would be written through a symlink"));
        }
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if file_name == ".wh..wh..opq" {
            let dir = dest.join(&parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent.join(child.file_name());
                    if !created.contains(&child_rel) {
                        remove_any(&child.path()).map_err(io_err(&child.path()))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let target = dest.join(&parent).join(hidden);
            remove_any(&target).map_err(io_err(&target))?;
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            // Device nodes come from the runtime (MountAPIVFS), not the image.
            continue;
        }
        let target = dest.join(&rel);
        if let Ok(m) = fs::symlink_metadata(&target)
            && !(m.is_dir() && kind.is_dir())
        {
            remove_any(&target).map_err(io_err(&target))?;
        }
        if kind.is_hard_link()
            && let Ok(Some(link)) = entry.link_name()
            && clean_entry_path(&link).is_err()
        {
            return Err(escape(&raw, "is a hard link to a path outside the image"));
        }
        // The tar crate wraps the real cause; keep it in the message.
        let inside = entry.unpack_in(dest).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .and_then(|c| c.source().or(Some(c)))
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            io_err(&target)(io::Error::new(e.kind(), format!("{e}{cause}")))
        })?;
        if !inside {
            return Err(escape(&raw, "would be written outside the image root"));
        }
        created.insert(rel);
    }
    Ok(())
}

pub mod archive;

#[cfg(test)]
mod tests;

//! Update bundles: what `make image` writes beside the disk image and what a
//! node installs into its other root slot.
//!
//! A bundle is a directory (or the layers of an OCI artifact) holding
//!
//! - `bundle.json`: the manifest, the version, and for each part its file
//!   name, size and sha256 ([`Manifest`]);
//! - `bundle.json.sig`: an SSH signature over `bundle.json` in the
//!   `berth-bundle` namespace (`ssh-keygen -Y sign -n berth-bundle`),
//!   checked against the same allowed-signers format the node uses for
//!   commits;
//! - `root.img.zst`: the root filesystem image, a zstd frame; the manifest
//!   also gives the size and sha256 of the image it decompresses to, which
//!   is what the slot must hold before anything points at it;
//! - `vmlinuz` and `initrd.img`: the slot's kernel and initrd.
//!
//! Only the manifest is signed; every other byte is bound to it by its
//! sha256. The manifest is parsed only after its signature checks.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use berth_git::{AllowedSigners, BUNDLE_NAMESPACE, SignatureError, Signer};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub const MANIFEST_FILE: &str = "bundle.json";
pub const SIGNATURE_FILE: &str = "bundle.json.sig";
/// The manifest's schema: a node refuses a bundle of a newer schema by name.
pub const SCHEMA: u32 = 1;
/// A manifest is a few hundred bytes; anything past this is not one.
const MAX_MANIFEST: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    /// The OS version the bundle installs (`0.2.0`, `0.2.0+test.1`).
    pub version: String,
    /// `amd64`: a node refuses a bundle for another architecture.
    pub architecture: String,
    pub root: RootPart,
    pub kernel: Part,
    pub initrd: Part,
}

/// A file of the bundle, bound to the manifest by its size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Part {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// The root filesystem: the compressed file, and the image it decompresses
/// to (what is written to the slot, and read back and hashed there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootPart {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// `zstd`, the only one.
    pub compression: String,
    pub image_size: u64,
    pub image_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("{path}: {why}")]
    Manifest { path: PathBuf, why: String },
    #[error("{path}: {field} {why}; refused, nothing written")]
    Part {
        path: PathBuf,
        field: &'static str,
        why: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A bundle whose signature and every part's digest have been checked.
#[derive(Debug, Clone)]
pub struct Verified {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub signer: Signer,
}

impl Verified {
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// Size and sha256 (hex) of everything `reader` gives.
pub fn digest(mut reader: impl Read) -> io::Result<(u64, String)> {
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hash.finalize())))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A part's file name: one plain name inside the bundle, never a path.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name != MANIFEST_FILE
        && name != SIGNATURE_FILE
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// Parses a manifest, refusing what a node could not install safely.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, BundleError> {
        let bad = |why: String| BundleError::Manifest {
            path: path.to_path_buf(),
            why,
        };
        let probe: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        match probe.get("schema").and_then(serde_json::Value::as_u64) {
            Some(s) if s == u64::from(SCHEMA) => {}
            Some(s) => {
                return Err(bad(format!(
                    "schema {s} is newer than this node reads ({SCHEMA}); update the node in steps"
                )));
            }
            None => return Err(bad("has no schema".into())),
        }
        let m: Manifest = serde_json::from_value(probe).map_err(|e| bad(e.to_string()))?;
        if m.version.is_empty() || m.version.len() > 64 || m.version.contains(char::is_whitespace) {
            return Err(bad(format!(
                "version {:?} must be 1-64 characters without spaces",
                m.version
            )));
        }
        if m.root.compression != "zstd" {
            return Err(bad(format!(
                "root.compression {:?} is not supported (zstd)",
                m.root.compression
            )));
        }
        let parts = [
            ("root", m.root.file.as_str(), m.root.sha256.as_str()),
            ("kernel", m.kernel.file.as_str(), m.kernel.sha256.as_str()),
            ("initrd", m.initrd.file.as_str(), m.initrd.sha256.as_str()),
        ];
        for (field, file, sha) in parts {
            if !plain_name(file) {
                return Err(bad(format!(
                    "{field}.file {file:?} must be a plain file name in the bundle"
                )));
            }
            if !is_sha256(sha) {
                return Err(bad(format!(
                    "{field}.sha256 is not 64 lowercase hex digits"
                )));
            }
        }
        if !is_sha256(&m.root.image_sha256) {
            return Err(bad("root.imageSha256 is not 64 lowercase hex digits".into()));
        }
        Ok(m)
    }

    /// Writes the manifest for the parts in `dir` (the root image already
    /// compressed there as `root_file`), decompressing the root once to
    /// learn the image's size and digest.
    pub fn describe(
        dir: &Path,
        version: &str,
        architecture: &str,
        root_file: &str,
        kernel_file: &str,
        initrd_file: &str,
    ) -> Result<Self, BundleError> {
        let part = |file: &str| -> Result<Part, BundleError> {
            let path = dir.join(file);
            let (size, sha256) = File::open(&path)
                .and_then(digest)
                .map_err(io_error(&path))?;
            Ok(Part {
                file: file.to_string(),
                size,
                sha256,
            })
        };
        let root = part(root_file)?;
        let root_path = dir.join(root_file);
        let (image_size, image_sha256) = File::open(&root_path)
            .map_err(io_error(&root_path))
            .and_then(|f| {
                digest(decompress(io::BufReader::new(f), &root_path)?).map_err(io_error(&root_path))
            })?;
        let m = Manifest {
            schema: SCHEMA,
            version: version.to_string(),
            architecture: architecture.to_string(),
            root: RootPart {
                file: root.file,
                size: root.size,
                sha256: root.sha256,
                compression: "zstd".into(),
                image_size,
                image_sha256,
            },
            kernel: part(kernel_file)?,
            initrd: part(initrd_file)?,
        };
        let text = serde_json::to_vec_pretty(&m).map_err(|e| BundleError::Manifest {
            path: dir.join(MANIFEST_FILE),
            why: e.to_string(),
        })?;
        Self::parse(&text, &dir.join(MANIFEST_FILE))?;
        let out = dir.join(MANIFEST_FILE);
        std::fs::write(&out, [text, b"\n".to_vec()].concat()).map_err(io_error(&out))?;
        Ok(m)
    }
}

/// A reader of the image a zstd frame holds.
pub fn decompress<R: Read>(reader: R, path: &Path) -> Result<impl Read, BundleError> {
    ruzstd::decoding::StreamingDecoder::new(reader).map_err(|e| BundleError::Part {
        path: path.to_path_buf(),
        field: "root",
        why: format!("is not a zstd frame: {e}"),
    })
}

/// Checks a bundle's manifest in `dir`: its signature against `allowed`,
/// then its schema and architecture. The parts are not looked at: a
/// download checks this before fetching them.
pub fn verify_manifest(
    dir: &Path,
    allowed: &AllowedSigners,
    architecture: &str,
) -> Result<(Manifest, Signer), BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let sig_path = dir.join(SIGNATURE_FILE);
    let mut bytes = Vec::new();
    File::open(&manifest_path)
        .and_then(|f| f.take(MAX_MANIFEST + 1).read_to_end(&mut bytes))
        .map_err(io_error(&manifest_path))?;
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(BundleError::Manifest {
            path: manifest_path,
            why: format!("is over {MAX_MANIFEST} bytes; not a bundle manifest"),
        });
    }
    let subject = format!("bundle {}", manifest_path.display());
    let armoured = match std::fs::read_to_string(&sig_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SignatureError::Unsigned(subject).into());
        }
        Err(e) => return Err(io_error(&sig_path)(e)),
    };
    let signer = allowed.verify(BUNDLE_NAMESPACE, &subject, &armoured, &bytes)?;
    let manifest = Manifest::parse(&bytes, &manifest_path)?;
    if manifest.architecture != architecture {
        return Err(BundleError::Manifest {
            path: manifest_path,
            why: format!(
                "architecture {} is not this node's ({architecture})",
                manifest.architecture
            ),
        });
    }
    Ok((manifest, signer))
}

/// Checks a bundle directory: the manifest ([`verify_manifest`]), then
/// each part's size and sha256. Nothing is written.
pub fn verify(
    dir: &Path,
    allowed: &AllowedSigners,
    architecture: &str,
) -> Result<Verified, BundleError> {
    let (manifest, signer) = verify_manifest(dir, allowed, architecture)?;
    let check = |field: &'static str, file: &str, size: u64, sha: &str| {
        let path = dir.join(file);
        let (got_size, got_sha) = File::open(&path)
            .and_then(digest)
            .map_err(io_error(&path))?;
        if got_size != size {
            return Err(BundleError::Part {
                path,
                field,
                why: format!("is {got_size} bytes, the signed manifest says {size}"),
            });
        }
        if got_sha != sha {
            return Err(BundleError::Part {
                path,
                field,
                why: format!("has sha256 {got_sha}, the signed manifest says {sha}"),
            });
        }
        Ok(())
    };
    let m = &manifest;
    check("root", &m.root.file, m.root.size, &m.root.sha256)?;
    check("kernel", &m.kernel.file, m.kernel.size, &m.kernel.sha256)?;
    check("initrd", &m.initrd.file, m.initrd.size, &m.initrd.sha256)?;
    Ok(Verified {
        dir: dir.to_path_buf(),
        manifest,
        signer,
    })
}

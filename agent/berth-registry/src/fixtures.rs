//! Test fixtures made offline: a real registry (Debian's `docker-registry`)
//! started on loopback, and images built here and pushed to it through
//! the distribution API's upload endpoints. Used by the registry tests,
//! the QEMU tests and `make bench-images`; nothing in the agent calls it.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

/// The registry binary Debian's package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A registry process listening on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct TestRegistry {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// `user:password` when it asks for a login.
    pub login: Option<(String, String)>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestRegistry {
    /// Starts one with its storage under `dir`. With `login`, every request
    /// needs basic auth (an htpasswd file made with `htpasswd -B`).
    pub fn start(dir: &Path, login: Option<(&str, &str)>) -> Result<Self, String> {
        if !Path::new(REGISTRY_BIN).exists() {
            return Err(format!(
                "{REGISTRY_BIN} is missing: install Debian's docker-registry package (scripts/deps.sh does)"
            ));
        }
        std::fs::create_dir_all(dir.join("storage")).map_err(|e| e.to_string())?;
        let port = free_port().map_err(|e| e.to_string())?;
        let mut auth = String::new();
        if let Some((user, password)) = login {
            let out = Command::new("htpasswd")
                .args(["-nbB", user, password])
                .output()
                .map_err(|e| format!("htpasswd (apache2-utils): {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let file = dir.join("htpasswd");
            std::fs::write(&file, &out.stdout).map_err(|e| e.to_string())?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                file.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.join("storage").display()
        );
        let config_file = dir.join("config.yml");
        std::fs::write(&config_file, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{REGISTRY_BIN}: {e}"))?;
        let mut me = Self {
            child,
            port,
            dir: dir.to_path_buf(),
            login: login.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let agent = Self::agent();
        loop {
            if let Ok(resp) = agent.get(&format!("{}/v2/", me.url())).call() {
                let _ = resp;
                return Ok(me);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                return Err(format!("the registry exited ({status}): {log}"));
            }
            if Instant::now() > deadline {
                return Err("the registry did not answer within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps a blob's bytes (to corrupt it on purpose).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
    }

    fn auth(&self) -> Option<String> {
        self.login.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// Uploads a blob (monolithic upload) unless the registry has it.
    pub fn push_blob(&self, repo: &str, body: &[u8]) -> Result<String, String> {
        let digest = digest(body);
        let agent = Self::agent();
        let mut post = agent.post(&format!("{}/v2/{repo}/blobs/uploads/", self.url()));
        if let Some(a) = self.auth() {
            post = post.header("Authorization", a);
        }
        let resp = post.send_empty().map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 202 {
            return Err(format!("upload start: {}", resp.status()));
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or("upload start: no Location")?
            .to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url())
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut put = agent
            .put(&format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream");
        if let Some(a) = self.auth() {
            put = put.header("Authorization", a);
        }
        let resp = put.send(body).map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 201 {
            return Err(format!("upload {digest}: {}", resp.status()));
        }
        Ok(digest)
    }

    /// Puts a manifest or index under a tag (or its digest); returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String, String> {
        let mut put = Self::agent()
            .put(&format!("{}/v2/{repo}/manifests/{tag}", self.url()))
            .header("Content-Type", media_type);
        if let Some(a) = self.auth() {
            put = put.header("Authorization", a);
        }
        let resp = put.send(body).map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 201 {
            return Err(format!("manifest {repo}:{tag}: {}", resp.status()));
        }
        Ok(digest(body))
    }

    /// Pushes an image of these layers (each as stored: pass gzipped
    /// bytes with `gzip`) and this config; returns the manifest digest.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        gzip: bool,
        config: &serde_json::Value,
    ) -> Result<String, String> {
        let body = self.image_manifest(repo, layers, gzip, config)?;
        self.push_manifest(repo, tag, OCI_MANIFEST, &body)
    }

    /// Uploads layers and config and returns the manifest, unpushed.
    pub fn image_manifest(
        &self,
        repo: &str,
        layers: &[Vec<u8>],
        gzip: bool,
        config: &serde_json::Value,
    ) -> Result<Vec<u8>, String> {
        let config = serde_json::to_vec(config).map_err(|e| e.to_string())?;
        let config_digest = self.push_blob(repo, &config)?;
        let mut descs = Vec::new();
        for l in layers {
            let d = self.push_blob(repo, l)?;
            descs.push(serde_json::json!({
                "mediaType": if gzip { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" },
                "digest": d, "size": l.len(),
            }));
        }
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        }))
        .map_err(|e| e.to_string())
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn digest(body: &[u8]) -> String {
    let mut r = body;
    format!(
        "sha256:{}",
        berth_images::sha256_hex(&mut r).unwrap_or_default()
    )
}

/// Incompressible bytes (xorshift), as most real layers are after gzip:
/// the benchmarks' layer contents.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar header owned by root, dated the epoch.
pub fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A gzip-compressed copy of a layer.
pub fn gzip(layer: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(layer);
    enc.finish().unwrap_or_default()
}

/// A layer holding the host's static busybox as `/bin/busybox` with the
/// links a shell needs, plus `files`; for images a container really runs.
pub fn busybox_layer(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>, String> {
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox (Debian's busybox-static): {e}"))?;
    let mut all: Vec<(&str, &[u8], u32)> = vec![("bin/busybox", &busybox, 0o755)];
    all.extend_from_slice(files);
    let mut b = tar::Builder::new(Vec::new());
    for dir in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "run", "var", "data",
    ] {
        let mut h = header(
            tar::EntryType::Directory,
            if dir == "tmp" { 0o1777 } else { 0o755 },
            0,
        );
        b.append_data(&mut h, dir, &[][..])
            .map_err(|e| e.to_string())?;
    }
    for applet in [
        "sh", "ls", "cat", "echo", "sleep", "id", "ps", "touch", "mkdir", "wc", "dd", "httpd",
        "stat", "hostname", "head", "grep",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    for (path, body, mode) in all {
        let mut h = header(tar::EntryType::Regular, mode, body.len() as u64);
        b.append_data(&mut h, path, body)
            .map_err(|e| e.to_string())?;
    }
    b.into_inner().map_err(|e| e.to_string())
}

//! The distribution API, as far as pulling goes: manifests by tag or
//! digest (image indexes resolved to the node's platform), blobs resumed
//! where a cut pull left them, every byte checked against its digest
//! before the image store takes it.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use berth_images::{ImageError, ImageStore, Platform, UnpackLimits, node_architecture};
use serde::Deserialize;

use crate::auth::{Challenge, Credential, matching, parse_challenge};
use crate::reference::{InvalidReference, Reference};

/// How the node reaches registries, from its config.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// By registry name as references write it (`registry.example:5000`,
    /// `docker.io`).
    pub hosts: BTreeMap<String, HostConfig>,
    /// Connecting, and waiting for any one read, give up after this.
    pub timeout: Duration,
    pub limits: UnpackLimits,
    /// `amd64`, `arm64`: which image of a multi-platform index to take.
    pub architecture: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Endpoints tried before the registry itself, in order, each a URL
    /// (`https://mirror.example`, `http://10.0.2.100:5000`).
    pub mirrors: Vec<String>,
    /// The registry itself speaks plain HTTP. Only ever when the node
    /// config says so.
    pub insecure: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            hosts: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            limits: UnpackLimits::default(),
            architecture: node_architecture().to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    InvalidName(#[from] InvalidReference),
    #[error("{endpoint}: pull access denied for {repository}: {message}")]
    Unauthorized {
        endpoint: String,
        repository: String,
        message: String,
    },
    #[error("{endpoint}: {reference} not found")]
    NotFound { endpoint: String, reference: String },
    #[error("{endpoint}: cannot reach the registry: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("{endpoint}: {message}")]
    Protocol { endpoint: String, message: String },
    #[error("{endpoint}: {what} has digest sha256:{actual}, not the {expected} asked for; refused")]
    Digest {
        endpoint: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Store(#[from] ImageError),
}

impl PullError {
    /// Credentials were refused or missing: retrying soon will not help.
    pub fn is_auth(&self) -> bool {
        matches!(self, PullError::Unauthorized { .. })
    }
}

/// What a pull's bytes are up to, read by status while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// What a pull gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub reference: String,
    pub manifest: String,
    /// Bytes downloaded now (blobs the store had are not counted).
    pub downloaded: u64,
    /// False when the store already had this exact image.
    pub new: bool,
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST: u64 = 4 << 20;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ManifestOrIndex {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
}

/// The `artifactType` of an OS update bundle in a registry: an OCI image
/// manifest whose layers are the bundle's files, each named by its
/// `org.opencontainers.image.title` annotation, and whose config is the
/// empty descriptor.
pub const BUNDLE_ARTIFACT_TYPE: &str = "application/vnd.berth.bundle.v1";
/// The media type of each file of a bundle artifact.
pub const BUNDLE_PART_TYPE: &str = "application/vnd.berth.bundle.part.v1";
const TITLE: &str = "org.opencontainers.image.title";
/// A bundle bigger than this, all parts together, is refused before any
/// of it is downloaded.
pub const MAX_BUNDLE: u64 = 4 << 30;

/// What [`Client::pull_artifact`] gave: the manifest's digest, and each
/// part by its file name and digest (its bytes are the store's blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub manifest: String,
    pub parts: Vec<(String, String)>,
    /// Bytes downloaded now (parts the store had are not counted).
    pub downloaded: u64,
}

fn artifact_from(
    s: &mut Session<'_>,
    store: &ImageStore,
    progress: &Progress,
) -> Result<Artifact, PullError> {
    let r = s.reference;
    let (digest, body) = s.manifest(r.manifest_ref(), r.digest.as_deref())?;
    let m: ManifestOrIndex = serde_json::from_slice(&body)
        .map_err(|e| s.protocol(format!("manifest of {r} is not JSON: {e}")))?;
    let kind = m
        .artifact_type
        .as_deref()
        .or(m.config.as_ref().map(|c| c.media_type.as_str()))
        .unwrap_or("");
    if m.manifests.is_some() || kind != BUNDLE_ARTIFACT_TYPE {
        return Err(s.protocol(format!(
            "{r} is not a Berth bundle: its artifactType is {kind:?}, not {BUNDLE_ARTIFACT_TYPE}"
        )));
    }
    let layers = m.layers.unwrap_or_default();
    let mut parts: Vec<(String, String)> = Vec::new();
    let mut total = 0u64;
    for l in &layers {
        let name = l.annotations.get(TITLE).map(String::as_str).unwrap_or("");
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0');
        if !plain {
            return Err(s.protocol(format!(
                "layer {} of {r} has no plain file name in {TITLE} ({name:?})",
                l.digest
            )));
        }
        if parts.iter().any(|(n, _)| n == name) {
            return Err(s.protocol(format!("{r} has two layers named {name:?}")));
        }
        if berth_images::valid_digest(&l.digest).is_none() {
            return Err(s.protocol(format!("layer {name} has a bad digest {:?}", l.digest)));
        }
        total = total.saturating_add(l.size);
        parts.push((name.to_string(), l.digest.clone()));
    }
    if total > MAX_BUNDLE {
        return Err(s.protocol(format!(
            "{r} is {total} bytes, more than the {MAX_BUNDLE} a bundle may be; nothing downloaded"
        )));
    }
    let missing: Vec<&Descriptor> = layers
        .iter()
        .filter(|d| !store.has_blob(&d.digest))
        .collect();
    progress
        .total
        .store(missing.iter().map(|d| d.size).sum(), Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let mut downloaded = 0;
    for d in missing {
        downloaded += s.blob(store, d, progress)?;
    }
    let source = format!("{}/{}", s.endpoint, r.repository);
    store.put_blob(&source, &digest, &body)?;
    Ok(Artifact {
        manifest: digest,
        parts,
        downloaded,
    })
}

#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    config: RegistryConfig,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut r = bytes;
    berth_images::sha256_hex(&mut r).unwrap_or_default()
}

impl Client {
    pub fn new(config: RegistryConfig) -> Self {
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::NativeTls)
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(config.timeout))
            .timeout_recv_response(Some(config.timeout))
            .timeout_recv_body(Some(config.timeout))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self { agent, config }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Where `reference` can be pulled from: its mirrors, then itself.
    fn endpoints(&self, r: &Reference) -> Vec<String> {
        let host = self
            .config
            .hosts
            .get(&r.registry)
            .cloned()
            .unwrap_or_default();
        let mut out: Vec<String> = host
            .mirrors
            .iter()
            .map(|m| m.trim_end_matches('/').to_string())
            .collect();
        let scheme = if host.insecure { "http" } else { "https" };
        out.push(format!("{scheme}://{}", r.api_host()));
        out
    }

    /// Pulls `reference` into `store` (blobs it has are not fetched again)
    /// and points the reference at what it got.
    pub fn pull(
        &self,
        store: &ImageStore,
        reference: &str,
        creds: &[Credential],
        progress: &Progress,
    ) -> Result<Pulled, PullError> {
        self.each_endpoint(reference, creds, |s| self.pull_from(s, store, progress))
    }

    /// Pulls an OS update bundle published as an OCI artifact (see
    /// [`BUNDLE_ARTIFACT_TYPE`]): every part into `store` as a verified
    /// blob, resumed where a cut download left it. Nothing is unpacked.
    pub fn pull_artifact(
        &self,
        store: &ImageStore,
        reference: &str,
        creds: &[Credential],
        progress: &Progress,
    ) -> Result<Artifact, PullError> {
        self.each_endpoint(reference, creds, |s| artifact_from(s, store, progress))
    }

    /// Downloads `url` (a bundle part published on a web server) to
    /// `dest`, resuming from `dest.partial` where a cut download left it;
    /// more than `max` bytes is refused. HTTPS, or plain HTTP for a host
    /// the node config marks insecure. Returns the bytes fetched now.
    pub fn fetch_file(
        &self,
        url: &str,
        dest: &Path,
        max: u64,
        progress: &Progress,
    ) -> Result<u64, PullError> {
        let host = url_host(url);
        let plain_ok = self.config.hosts.get(host).is_some_and(|h| h.insecure);
        if !(url.starts_with("https://") || (url.starts_with("http://") && plain_ok)) {
            return Err(PullError::Protocol {
                endpoint: host.to_string(),
                message: format!(
                    "{url}: only https:// (plain http:// only for a host the node config marks insecure)"
                ),
            });
        }
        let unreachable = |e: &dyn std::fmt::Display| PullError::Unreachable {
            endpoint: host.to_string(),
            message: format!("{url}: {e}"),
        };
        let partial = dest.with_extension("partial");
        let io_fail = |e: io::Error| {
            PullError::Store(ImageError::Io {
                path: partial.clone(),
                source: e,
            })
        };
        let have = fs::metadata(&partial).map_or(0, |m| m.len());
        let mut req = self
            .agent
            .get(url)
            .config()
            .timeout_recv_body(Some(
                self.config.timeout + Duration::from_secs(max / MIN_RATE),
            ))
            .build();
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let mut resp = req.call().map_err(|e| unreachable(&e))?;
        match resp.status().as_u16() {
            200 => {}
            206 if have > 0 => {}
            404 => {
                return Err(PullError::NotFound {
                    endpoint: host.to_string(),
                    reference: url.to_string(),
                });
            }
            s => {
                return Err(PullError::Protocol {
                    endpoint: host.to_string(),
                    message: format!("{url}: the server answered {s}"),
                });
            }
        }
        progress.done.fetch_add(have, Ordering::Relaxed);
        let (fetched, _) = land(&mut resp, &partial, have, max, progress).map_err(|e| match e {
            Landing::Io(e) => io_fail(e),
            Landing::Read(e) => unreachable(&e),
            Landing::TooLong => PullError::Protocol {
                endpoint: host.to_string(),
                message: format!("{url} is longer than the {max} bytes expected; refused"),
            },
        })?;
        fs::rename(&partial, dest).map_err(io_fail)?;
        Ok(fetched)
    }

    /// Publishes a bundle (`files`: each part's name and path) as an OCI
    /// artifact under `reference` on its registry itself (no mirror), each
    /// part a layer named by its title annotation; parts the registry has
    /// are not sent again. Returns the manifest's digest.
    pub fn push_artifact(
        &self,
        reference: &str,
        files: &[(String, std::path::PathBuf)],
        creds: &[Credential],
    ) -> Result<String, PullError> {
        let r = Reference::parse(reference)?;
        let host = self
            .config
            .hosts
            .get(&r.registry)
            .cloned()
            .unwrap_or_default();
        let endpoint = format!(
            "{}://{}",
            if host.insecure { "http" } else { "https" },
            r.api_host()
        );
        let mut s = Session {
            agent: &self.agent,
            timeout: self.config.timeout,
            endpoint: &endpoint,
            reference: &r,
            creds: matching(creds, &r.registry, &r.repository),
            auth: None,
        };
        let mut layers = Vec::new();
        for (name, path) in files {
            let io_fail = |e: io::Error| {
                PullError::Store(ImageError::Io {
                    path: path.clone(),
                    source: e,
                })
            };
            let mut file = fs::File::open(path).map_err(io_fail)?;
            let hex = berth_images::sha256_hex(&mut file).map_err(io_fail)?;
            let size = file.metadata().map_err(io_fail)?.len();
            let digest = format!("sha256:{hex}");
            s.push_blob(&digest, || {
                fs::File::open(path).map(PushBody::File).map_err(io_fail)
            })?;
            layers.push(serde_json::json!({
                "mediaType": BUNDLE_PART_TYPE,
                "digest": digest,
                "size": size,
                "annotations": {TITLE: name},
            }));
        }
        let config = b"{}";
        let config_digest = format!("sha256:{}", sha256_hex(config));
        s.push_blob(&config_digest, || Ok(PushBody::Bytes(config.to_vec())))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": BUNDLE_ARTIFACT_TYPE,
            "config": {"mediaType": BUNDLE_ARTIFACT_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layers,
        }))
        .map_err(|e| s.protocol(e.to_string()))?;
        let url = format!(
            "{endpoint}/v2/{}/manifests/{}",
            r.repository,
            r.manifest_ref()
        );
        let resp = s.send_authorized(
            "PUT",
            &url,
            Some("application/vnd.oci.image.manifest.v1+json"),
            || Ok(PushBody::Bytes(manifest.clone())),
        )?;
        if resp.status().as_u16() != 201 {
            return Err(s.protocol(format!(
                "manifest {reference}: the registry answered {}",
                resp.status()
            )));
        }
        Ok(format!("sha256:{}", sha256_hex(&manifest)))
    }

    /// `f` on each endpoint of `reference` in turn (its mirrors, then the
    /// registry) until one gives an answer.
    fn each_endpoint<T>(
        &self,
        reference: &str,
        creds: &[Credential],
        mut f: impl FnMut(&mut Session<'_>) -> Result<T, PullError>,
    ) -> Result<T, PullError> {
        let r = Reference::parse(reference)?;
        let endpoints = self.endpoints(&r);
        let mut last = None;
        for (i, endpoint) in endpoints.iter().enumerate() {
            // A pull secret's login goes to the host it names: a mirror
            // gets only credentials written for the mirror itself.
            let is_mirror = i + 1 < endpoints.len();
            let host = if is_mirror {
                url_host(endpoint)
            } else {
                &r.registry
            };
            let mut session = Session {
                agent: &self.agent,
                timeout: self.config.timeout,
                endpoint,
                reference: &r,
                creds: matching(creds, host, &r.repository),
                auth: None,
            };
            match f(&mut session) {
                Ok(p) => return Ok(p),
                // A mirror that fails is skipped; the registry itself has the last word.
                Err(e) if is_mirror => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| PullError::Unreachable {
            endpoint: r.registry.clone(),
            message: "no endpoint".into(),
        }))
    }

    fn pull_from(
        &self,
        s: &mut Session<'_>,
        store: &ImageStore,
        progress: &Progress,
    ) -> Result<Pulled, PullError> {
        let r = s.reference;
        let (digest, body) = s.manifest(r.manifest_ref(), r.digest.as_deref())?;
        let parsed: ManifestOrIndex = serde_json::from_slice(&body)
            .map_err(|e| s.protocol(format!("manifest of {r} is not JSON: {e}")))?;
        let (manifest_digest, manifest_body, manifest) = if let Some(list) = &parsed.manifests {
            let wanted = &self.config.architecture;
            let pick = list
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| p.is(wanted)))
                .ok_or_else(|| {
                    s.protocol(format!("image index of {r} has no linux/{wanted} image"))
                })?;
            if pick.size > MAX_MANIFEST {
                return Err(s.protocol(format!(
                    "manifest {} is {} bytes, too big",
                    pick.digest, pick.size
                )));
            }
            let (d, body) = s.manifest(&pick.digest, Some(&pick.digest))?;
            let m: ManifestOrIndex = serde_json::from_slice(&body)
                .map_err(|e| s.protocol(format!("manifest {d} is not JSON: {e}")))?;
            if m.manifests.is_some() {
                return Err(s.protocol(format!("manifest {d} is another index; refused")));
            }
            (d, body, m)
        } else {
            (digest, body, parsed)
        };
        let (Some(config), Some(layers)) = (&manifest.config, &manifest.layers) else {
            return Err(s.protocol(format!(
                "manifest of {r} ({}) has no config or layers; schema 1 manifests are not supported",
                manifest.media_type
            )));
        };
        for l in layers {
            let t = l.media_type.as_str();
            let known = t.ends_with("tar") || t.ends_with("tar+gzip") || t.ends_with("tar.gzip");
            if !known {
                return Err(s.protocol(format!(
                    "layer {} has media type {t:?}, which Berth does not unpack",
                    l.digest
                )));
            }
        }
        let missing: Vec<&Descriptor> = std::iter::once(config)
            .chain(layers)
            .filter(|d| !store.has_blob(&d.digest))
            .collect();
        let total: u64 = missing.iter().map(|d| d.size).sum();
        progress.total.store(total, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let mut downloaded = 0;
        for d in &missing {
            downloaded += s.blob(store, d, progress)?;
        }
        let source = format!("{}/{}", s.endpoint, r.repository);
        store.put_blob(&source, &manifest_digest, &manifest_body)?;
        let new = store.install(
            &source,
            &r.to_string(),
            &manifest_digest,
            self.config.limits,
        )?;
        Ok(Pulled {
            reference: r.to_string(),
            manifest: manifest_digest,
            downloaded,
            new,
        })
    }
}

/// The slowest average rate a blob may arrive at, in bytes per second.
const MIN_RATE: u64 = 256 * 1024;

struct Session<'a> {
    agent: &'a ureq::Agent,
    timeout: Duration,
    endpoint: &'a str,
    reference: &'a Reference,
    /// Credentials still to try, most specific first.
    creds: Vec<&'a Credential>,
    auth: Option<String>,
}

/// A body to send, made again for each try (a login may be asked first).
enum PushBody {
    File(fs::File),
    Bytes(Vec<u8>),
}

impl Session<'_> {
    /// A request that logs in when the registry asks (basic, or a token
    /// with push scope), sending a body made by `body` for each try.
    fn send_authorized(
        &mut self,
        method: &str,
        url: &str,
        content_type: Option<&str>,
        body: impl Fn() -> Result<PushBody, PullError>,
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        let mut tried: Vec<Option<usize>> = Vec::new();
        loop {
            let mut req = ureq::http::Request::builder().method(method).uri(url);
            if let Some(t) = content_type {
                req = req.header("Content-Type", t);
            }
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a);
            }
            let sent = match body()? {
                PushBody::File(f) => req
                    .body(f)
                    .map_err(|e| self.protocol(e.to_string()))
                    .and_then(|r| self.agent.run(r).map_err(|e| self.unreachable(e))),
                PushBody::Bytes(b) => req
                    .body(b)
                    .map_err(|e| self.protocol(e.to_string()))
                    .and_then(|r| self.agent.run(r).map_err(|e| self.unreachable(e))),
            }?;
            if sent.status().as_u16() != 401 {
                if sent.status().as_u16() == 403 {
                    return Err(self.denied("the registry answered 403 Forbidden".into()));
                }
                return Ok(sent);
            }
            // Anonymous first (a token without credentials), then each credential once.
            let next = if tried.is_empty() {
                None
            } else {
                let n = tried.iter().flatten().count();
                if n >= self.creds.len() {
                    return Err(self.denied(if self.creds.is_empty() {
                        "the registry wants a login to push (--auth-file)".into()
                    } else {
                        "the credentials were refused".into()
                    }));
                }
                Some(n)
            };
            tried.push(next);
            let cred = next.map(|i| self.creds[i]);
            let challenge = sent
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            self.auth = match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => {
                    let scope = format!("repository:{}:pull,push", self.reference.repository);
                    Some(self.token(&realm, service.as_deref(), Some(&scope), cred)?)
                }
                Some(Challenge::Basic) | None => match cred {
                    Some(c) => Some(basic(c)),
                    None => continue,
                },
            };
        }
    }

    /// Uploads one blob (a monolithic upload) unless the registry has it.
    fn push_blob(
        &mut self,
        digest: &str,
        body: impl Fn() -> Result<PushBody, PullError>,
    ) -> Result<(), PullError> {
        let repo = self.reference.repository.clone();
        let head = format!("{}/v2/{repo}/blobs/{digest}", self.endpoint);
        let have = self.send_authorized("HEAD", &head, None, || Ok(PushBody::Bytes(Vec::new())))?;
        if have.status().as_u16() == 200 {
            return Ok(());
        }
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.endpoint);
        let resp =
            self.send_authorized("POST", &start, None, || Ok(PushBody::Bytes(Vec::new())))?;
        if resp.status().as_u16() != 202 {
            return Err(self.protocol(format!(
                "blob {digest}: starting the upload, the registry answered {}",
                resp.status()
            )));
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.protocol(format!("blob {digest}: the upload has no Location")))?;
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.endpoint)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let resp = self.send_authorized("PUT", &put, Some("application/octet-stream"), body)?;
        if resp.status().as_u16() != 201 {
            return Err(self.protocol(format!(
                "blob {digest}: the registry answered {}",
                resp.status()
            )));
        }
        Ok(())
    }

    fn protocol(&self, message: String) -> PullError {
        PullError::Protocol {
            endpoint: self.endpoint.to_string(),
            message,
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> PullError {
        PullError::Unreachable {
            endpoint: self.endpoint.to_string(),
            message: e.to_string(),
        }
    }

    fn denied(&self, message: String) -> PullError {
        PullError::Unauthorized {
            endpoint: self.endpoint.to_string(),
            repository: self.reference.repository.clone(),
            message,
        }
    }

    /// A GET that logs in when the registry asks: basic or token auth,
    /// trying each matching credential in turn.
    fn get(
        &mut self,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        self.get_within(url, headers, Some(self.timeout))
    }

    fn get_within(
        &mut self,
        url: &str,
        headers: &[(&str, String)],
        body_timeout: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        let mut tried_anonymous = false;
        let mut tried_credentials = false;
        loop {
            let mut req = self
                .agent
                .get(url)
                .config()
                .timeout_recv_body(body_timeout)
                .build();
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a);
            }
            let resp = req.call().map_err(|e| self.unreachable(e))?;
            let status = resp.status().as_u16();
            if status != 401 {
                if status == 403 {
                    return Err(self.denied("the registry answered 403 Forbidden".into()));
                }
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            // A token without credentials is how public images are pulled;
            // that is tried once before any credential.
            let cred = if self.auth.is_none()
                && !tried_anonymous
                && matches!(challenge, Some(Challenge::Bearer { .. }))
                && self.creds.is_empty()
            {
                tried_anonymous = true;
                None
            } else if self.creds.is_empty() {
                return Err(self.denied(if tried_credentials {
                    "the credentials were refused".into()
                } else {
                    "the registry wants a login and no imagePullSecret has credentials for it"
                        .into()
                }));
            } else {
                tried_credentials = true;
                Some(self.creds.remove(0))
            };
            self.auth = Some(match challenge {
                Some(Challenge::Basic) | None => {
                    let c = cred.ok_or_else(|| self.denied("the registry wants a login".into()))?;
                    basic(c)
                }
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope,
                }) => self.token(&realm, service.as_deref(), scope.as_deref(), cred)?,
            });
        }
    }

    fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        cred: Option<&Credential>,
    ) -> Result<String, PullError> {
        if !realm_allowed(self.endpoint, realm) {
            return Err(self.denied(format!(
                "the token service {realm} is not HTTPS: nothing is sent to it (plain HTTP only for a registry the node config marks insecure)"
            )));
        }
        let scope = scope.map_or_else(
            || format!("repository:{}:pull", self.reference.repository),
            str::to_string,
        );
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(s) = service {
            req = req.query("service", s);
        }
        if let Some(c) = cred {
            req = req.header("Authorization", basic(c));
        }
        let mut resp = req.call().map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self.denied(format!(
                "the token service {realm} answered {}",
                resp.status()
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| self.unreachable(e))?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("token from {realm} is not JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| self.protocol(format!("{realm} gave no token")))?;
        Ok(format!("Bearer {token}"))
    }

    /// Fetches a manifest and checks its digest: against the one asked
    /// for, or for a tag against what the registry says it is.
    fn manifest(
        &mut self,
        reference: &str,
        expected: Option<&str>,
    ) -> Result<(String, Vec<u8>), PullError> {
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.endpoint, self.reference.repository
        );
        let mut resp = self.get(&url, &[("Accept", MANIFEST_TYPES.to_string())])?;
        match resp.status().as_u16() {
            200 => {}
            404 => {
                return Err(PullError::NotFound {
                    endpoint: self.endpoint.to_string(),
                    reference: format!("{}:{reference}", self.reference.repository),
                });
            }
            s => {
                return Err(
                    self.protocol(format!("manifest {reference}: the registry answered {s}"))
                );
            }
        }
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST)
            .read_to_vec()
            .map_err(|e| self.unreachable(format!("manifest {reference}: {e}")))?;
        let actual = sha256_hex(&body);
        let digest = format!("sha256:{actual}");
        if let Some(want) = expected.or(claimed.as_deref().filter(|c| c.starts_with("sha256:")))
            && want != digest
        {
            return Err(PullError::Digest {
                endpoint: self.endpoint.to_string(),
                what: format!("manifest {reference}"),
                expected: want.to_string(),
                actual,
            });
        }
        Ok((digest, body))
    }

    /// Downloads one blob into the store, resuming a partial download.
    /// Returns the bytes fetched now.
    fn blob(
        &mut self,
        store: &ImageStore,
        d: &Descriptor,
        progress: &Progress,
    ) -> Result<u64, PullError> {
        let partial = store
            .partial_blob(&d.digest)
            .ok_or_else(|| self.protocol(format!("bad digest {:?}", d.digest)))?;
        let io_fail = |e: io::Error| {
            // A write that failed (the disk full) leaves nothing behind.
            let _ = fs::remove_file(&partial);
            PullError::Store(ImageError::Io {
                path: partial.clone(),
                source: e,
            })
        };
        let mut have = fs::metadata(&partial).map_or(0, |m| m.len());
        if have > d.size {
            fs::remove_file(&partial).map_err(io_fail)?;
            have = 0;
        }
        progress.done.fetch_add(have, Ordering::Relaxed);
        let url = format!(
            "{}/v2/{}/blobs/{}",
            self.endpoint, self.reference.repository, d.digest
        );
        let mut fetched = 0;
        if have < d.size {
            let headers = if have > 0 {
                vec![("Range", format!("bytes={have}-"))]
            } else {
                Vec::new()
            };
            // A stalled transfer is cut: the body must come at 256 KiB/s on
            // average. What arrived stays, and the next pull resumes there.
            let budget = self.timeout + Duration::from_secs((d.size - have) / MIN_RATE);
            let mut resp = self.get_within(&url, &headers, Some(budget))?;
            match resp.status().as_u16() {
                200 => {}
                206 if have > 0 => {}
                404 => {
                    return Err(PullError::NotFound {
                        endpoint: self.endpoint.to_string(),
                        reference: format!("blob {}", d.digest),
                    });
                }
                s => {
                    return Err(
                        self.protocol(format!("blob {}: the registry answered {s}", d.digest))
                    );
                }
            }
            let (now, total) =
                land(&mut resp, &partial, have, d.size, progress).map_err(|e| match e {
                    Landing::Io(e) => io_fail(e),
                    Landing::Read(e) => self.unreachable(format!("blob {}: {e}", d.digest)),
                    Landing::TooLong => self.protocol(format!(
                        "blob {} is longer than the {} bytes its descriptor says; refused",
                        d.digest, d.size
                    )),
                })?;
            fetched = now;
            have = total - now;
            if have + fetched < d.size {
                return Err(self.unreachable(format!(
                    "blob {} ended after {} of {} bytes; the next pull resumes there",
                    d.digest,
                    have + fetched,
                    d.size
                )));
            }
        }
        let source = format!("{}/{}", self.endpoint, self.reference.repository);
        store.commit_blob(&source, &d.digest).map_err(|e| match e {
            ImageError::Digest { digest, actual, .. } => PullError::Digest {
                endpoint: self.endpoint.to_string(),
                what: format!("blob {digest}"),
                expected: digest,
                actual,
            },
            other => PullError::Store(other),
        })?;
        Ok(fetched)
    }
}

/// What went wrong while a download's body was written.
enum Landing {
    Io(io::Error),
    Read(io::Error),
    /// More than the size promised: the file is removed.
    TooLong,
}

/// Writes a download's body into `partial`: after the `have` bytes there
/// for a 206 (the rest), from the start for a 200 (the whole; what
/// `progress` counted of `have` is taken back). At most `size` bytes in
/// all. Synced. Returns the bytes received now and the bytes in the file.
fn land(
    resp: &mut ureq::http::Response<ureq::Body>,
    partial: &Path,
    have: u64,
    size: u64,
    progress: &Progress,
) -> Result<(u64, u64), Landing> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(partial)
        .map_err(Landing::Io)?;
    let start = if resp.status().as_u16() == 206 && have > 0 {
        file.seek(io::SeekFrom::Start(have)).map_err(Landing::Io)?;
        have
    } else {
        progress.done.fetch_sub(have, Ordering::Relaxed);
        file.set_len(0).map_err(Landing::Io)?;
        0
    };
    // One byte more than promised is enough to know it lies.
    let mut body = resp
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .take(size.saturating_sub(start) + 1);
    let mut buf = vec![0u8; 256 * 1024];
    let mut fetched = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(Landing::Read)?;
        if n == 0 {
            break;
        }
        fetched += n as u64;
        if start + fetched > size {
            drop(file);
            let _ = fs::remove_file(partial);
            return Err(Landing::TooLong);
        }
        file.write_all(&buf[..n]).map_err(Landing::Io)?;
        progress.done.fetch_add(n as u64, Ordering::Relaxed);
    }
    file.sync_data().map_err(Landing::Io)?;
    Ok((fetched, start + fetched))
}

/// `host[:port]` of an endpoint URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Where a registry's token service may be: HTTPS, or plain HTTP when the
/// registry itself is spoken to over plain HTTP (the node config's
/// `insecure`, or a mirror written as `http://`).
fn realm_allowed(endpoint: &str, realm: &str) -> bool {
    realm.starts_with("https://")
        || (endpoint.starts_with("http://") && realm.starts_with("http://"))
}

fn basic(c: &Credential) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_service_must_be_https_unless_the_registry_is_plain_http() {
        let cases = [
            (
                "https://registry.example",
                "https://auth.example/token",
                true,
            ),
            (
                "https://registry.example",
                "http://auth.example/token",
                false,
            ),
            (
                "https://registry.example",
                "ftp://auth.example/token",
                false,
            ),
            ("https://registry.example", "/token", false),
            (
                "http://10.0.2.100:5000",
                "http://10.0.2.100:5001/token",
                true,
            ),
            ("http://10.0.2.100:5000", "https://auth.example/token", true),
        ];
        for (endpoint, realm, allowed) in cases {
            assert_eq!(
                realm_allowed(endpoint, realm),
                allowed,
                "{endpoint} {realm}"
            );
        }
        assert_eq!(
            url_host("https://mirror.internal:8443/v2/"),
            "mirror.internal:8443"
        );
        assert_eq!(url_host("http://10.0.2.100:5000"), "10.0.2.100:5000");
    }
}

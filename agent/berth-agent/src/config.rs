//! The node's configuration, merged from three places in a fixed order:
//! `berth/config.yaml` on the ESP (editable from any OS after flashing), then
//! systemd credentials `berth.*` (QEMU passes them by SMBIOS), then the
//! kernel command line `berth.*=`. A later source overrides an earlier one,
//! field by field, so a test or a one-off boot can change one setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_git::{Credentials, Remote};
use berth_manifest::names;
use serde::Deserialize;

/// Where a setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Credential(String),
    KernelCommandLine,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Credential(name) => write!(f, "credential {name}"),
            Origin::KernelCommandLine => f.write_str("kernel command line"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {field}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub field: String,
    pub message: String,
}

fn error(origin: &Origin, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        origin: origin.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// The file's shape. Unknown fields are errors: a typo must not be ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    node: Option<FileNode>,
    #[serde(default)]
    git: Option<FileGit>,
    #[serde(default)]
    status: Option<FileStatus>,
    #[serde(default)]
    drift: Option<FileDrift>,
    #[serde(default)]
    network: Option<FileNetwork>,
    #[serde(default)]
    storage: Option<FileStorage>,
    #[serde(default)]
    images: Option<FileImages>,
    #[serde(default)]
    security: Option<FileSecurity>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileImages {
    registries: Option<BTreeMap<String, FileRegistry>>,
    pull_timeout: Option<String>,
    gc: Option<FileImageGc>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileRegistry {
    mirrors: Option<Vec<String>>,
    insecure: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileImageGc {
    high_threshold_percent: Option<u8>,
    low_threshold_percent: Option<u8>,
    minimum_age: Option<String>,
    maximum_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileSecurity {
    allow_privileged: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileStorage {
    host_path_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileNetwork {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "serviceCIDR")]
    service_cidr: Option<String>,
    cluster_domain: Option<String>,
    node_port_range: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileStatus {
    publish: Option<bool>,
    push_options: Option<Vec<String>>,
    heartbeat: Option<String>,
    history: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDrift {
    policy: Option<String>,
    restart_threshold: Option<u32>,
    ignore: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileGit {
    url: Option<String>,
    branch: Option<String>,
    path: Option<String>,
    poll_interval: Option<String>,
    credentials: Option<FileCredentials>,
    allowed_signers: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileCredentials {
    ssh_key: Option<PathBuf>,
    user: Option<String>,
    token_file: Option<PathBuf>,
}

/// One source's settings, each with where it came from.
#[derive(Debug, Default, Clone)]
struct Layer {
    node: Option<(String, Origin)>,
    labels: Option<(BTreeMap<String, String>, Origin)>,
    url: Option<(String, Origin)>,
    branch: Option<(String, Origin)>,
    path: Option<(String, Origin)>,
    poll: Option<(String, Origin)>,
    ssh_key: Option<(PathBuf, Origin)>,
    user: Option<(String, Origin)>,
    token_file: Option<(PathBuf, Origin)>,
    allowed_signers: Option<(PathBuf, Origin)>,
    publish: Option<(String, Origin)>,
    heartbeat: Option<(String, Origin)>,
    history: Option<(String, Origin)>,
    drift_policy: Option<(String, Origin)>,
    restart_threshold: Option<(String, Origin)>,
    ignore: Option<(Vec<String>, Origin)>,
    push_options: Option<(Vec<String>, Origin)>,
    pod_cidr: Option<(String, Origin)>,
    service_cidr: Option<(String, Origin)>,
    cluster_domain: Option<(String, Origin)>,
    node_port_range: Option<(String, Origin)>,
    host_path_prefixes: Option<(Vec<String>, Origin)>,
    images: Option<(FileImages, Origin)>,
    allow_privileged: Option<(bool, Origin)>,
}

impl Layer {
    fn over(mut self, top: Layer) -> Layer {
        macro_rules! take {
            ($($f:ident),*) => { $( if top.$f.is_some() { self.$f = top.$f; } )* };
        }
        take!(
            node,
            labels,
            url,
            branch,
            path,
            poll,
            ssh_key,
            user,
            token_file,
            allowed_signers,
            publish,
            heartbeat,
            history,
            drift_policy,
            restart_threshold,
            ignore,
            push_options,
            pod_cidr,
            service_cidr,
            cluster_domain,
            node_port_range,
            host_path_prefixes,
            images,
            allow_privileged
        );
        self
    }
}

/// The merged, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub remote: Remote,
    /// The directory of the branch that holds this node's manifests.
    pub path: String,
    pub poll_interval: Duration,
    pub credentials: Option<Credentials>,
    /// Only commits signed by these keys are applied, when set.
    pub allowed_signers: Option<PathBuf>,
    /// Whether status and drift are pushed to the remote.
    pub publish: bool,
    /// A status commit at least this often, and every branch pushed again.
    pub heartbeat: Duration,
    /// Status commits kept on the branch before it starts over.
    pub history: usize,
    /// Sent with drift branch pushes (`git push -o`), for forges that open
    /// a merge request from a push.
    pub push_options: Vec<String>,
    pub drift: crate::drift::Settings,
    /// Pod and Service ranges, cluster domain, node port range.
    pub network: berth_net::NetworkSettings,
    /// `storage.hostPathPrefixes`: the only places hostPath volumes and
    /// static PersistentVolumes may bind (none by default).
    pub host_path_prefixes: Vec<String>,
    /// `images`: registries (mirrors, plain HTTP), pull timeout, collection.
    pub images: ImageSettings,
    /// `security.allowPrivileged`: whether `privileged: true` containers may run.
    pub allow_privileged: bool,
    /// Which sources contributed, in order.
    pub sources: Vec<String>,
}

/// Where to look; `main` builds this from the real paths and the tests from
/// temporary ones.
#[derive(Debug, Clone)]
pub struct ConfigSources {
    pub esp_file: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, when systemd passed credentials.
    pub credentials_dir: Option<PathBuf>,
    /// The kernel command line (the contents of /proc/cmdline).
    pub kernel_cmdline: String,
    /// Used when no source names the node.
    pub hostname: String,
}

pub const DEFAULT_BRANCH: &str = "main";
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);
pub const MIN_POLL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(300);
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(10);
pub const DEFAULT_HISTORY: usize = 100;

/// Reads every source and merges them. A missing ESP file is not an error in
/// itself (a missing Git URL is); a malformed one is.
pub fn load(sources: &ConfigSources) -> Result<NodeConfig, ConfigError> {
    let mut merged = Layer::default();
    let mut used = Vec::new();
    match std::fs::read_to_string(&sources.esp_file) {
        Ok(text) => {
            merged = merged.over(parse_file(&text, Origin::File(sources.esp_file.clone()))?);
            used.push(sources.esp_file.display().to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(error(
                &Origin::File(sources.esp_file.clone()),
                "(file)",
                format!("cannot read: {e}"),
            ));
        }
    }
    if let Some(dir) = &sources.credentials_dir {
        let layer = credentials_layer(dir)?;
        if layer.1 {
            used.push("systemd credentials".to_string());
        }
        merged = merged.over(layer.0);
    }
    let cmdline = cmdline_layer(&sources.kernel_cmdline)?;
    if cmdline.1 {
        used.push("kernel command line".to_string());
    }
    merged = merged.over(cmdline.0);
    finish(merged, &sources.hostname, used)
}

fn parse_file(text: &str, origin: Origin) -> Result<Layer, ConfigError> {
    let file: FileConfig = serde_saphyr::from_str(text).map_err(|e| {
        let line = e
            .location()
            .map(|l| format!("line {}: ", l.line()))
            .unwrap_or_default();
        let first = e.to_string().lines().next().unwrap_or("").to_string();
        error(&origin, "(file)", format!("{line}{first}"))
    })?;
    let node = file.node.unwrap_or_default();
    let git = file.git.unwrap_or_default();
    let creds = git.credentials.unwrap_or_default();
    let status = file.status.unwrap_or_default();
    let drift = file.drift.unwrap_or_default();
    let network = file.network.unwrap_or_default();
    let storage = file.storage.unwrap_or_default();
    let images = file.images;
    let security = file.security.unwrap_or_default();
    let with = |v: Option<String>| v.map(|v| (v, origin.clone()));
    Ok(Layer {
        node: with(node.name),
        labels: node.labels.map(|l| (l, origin.clone())),
        url: with(git.url),
        branch: with(git.branch),
        path: with(git.path),
        poll: with(git.poll_interval),
        ssh_key: creds.ssh_key.map(|p| (p, origin.clone())),
        user: with(creds.user),
        token_file: creds.token_file.map(|p| (p, origin.clone())),
        allowed_signers: git.allowed_signers.map(|p| (p, origin.clone())),
        publish: with(status.publish.map(|b| b.to_string())),
        heartbeat: with(status.heartbeat),
        history: with(status.history.map(|n| n.to_string())),
        drift_policy: with(drift.policy),
        restart_threshold: with(drift.restart_threshold.map(|n| n.to_string())),
        ignore: drift.ignore.map(|l| (l, origin.clone())),
        push_options: status.push_options.map(|l| (l, origin.clone())),
        pod_cidr: with(network.pod_cidr),
        service_cidr: with(network.service_cidr),
        cluster_domain: with(network.cluster_domain),
        node_port_range: with(network.node_port_range),
        host_path_prefixes: storage.host_path_prefixes.map(|l| (l, origin.clone())),
        images: images.map(|i| (i, origin.clone())),
        allow_privileged: security.allow_privileged.map(|b| (b, origin.clone())),
    })
}

/// Keys shared by credentials (`berth.<key>`) and the kernel command line (`berth.<key>=`).
const KEYS: [&str; 21] = [
    "node",
    "labels",
    "repo",
    "branch",
    "path",
    "poll",
    "ssh-key",
    "user",
    "token-file",
    "allowed-signers",
    "publish",
    "heartbeat",
    "history",
    "drift-policy",
    "restart-threshold",
    "drift-ignore",
    "push-options",
    "pod-cidr",
    "service-cidr",
    "cluster-domain",
    "node-port-range",
];

fn set(layer: &mut Layer, key: &str, value: String, origin: Origin) -> Result<(), ConfigError> {
    match key {
        "node" => layer.node = Some((value, origin)),
        "labels" => layer.labels = Some((parse_labels(&value, &origin)?, origin)),
        "repo" => layer.url = Some((value, origin)),
        "branch" => layer.branch = Some((value, origin)),
        "path" => layer.path = Some((value, origin)),
        "poll" => layer.poll = Some((value, origin)),
        "ssh-key" => layer.ssh_key = Some((PathBuf::from(value), origin)),
        "user" => layer.user = Some((value, origin)),
        "token-file" => layer.token_file = Some((PathBuf::from(value), origin)),
        "allowed-signers" => layer.allowed_signers = Some((PathBuf::from(value), origin)),
        "publish" => layer.publish = Some((value, origin)),
        "heartbeat" => layer.heartbeat = Some((value, origin)),
        "history" => layer.history = Some((value, origin)),
        "drift-policy" => layer.drift_policy = Some((value, origin)),
        "pod-cidr" => layer.pod_cidr = Some((value, origin)),
        "service-cidr" => layer.service_cidr = Some((value, origin)),
        "cluster-domain" => layer.cluster_domain = Some((value, origin)),
        "node-port-range" => layer.node_port_range = Some((value, origin)),
        "restart-threshold" => layer.restart_threshold = Some((value, origin)),
        "drift-ignore" => {
            let fields = value
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect();
            layer.ignore = Some((fields, origin));
        }
        "push-options" => {
            let options = value
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect();
            layer.push_options = Some((options, origin));
        }
        other => {
            return Err(error(
                &origin,
                other,
                format!(
                    "unknown setting; known: {}",
                    KEYS.map(|k| format!("berth.{k}")).join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn credentials_layer(dir: &Path) -> Result<(Layer, bool), ConfigError> {
    let mut layer = Layer::default();
    let mut any = false;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok((layer, false));
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // berth.config (a whole config file) first, single settings on top of it.
    if let Some(i) = names.iter().position(|n| n == "berth.config") {
        let name = names.remove(i);
        let origin = Origin::Credential(name.clone());
        let text = std::fs::read_to_string(dir.join(&name))
            .map_err(|e| error(&origin, "(credential)", e.to_string()))?;
        layer = layer.over(parse_file(&text, origin)?);
        any = true;
    }
    for name in names {
        let Some(key) = name.strip_prefix("berth.") else {
            continue;
        };
        let origin = Origin::Credential(name.clone());
        let value = std::fs::read_to_string(dir.join(&name))
            .map_err(|e| error(&origin, key, e.to_string()))?;
        set(&mut layer, key, value.trim().to_string(), origin)?;
        any = true;
    }
    Ok((layer, any))
}

fn cmdline_layer(cmdline: &str) -> Result<(Layer, bool), ConfigError> {
    let mut layer = Layer::default();
    let mut any = false;
    for word in cmdline.split_whitespace() {
        let Some(setting) = word.strip_prefix("berth.") else {
            continue;
        };
        let Some((key, value)) = setting.split_once('=') else {
            return Err(error(
                &Origin::KernelCommandLine,
                word,
                "expected berth.<setting>=<value>",
            ));
        };
        set(
            &mut layer,
            key,
            value.to_string(),
            Origin::KernelCommandLine,
        )?;
        any = true;
    }
    Ok((layer, any))
}

fn parse_labels(text: &str, origin: &Origin) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| error(origin, "labels", format!("{pair:?} is not key=value")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// `30s`, `5m`, `1h`, `1500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn setting_text(v: &Option<(String, Origin)>) -> Option<&str> {
    v.as_ref().map(|(t, _)| t.as_str())
}

fn finish(layer: Layer, hostname: &str, sources: Vec<String>) -> Result<NodeConfig, ConfigError> {
    let none = Origin::File(PathBuf::from("(no source)"));
    let (node_name, node_origin) = layer.node.clone().unwrap_or_else(|| {
        (
            hostname.to_string(),
            Origin::File(PathBuf::from("(hostname)")),
        )
    });
    names::dns1123_subdomain(&node_name).map_err(|e| error(&node_origin, "node.name", e))?;
    let (labels, labels_origin) = layer
        .labels
        .clone()
        .unwrap_or_else(|| (BTreeMap::new(), none.clone()));
    for (k, v) in &labels {
        names::qualified_name(k).map_err(|e| error(&labels_origin, "node.labels", e))?;
        names::label_value(v).map_err(|e| error(&labels_origin, "node.labels", e))?;
    }
    let (url, url_origin) = layer.url.clone().ok_or_else(|| ConfigError {
        origin: if sources.is_empty() { "no configuration found".into() } else { sources.join(", ") },
        field: "git.url".into(),
        message: "no Git URL is configured: set git.url in berth/config.yaml on the ESP, the berth.repo credential, or berth.repo= on the kernel command line".into(),
    })?;
    let url_ok = ["git://", "http://", "https://", "ssh://", "file://", "/"]
        .iter()
        .any(|p| url.starts_with(p))
        || (url.contains('@') && url.contains(':'));
    if !url_ok || url.chars().any(char::is_whitespace) {
        return Err(error(
            &url_origin,
            "git.url",
            format!(
                "{url:?} is not a Git URL (git://, https://, ssh://, user@host:path, file:// or an absolute path)"
            ),
        ));
    }
    let (branch, branch_origin) = layer
        .branch
        .clone()
        .unwrap_or_else(|| (DEFAULT_BRANCH.to_string(), none.clone()));
    let branch_ok = !branch.is_empty()
        && !branch.starts_with(['-', '/', '.'])
        && !branch.ends_with(['/', '.'])
        && !branch.contains("..")
        && !branch.ends_with(".lock")
        && branch
            .chars()
            .all(|c| !c.is_control() && !" ~^:?*[\\".contains(c));
    if !branch_ok {
        return Err(error(
            &branch_origin,
            "git.branch",
            format!("{branch:?} is not a valid branch name"),
        ));
    }
    let (path, path_origin) = layer
        .path
        .clone()
        .unwrap_or_else(|| (".".to_string(), none.clone()));
    if path.split('/').any(|c| c == "..") || path.starts_with('/') {
        return Err(error(
            &path_origin,
            "git.path",
            format!("{path:?} must be a relative path inside the repository without '..'"),
        ));
    }
    let poll_interval = match &layer.poll {
        None => DEFAULT_POLL,
        Some((text, origin)) => {
            let d = parse_duration(text).ok_or_else(|| {
                error(
                    origin,
                    "git.pollInterval",
                    format!("{text:?} is not a duration such as 30s, 5m or 1h"),
                )
            })?;
            if d < MIN_POLL {
                return Err(error(
                    origin,
                    "git.pollInterval",
                    format!("{text:?} is shorter than the minimum of 5s"),
                ));
            }
            d
        }
    };
    let user = layer.user.clone().map(|(u, _)| u);
    let credentials = match (&layer.ssh_key, &layer.token_file) {
        (Some(_), Some((_, origin))) => {
            return Err(error(
                origin,
                "git.credentials",
                "set either sshKey or tokenFile, not both",
            ));
        }
        (Some((key, _)), None) => Some(Credentials::SshKey {
            user: user.unwrap_or_else(|| "git".into()),
            private_key: key.clone(),
        }),
        (None, Some((file, origin))) => {
            let token = std::fs::read_to_string(file).map_err(|e| {
                error(
                    origin,
                    "git.credentials.tokenFile",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            Some(Credentials::Token {
                user: user.unwrap_or_else(|| "x-access-token".into()),
                token: token.trim().to_string(),
            })
        }
        (None, None) => None,
    };
    let publish = match &layer.publish {
        None => true,
        Some((text, origin)) => match text.as_str() {
            "true" | "yes" | "1" => true,
            "false" | "no" | "0" => false,
            _ => {
                return Err(error(
                    origin,
                    "status.publish",
                    format!("{text:?} is not true or false"),
                ));
            }
        },
    };
    let heartbeat = match &layer.heartbeat {
        None => DEFAULT_HEARTBEAT,
        Some((text, origin)) => match parse_duration(text) {
            Some(d) if d >= MIN_HEARTBEAT => d,
            Some(_) => {
                return Err(error(
                    origin,
                    "status.heartbeat",
                    format!("{text:?} is shorter than the minimum of 10s"),
                ));
            }
            None => {
                return Err(error(
                    origin,
                    "status.heartbeat",
                    format!("{text:?} is not a duration such as 30s, 5m or 1h"),
                ));
            }
        },
    };
    let history = match &layer.history {
        None => DEFAULT_HISTORY,
        Some((text, origin)) => match text.parse::<usize>() {
            Ok(n) if (2..=10_000).contains(&n) => n,
            _ => {
                return Err(error(
                    origin,
                    "status.history",
                    format!("{text:?} is not a number of commits from 2 to 10000"),
                ));
            }
        },
    };
    let mut drift = crate::drift::Settings::default();
    if let Some((text, origin)) = &layer.drift_policy {
        drift.policy = crate::drift::Policy::parse(text).ok_or_else(|| {
            error(
                origin,
                "drift.policy",
                format!("{text:?} is not a drift policy: use heal or report"),
            )
        })?;
    }
    if let Some((text, origin)) = &layer.restart_threshold {
        drift.restart_threshold = text.parse().map_err(|_| {
            error(
                origin,
                "drift.restartThreshold",
                format!("{text:?} is not a whole number"),
            )
        })?;
    }
    if let Some((fields, origin)) = &layer.ignore {
        for f in fields {
            if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(error(
                    origin,
                    "drift.ignore",
                    format!(
                        "{f:?} is not a field name (a systemd property such as MemoryHigh, or state, restarts, apply)"
                    ),
                ));
            }
        }
        drift.ignore = fields.iter().cloned().collect();
    }
    let push_options = match &layer.push_options {
        None => Vec::new(),
        Some((options, origin)) => {
            if let Some(bad) = options
                .iter()
                .find(|o| o.is_empty() || o.chars().any(|c| c.is_control()))
            {
                return Err(error(
                    origin,
                    "status.pushOptions",
                    format!(
                        "{bad:?} is not a push option (one line of text, such as merge_request.create)"
                    ),
                ));
            }
            options.clone()
        }
    };
    let network = berth_net::NetworkSettings::parse(
        setting_text(&layer.pod_cidr),
        setting_text(&layer.service_cidr),
        setting_text(&layer.cluster_domain),
        setting_text(&layer.node_port_range),
    )
    .map_err(|e| {
        let origin = match e.field {
            "network.podCIDR" => &layer.pod_cidr,
            "network.serviceCIDR" => layer
                .service_cidr
                .as_ref()
                .map_or(&layer.pod_cidr, |_| &layer.service_cidr),
            "network.clusterDomain" => &layer.cluster_domain,
            _ => &layer.node_port_range,
        };
        let origin = origin.as_ref().map_or(none.clone(), |(_, o)| o.clone());
        error(&origin, e.field, e.message)
    })?;
    let mut host_path_prefixes = Vec::new();
    if let Some((prefixes, origin)) = &layer.host_path_prefixes {
        for p in prefixes {
            if let Err(e) = berth_manifest::volumes::absolute_path(p) {
                return Err(error(origin, "storage.hostPathPrefixes", e));
            }
            if p.trim_end_matches('/').is_empty() {
                return Err(error(
                    origin,
                    "storage.hostPathPrefixes",
                    "\"/\" would let pods bind the whole node; name the directories they may use",
                ));
            }
            host_path_prefixes.push(p.trim_end_matches('/').to_string());
        }
    }
    let allowed_signers = layer.allowed_signers.clone().map(|(p, _)| p);
    let images = match &layer.images {
        None => ImageSettings::default(),
        Some((file, origin)) => image_settings(file, origin)?,
    };
    let allow_privileged = layer.allow_privileged.as_ref().is_some_and(|(b, _)| *b);
    Ok(NodeConfig {
        node_name,
        labels,
        remote: Remote { url, branch },
        path,
        poll_interval,
        credentials,
        allowed_signers,
        publish,
        heartbeat,
        history,
        push_options,
        drift,
        network,
        host_path_prefixes,
        images,
        allow_privileged,
        sources,
    })
}

/// How the node pulls and keeps images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    /// By registry name as image references write it.
    pub registries: BTreeMap<String, RegistrySettings>,
    pub pull_timeout: Duration,
    /// Collection starts when the image filesystem is fuller than this...
    pub gc_high_percent: u8,
    /// ...and frees unused images until it is below this.
    pub gc_low_percent: u8,
    /// An unused image younger than this is never collected.
    pub gc_minimum_age: Duration,
    /// An image unused for longer than this is collected whatever the disk
    /// says (none by default, as in the kubelet).
    pub gc_maximum_age: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    pub mirrors: Vec<String>,
    pub insecure: bool,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            registries: BTreeMap::new(),
            pull_timeout: Duration::from_secs(30),
            gc_high_percent: 85,
            gc_low_percent: 80,
            gc_minimum_age: Duration::from_secs(120),
            gc_maximum_age: None,
        }
    }
}

fn image_settings(file: &FileImages, origin: &Origin) -> Result<ImageSettings, ConfigError> {
    let mut out = ImageSettings::default();
    for (name, r) in file.registries.iter().flatten() {
        let field = format!("images.registries.{name}");
        if name.is_empty() || name.contains(['/', ' ']) || name.starts_with("http") {
            return Err(error(
                origin,
                &field,
                "a registry is named as image references name it: host[:port], no scheme or path",
            ));
        }
        let mut mirrors = Vec::new();
        for (i, m) in r.mirrors.iter().flatten().enumerate() {
            let rest = m
                .strip_prefix("https://")
                .or_else(|| m.strip_prefix("http://"));
            let ok = rest.is_some_and(|h| {
                let host = h.trim_end_matches('/');
                !host.is_empty() && !host.contains(['/', ' ', '?', '#', '@'])
            });
            if !ok {
                return Err(error(
                    origin,
                    &format!("{field}.mirrors[{i}]"),
                    format!(
                        "{m:?} is not a mirror URL (http://host[:port] or https://host[:port])"
                    ),
                ));
            }
            mirrors.push(m.trim_end_matches('/').to_string());
        }
        out.registries.insert(
            name.clone(),
            RegistrySettings {
                mirrors,
                insecure: r.insecure.unwrap_or(false),
            },
        );
    }
    if let Some(t) = &file.pull_timeout {
        out.pull_timeout = parse_duration(t)
            .filter(|d| *d >= Duration::from_secs(1))
            .ok_or_else(|| {
                error(
                    origin,
                    "images.pullTimeout",
                    format!("{t:?} is not a duration of at least 1s (30s, 2m)"),
                )
            })?;
    }
    if let Some(gc) = &file.gc {
        let pct = |v: Option<u8>, name: &str, default: u8| match v {
            None => Ok(default),
            Some(p) if (1..=100).contains(&p) => Ok(p),
            Some(p) => Err(error(
                origin,
                &format!("images.gc.{name}"),
                format!("{p} is not a percentage from 1 to 100"),
            )),
        };
        out.gc_high_percent = pct(gc.high_threshold_percent, "highThresholdPercent", 85)?;
        out.gc_low_percent = pct(gc.low_threshold_percent, "lowThresholdPercent", 80)?;
        if out.gc_low_percent > out.gc_high_percent {
            return Err(error(
                origin,
                "images.gc.lowThresholdPercent",
                "must not be above highThresholdPercent",
            ));
        }
        if let Some(t) = &gc.minimum_age {
            out.gc_minimum_age = parse_duration(t).ok_or_else(|| {
                error(
                    origin,
                    "images.gc.minimumAge",
                    format!("{t:?} is not a duration (2m, 1h)"),
                )
            })?;
        }
        if let Some(t) = &gc.maximum_age {
            out.gc_maximum_age = Some(parse_duration(t).ok_or_else(|| {
                error(
                    origin,
                    "images.gc.maximumAge",
                    format!("{t:?} is not a duration (1h, 168h)"),
                )
            })?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("berth-config-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sources(dir: &Dir, cmdline: &str, creds: bool) -> ConfigSources {
        ConfigSources {
            esp_file: dir.0.join("config.yaml"),
            credentials_dir: creds.then(|| dir.0.join("creds")),
            kernel_cmdline: cmdline.to_string(),
            hostname: "fallback-host".into(),
        }
    }

    #[test]
    fn later_sources_override_earlier_ones_field_by_field() {
        let dir = Dir::new("layers");
        dir.write("config.yaml", "node:\n  name: from-esp\n  labels: {zone: a}\ngit:\n  url: https://example.invalid/x.git\n  branch: main\n  pollInterval: 30s\n");
        std::fs::create_dir_all(dir.0.join("creds")).expect("creds dir");
        dir.write("creds/berth.repo", "git://10.0.2.100/desired.git\n");
        dir.write("creds/berth.node", "from-credential");
        let c = load(&sources(
            &dir,
            "quiet berth.branch=staging root=/dev/vda2",
            true,
        ))
        .expect("valid");
        assert_eq!(c.node_name, "from-credential");
        assert_eq!(c.remote.url, "git://10.0.2.100/desired.git");
        assert_eq!(c.remote.branch, "staging");
        assert_eq!(c.poll_interval, Duration::from_secs(30));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.sources.len(), 3, "{:?}", c.sources);
    }

    #[test]
    fn a_typo_in_the_file_names_the_file_and_the_line() {
        let dir = Dir::new("typo");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\n  brnach: main\n",
        );
        let e = load(&sources(&dir, "", false)).expect_err("typo");
        assert!(e.origin.ends_with("config.yaml"), "{e}");
        assert!(
            e.message.contains("line 3") && e.message.contains("brnach"),
            "{e}"
        );
    }

    #[test]
    fn image_settings_are_read_and_bad_ones_name_their_field() {
        let dir = Dir::new("images");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nimages:\n  registries:\n    registry.example:\n      mirrors: [\"http://10.0.2.100:5000/\"]\n    \"10.0.2.101:5000\": {insecure: true}\n  pullTimeout: 1m\n  gc: {highThresholdPercent: 90, lowThresholdPercent: 70, minimumAge: 5m, maximumAge: 168h}\nsecurity: {allowPrivileged: true}\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(
            c.images.registries["registry.example"].mirrors,
            ["http://10.0.2.100:5000"]
        );
        assert!(c.images.registries["10.0.2.101:5000"].insecure);
        assert!(!c.images.registries["registry.example"].insecure);
        assert_eq!(c.images.pull_timeout, Duration::from_secs(60));
        assert_eq!(
            (c.images.gc_high_percent, c.images.gc_low_percent),
            (90, 70)
        );
        assert_eq!(
            c.images.gc_maximum_age,
            Some(Duration::from_secs(168 * 3600))
        );
        assert!(c.allow_privileged);
        dir.write("config.yaml", "git:\n  url: git://h/r.git\n");
        let plain = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(plain.images, ImageSettings::default());
        assert!(!plain.allow_privileged);
        for (bad, field) in [
            (
                "images:\n  registries:\n    \"https://r.example\": {}\n",
                "images.registries.https://r.example",
            ),
            (
                "images:\n  registries:\n    r.example: {mirrors: [ftp://m]}\n",
                "images.registries.r.example.mirrors[0]",
            ),
            (
                "images:\n  gc: {highThresholdPercent: 101}\n",
                "images.gc.highThresholdPercent",
            ),
            (
                "images:\n  gc: {highThresholdPercent: 50, lowThresholdPercent: 60}\n",
                "images.gc.lowThresholdPercent",
            ),
            ("images:\n  pullTimeout: soon\n", "images.pullTimeout"),
            ("images:\n  pullTimout: 1m\n", "pullTimout"),
        ] {
            dir.write("config.yaml", &format!("git:\n  url: git://h/r.git\n{bad}"));
            let e = load(&sources(&dir, "", false)).expect_err(bad);
            assert!(e.to_string().contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn host_path_prefixes_are_absolute_directories_and_never_the_root() {
        let dir = Dir::new("storage");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nstorage:\n  hostPathPrefixes: [/srv/, /data]\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.host_path_prefixes, ["/srv", "/data"]);
        for (bad, says) in [
            ("[srv]", "absolute"),
            ("[/]", "whole node"),
            ("[/srv/../etc]", "'..'"),
        ] {
            dir.write(
                "config.yaml",
                &format!("git:\n  url: git://h/r.git\nstorage:\n  hostPathPrefixes: {bad}\n"),
            );
            let e = load(&sources(&dir, "", false)).expect_err(bad);
            assert_eq!(e.field, "storage.hostPathPrefixes", "{e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn network_settings_come_from_the_file_and_a_bad_one_names_file_and_field() {
        let dir = Dir::new("network");
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nnetwork:\n  podCIDR: 172.30.0.0/16\n  serviceCIDR: 172.31.0.0/16\n  clusterDomain: example.internal\n  nodePortRange: 31000-31999\n",
        );
        let c = load(&sources(&dir, "", false)).expect("valid");
        assert_eq!(c.network.pod_cidr.to_string(), "172.30.0.0/16");
        assert_eq!(c.network.service_cidr.to_string(), "172.31.0.0/16");
        assert_eq!(c.network.cluster_domain, "example.internal");
        assert_eq!(c.network.node_ports, (31000, 31999));
        dir.write(
            "config.yaml",
            "git:\n  url: git://h/r.git\nnetwork:\n  podCIDR: 10.96.0.0/16\n",
        );
        let e = load(&sources(&dir, "", false)).expect_err("overlap");
        assert!(e.origin.ends_with("config.yaml"), "{e}");
        assert_eq!(e.field, "network.serviceCIDR");
        assert!(
            e.message.contains("overlaps the pod range 10.96.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn no_git_url_anywhere_is_a_clear_error() {
        let dir = Dir::new("nourl");
        let e = load(&sources(&dir, "", false)).expect_err("no url");
        assert_eq!(e.field, "git.url");
        assert!(e.message.contains("berth/config.yaml on the ESP"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_their_source() {
        let dir = Dir::new("bad");
        for (cmdline, field) in [
            ("berth.repo=git://h/r berth.branch=a..b", "git.branch"),
            ("berth.repo=git://h/r berth.poll=1s", "git.pollInterval"),
            ("berth.repo=git://h/r berth.poll=soon", "git.pollInterval"),
            ("berth.repo=git://h/r berth.path=../etc", "git.path"),
            ("berth.repo=not-a-url", "git.url"),
            ("berth.repo=git://h/r berth.node=Bad_Name", "node.name"),
            ("berth.repo=git://h/r berth.labels=novalue", "labels"),
            ("berth.repo=git://h/r berth.colour=red", "colour"),
            (
                "berth.repo=git://h/r berth.pod-cidr=10.88.0.0/33",
                "network.podCIDR",
            ),
            (
                "berth.repo=git://h/r berth.service-cidr=10.88.0.0/24",
                "network.serviceCIDR",
            ),
            (
                "berth.repo=git://h/r berth.node-port-range=80",
                "network.nodePortRange",
            ),
            (
                "berth.repo=git://h/r berth.drift-policy=maybe",
                "drift.policy",
            ),
            (
                "berth.repo=git://h/r berth.heartbeat=1s",
                "status.heartbeat",
            ),
            (
                "berth.repo=git://h/r berth.heartbeat=often",
                "status.heartbeat",
            ),
            ("berth.repo=git://h/r berth.history=1", "status.history"),
            (
                "berth.repo=git://h/r berth.publish=perhaps",
                "status.publish",
            ),
            (
                "berth.repo=git://h/r berth.restart-threshold=-1",
                "drift.restartThreshold",
            ),
            (
                "berth.repo=git://h/r berth.drift-ignore=Memory.Max",
                "drift.ignore",
            ),
        ] {
            let e = load(&sources(&dir, cmdline, false)).expect_err(cmdline);
            assert_eq!(e.field, field, "{cmdline}: {e}");
            assert_eq!(e.origin, "kernel command line", "{cmdline}: {e}");
        }
    }

    #[test]
    fn status_and_drift_settings_are_read_with_their_defaults() {
        let dir = Dir::new("drift");
        let file = dir.write(
            "config.yaml",
            "git:\n  url: git://h/r\n  allowedSigners: /efi/berth/allowed\nstatus:\n  heartbeat: 2m\n  history: 20\n  pushOptions: [merge_request.create]\ndrift:\n  policy: report\n  restartThreshold: 3\n  ignore: [MemoryHigh, state]\n",
        );
        let mut src = sources(&dir, "", false);
        src.esp_file = file;
        let c = load(&src).expect("valid");
        assert_eq!(c.heartbeat, Duration::from_secs(120));
        assert_eq!(c.history, 20);
        assert_eq!(c.push_options, vec!["merge_request.create".to_string()]);
        assert_eq!(c.drift.policy, crate::drift::Policy::Report);
        assert_eq!(c.drift.restart_threshold, 3);
        assert!(c.drift.ignore.contains("MemoryHigh") && c.drift.ignore.contains("state"));
        assert_eq!(c.allowed_signers, Some(PathBuf::from("/efi/berth/allowed")));
        assert!(c.publish);
        std::fs::remove_file(&src.esp_file).expect("remove");
        let d = load(&sources(&dir, "berth.repo=git://h/r", false)).expect("valid");
        assert_eq!(
            (
                d.heartbeat,
                d.history,
                d.drift.policy,
                d.drift.restart_threshold
            ),
            (
                DEFAULT_HEARTBEAT,
                DEFAULT_HISTORY,
                crate::drift::Policy::Heal,
                5
            )
        );
        let e = {
            dir.write(
                "config.yaml",
                "git:\n  url: git://h/r\ndrift:\n  polcy: heal\n",
            );
            load(&src).expect_err("typo")
        };
        assert!(e.message.contains("polcy"), "{e}");
    }

    #[test]
    fn the_hostname_names_the_node_when_nothing_else_does() {
        let dir = Dir::new("host");
        let c = load(&sources(&dir, "berth.repo=/srv/git/desired.git", false)).expect("valid");
        assert_eq!(c.node_name, "fallback-host");
        assert_eq!(c.remote.branch, "main");
        assert_eq!(c.poll_interval, DEFAULT_POLL);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("m"), None);
    }
}

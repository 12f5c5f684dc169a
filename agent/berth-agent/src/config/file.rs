//! The sources of the node's settings: the YAML file on the ESP, systemd
//! credentials and the kernel command line, each read into a [`Layer`]
//! whose every setting remembers its origin, for messages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::origin::{ConfigError, Origin, error};

/// The file's shape. Unknown fields are errors: a typo must not be ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) node: Option<FileNode>,
    #[serde(default)]
    pub(super) git: Option<FileGit>,
    #[serde(default)]
    pub(super) status: Option<FileStatus>,
    #[serde(default)]
    pub(super) drift: Option<FileDrift>,
    #[serde(default)]
    pub(super) network: Option<FileNetwork>,
    #[serde(default)]
    pub(super) storage: Option<FileStorage>,
    #[serde(default)]
    pub(super) images: Option<FileImages>,
    #[serde(default)]
    pub(super) security: Option<FileSecurity>,
    #[serde(default)]
    pub(super) rollout: Option<FileRollout>,
    #[serde(default)]
    pub(super) eviction: Option<FileEviction>,
    #[serde(default)]
    pub(super) metrics: Option<FileMetrics>,
    #[serde(default)]
    pub(super) updates: Option<FileUpdates>,
}

/// `updates:`: OS updates declared by NodeImages.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileUpdates {
    /// Keys allowed to sign update bundles (ssh-keygen's allowed-signers format).
    pub(super) allowed_signers: Option<PathBuf>,
}

/// `metrics:`: the Prometheus endpoint, off unless `listen` is given.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileMetrics {
    pub(super) listen: Option<String>,
    pub(super) allow_pods: Option<bool>,
}

/// `eviction:`: the kubelet's eviction settings, each a map from a signal
/// (`memory.available`, `nodefs.available`, `pid.available`) to a value.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileEviction {
    pub(super) hard: Option<BTreeMap<String, String>>,
    pub(super) soft: Option<BTreeMap<String, String>>,
    pub(super) soft_grace_period: Option<BTreeMap<String, String>>,
    pub(super) minimum_reclaim: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileRollout {
    pub(super) auto_rollback: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileImages {
    pub(super) registries: Option<BTreeMap<String, FileRegistry>>,
    pub(super) pull_timeout: Option<String>,
    pub(super) gc: Option<FileImageGc>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileRegistry {
    pub(super) mirrors: Option<Vec<String>>,
    pub(super) insecure: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileImageGc {
    pub(super) high_threshold_percent: Option<u8>,
    pub(super) low_threshold_percent: Option<u8>,
    pub(super) minimum_age: Option<String>,
    pub(super) maximum_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileSecurity {
    pub(super) pod_security: Option<String>,
    pub(super) allow_privileged: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileStorage {
    pub(super) host_path_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileNetwork {
    #[serde(rename = "podCIDR")]
    pub(super) pod_cidr: Option<String>,
    #[serde(rename = "serviceCIDR")]
    pub(super) service_cidr: Option<String>,
    pub(super) cluster_domain: Option<String>,
    pub(super) node_port_range: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileStatus {
    pub(super) url: Option<String>,
    pub(super) credentials: Option<FileCredentials>,
    pub(super) publish: Option<bool>,
    pub(super) push_options: Option<Vec<String>>,
    pub(super) heartbeat: Option<String>,
    pub(super) history: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileDrift {
    pub(super) policy: Option<String>,
    pub(super) restart_threshold: Option<u32>,
    pub(super) ignore: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileNode {
    pub(super) name: Option<String>,
    pub(super) labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileGit {
    pub(super) url: Option<String>,
    pub(super) branch: Option<String>,
    pub(super) path: Option<String>,
    pub(super) poll_interval: Option<String>,
    pub(super) credentials: Option<FileCredentials>,
    pub(super) allowed_signers: Option<PathBuf>,
    pub(super) allow_rewind: Option<bool>,
    pub(super) known_hosts: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileCredentials {
    pub(super) ssh_key: Option<PathBuf>,
    pub(super) user: Option<String>,
    pub(super) token_file: Option<PathBuf>,
}

/// One source's settings, each with where it came from.
#[derive(Debug, Default, Clone)]
pub(super) struct Layer {
    pub(super) node: Option<(String, Origin)>,
    pub(super) labels: Option<(BTreeMap<String, String>, Origin)>,
    pub(super) url: Option<(String, Origin)>,
    pub(super) branch: Option<(String, Origin)>,
    pub(super) path: Option<(String, Origin)>,
    pub(super) poll: Option<(String, Origin)>,
    pub(super) ssh_key: Option<(PathBuf, Origin)>,
    pub(super) user: Option<(String, Origin)>,
    pub(super) token_file: Option<(PathBuf, Origin)>,
    pub(super) allowed_signers: Option<(PathBuf, Origin)>,
    pub(super) allow_rewind: Option<(bool, Origin)>,
    pub(super) known_hosts: Option<(PathBuf, Origin)>,
    pub(super) status_url: Option<(String, Origin)>,
    pub(super) status_ssh_key: Option<(PathBuf, Origin)>,
    pub(super) status_user: Option<(String, Origin)>,
    pub(super) status_token_file: Option<(PathBuf, Origin)>,
    pub(super) publish: Option<(String, Origin)>,
    pub(super) heartbeat: Option<(String, Origin)>,
    pub(super) history: Option<(String, Origin)>,
    pub(super) drift_policy: Option<(String, Origin)>,
    pub(super) restart_threshold: Option<(String, Origin)>,
    pub(super) ignore: Option<(Vec<String>, Origin)>,
    pub(super) push_options: Option<(Vec<String>, Origin)>,
    pub(super) pod_cidr: Option<(String, Origin)>,
    pub(super) service_cidr: Option<(String, Origin)>,
    pub(super) cluster_domain: Option<(String, Origin)>,
    pub(super) node_port_range: Option<(String, Origin)>,
    pub(super) host_path_prefixes: Option<(Vec<String>, Origin)>,
    pub(super) images: Option<(FileImages, Origin)>,
    pub(super) pod_security: Option<(String, Origin)>,
    pub(super) allow_privileged: Option<(bool, Origin)>,
    pub(super) auto_rollback: Option<(String, Origin)>,
    pub(super) eviction: Option<(FileEviction, Origin)>,
    pub(super) metrics: Option<(FileMetrics, Origin)>,
    pub(super) bundle_signers: Option<(PathBuf, Origin)>,
}

impl Layer {
    pub(super) fn over(mut self, top: Layer) -> Layer {
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
            allow_rewind,
            known_hosts,
            status_url,
            status_ssh_key,
            status_user,
            status_token_file,
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
            pod_security,
            allow_privileged,
            auto_rollback,
            eviction,
            metrics,
            bundle_signers
        );
        self
    }
}

pub(super) fn parse_file(text: &str, origin: Origin) -> Result<Layer, ConfigError> {
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
    let status_creds = status.credentials.unwrap_or_default();
    let drift = file.drift.unwrap_or_default();
    let network = file.network.unwrap_or_default();
    let storage = file.storage.unwrap_or_default();
    let images = file.images;
    let security = file.security.unwrap_or_default();
    let rollout = file.rollout.unwrap_or_default();
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
        allow_rewind: git.allow_rewind.map(|b| (b, origin.clone())),
        known_hosts: git.known_hosts.map(|p| (p, origin.clone())),
        status_url: with(status.url),
        status_ssh_key: status_creds.ssh_key.map(|p| (p, origin.clone())),
        status_user: with(status_creds.user),
        status_token_file: status_creds.token_file.map(|p| (p, origin.clone())),
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
        pod_security: security.pod_security.map(|l| (l, origin.clone())),
        allow_privileged: security.allow_privileged.map(|b| (b, origin.clone())),
        auto_rollback: with(rollout.auto_rollback.map(|b| b.to_string())),
        eviction: file.eviction.map(|e| (e, origin.clone())),
        metrics: file.metrics.map(|m| (m, origin.clone())),
        bundle_signers: file
            .updates
            .and_then(|u| u.allowed_signers)
            .map(|p| (p, origin.clone())),
    })
}

/// Keys shared by credentials (`berth.<key>`) and the kernel command line (`berth.<key>=`).
pub(super) const KEYS: [&str; 22] = [
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
    "auto-rollback",
];

pub(super) fn set(
    layer: &mut Layer,
    key: &str,
    value: String,
    origin: Origin,
) -> Result<(), ConfigError> {
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
        "known-hosts" => layer.known_hosts = Some((PathBuf::from(value), origin)),
        "publish" => layer.publish = Some((value, origin)),
        "heartbeat" => layer.heartbeat = Some((value, origin)),
        "history" => layer.history = Some((value, origin)),
        "drift-policy" => layer.drift_policy = Some((value, origin)),
        "pod-cidr" => layer.pod_cidr = Some((value, origin)),
        "service-cidr" => layer.service_cidr = Some((value, origin)),
        "cluster-domain" => layer.cluster_domain = Some((value, origin)),
        "node-port-range" => layer.node_port_range = Some((value, origin)),
        "restart-threshold" => layer.restart_threshold = Some((value, origin)),
        "auto-rollback" => layer.auto_rollback = Some((value, origin)),
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

pub(super) fn credentials_layer(dir: &Path) -> Result<(Layer, bool), ConfigError> {
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

/// `berth.*` kernel parameters that are not node settings.
const BOOT_PARAMETERS: [&str; 2] = ["slot", "initrd"];

pub(super) fn cmdline_layer(cmdline: &str) -> Result<(Layer, bool), ConfigError> {
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
        // Not the agent's: the boot entry's slot (read by OS updates) and
        // the initrd's own switch.
        if BOOT_PARAMETERS.contains(&key) {
            continue;
        }
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

pub(super) fn parse_labels(
    text: &str,
    origin: &Origin,
) -> Result<BTreeMap<String, String>, ConfigError> {
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

pub(super) fn setting_text(v: &Option<(String, Origin)>) -> Option<&str> {
    v.as_ref().map(|(t, _)| t.as_str())
}

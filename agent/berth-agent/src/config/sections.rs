//! The merged settings, checked section by section into a [`NodeConfig`]:
//! every bad value is refused with the source and the field it came from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_git::{Credentials, Remote};
use berth_manifest::names;

use super::file::{Layer, parse_duration, setting_text};
use super::images::{ImageSettings, image_settings};
use super::origin::{ConfigError, Origin, error};

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
    /// `status.url`: where the status and drift branches are pushed (the
    /// desired remote unless set).
    pub status_url: String,
    /// `status.credentials`: for those pushes (the desired remote's unless set).
    pub status_credentials: Option<Credentials>,
    /// Only commits signed by these keys are applied, when set.
    pub allowed_signers: Option<PathBuf>,
    /// `git.allowRewind`: with allowed signers, whether a commit that does
    /// not descend from the last applied one (a rewinding force-push) may
    /// be applied. Off by default: an older signed commit is not replayed.
    pub allow_rewind: bool,
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
    /// `security.podSecurity`: the Pod Security Standard pods are held to
    /// (`baseline` unless set; `security.allowPrivileged: true`, the older
    /// spelling, means `privileged`).
    pub pod_security: berth_plan::podsecurity::Level,
    /// `rollout.autoRollback`: a revision whose rollout fails is rejected
    /// and the node returns to the last revision that was healthy on it
    /// (on unless set to false).
    pub auto_rollback: bool,
    /// `eviction`: the thresholds under which the node evicts pods (the
    /// kubelet's defaults when absent).
    pub eviction: berth_plan::pressure::Thresholds,
    /// `metrics`: the Prometheus endpoint (off by default).
    pub metrics: crate::metrics::MetricsSettings,
    /// `updates.allowedSigners`: keys allowed to sign OS update bundles. A
    /// NodeImage is not acted on without it.
    pub bundle_signers: Option<PathBuf>,
    /// Which sources contributed, in order.
    pub sources: Vec<String>,
}

pub const DEFAULT_BRANCH: &str = "main";
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);
pub const MIN_POLL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(300);
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(10);
pub const DEFAULT_HISTORY: usize = 100;

pub(super) fn finish(
    layer: Layer,
    hostname: &str,
    sources: Vec<String>,
) -> Result<NodeConfig, ConfigError> {
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
    git_url(&url, &url_origin, "git.url")?;
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
    let known_hosts = layer.known_hosts.as_ref().map(|(p, _)| p);
    let credentials = remote_credentials(
        layer.ssh_key.as_ref(),
        layer.token_file.as_ref(),
        layer.user.as_ref(),
        known_hosts,
        "git.credentials",
    )?;
    // Where status and drift go: the desired remote unless said otherwise,
    // so a fleet can give nodes read-only access to what they run.
    let status_url = match &layer.status_url {
        Some((u, origin)) => {
            git_url(u, origin, "status.url")?;
            u.clone()
        }
        None => url.clone(),
    };
    let status_credentials = match (&layer.status_ssh_key, &layer.status_token_file) {
        (None, None) => credentials.clone(),
        (key, token) => remote_credentials(
            key.as_ref(),
            token.as_ref(),
            layer.status_user.as_ref(),
            known_hosts,
            "status.credentials",
        )?,
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
    let allow_rewind = layer.allow_rewind.as_ref().is_some_and(|(b, _)| *b);
    let bundle_signers = layer.bundle_signers.clone().map(|(p, _)| p);
    let images = match &layer.images {
        None => ImageSettings::default(),
        Some((file, origin)) => image_settings(file, origin)?,
    };
    let pod_security = pod_security(&layer)?;
    let auto_rollback = match &layer.auto_rollback {
        None => true,
        Some((text, origin)) => match text.as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(error(
                    origin,
                    "rollout.autoRollback",
                    format!("{other:?} is not true or false"),
                ));
            }
        },
    };
    let eviction = match &layer.eviction {
        None => berth_plan::pressure::Thresholds::default(),
        Some((file, origin)) => eviction_settings(file, origin)?,
    };
    let metrics = match &layer.metrics {
        None => crate::metrics::MetricsSettings::default(),
        Some((file, origin)) => crate::metrics::MetricsSettings {
            listen: file
                .listen
                .as_deref()
                .map(crate::metrics::parse_listen)
                .transpose()
                .map_err(|e| error(origin, "metrics.listen", e))?,
            allow_pods: file.allow_pods.unwrap_or(false),
        },
    };
    Ok(NodeConfig {
        node_name,
        labels,
        remote: Remote { url, branch },
        path,
        poll_interval,
        credentials,
        status_url,
        status_credentials,
        allowed_signers,
        allow_rewind,
        bundle_signers,
        publish,
        heartbeat,
        history,
        push_options,
        drift,
        network,
        host_path_prefixes,
        images,
        pod_security,
        auto_rollback,
        eviction,
        metrics,
        sources,
    })
}

/// `eviction:` checked: each key a signal the node measures, each value a
/// quantity, a percentage or (for grace periods) a duration; an error names
/// the field.
fn eviction_settings(
    file: &super::file::FileEviction,
    origin: &Origin,
) -> Result<berth_plan::pressure::Thresholds, ConfigError> {
    use berth_plan::pressure::{Signal, Thresholds, parse_amount};
    let signal = |section: &str, key: &str| {
        Signal::parse(key).ok_or_else(|| {
            error(
                origin,
                &format!("eviction.{section}.{key}"),
                format!(
                    "{key:?} is not a signal this node measures ({}); imagefs is the node's filesystem here, nodefs covers it",
                    Signal::ALL.map(Signal::as_str).join(", ")
                ),
            )
        })
    };
    let amounts = |section: &str, map: &Option<BTreeMap<String, String>>| {
        let mut out = BTreeMap::new();
        for (key, value) in map.iter().flatten() {
            let s = signal(section, key)?;
            let a = parse_amount(s, value)
                .map_err(|e| error(origin, &format!("eviction.{section}.{key}"), e))?;
            out.insert(s, a);
        }
        Ok::<_, ConfigError>(out)
    };
    let mut thresholds = Thresholds::default();
    if file.hard.is_some() {
        // Written: exactly these, as the kubelet takes `--eviction-hard`.
        thresholds.hard = amounts("hard", &file.hard)?;
    }
    thresholds.soft = amounts("soft", &file.soft)?;
    thresholds.minimum_reclaim = amounts("minimumReclaim", &file.minimum_reclaim)?;
    for (key, value) in file.soft_grace_period.iter().flatten() {
        let s = signal("softGracePeriod", key)?;
        let d = super::file::parse_duration(value).ok_or_else(|| {
            error(
                origin,
                &format!("eviction.softGracePeriod.{key}"),
                format!("{value:?} is not a duration; write e.g. 30s or 90s"),
            )
        })?;
        thresholds.soft_grace_seconds.insert(s, d.as_secs());
    }
    for s in thresholds.soft.keys() {
        if !thresholds.soft_grace_seconds.contains_key(s) {
            return Err(error(
                origin,
                &format!("eviction.softGracePeriod.{s}"),
                format!(
                    "a soft threshold needs a grace period, as the kubelet requires (eviction.soft.{s} has none)"
                ),
            ));
        }
    }
    for s in thresholds.soft_grace_seconds.keys() {
        if !thresholds.soft.contains_key(s) {
            return Err(error(
                origin,
                &format!("eviction.softGracePeriod.{s}"),
                format!("a grace period for a soft threshold that is not set (eviction.soft.{s})"),
            ));
        }
    }
    Ok(thresholds)
}

/// A remote's URL: one of the forms libgit2 fetches and pushes.
fn git_url(url: &str, origin: &Origin, field: &str) -> Result<(), ConfigError> {
    let url_ok = ["git://", "http://", "https://", "ssh://", "file://", "/"]
        .iter()
        .any(|p| url.starts_with(p))
        || (url.contains('@') && url.contains(':'));
    if !url_ok || url.chars().any(char::is_whitespace) {
        return Err(error(
            origin,
            field,
            format!(
                "{url:?} is not a Git URL (git://, https://, ssh://, user@host:path, file:// or an absolute path)"
            ),
        ));
    }
    Ok(())
}

/// `credentials` of a remote (`git.credentials`, `status.credentials`): an
/// SSH key or a token file, never both.
fn remote_credentials(
    ssh_key: Option<&(PathBuf, Origin)>,
    token_file: Option<&(PathBuf, Origin)>,
    user: Option<&(String, Origin)>,
    known_hosts: Option<&PathBuf>,
    field: &str,
) -> Result<Option<Credentials>, ConfigError> {
    let user = user.map(|(u, _)| u.clone());
    Ok(match (ssh_key, token_file) {
        (Some(_), Some((_, origin))) => {
            return Err(error(
                origin,
                field,
                "set either sshKey or tokenFile, not both",
            ));
        }
        (Some((key, _)), None) => Some(Credentials::SshKey {
            user: user.unwrap_or_else(|| "git".into()),
            private_key: key.clone(),
            known_hosts: known_hosts.cloned(),
        }),
        (None, Some((file, origin))) => {
            let token = std::fs::read_to_string(file).map_err(|e| {
                error(
                    origin,
                    &format!("{field}.tokenFile"),
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            Some(Credentials::Token {
                user: user.unwrap_or_else(|| "x-access-token".into()),
                token: token.trim().to_string(),
            })
        }
        (None, None) => None,
    })
}

/// `security.podSecurity`, or what the older `security.allowPrivileged` meant.
fn pod_security(layer: &Layer) -> Result<berth_plan::podsecurity::Level, ConfigError> {
    use berth_plan::podsecurity::Level;
    let legacy = layer.allow_privileged.as_ref().map(|(b, o)| {
        (
            if *b {
                Level::Privileged
            } else {
                Level::Baseline
            },
            o,
        )
    });
    let Some((text, origin)) = &layer.pod_security else {
        return Ok(legacy.map_or(Level::Baseline, |(l, _)| l));
    };
    let level = Level::parse(text).ok_or_else(|| {
        error(
            origin,
            "security.podSecurity",
            format!("{text:?} is not a Pod Security level: privileged, baseline or restricted"),
        )
    })?;
    if let Some((older, o)) = legacy
        && (older == Level::Privileged) != (level == Level::Privileged)
    {
        return Err(error(
            o,
            "security.allowPrivileged",
            format!(
                "says {} but security.podSecurity is {level}: remove allowPrivileged (podSecurity: privileged is its meaning)",
                older == Level::Privileged
            ),
        ));
    }
    Ok(level)
}

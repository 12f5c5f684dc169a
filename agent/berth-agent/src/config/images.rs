//! The `images:` section: registries (mirrors, plain HTTP), the pull
//! timeout, and when unused images are collected.

use std::collections::BTreeMap;
use std::time::Duration;

use super::file::{FileImages, parse_duration};
use super::origin::{ConfigError, Origin, error};

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

pub(super) fn image_settings(
    file: &FileImages,
    origin: &Origin,
) -> Result<ImageSettings, ConfigError> {
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

impl ImageSettings {
    /// How the registry client reaches registries, from these settings.
    pub fn registry_config(&self) -> berth_registry::RegistryConfig {
        berth_registry::RegistryConfig {
            hosts: self
                .registries
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        berth_registry::HostConfig {
                            mirrors: r.mirrors.clone(),
                            insecure: r.insecure,
                        },
                    )
                })
                .collect(),
            timeout: self.pull_timeout,
            ..berth_registry::RegistryConfig::default()
        }
    }
}

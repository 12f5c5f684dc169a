//! `kind: NodeImage` (`berth.dev/v1alpha1`): the OS version the nodes it
//! selects should run, where its update bundle is, and when they may
//! reboot into it. Berth's own kind, cluster-scoped; the planner decides
//! what a node does about it (`berth_plan::osupdate`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::diag::{FieldIssue, FieldPath};
use crate::model::IntOrPercent;
use crate::validate::{self, Issues};

pub const API_VERSION: &str = "berth.dev/v1alpha1";
pub const KIND: &str = "NodeImage";

/// Boots a new slot gets before systemd-boot falls back, unless the object says.
pub const DEFAULT_TRIES: u32 = 3;
/// How long the health gate waits on each boot of the new slot, unless the object says.
pub const DEFAULT_GATE_SECONDS: u64 = 300;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeImage {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NodeImageSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageSpec {
    /// The OS version the bundle installs; the bundle's signed manifest must say the same.
    pub version: String,
    pub bundle: BundleSource,
    /// The nodes this applies to, by their labels; none selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// When a node may reboot into the new version (the download and the
    /// write into the other slot happen at any time). None: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Across a fleet: how many selected nodes may be updating at once.
    /// Accepted for fleets; a node alone does not coordinate (a warning says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// Boots the new slot gets before systemd-boot falls back (1–9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries: Option<u32>,
    /// How long the health gate waits for the agent, Git and the pods on
    /// each boot of the new slot, in seconds (30–3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_seconds: Option<u64>,
}

/// Where the bundle is: one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleSource {
    /// An OCI artifact in a registry (`registry.example/berth/os:1.2.0`),
    /// pulled with the node's registry settings (mirrors, logins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An HTTPS URL of a bundle directory (`…/berth-1.2.0-amd64.bundle/`);
    /// plain HTTP only to a host the node config marks insecure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A daily window, in UTC: `start` `HH:MM`, `duration` such as `2h` or `90m`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    pub start: String,
    pub duration: String,
}

impl NodeImageSpec {
    pub fn tries(&self) -> u32 {
        self.tries.unwrap_or(DEFAULT_TRIES)
    }

    pub fn gate_seconds(&self) -> u64 {
        self.gate_seconds.unwrap_or(DEFAULT_GATE_SECONDS)
    }

    /// The bundle reference as written, `image:` or `url:` first.
    pub fn source(&self) -> String {
        match (&self.bundle.image, &self.bundle.url) {
            (Some(i), _) => format!("image {i}"),
            (None, Some(u)) => format!("url {u}"),
            (None, None) => "no bundle".into(),
        }
    }
}

impl MaintenanceWindow {
    /// Seconds after midnight UTC it opens, and how long it lasts.
    pub fn parse(&self) -> Result<(u64, u64), String> {
        let start = parse_clock(&self.start)
            .ok_or_else(|| format!("start {:?} is not HH:MM (UTC)", self.start))?;
        let duration = parse_duration(&self.duration).ok_or_else(|| {
            format!(
                "duration {:?} is not a duration such as 2h, 90m or 1h30m",
                self.duration
            )
        })?;
        if duration == 0 || duration > 24 * 3600 {
            return Err(format!(
                "duration {:?} must be more than 0 and at most 24h",
                self.duration
            ));
        }
        Ok((start, duration))
    }

    /// Whether `now` (seconds since the epoch) is inside the window, and
    /// if not, when it next opens.
    pub fn check(&self, now: u64) -> Result<Result<(), u64>, String> {
        let (start, duration) = self.parse()?;
        const DAY: u64 = 24 * 3600;
        let midnight = now - now % DAY;
        // Today's window, or yesterday's when it runs past midnight.
        for opens in [midnight.saturating_sub(DAY) + start, midnight + start] {
            if now >= opens && now < opens + duration {
                return Ok(Ok(()));
            }
        }
        let today = midnight + start;
        Ok(Err(if today > now { today } else { today + DAY }))
    }
}

fn parse_clock(s: &str) -> Option<u64> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

/// `2h`, `90m`, `1h30m`, `45s`: seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut digits = String::new();
    if s.is_empty() {
        return None;
    }
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    digits.is_empty().then_some(total)
}

/// Checks a NodeImage as the API server of a CRD with a schema would, and
/// what Berth needs to act on it.
pub fn validate(n: &NodeImage, issues: &mut Issues) {
    validate::metadata(&n.metadata, issues);
    let spec = FieldPath::root().key("spec");
    let version = &n.spec.version;
    if version.is_empty() {
        issues.push(FieldIssue::error(spec.key("version"), "required"));
    } else if version.len() > 64
        || !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-~".contains(c))
    {
        issues.push(FieldIssue::error(
            spec.key("version"),
            format!(
                "{version:?} must be at most 64 letters, digits and . _ + - ~ (it names a boot entry's version)"
            ),
        ));
    }
    let bundle = spec.key("bundle");
    match (&n.spec.bundle.image, &n.spec.bundle.url) {
        (Some(_), Some(_)) => issues.push(FieldIssue::error(
            bundle.clone(),
            "set one of image and url, not both",
        )),
        (None, None) => issues.push(FieldIssue::error(
            bundle.clone(),
            "required: image (an OCI artifact in a registry) or url (an HTTPS bundle directory)",
        )),
        (Some(image), None) => {
            if image.is_empty() || image.contains(char::is_whitespace) || image.contains("://") {
                issues.push(FieldIssue::error(
                    bundle.key("image"),
                    format!(
                        "{image:?} is not an image reference such as registry.example/berth/os:1.2.0"
                    ),
                ));
            }
        }
        (None, Some(url)) => {
            let plain = url.strip_prefix("http://");
            let host = url.strip_prefix("https://").or(plain).unwrap_or("");
            if host.is_empty() || host.starts_with('/') || url.contains(char::is_whitespace) {
                issues.push(FieldIssue::error(
                    bundle.key("url"),
                    format!("{url:?} must be an https:// URL of a bundle directory"),
                ));
            } else if plain.is_some() {
                issues.push(FieldIssue::warning(
                    bundle.key("url"),
                    "plain http://: a node fetches it only from a host its config marks insecure (images.registries.<host>.insecure); the bundle's signature still decides",
                ));
            }
        }
    }
    if let Some(s) = &n.spec.node_selector
        && let Err(e) = validate::selector_matches(s, &std::collections::BTreeMap::new())
    {
        issues.push(FieldIssue::error(spec.key("nodeSelector"), e));
    }
    if let Some(w) = &n.spec.maintenance_window
        && let Err(e) = w.parse()
    {
        issues.push(FieldIssue::error(spec.key("maintenanceWindow"), e));
    }
    if let Some(v) = &n.spec.max_unavailable {
        let path = spec.key("maxUnavailable");
        if let Some(IntOrPercent::Int(0)) = validate::int_or_percent(v, &path, issues) {
            issues.push(FieldIssue::error(path, "must be at least 1"));
        } else {
            issues.push(FieldIssue::warning(
                path,
                "not enforced yet: each node decides for itself, without a fleet to count",
            ));
        }
    }
    if let Some(t) = n.spec.tries
        && !(1..=9).contains(&t)
    {
        issues.push(FieldIssue::error(
            spec.key("tries"),
            format!("{t} is outside 1..9 (systemd-boot counts one digit)"),
        ));
    }
    if let Some(g) = n.spec.gate_seconds
        && !(30..=3600).contains(&g)
    {
        issues.push(FieldIssue::error(
            spec.key("gateSeconds"),
            format!("{g} is outside 30..3600"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, duration: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            duration: duration.into(),
        }
    }

    #[test]
    fn durations_and_clocks_parse_or_say_no() {
        assert_eq!(parse_duration("2h"), Some(7200));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("45s"), Some(45));
        for bad in ["", "2", "h", "2d", "1.5h", "-1h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_clock("02:30"), Some(9000));
        for bad in ["2:30", "24:00", "12:60", "noon", "12:3"] {
            assert_eq!(parse_clock(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_window_opens_daily_and_may_run_past_midnight() {
        let day = 24 * 3600;
        let t = |d: u64, h: u64, m: u64| d * day + h * 3600 + m * 60;
        let w = window("02:00", "2h");
        assert_eq!(w.check(t(10, 2, 0)), Ok(Ok(())));
        assert_eq!(w.check(t(10, 3, 59)), Ok(Ok(())));
        assert_eq!(w.check(t(10, 4, 0)), Ok(Err(t(11, 2, 0))));
        assert_eq!(w.check(t(10, 1, 0)), Ok(Err(t(10, 2, 0))));
        let late = window("23:00", "3h");
        assert_eq!(late.check(t(10, 1, 30)), Ok(Ok(())));
        assert_eq!(late.check(t(10, 23, 30)), Ok(Ok(())));
        assert_eq!(late.check(t(10, 2, 0)), Ok(Err(t(10, 23, 0))));
        assert!(window("02:00", "25h").check(0).is_err());
        assert!(window("2am", "1h").check(0).is_err());
    }
}

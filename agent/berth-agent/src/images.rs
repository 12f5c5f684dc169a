//! Images for the pods about to start: pulled by `imagePullPolicy` in the
//! background (a pass never waits on a registry), shown on the pod while
//! they come (`ContainerCreating`, `ErrImagePull`, `ImagePullBackOff`), and
//! collected when no pod uses them, by age and by disk pressure, as the
//! kubelet does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use berth_plan::{ContainerUnit, DesiredPod, PullPolicy, Verb};
use berth_registry::{
    Client, Credential, HostConfig, PullPhase, PullStatus, Puller, RegistryConfig,
};
use berth_runtime::FailureReason;
use serde::{Deserialize, Serialize};

use crate::config::ImageSettings;
use crate::{Log, Runtime, Wake, now_secs};

/// A failed pull shows `ErrImagePull` this long, then `ImagePullBackOff`.
const ERR_PULL_SHOWN_SECS: u64 = 10;
/// Collection by age runs this often; by pressure, whenever the disk is full.
const AGE_COLLECT_EVERY: Duration = Duration::from_secs(600);

/// What status shows of images.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImagesRecord {
    /// Pulls running or failed, by reference.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pulls: BTreeMap<String, PullStatus>,
    /// Images the last collection removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collected: Vec<String>,
}

#[derive(Debug)]
pub struct Images {
    settings: Option<ImageSettings>,
    puller: Option<Puller>,
    waker: Option<Sender<Wake>>,
    /// `Always` containers about to start: the pull asked for them, by
    /// reference. The container starts once a pull at least this recent is done.
    fresh: BTreeMap<String, u64>,
    /// What was logged of each pull (phase and number), so each is logged once.
    logged: BTreeMap<String, (PullPhase, u64)>,
    last_age_collect: Option<Instant>,
}

impl Images {
    pub fn new() -> Self {
        Self {
            settings: None,
            puller: None,
            waker: None,
            fresh: BTreeMap::new(),
            logged: BTreeMap::new(),
            last_age_collect: None,
        }
    }

    /// A finished pull wakes the loop through this.
    pub fn set_waker(&mut self, waker: Sender<Wake>) {
        self.waker = Some(waker);
    }

    /// The puller for these settings, started (again, when they changed).
    fn puller(&mut self, settings: &ImageSettings, rt: &Runtime) -> Puller {
        if let (Some(s), Some(p)) = (&self.settings, &self.puller)
            && s == settings
        {
            return p.clone();
        }
        {
            let config = RegistryConfig {
                hosts: settings
                    .registries
                    .iter()
                    .map(|(name, r)| {
                        (
                            name.clone(),
                            HostConfig {
                                mirrors: r.mirrors.clone(),
                                insecure: r.insecure,
                            },
                        )
                    })
                    .collect(),
                timeout: settings.pull_timeout,
                ..RegistryConfig::default()
            };
            let waker = self.waker.clone();
            let on_done: Box<dyn Fn() + Send + Sync> = Box::new(move || {
                if let Some(w) = &waker {
                    let _ = w.send(Wake::UnitChanged);
                }
            });
            let puller = Puller::start(Client::new(config), rt.images.clone(), on_done);
            self.puller = Some(puller.clone());
            self.settings = Some(settings.clone());
            puller
        }
    }

    /// For every container the plan starts, makes sure its image is here
    /// by its pull policy. Returns the pods that must wait, by pod key, with
    /// the reason and message their status shows.
    pub fn ensure(
        &mut self,
        settings: &ImageSettings,
        rt: &Runtime,
        pods: &[DesiredPod],
        starting: &BTreeSet<String>,
        log: &Log,
    ) -> BTreeMap<FailureReason, BTreeMap<String, String>> {
        let now = now_secs();
        let mut waits: BTreeMap<FailureReason, BTreeMap<String, String>> = BTreeMap::new();
        let puller = self.puller(settings, rt);
        let mut wanted: HashSet<String> = HashSet::new();
        for pod in pods {
            let units: Vec<&ContainerUnit> = pod
                .units()
                .filter(|u| starting.contains(u.name.as_str()))
                .collect();
            if units.is_empty() {
                continue;
            }
            let creds = credentials(pod, log);
            for unit in units {
                let reference = match berth_registry::Reference::parse(&unit.image) {
                    Ok(r) => r.to_string(),
                    Err(e) => {
                        waits
                            .entry(FailureReason::InvalidImageName)
                            .or_default()
                            .insert(pod.id.key(), e.to_string());
                        continue;
                    }
                };
                wanted.insert(reference.clone());
                if let Some((reason, message)) =
                    self.decide(&puller, rt, unit, &reference, &creds, now)
                {
                    waits
                        .entry(reason)
                        .or_default()
                        .entry(pod.id.key())
                        .or_insert(message);
                }
            }
        }
        self.fresh.retain(|r, _| wanted.contains(r));
        for (reference, status) in puller.all() {
            let key = (status.phase, status.seq);
            if self.logged.get(&reference) == Some(&key) {
                continue;
            }
            self.logged.insert(reference.clone(), key);
            match status.phase {
                PullPhase::Queued | PullPhase::Pulling => {
                    log.info(&format!("pulling image {reference}"))
                }
                PullPhase::Done => log.info(&format!(
                    "pulled image {reference} ({}, {} downloaded)",
                    status.manifest.as_deref().unwrap_or("?"),
                    megabytes(status.bytes_total)
                )),
                PullPhase::Failed => log.error(&format!(
                    "pulling image {reference} failed (attempt {}; next in {}s): {}",
                    status.failures,
                    status.retry_at.saturating_sub(now),
                    status.error.as_deref().unwrap_or("?")
                )),
            }
        }
        waits
    }

    fn decide(
        &mut self,
        puller: &Puller,
        rt: &Runtime,
        unit: &ContainerUnit,
        reference: &str,
        creds: &[Credential],
        now: u64,
    ) -> Option<(FailureReason, String)> {
        let present = rt.images.rootfs(reference).is_some();
        let status = match unit.pull_policy {
            PullPolicy::Never if present => return None,
            PullPolicy::Never => {
                return Some((
                    FailureReason::ErrImageNeverPull,
                    format!("image {reference:?} is not present with pull policy of Never"),
                ));
            }
            PullPolicy::IfNotPresent if present => return None,
            PullPolicy::IfNotPresent => puller.request(reference, creds.to_vec(), true),
            PullPolicy::Always => {
                let asked = self.fresh.get(reference).copied();
                let current = puller.status(reference);
                match (asked, current) {
                    (Some(seq), Some(s))
                        if s.seq >= seq && s.phase == PullPhase::Done && present =>
                    {
                        return None;
                    }
                    (Some(seq), Some(s)) if s.seq >= seq && s.phase != PullPhase::Failed => s,
                    _ => {
                        let s = puller.request(reference, creds.to_vec(), true);
                        self.fresh.insert(reference.to_string(), s.seq);
                        s
                    }
                }
            }
        };
        Some(match status.phase {
            PullPhase::Queued => (
                FailureReason::ContainerCreating,
                format!("waiting to pull image {reference:?}"),
            ),
            PullPhase::Pulling => (
                FailureReason::ContainerCreating,
                format!(
                    "pulling image {reference:?}: {} of {}",
                    megabytes(status.bytes_done),
                    megabytes(status.bytes_total)
                ),
            ),
            // Done but not here: removed meanwhile; the next pass asks again.
            PullPhase::Done => (
                FailureReason::ContainerCreating,
                format!("image {reference:?} was pulled; starting"),
            ),
            PullPhase::Failed => {
                let error = status.error.unwrap_or_default();
                let hint = if status.auth_error {
                    " (check the pod's imagePullSecrets)"
                } else {
                    ""
                };
                if now.saturating_sub(status.finished_at.unwrap_or(0)) < ERR_PULL_SHOWN_SECS {
                    (FailureReason::ErrImagePull, format!("{error}{hint}"))
                } else {
                    // No countdown here: the pod's status would change every
                    // pass. `berth status` and `berth images` show it.
                    (
                        FailureReason::ImagePullBackOff,
                        format!("Back-off pulling image {reference:?}: {error}{hint}"),
                    )
                }
            }
        })
    }

    /// What status shows: pulls not yet done well.
    pub fn record(&self, collected: Vec<String>) -> ImagesRecord {
        ImagesRecord {
            pulls: self
                .puller
                .as_ref()
                .map(Puller::all)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, s)| s.phase != PullPhase::Done)
                .collect(),
            collected,
        }
    }

    /// Removes images no pod uses: any unused longer than the maximum age,
    /// and, when the image filesystem is fuller than the high threshold,
    /// the least recently used (older than the minimum age) until it is
    /// below the low one. Never an image a desired pod or a container on
    /// the node uses, and not while a pull runs.
    pub fn collect(
        &mut self,
        settings: &ImageSettings,
        rt: &Runtime,
        pods: &[DesiredPod],
        log: &Log,
    ) -> Vec<String> {
        if self.puller.as_ref().is_some_and(Puller::busy) {
            return Vec::new();
        }
        let Ok(st) = rustix::fs::statvfs(rt.images.root()) else {
            return Vec::new();
        };
        let total = st.f_blocks.saturating_mul(st.f_frsize);
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let (used_pct, need) = pressure(total, free, settings);
        let pressure = need > 0;
        let by_age = settings.gc_maximum_age.is_some_and(|max| {
            self.last_age_collect
                .is_none_or(|t| t.elapsed() >= AGE_COLLECT_EVERY.min(max))
        });
        if !pressure && !by_age {
            return Vec::new();
        }
        if by_age {
            self.last_age_collect = Some(Instant::now());
        }
        let mut keep = rt.roots.images_in_use();
        keep.extend(
            pods.iter()
                .flat_map(DesiredPod::units)
                .filter_map(|u| rt.images.resolve(&u.image)),
        );
        let now = now_secs();
        let min_age = settings.gc_minimum_age.as_secs();
        let max_age = settings.gc_maximum_age.map(|d| d.as_secs());
        let result = rt.images.collect(&keep, |image, freed| {
            let age = now.saturating_sub(image.last_used);
            max_age.is_some_and(|m| age > m) || (freed < need && age >= min_age)
        });
        match result {
            Ok(c) => {
                for image in &c.images {
                    log.info(&format!(
                        "image {image} collected: unused{}",
                        if pressure {
                            format!(" and the image disk is {used_pct}% full")
                        } else {
                            " for longer than images.gc.maximumAge".to_string()
                        }
                    ));
                }
                if let Some(p) = &self.puller {
                    let gone: BTreeSet<&String> = c.images.iter().collect();
                    p.retain(|r| !gone.contains(&r.to_string()));
                }
                c.images
            }
            Err(e) => {
                log.error(&format!("image collection failed: {e}"));
                Vec::new()
            }
        }
    }
}

impl Default for Images {
    fn default() -> Self {
        Self::new()
    }
}

/// How full the image disk is (percent), and how many bytes collection
/// must free: none below the high threshold, else down to the low one.
pub fn pressure(total: u64, free: u64, settings: &ImageSettings) -> (u64, u64) {
    let used_pct = free
        .saturating_mul(100)
        .checked_div(total)
        .map_or(0, |free_pct| 100u64.saturating_sub(free_pct));
    if used_pct <= u64::from(settings.gc_high_percent) {
        return (used_pct, 0);
    }
    let target_used = total / 100 * u64::from(settings.gc_low_percent);
    (used_pct, (total - free).saturating_sub(target_used).max(1))
}

/// The containers the plan starts (or restarts).
pub fn starting(plan: &berth_plan::NodePlan) -> BTreeSet<String> {
    plan.plan
        .actions
        .iter()
        .filter(|a| matches!(a.verb, Verb::Start | Verb::Restart))
        .map(|a| a.unit.to_string())
        .collect()
}

fn credentials(pod: &DesiredPod, log: &Log) -> Vec<Credential> {
    let mut out = Vec::new();
    for s in &pod.pull_secrets {
        match berth_registry::parse_docker_config(s.key, &s.data.0) {
            Ok(c) => out.extend(c),
            Err(e) => log.warn(&format!(
                "pod {}: imagePullSecret {}: {e}; pulls go without it",
                pod.id, s.name
            )),
        }
    }
    out
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_frees_down_to_the_low_threshold_only_above_the_high_one() {
        let s = ImageSettings::default();
        let gib = 1u64 << 30;
        // 84 % used: nothing to do.
        assert_eq!(pressure(100 * gib, 16 * gib, &s), (84, 0));
        // 90 % used: free 10 GiB to reach 80 %.
        assert_eq!(pressure(100 * gib, 10 * gib, &s), (90, 10 * gib));
        // A full disk: 20 % of it.
        assert_eq!(pressure(100 * gib, 0, &s), (100, 20 * gib));
        // No filesystem size known: nothing.
        assert_eq!(pressure(0, 0, &s), (0, 0));
    }
}

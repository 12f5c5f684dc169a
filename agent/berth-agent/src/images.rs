//! Images for the pods about to start: pulled by `imagePullPolicy` in the
//! background (a pass never waits on a registry), shown on the pod while
//! they come (`ContainerCreating`, `ErrImagePull`, `ImagePullBackOff`), and
//! collected when no pod uses them, by age and by disk pressure, as the
//! kubelet does.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use berth_plan::{ContainerUnit, DesiredPod, ImageFact, NodePlan, PullFact, PullPolicy, Verb};
use berth_registry::{Client, Credential, PullPhase, PullStatus, Puller};
use serde::{Deserialize, Serialize};

use crate::clock::now_secs;
use crate::config::ImageSettings;
use crate::events::EventType;
use crate::host::Runtime;
use crate::log::Log;
use crate::wake::Wake;

/// A pull that began, ended or failed, for the events of the pods that use
/// its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullNotice {
    pub reference: String,
    pub kind: EventType,
    pub reason: &'static str,
    pub message: String,
}

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
            let config = settings.registry_config();
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

    /// How the image of every desired container stands: whether its name
    /// is a reference, whether it is here, the latest pull of it, and for
    /// `Always` the pull asked for its pending start. Facts for the planner,
    /// which decides what waits and what is pulled.
    pub fn facts(
        &mut self,
        settings: &ImageSettings,
        rt: &Runtime,
        pods: &[DesiredPod],
    ) -> BTreeMap<String, ImageFact> {
        let puller = self.puller(settings, rt);
        let mut out = BTreeMap::new();
        for unit in pods.iter().flat_map(DesiredPod::units) {
            if out.contains_key(&unit.image) {
                continue;
            }
            let fact = match berth_registry::Reference::parse(&unit.image) {
                Err(e) => ImageFact {
                    invalid: Some(e.to_string()),
                    ..ImageFact::default()
                },
                Ok(r) => {
                    let reference = r.to_string();
                    ImageFact {
                        present: rt.images.rootfs(&reference).is_some(),
                        pull: puller.status(&reference).map(pull_fact),
                        fresh_pull: self.fresh.get(&reference).copied(),
                        reference: Some(reference),
                        invalid: None,
                    }
                }
            };
            out.insert(unit.image.clone(), fact);
        }
        out
    }

    /// Carries out the plan's pulls (each a request the puller keeps to
    /// one download per image), and forgets the fresh pulls of `Always`
    /// containers no longer about to start.
    /// Requests the pulls `plan` asks for; returns what changed since the
    /// last call (pulls begun, done, failed), for the pods' events.
    pub fn pull(
        &mut self,
        settings: &ImageSettings,
        rt: &Runtime,
        plan: &NodePlan,
        log: &Log,
    ) -> Vec<PullNotice> {
        let mut notices = Vec::new();
        let puller = self.puller(settings, rt);
        let units: BTreeMap<&str, (&DesiredPod, &ContainerUnit)> = plan
            .pods
            .iter()
            .flat_map(|p| p.units().map(move |u| (u.name.as_str(), (p, u))))
            .collect();
        for action in plan.plan.actions.iter().filter(|a| a.verb == Verb::Pull) {
            let (Some(reference), Some((pod, unit))) =
                (&action.image, units.get(action.unit.as_str()))
            else {
                continue;
            };
            let status = puller.request(reference, credentials(pod, log), true);
            if unit.pull_policy == PullPolicy::Always {
                self.fresh.insert(reference.clone(), status.seq);
            }
        }
        // The references of containers starting, or waiting to: a fresh
        // pull counts for their start only.
        let mut wanted: HashSet<String> = HashSet::new();
        let starting = plan
            .plan
            .actions
            .iter()
            .filter(|a| matches!(a.verb, Verb::Start | Verb::Restart | Verb::Pull))
            .map(|a| &a.unit)
            .chain(plan.plan.held.iter().flat_map(|h| &h.units));
        for unit in starting {
            if let Some(r) = units
                .get(unit.as_str())
                .and_then(|(_, u)| berth_registry::Reference::parse(&u.image).ok())
            {
                wanted.insert(r.to_string());
            }
        }
        self.fresh.retain(|r, _| wanted.contains(r));
        let now = now_secs();
        for (reference, status) in puller.all() {
            let key = (status.phase, status.seq);
            if self.logged.get(&reference) == Some(&key) {
                continue;
            }
            self.logged.insert(reference.clone(), key);
            let (kind, reason, message) = match status.phase {
                PullPhase::Queued | PullPhase::Pulling => {
                    log.info(&format!("pulling image {reference}"));
                    (
                        EventType::Normal,
                        "Pulling",
                        format!("Pulling image {reference:?}"),
                    )
                }
                PullPhase::Done => {
                    log.info(&format!(
                        "pulled image {reference} ({}, {} downloaded)",
                        status.manifest.as_deref().unwrap_or("?"),
                        megabytes(status.bytes_total)
                    ));
                    (
                        EventType::Normal,
                        "Pulled",
                        format!(
                            "Successfully pulled image {reference:?} ({} downloaded)",
                            megabytes(status.bytes_total)
                        ),
                    )
                }
                PullPhase::Failed => {
                    log.error(&format!(
                        "pulling image {reference} failed (attempt {}; next in {}s): {}",
                        status.failures,
                        status.retry_at.saturating_sub(now),
                        status.error.as_deref().unwrap_or("?")
                    ));
                    (
                        EventType::Warning,
                        "Failed",
                        format!(
                            "Failed to pull image {reference:?}: {}",
                            status.error.as_deref().unwrap_or("?")
                        ),
                    )
                }
            };
            notices.push(PullNotice {
                reference,
                kind,
                reason,
                message,
            });
        }
        notices
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
        let mut keep = match rt.roots.images_in_use() {
            Ok(k) => k,
            Err(e) => {
                log.error(&format!(
                    "image collection skipped, every image kept: which image a container uses is unknown ({e})"
                ));
                return Vec::new();
            }
        };
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

/// The puller's word for a pull, in the planner's terms.
fn pull_fact(status: PullStatus) -> PullFact {
    PullFact {
        phase: match status.phase {
            PullPhase::Queued => berth_plan::PullPhase::Queued,
            PullPhase::Pulling => berth_plan::PullPhase::Pulling,
            PullPhase::Done => berth_plan::PullPhase::Done,
            PullPhase::Failed => berth_plan::PullPhase::Failed,
        },
        seq: status.seq,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        finished_at: status.finished_at,
        retry_at: status.retry_at,
        error: status.error,
        auth_error: status.auth_error,
    }
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

use berth_plan::waits::megabytes;

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

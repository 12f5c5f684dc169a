//! What a pod waits for before its containers start: its images, its
//! network namespace, its volumes. The agent prepares these outside the
//! plan (a pull runs in the background, wiring and mounts are idempotent)
//! and reports how they stand as facts in [`ActualState`]; this stage
//! reads those facts and holds back the starts of pods that are not ready,
//! saying why in Kubernetes' words, and asks for the pulls they need.
//!
//! The rules follow the kubelet's image manager: `Never` uses what is
//! here, `IfNotPresent` pulls what is missing, `Always` pulls again before
//! each start; a failed pull shows `ErrImagePull`, then `ImagePullBackOff`
//! until its back-off ends.

use std::collections::{BTreeMap, BTreeSet};

use crate::actual::{ActualState, ImageFact, PullFact, PullPhase, Wiring};
use crate::desired::{ContainerUnit, DesiredPod, PullPolicy};
use crate::node::NodeInfo;
use crate::plan::{Action, Held, Verb};
use crate::reason::{FailureReason, HoldReason};
use crate::units::{SharedProperties, UnitName};

/// A failed pull shows `ErrImagePull` this long, then `ImagePullBackOff`.
pub const ERR_PULL_SHOWN_SECS: u64 = 10;

/// The actions that may go ahead, the pulls to ask for, and what waits.
#[derive(Debug, Default)]
pub struct Gated {
    pub actions: Vec<Action>,
    pub pulls: Vec<Action>,
    pub held: Vec<Held>,
}

/// What one container's image allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ImageStep {
    Ready,
    Wait(FailureReason, String),
    /// Wait, and ask for a pull (a new one, or for `Always` the one under
    /// way counted as this start's).
    Pull(FailureReason, String),
}

/// Holds back the starts and restarts of pods whose images, network or
/// volumes are not ready, in that order of reasons, and asks for pulls.
pub fn gate(
    actions: Vec<Action>,
    pods: &[DesiredPod],
    actual: &ActualState,
    node: &NodeInfo,
) -> Gated {
    let starting: BTreeSet<&str> = actions
        .iter()
        .filter(|a| matches!(a.verb, Verb::Start | Verb::Restart))
        .map(|a| a.unit.as_str())
        .collect();
    let mut out = Gated::default();
    let mut pulled: BTreeSet<String> = BTreeSet::new();
    let mut blocked: BTreeSet<String> = BTreeSet::new();
    let mut sorted: Vec<&DesiredPod> = pods.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for pod in sorted {
        let units: Vec<&ContainerUnit> = pod
            .units()
            .filter(|u| starting.contains(u.name.as_str()))
            .collect();
        if units.is_empty() {
            continue;
        }
        let held_before = out.held.len();
        let held_units: Vec<UnitName> = units.iter().map(|u| u.name.clone()).collect();
        let first_unit = pod
            .units()
            .next()
            .map_or_else(|| format!("image of {}", pod.id), |u| u.name.to_string());
        // One wait per reason, the first container's message, as the
        // kubelet shows one reason per pod.
        let mut waits: BTreeMap<FailureReason, String> = BTreeMap::new();
        for unit in &units {
            let fact = actual.images.get(&unit.image);
            let step = image_step(unit, fact, actual.observed_at);
            let (reason, message, pull) = match step {
                ImageStep::Ready => continue,
                ImageStep::Wait(r, m) => (r, m, false),
                ImageStep::Pull(r, m) => (r, m, true),
            };
            waits.entry(reason).or_insert(message);
            let reference = fact.and_then(|f| f.reference.clone());
            if pull
                && let Some(reference) = reference
                && pulled.insert(reference.clone())
            {
                out.pulls.push(Action {
                    verb: Verb::Pull,
                    unit: unit.name.clone(),
                    pod: Some(pod.id.clone()),
                    reason: pull_reason(unit, fact),
                    image: Some(reference),
                    properties: SharedProperties::default(),
                    changes: Vec::new(),
                    grace_seconds: None,
                    after_start: Vec::new(),
                });
            }
        }
        for (reason, message) in waits {
            out.held.push(Held {
                unit: first_unit.clone(),
                pod: Some(pod.id.clone()),
                reason: HoldReason::Waiting(reason),
                message,
                units: held_units.clone(),
            });
        }
        let facts = actual.pods.get(&pod.id.to_string());
        if !pod.host_network
            && let Some(Wiring::Failed { message }) = facts.and_then(|f| f.network.as_ref())
        {
            let netns = node.netns_dir.as_deref().unwrap_or("netns");
            out.held.push(Held {
                unit: format!("{netns}/{}", pod.id.key()),
                pod: Some(pod.id.clone()),
                reason: HoldReason::Waiting(FailureReason::FailedCreatePodSandBox),
                message: message.clone(),
                units: held_units.clone(),
            });
        }
        if let Some(message) = facts.and_then(|f| f.volumes_not_ready.as_ref()) {
            out.held.push(Held {
                unit: format!("volumes of {}", pod.id),
                pod: Some(pod.id.clone()),
                reason: HoldReason::Waiting(FailureReason::FailedMount),
                message: message.clone(),
                units: held_units.clone(),
            });
        }
        if out.held.len() > held_before {
            blocked.insert(pod.id.to_string());
        }
    }
    out.actions = actions
        .into_iter()
        .filter(|a| {
            !(matches!(a.verb, Verb::Start | Verb::Restart)
                && a.pod
                    .as_ref()
                    .is_some_and(|p| blocked.contains(&p.to_string())))
        })
        .collect();
    out
}

fn pull_reason(unit: &ContainerUnit, fact: Option<&ImageFact>) -> String {
    let name = &unit.image;
    match unit.pull_policy {
        PullPolicy::Always => format!(
            "container {} starts with pull policy Always: image {name} is pulled again first",
            unit.container
        ),
        _ if fact
            .and_then(|f| f.pull.as_ref())
            .is_some_and(|p| p.phase == PullPhase::Failed) =>
        {
            format!(
                "image {name} of container {} is not on the node; the last pull failed and its back-off has ended",
                unit.container
            )
        }
        _ => format!(
            "image {name} of container {} is not on the node",
            unit.container
        ),
    }
}

/// Whether asking for a pull now would leave the current one as it is:
/// one queued or running, or failed and still in its back-off.
fn pull_stands(pull: Option<&PullFact>, now: u64) -> bool {
    pull.is_some_and(|p| match p.phase {
        PullPhase::Queued | PullPhase::Pulling => true,
        PullPhase::Failed => now < p.retry_at,
        PullPhase::Done => false,
    })
}

fn image_step(unit: &ContainerUnit, fact: Option<&ImageFact>, now: u64) -> ImageStep {
    // No fact: a plan from YAML alone, where every image counts as here.
    let Some(fact) = fact else {
        return ImageStep::Ready;
    };
    let reference = match (&fact.reference, &fact.invalid) {
        (_, Some(why)) => return ImageStep::Wait(FailureReason::InvalidImageName, why.clone()),
        (Some(r), None) => r.as_str(),
        (None, None) => unit.image.as_str(),
    };
    let waiting = || {
        ImageStep::Pull(
            FailureReason::ContainerCreating,
            format!("waiting to pull image {reference:?}"),
        )
    };
    match unit.pull_policy {
        PullPolicy::Never if fact.present => ImageStep::Ready,
        PullPolicy::Never => ImageStep::Wait(
            FailureReason::ErrImageNeverPull,
            format!("image {reference:?} is not present with pull policy of Never"),
        ),
        PullPolicy::IfNotPresent if fact.present => ImageStep::Ready,
        PullPolicy::IfNotPresent => match &fact.pull {
            Some(p) if pull_stands(Some(p), now) => {
                let (r, m) = pull_message(p, reference, now);
                ImageStep::Wait(r, m)
            }
            _ => waiting(),
        },
        PullPolicy::Always => match (fact.fresh_pull, &fact.pull) {
            (Some(seq), Some(p)) if p.seq >= seq && p.phase == PullPhase::Done && fact.present => {
                ImageStep::Ready
            }
            (Some(seq), Some(p)) if p.seq >= seq && p.phase != PullPhase::Failed => {
                let (r, m) = pull_message(p, reference, now);
                ImageStep::Wait(r, m)
            }
            // This start's pull: the one under way or backing off, or a new one.
            (_, Some(p)) if pull_stands(Some(p), now) => {
                let (r, m) = pull_message(p, reference, now);
                ImageStep::Pull(r, m)
            }
            _ => waiting(),
        },
    }
}

/// What a pod waiting on a pull shows.
fn pull_message(pull: &PullFact, reference: &str, now: u64) -> (FailureReason, String) {
    match pull.phase {
        PullPhase::Queued => (
            FailureReason::ContainerCreating,
            format!("waiting to pull image {reference:?}"),
        ),
        PullPhase::Pulling => (
            FailureReason::ContainerCreating,
            format!(
                "pulling image {reference:?}: {} of {}",
                megabytes(pull.bytes_done),
                megabytes(pull.bytes_total)
            ),
        ),
        // Done but not here: removed meanwhile; the next pass asks again.
        PullPhase::Done => (
            FailureReason::ContainerCreating,
            format!("image {reference:?} was pulled; starting"),
        ),
        PullPhase::Failed => {
            let error = pull.error.clone().unwrap_or_default();
            let hint = if pull.auth_error {
                " (check the pod's imagePullSecrets)"
            } else {
                ""
            };
            if now.saturating_sub(pull.finished_at.unwrap_or(0)) < ERR_PULL_SHOWN_SECS {
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
    }
}

/// `12.3 MB`, in decimal megabytes as registries and `docker pull` count.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

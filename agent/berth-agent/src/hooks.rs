//! `preStop` hooks, run by the agent before it ends a running container,
//! as the kubelet runs them: only when the node ends the container (Git
//! stops or changes it, or a probe kills it), never when it exited on its
//! own; before SIGTERM; and within the grace period, which the hook's own
//! time counts against.
//!
//! systemd's `ExecStop=` was weighed and left: it runs also after the main
//! process exited on its own, and its time does not count against the stop
//! timeout (each `ExecStop=` line and then the SIGTERM wait get the whole
//! `TimeoutStopSec=`), so a 30 s hook could stretch a 30 s grace to 60 s.
//!
//! The hooks of a pass run at once, each on its own short-lived thread
//! (hooks are rare: one per container ended). The containers whose hook
//! ran are then sent SIGTERM here and given what is left of their grace
//! period (at least the kubelet's 2 s) before SIGKILL, so the stop that the
//! plan applies next finds them ended. A kill for a failed probe only runs
//! the hook here: its SIGTERM is the plan's, and its SIGKILL comes at the
//! grace period's end counted from the pass's start.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_manifest::probe::Action;
use berth_plan::Verb;
use berth_runtime::{KillWhom, Systemd};
use serde::{Deserialize, Serialize};

use crate::log::{Level, Log};
use crate::prober::ProbeTarget;

/// A running container's `preStop`, kept from the pass that started it:
/// a pod removed from Git still gets the hook it was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreStop {
    pub pod: String,
    pub container: String,
    pub action: Action,
    /// The pod's `terminationGracePeriodSeconds`.
    pub grace_seconds: u64,
}

/// The hooks of the running containers, by unit: those of the desired pods,
/// and those kept for units that still exist.
pub fn record(
    kept: &mut BTreeMap<String, PreStop>,
    desired: &[berth_plan::DesiredPod],
    observed: &berth_runtime::Observed,
) {
    kept.retain(|unit, _| observed.units.contains_key(unit));
    for pod in desired {
        for unit in pod.units() {
            match &unit.hooks.pre_stop {
                Some(action) => {
                    kept.insert(
                        unit.name.to_string(),
                        PreStop {
                            pod: pod.id.to_string(),
                            container: unit.container.clone(),
                            action: (**action).clone(),
                            grace_seconds: unit.grace_seconds,
                        },
                    );
                }
                None => {
                    kept.remove(unit.name.as_str());
                }
            }
        }
    }
}

struct Job {
    unit: String,
    hook: PreStop,
    target: ProbeTarget,
    grace: Duration,
    /// Whether the plan sends SIGTERM itself (a kill for a probe).
    plan_terminates: bool,
}

/// Runs the `preStop` hooks of the running containers `plan` ends, then
/// (for stops and restarts) SIGTERM and, at the end of what is left of
/// each grace period, SIGKILL. Returns once every one of them has ended.
pub fn run_before(
    plan: &berth_plan::Plan,
    hooks: &BTreeMap<String, PreStop>,
    observed: &berth_runtime::Observed,
    addresses: &BTreeMap<String, String>,
    systemd: &dyn Systemd,
    exe: &Path,
    log: &Log,
) {
    let mut jobs = Vec::new();
    for a in &plan.actions {
        let plan_terminates = a.verb == Verb::Kill;
        let ends = matches!(a.verb, Verb::Stop | Verb::Restart)
            || (plan_terminates && a.grace_seconds.is_some_and(|g| g > 0));
        if !ends {
            continue;
        }
        let (Some(hook), Some(details)) = (
            hooks.get(a.unit.as_str()),
            observed.units.get(a.unit.as_str()),
        ) else {
            continue;
        };
        let address = addresses
            .get(&hook.pod)
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        let Some(target) = ProbeTarget::of_unit(
            &hook.pod,
            &hook.container,
            details,
            address,
            Default::default(),
        ) else {
            continue;
        };
        let grace = if plan_terminates {
            a.grace_seconds.unwrap_or(hook.grace_seconds)
        } else {
            hook.grace_seconds
        };
        jobs.push(Job {
            unit: a.unit.to_string(),
            target,
            hook: hook.clone(),
            grace: Duration::from_secs(grace),
            plan_terminates,
        });
    }
    if jobs.is_empty() {
        return;
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for job in &jobs {
            scope.spawn(move || {
                let outcome =
                    crate::prober::run_probe(&job.hook.action, &job.target, job.grace, exe);
                let took = started.elapsed().as_secs_f64();
                let line = match outcome {
                    berth_plan::health::Outcome::Success => format!(
                        "preStop hook of container {} ran in {took:.1} s",
                        job.hook.container
                    ),
                    berth_plan::health::Outcome::Failure(e) => format!(
                        "preStop hook of container {} failed after {took:.1} s: {e}",
                        job.hook.container
                    ),
                };
                log.pod(Level::Info, &job.hook.pod, &job.unit, &line);
            });
        }
    });
    // SIGTERM, then SIGKILL for what still runs when its grace period
    // (counted from the hook's start, at least 2 s after SIGTERM) is over.
    let term_at = Instant::now();
    let mut waiting: Vec<(&Job, Instant)> = Vec::new();
    for job in jobs.iter().filter(|j| !j.plan_terminates) {
        let _ = systemd.kill(&job.unit, KillWhom::Main, 15);
        let min = term_at + Duration::from_secs(berth_plan::health::MIN_KILL_GRACE_SECONDS);
        waiting.push((job, (started + job.grace).max(min)));
    }
    while !waiting.is_empty() {
        waiting.retain(|(job, deadline)| {
            let running = systemd.unit(&job.unit).ok().flatten().is_some_and(|u| {
                u.active_state == berth_plan::ActiveState::Active
                    && u.runtime.main_pid == job.target.main_pid
            });
            if running && Instant::now() >= *deadline {
                let _ = systemd.kill(&job.unit, KillWhom::All, 9);
                return false;
            }
            running
        });
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;

    fn plan(yaml: &str) -> berth_plan::NodePlan {
        let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
            path: "p.yaml".into(),
            text: yaml.into(),
        }]);
        assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
        let node = berth_plan::NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
        berth_plan::plan_node(
            &catalog,
            &node,
            &berth_plan::ImageCatalog::default(),
            &berth_plan::ActualState::default(),
            "r1",
        )
    }

    #[test]
    fn hooks_are_kept_while_their_units_exist_even_once_git_drops_the_pod() {
        let with_hook = plan(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  terminationGracePeriodSeconds: 7\n  containers:\n  - name: c\n    image: busybox:1.37\n    command: [sleep, \"9\"]\n    lifecycle: {preStop: {sleep: {seconds: 3}}}\n",
        );
        let unit = with_hook.pods[0].containers[0].name.to_string();
        let mut kept = BTreeMap::new();
        let mut observed = berth_runtime::Observed::default();
        record(&mut kept, &with_hook.pods, &observed);
        assert_eq!(
            kept.get(&unit),
            Some(&PreStop {
                pod: "default/a".into(),
                container: "c".into(),
                action: Action::Sleep { seconds: 3 },
                grace_seconds: 7,
            })
        );
        // Git drops the pod while its unit still runs: the hook stays.
        observed.units.insert(unit.clone(), Default::default());
        record(&mut kept, &[], &observed);
        assert!(kept.contains_key(&unit));
        // The unit gone: so is its hook.
        record(&mut kept, &[], &berth_runtime::Observed::default());
        assert!(kept.is_empty());
        // A pod whose hook was removed in Git loses it at once.
        let without = plan(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37\n    command: [sleep, \"9\"]\n",
        );
        record(&mut kept, &with_hook.pods, &observed);
        record(&mut kept, &without.pods, &observed);
        assert!(kept.is_empty());
    }
}

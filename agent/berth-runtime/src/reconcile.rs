//! The two stages that touch the machine: `observe` reads Berth's units
//! back from systemd, `apply` carries out a plan. Apply never stops at the
//! first error: every action is tried (unless one it depends on failed)
//! and every failure is reported with the unit and pod it concerns.

use std::collections::{BTreeMap, BTreeSet};

use berth_plan::plan::Plan;
use berth_plan::{
    ActualState, ActualUnit, ContainerUnit, DesiredPod, PodId, Properties, PropertyValue, UnitName,
    Verb,
};
use serde::{Deserialize, Serialize};

use crate::images::ImageStore;
use crate::rootfs::{ContainerRoots, UserRecords};
use crate::systemd::{KillWhom, Systemd, SystemdError, UnitDetails};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// Every unit Berth could have made. Admin units that happen to match are
/// observed too, so the planner can refuse to touch them.
pub const UNIT_PATTERNS: &[&str] = &["berth*.slice", "berth-*.service"];

/// What observe saw: the planner's view and the full details for status.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub actual: ActualState,
    pub units: BTreeMap<String, UnitDetails>,
}

pub fn observe(systemd: &dyn Systemd) -> Result<Observed, SystemdError> {
    let mut observed = Observed::default();
    for details in systemd.units_matching(UNIT_PATTERNS)? {
        observed.actual.units.push(ActualUnit {
            name: UnitName::from_observed(details.name.clone()),
            active_state: details.active_state,
            properties: details.properties.clone(),
            restarts: details.runtime.restarts,
        });
        observed.units.insert(details.name.clone(), details);
    }
    Ok(observed)
}

/// The host handles apply works with.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub systemd: &'a dyn Systemd,
    pub images: &'a ImageStore,
    pub roots: &'a ContainerRoots,
    pub users: &'a UserRecords,
    /// Files copied into each container's writable layer before it starts,
    /// by pod key: `(path inside the root, file on the node)`. The pod
    /// network's `etc/resolv.conf`, `etc/hosts` and `etc/hostname`.
    pub pod_files: Option<&'a BTreeMap<String, Vec<(String, std::path::PathBuf)>>>,
}

impl std::fmt::Debug for dyn Systemd + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Systemd")
    }
}

pub use berth_plan::FailureReason;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyFailure {
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub verb: String,
    pub reason: FailureReason,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Units whose action succeeded, with the action.
    pub done: Vec<(String, Verb)>,
    pub failed: Vec<ApplyFailure>,
    /// Container roots and mounts of containers that no longer exist.
    pub cleaned: Vec<String>,
    /// Where the apply's time went, phase by phase, in order.
    pub phases: Vec<(&'static str, std::time::Duration)>,
}

/// Times the phases of an apply into its report.
struct PhaseClock(std::time::Instant);

impl PhaseClock {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }

    /// The phase `what` ended now.
    fn mark(&mut self, what: &'static str, report: &mut ApplyReport) {
        let now = std::time::Instant::now();
        report.phases.push((what, now - self.0));
        self.0 = now;
    }
}

pub(crate) fn container_key(pod: &PodId, container: &str) -> String {
    format!("{}_{container}", pod.key())
}

/// `berth-<ns>_<pod>_<container>.service` → `<ns>_<pod>_<container>`.
fn key_of_service(unit: &str) -> Option<&str> {
    unit.strip_prefix("berth-")?.strip_suffix(".service")
}

fn numeric(props: &Properties, key: &str) -> Option<u32> {
    match props.get(key) {
        Some(PropertyValue::Text(t)) => t.parse().ok(),
        _ => None,
    }
}

struct Failure {
    reason: FailureReason,
    message: String,
}

impl From<SystemdError> for Failure {
    fn from(e: SystemdError) -> Self {
        let reason = match &e {
            SystemdError::JobFailed { .. } | SystemdError::JobTimeout { .. } => {
                FailureReason::StartError
            }
            _ => FailureReason::CreateContainerConfigError,
        };
        Failure {
            reason,
            message: e.to_string(),
        }
    }
}

pub fn apply(
    host: &Host<'_>,
    plan: &Plan,
    pods: &[DesiredPod],
    observed: &Observed,
) -> ApplyReport {
    let units: BTreeMap<&str, (&DesiredPod, &ContainerUnit)> = pods
        .iter()
        .flat_map(|p| p.units().map(move |u| (u.name.as_str(), (p, u))))
        .collect();
    let slices: BTreeMap<&str, &Properties> = pods
        .iter()
        .map(|p| (p.slice.name.as_str(), &*p.slice.properties))
        .collect();
    let mut report = ApplyReport::default();
    let mut clock = PhaseClock::start();
    let mut failed_pods: BTreeSet<String> = BTreeSet::new();
    let mut pending: Vec<(&berth_plan::Action, Prepared<'_>)> = Vec::new();
    // Containers Git no longer wants stop together, each with its own
    // grace period; their mounts and layers go afterwards, one by one.
    // A rolling update's old pods (`plan.beside`) wind down while the new
    // ones start: their stops are queued in another thread, and what
    // follows a stop (unmounts, the slice) waits until the starts are done.
    let is_beside = |a: &berth_plan::Action| plan.beside.contains(&a.unit);
    let stops_of = |beside: bool| -> Vec<&str> {
        plan.actions
            .iter()
            .filter(|a| a.verb == Verb::Stop && is_beside(a) == beside)
            .map(|a| a.unit.as_str())
            .collect()
    };
    let (stops, beside_stops) = (stops_of(false), stops_of(true));
    // A hard eviction (no grace period): every process of the container
    // gets SIGKILL before its stop job, as the kubelet kills at once.
    for a in plan
        .actions
        .iter()
        .filter(|a| a.verb == Verb::Stop && a.grace_seconds == Some(0))
    {
        let _ = host.systemd.kill(a.unit.as_str(), KillWhom::All, SIGKILL);
    }
    let mut stopped: BTreeMap<&str, Result<(), SystemdError>> = stops
        .iter()
        .copied()
        .zip(host.systemd.stop_all(&stops))
        .collect();
    if !stops.is_empty() {
        clock.mark("stops", &mut report);
    }
    let deferred = std::cell::RefCell::new(Vec::new());
    let ctx = Applying {
        host,
        units: &units,
        slices: &slices,
        observed,
        deferred: &deferred,
    };
    std::thread::scope(|scope| {
        let winding_down = (!beside_stops.is_empty())
            .then(|| scope.spawn(|| host.systemd.stop_all(&beside_stops)));
        // Pulls are the image puller's to carry out, not systemd's.
        let now: Vec<&berth_plan::Action> = plan
            .actions
            .iter()
            .filter(|a| a.verb != Verb::Pull && !is_beside(a))
            .collect();
        apply_actions(
            &ctx,
            &now,
            &mut stopped,
            &mut report,
            &mut pending,
            &mut failed_pods,
        );
        clock.mark("slices and roots", &mut report);
        if !pending.is_empty() {
            start_prepared(host, &pending, &mut report, &mut clock);
        }
        let deferred = deferred.take();
        if !deferred.is_empty() {
            limit_slices(host, &deferred, &mut report);
        }
        if !pending.is_empty() || !deferred.is_empty() {
            clock.mark("limits", &mut report);
        }
        if let Some(thread) = winding_down {
            let results = thread.join().unwrap_or_else(|_| {
                beside_stops
                    .iter()
                    .map(|u| {
                        Err(SystemdError::Bus {
                            method: "StopUnit",
                            message: format!("the thread stopping {u} panicked"),
                        })
                    })
                    .collect()
            });
            stopped.extend(beside_stops.iter().copied().zip(results));
            let after: Vec<&berth_plan::Action> =
                plan.actions.iter().filter(|a| is_beside(a)).collect();
            let mut none = Vec::new();
            apply_actions(
                &ctx,
                &after,
                &mut stopped,
                &mut report,
                &mut none,
                &mut failed_pods,
            );
            clock.mark("winding down", &mut report);
        }
    });
    report.cleaned = collect_garbage(host, pods);
    clock.mark("clean-up", &mut report);
    report
}

/// What [`apply_actions`] reads.
struct Applying<'a, 'h> {
    host: &'a Host<'h>,
    units: &'a BTreeMap<&'a str, (&'a DesiredPod, &'a ContainerUnit)>,
    slices: &'a BTreeMap<&'a str, &'a Properties>,
    observed: &'a Observed,
    /// Pod slices created without what the plan gives them after the start
    /// (`Action::after_start`), and that: given once the pods' containers
    /// have started.
    deferred: &'a std::cell::RefCell<Vec<(String, Properties)>>,
}

/// Carries out `actions` in order; starts are only prepared (into
/// `pending`), to be started together.
fn apply_actions<'a>(
    ctx: &Applying<'a, '_>,
    actions: &[&'a berth_plan::Action],
    stopped: &mut BTreeMap<&str, Result<(), SystemdError>>,
    report: &mut ApplyReport,
    pending: &mut Vec<(&'a berth_plan::Action, Prepared<'a>)>,
    failed_pods: &mut BTreeSet<String>,
) {
    let Applying {
        host,
        units,
        slices,
        observed,
        deferred,
    } = *ctx;
    // The slices are made while the containers' roots are prepared: neither
    // needs the other. A pod whose slice fails has its prepared roots
    // unmounted below, as it comes to them.
    let mut limits_later = Vec::new();
    let (mut created, mut early) = std::thread::scope(|scope| {
        let slices = scope.spawn(|| create_slices(host, actions, &mut limits_later));
        let early = prepare_together(host, units, observed, actions, failed_pods);
        let created = slices
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (created, early)
    });
    deferred.borrow_mut().extend(limits_later);
    for action in actions.iter().copied() {
        let unit = action.unit.as_str();
        let pod = action.pod.as_ref().map(ToString::to_string);
        if let Some(p) = &pod
            && failed_pods.contains(p)
            && matches!(action.verb, Verb::Start | Verb::Restart)
        {
            // Prepared ahead, it is not started: nothing stays mounted.
            if let (Some(Ok(_)), Some((pod, u))) = (early.remove(unit), units.get(unit)) {
                let _ = host.roots.unmount(&container_key(&pod.id, &u.container));
            }
            report.failed.push(ApplyFailure {
                unit: unit.to_string(),
                pod: pod.clone(),
                verb: action.verb.as_str().to_string(),
                reason: FailureReason::DependencyFailed,
                message: format!("not started: an earlier unit of pod {p} failed"),
            });
            continue;
        }
        let result: Result<(), Failure> = match action.verb {
            Verb::Pull => Ok(()),
            Verb::CreateSlice => created
                .remove(unit)
                .unwrap_or_else(|| host.systemd.start_transient(unit, &action.properties))
                .map_err(Failure::from),
            Verb::UpdateSlice => {
                let props: Properties = action
                    .changes
                    .iter()
                    .filter_map(|c| {
                        let v = slices
                            .get(unit)
                            .and_then(|p| p.get(&c.property).cloned())
                            .or_else(|| c.to.clone())?;
                        Some((c.property.clone(), v))
                    })
                    .collect();
                host.systemd
                    .set_properties(unit, &props)
                    .map_err(Failure::from)
            }
            // Prepared now (or ahead, together), started together after the
            // loop.
            Verb::Start | Verb::Restart => match units.get(unit) {
                Some((p, u)) => early
                    .remove(unit)
                    .unwrap_or_else(|| prepare_container(host, p, u, observed.units.get(unit)))
                    .map(|prepared| {
                        pending.push((action, prepared));
                    }),
                None => Err(Failure {
                    reason: FailureReason::CreateContainerConfigError,
                    message: format!("unit {unit} is planned but has no desired properties"),
                }),
            },
            Verb::Update => match units.get(unit) {
                Some((_, u)) => {
                    let props: Properties = action
                        .changes
                        .iter()
                        .filter_map(|c| {
                            u.properties_for_apply()
                                .get(&c.property)
                                .map(|v| (c.property.clone(), v.clone()))
                        })
                        .collect();
                    host.systemd
                        .set_properties(unit, &props)
                        .map_err(Failure::from)
                }
                None => Ok(()),
            },
            Verb::Stop => match stopped.remove(unit) {
                Some(Err(e)) => Err(Failure {
                    reason: FailureReason::KillError,
                    message: e.to_string(),
                }),
                _ => remove_container(host, unit),
            },
            Verb::RemoveSlice => host.systemd.stop(unit).map_err(|e| Failure {
                reason: FailureReason::KillError,
                message: e.to_string(),
            }),
            // SIGTERM to the main process; a kill whose grace period ran
            // out is SIGKILL to every process of the container.
            Verb::Kill => {
                let (whom, signal) = match action.grace_seconds {
                    Some(0) => (KillWhom::All, SIGKILL),
                    _ => (KillWhom::Main, SIGTERM),
                };
                host.systemd.kill(unit, whom, signal).map_err(|e| Failure {
                    reason: FailureReason::KillError,
                    message: e.to_string(),
                })
            }
        };
        match result {
            Ok(()) if matches!(action.verb, Verb::Start | Verb::Restart) => {}
            Ok(()) => report.done.push((unit.to_string(), action.verb)),
            Err(f) => {
                if let Some(p) = &pod {
                    failed_pods.insert(p.clone());
                }
                report.failed.push(ApplyFailure {
                    unit: unit.to_string(),
                    pod,
                    verb: action.verb.as_str().to_string(),
                    reason: f.reason,
                    message: f.message,
                });
            }
        }
    }
}

/// Threads preparing containers at once.
const PREPARING_THREADS: usize = 4;

/// Prepares, on a few threads at once, the first container `actions` start
/// of each pod that only the creation of its slice comes before (the
/// slice's result is taken up in the loop, which unmounts what it will not
/// start). Each container has a root of its own; the rest are prepared in
/// their turn.
fn prepare_together<'a>(
    host: &Host<'_>,
    units: &BTreeMap<&'a str, (&'a DesiredPod, &'a ContainerUnit)>,
    observed: &Observed,
    actions: &[&'a berth_plan::Action],
    failed_pods: &BTreeSet<String>,
) -> BTreeMap<&'a str, Result<Prepared<'a>, Failure>> {
    let mut blocked: BTreeSet<String> = failed_pods.clone();
    let mut ready: Vec<(&'a str, &'a DesiredPod, &'a ContainerUnit)> = Vec::new();
    for a in actions {
        let Some(pod) = a.pod.as_ref().map(ToString::to_string) else {
            continue;
        };
        let fine = match a.verb {
            Verb::CreateSlice => true,
            Verb::Start | Verb::Restart => match units.get(a.unit.as_str()) {
                Some((p, u)) if !blocked.contains(&pod) => {
                    ready.push((a.unit.as_str(), p, u));
                    // A later start of the pod waits for this one's result.
                    false
                }
                _ => false,
            },
            Verb::Pull => true,
            _ => false,
        };
        if !fine {
            blocked.insert(pod);
        }
    }
    let prepared = crate::parallel::in_parallel(&ready, PREPARING_THREADS, |(unit, p, u)| {
        prepare_container(host, p, u, observed.units.get(*unit))
    });
    ready
        .iter()
        .map(|(unit, _, _)| *unit)
        .zip(prepared)
        .collect()
}

/// Creates the slices `actions` ask for ahead of the rest: the node's own
/// (Berth's and the QoS classes', parents of the others) one by one in
/// order, then every pod's together, queued at once and waited for (one
/// round trip to systemd for them all, not one per pod). Their results are
/// taken up where each action comes in the plan.
///
/// A pod slice is created without what the plan gives it after the start
/// (its CPU limit), kept in `deferred` for [`limit_slices`] once the pod's
/// containers have started.
fn create_slices<'a>(
    host: &Host<'_>,
    actions: &[&'a berth_plan::Action],
    deferred: &mut Vec<(String, Properties)>,
) -> BTreeMap<&'a str, Result<(), SystemdError>> {
    let creates = || actions.iter().filter(|a| a.verb == Verb::CreateSlice);
    let mut results: BTreeMap<&str, Result<(), SystemdError>> = creates()
        .filter(|a| a.pod.is_none())
        .map(|a| {
            let unit = a.unit.as_str();
            (unit, host.systemd.start_transient(unit, &a.properties))
        })
        .collect();
    let pod_slices: Vec<(&str, &Properties, Option<SplitLimit>)> = creates()
        .filter(|a| a.pod.is_some())
        .map(|a| {
            (
                a.unit.as_str(),
                &*a.properties,
                split_after_start(&a.properties, &a.after_start),
            )
        })
        .collect();
    let starts: Vec<(&str, &Properties)> = pod_slices
        .iter()
        .map(|(n, all, split)| (*n, split.as_ref().map_or(*all, |(rest, _)| rest)))
        .collect();
    for ((name, _, split), result) in pod_slices.iter().zip(host.systemd.start_all(&starts)) {
        if let (Ok(()), Some((_, limit))) = (&result, split) {
            deferred.push((name.to_string(), limit.clone()));
        }
        results.insert(name, result);
    }
    results
}

/// A unit's properties without those the plan gives it after its start
/// (`Action::after_start`), and those alone; `None` when there are none.
type SplitLimit = (Properties, Properties);

fn split_after_start(properties: &Properties, after: &[String]) -> Option<SplitLimit> {
    let later: Properties = properties
        .iter()
        .filter(|(k, _)| after.iter().any(|a| a == k))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    if later.is_empty() {
        return None;
    }
    let rest = properties
        .iter()
        .filter(|(k, _)| !after.iter().any(|a| a == k))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Some((rest, later))
}

/// Gives the pod slices created in this pass their CPU limits.
fn limit_slices(host: &Host<'_>, deferred: &[(String, Properties)], report: &mut ApplyReport) {
    let limits: Vec<(&str, &Properties)> = deferred.iter().map(|(s, l)| (s.as_str(), l)).collect();
    for ((slice, _), result) in deferred
        .iter()
        .zip(host.systemd.set_properties_all(&limits))
    {
        if let Err(e) = result {
            report.failed.push(ApplyFailure {
                unit: slice.clone(),
                pod: None,
                verb: Verb::CreateSlice.as_str().to_string(),
                reason: FailureReason::CreateContainerConfigError,
                message: format!("its CPU limit could not be set once its pod started: {e}"),
            });
        }
    }
}

/// A container ready to start: its root mounted, its service's properties.
struct Prepared<'a> {
    properties: &'a Properties,
}

/// Starts the prepared containers together: every service queued at once
/// and waited for, so pods start in parallel (systemd still orders init
/// containers by `After=`).
fn start_prepared(
    host: &Host<'_>,
    pending: &[(&berth_plan::Action, Prepared<'_>)],
    report: &mut ApplyReport,
    clock: &mut PhaseClock,
) {
    // What the plan gives a container once it runs (an app container's
    // CPU limit) is left out of its start.
    let splits: Vec<Option<SplitLimit>> = pending
        .iter()
        .map(|(a, p)| split_after_start(p.properties, &a.after_start))
        .collect();
    let services: Vec<(&str, &Properties)> = pending
        .iter()
        .zip(&splits)
        .map(|((a, p), split)| {
            (
                a.unit.as_str(),
                split.as_ref().map_or(p.properties, |(rest, _)| rest),
            )
        })
        .collect();
    let started = host.systemd.start_all(&services);
    clock.mark("starts", report);
    // The limits of those that started, given together.
    let limits: Vec<(&str, &Properties)> = pending
        .iter()
        .zip(&started)
        .zip(&splits)
        .filter_map(|(((a, _), r), split)| {
            Some((a.unit.as_str(), &split.as_ref().filter(|_| r.is_ok())?.1))
        })
        .collect();
    let mut limited: BTreeMap<&str, Result<(), SystemdError>> = limits
        .iter()
        .map(|(u, _)| *u)
        .zip(host.systemd.set_properties_all(&limits))
        .collect();
    for ((action, _), result) in pending.iter().zip(started) {
        let result = result.and_then(|()| limited.remove(action.unit.as_str()).unwrap_or(Ok(())));
        match result {
            Ok(()) => report.done.push((action.unit.to_string(), action.verb)),
            Err(e) => {
                let f = Failure::from(e);
                report.failed.push(ApplyFailure {
                    unit: action.unit.to_string(),
                    pod: action.pod.as_ref().map(ToString::to_string),
                    verb: action.verb.as_str().to_string(),
                    reason: f.reason,
                    message: f.message,
                });
            }
        }
    }
}

/// Writes `body` to `path`, readable by root only, whole or not at all;
/// older environment files beside it go.
fn write_private(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    let tmp = dir.join(".environment.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    remove_environment_files(dir, Some(path));
    Ok(())
}

/// Removes the environment files in a container's directory but `keep`.
fn remove_environment_files(dir: &std::path::Path, keep: Option<&std::path::Path>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("environment-") && Some(e.path().as_path()) != keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Everything before a container's start: its image, the unit it
/// replaces, a fresh root, its user records.
fn prepare_container<'a>(
    host: &Host<'_>,
    pod: &DesiredPod,
    unit: &'a ContainerUnit,
    existing: Option<&UnitDetails>,
) -> Result<Prepared<'a>, Failure> {
    let name = unit.name.as_str();
    let image_root = host.images.rootfs(&unit.image).ok_or_else(|| Failure {
        reason: FailureReason::ImageNotPresent,
        message: format!(
            "image {:?} is not in the local image store (removed since it was pulled?); it is pulled again on the next pass",
            unit.image
        ),
    })?;
    let props = unit.properties_for_apply();
    if unit.verify_non_root && numeric(props, "User").unwrap_or(0) == 0 {
        return Err(Failure {
            reason: FailureReason::CreateContainerConfigError,
            message: format!(
                "container has runAsNonRoot and image {:?} will run as root: set runAsUser, or use an image with a non-root USER",
                unit.image
            ),
        });
    }
    if props.get("ExecStart").is_none() {
        return Err(Failure {
            reason: FailureReason::CreateContainerConfigError,
            message: format!("image {:?} gives nothing to run", unit.image),
        });
    }
    if existing.is_some() {
        host.systemd.stop(name).map_err(|e| Failure {
            reason: FailureReason::KillError,
            message: e.to_string(),
        })?;
        host.systemd.reset_failed(name).map_err(Failure::from)?;
    }
    let key = container_key(&pod.id, &unit.container);
    let host_err = |e: std::io::Error| Failure {
        reason: FailureReason::CreateContainerError,
        message: format!("container root {}: {e}", host.roots.dir(&key).display()),
    };
    // A fresh root every start: the image may have changed.
    host.roots.unmount(&key).map_err(host_err)?;
    // systemd 257 leaves a `RootDirectory=` root writable under
    // `ReadOnlyPaths=/` (measured), so the overlay itself is mounted `ro`.
    let mode = crate::rootfs::RootMode {
        read_only: matches!(props.get("ReadOnlyPaths"), Some(PropertyValue::List(l)) if l.iter().any(|p| p == "/")),
        mount_points: ["BindPaths", "BindReadOnlyPaths"]
            .iter()
            .filter_map(|k| match props.get(k) {
                Some(PropertyValue::Binds(b)) => Some(b.iter().map(|b| b.destination.clone())),
                _ => None,
            })
            .flatten()
            .collect(),
    };
    let overlay = host
        .roots
        .prepare_with(&key, &image_root, &mode)
        .map_err(host_err)?;
    // Its environment from Secrets: root-only, beside (not inside) its root;
    // none left from an earlier start that had one.
    match unit.environment_file_for_apply() {
        Some(file) => {
            write_private(std::path::Path::new(&file.path), &file.body.0).map_err(|e| Failure {
                reason: FailureReason::CreateContainerConfigError,
                message: format!("its environment file {}: {e}", file.path),
            })?;
        }
        None => remove_environment_files(&host.roots.dir(&key), None),
    }
    // Which image the container runs on, so collection keeps it even after
    // its tag moves on; and its last use, for collection by age.
    if let Some(manifest) = host.images.resolve(&unit.image) {
        host.roots.record_image(&key, &manifest).map_err(host_err)?;
        host.images.touch(&manifest);
    }
    for (inside, source) in host
        .pod_files
        .and_then(|f| f.get(&pod.id.key()))
        .into_iter()
        .flatten()
    {
        let upper = host.roots.dir(&key).join("upper");
        copy_into_layer(&upper, inside, source).map_err(|e| Failure {
            reason: FailureReason::CreateContainerError,
            message: format!(
                "copying {} into the container as /{inside}: {e}",
                source.display()
            ),
        })?;
    }
    host.users
        .ensure(numeric(props, "User"), numeric(props, "Group"))
        .map_err(host_err)?;
    // Last: a step that fails above leaves nothing mounted.
    host.roots.mount(&key, &overlay).map_err(|e| Failure {
        reason: FailureReason::CreateContainerError,
        message: format!(
            "mounting the container root {}: {e}",
            host.roots.rootfs(&key).display()
        ),
    })?;
    Ok(Prepared { properties: props })
}

/// Copies a file into a container's writable layer, readable by every user
/// of the container. A directory made in the upper layer hides the image's
/// own mode, so each one is made 0755 whatever the agent's umask.
fn copy_into_layer(
    upper: &std::path::Path,
    inside: &str,
    source: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = upper.to_path_buf();
    let parts: Vec<&str> = inside
        .split('/')
        .filter(|p| !p.is_empty() && *p != "..")
        .collect();
    let Some((file, dirs)) = parts.split_last() else {
        return Ok(());
    };
    for d in dirs {
        dir.push(d);
        if !dir.is_dir() {
            std::fs::create_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let target = dir.join(file);
    std::fs::copy(source, &target)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644))
}

/// What is left of a container once its service stopped: a failed unit
/// record, its root mount, its layers.
fn remove_container(host: &Host<'_>, unit: &str) -> Result<(), Failure> {
    let kill = |e: SystemdError| Failure {
        reason: FailureReason::KillError,
        message: e.to_string(),
    };
    host.systemd.reset_failed(unit).map_err(kill)?;
    if let Some(key) = key_of_service(unit) {
        host.roots.unmount(key).map_err(|e| Failure {
            reason: FailureReason::KillError,
            message: format!(
                "unmounting the container root {}: {e}",
                host.roots.rootfs(key).display()
            ),
        })?;
        host.roots.remove(key).map_err(|e| Failure {
            reason: FailureReason::KillError,
            message: format!("container root {}: {e}", host.roots.dir(key).display()),
        })?;
    }
    Ok(())
}

/// Container mounts and directories whose service is gone and that no pod
/// wants: left behind when the agent died between steps.
fn collect_garbage(host: &Host<'_>, pods: &[DesiredPod]) -> Vec<String> {
    let mut keep: BTreeSet<String> = pods
        .iter()
        .flat_map(|p| p.units().map(|u| container_key(&p.id, &u.container)))
        .collect();
    let Ok(services) = host.systemd.list_units(&["berth-*.service"]) else {
        return Vec::new();
    };
    keep.extend(
        services
            .iter()
            .filter_map(|s| key_of_service(&s.name).map(str::to_string)),
    );
    let mut cleaned = Vec::new();
    let Ok(mounted) = host.roots.mounted_keys() else {
        return cleaned;
    };
    let mut still = mounted.clone();
    for key in mounted.iter().filter(|k| !keep.contains(*k)) {
        if host.roots.unmount(key).is_ok() {
            still.remove(key);
            cleaned.push(host.roots.rootfs(key).display().to_string());
        }
    }
    for key in host.roots.keys().iter().filter(|k| !keep.contains(*k)) {
        if !still.contains(key) && host.roots.remove(key).is_ok() {
            cleaned.push(host.roots.dir(key).display().to_string());
        }
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn an_environment_file_is_root_only_and_replaces_the_last_one() {
        let dir = std::env::temp_dir().join(format!("berth-envfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let first = dir.join("environment-aaaa");
        write_private(&first, b"TOKEN=\"one\"\n").expect("written");
        let meta = std::fs::metadata(&first).expect("there");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let second = dir.join("environment-bbbb");
        write_private(&second, b"TOKEN=\"two\"\n").expect("written");
        assert!(!first.exists(), "the old values are gone");
        assert_eq!(std::fs::read(&second).expect("read"), b"TOKEN=\"two\"\n");
        assert!(!dir.join(".environment.tmp").exists());
        // A start without secrets leaves none behind.
        remove_environment_files(&dir, None);
        assert!(!second.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

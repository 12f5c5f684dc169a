//! Pod status on the node, the way `kubectl get pods` shows it: a phase per
//! pod, a state per container (with restarts and the last exit code), and
//! usage read from the pod's cgroup. Built from what observe saw, the
//! failures the last apply recorded, and the cgroup files; no clock inside.

use std::collections::BTreeMap;
use std::path::Path;

use berth_plan::units::{CONTAINER_FIELD, POD_FIELD, SLICE_DESCRIPTION_PREFIX};
use berth_plan::{ActiveState, PropertyValue};
use serde::{Deserialize, Serialize};

use crate::reconcile::{ApplyFailure, Observed};
use crate::systemd::UnitDetails;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerState {
    Running {
        #[serde(rename = "startedAt")]
        started_usec: u64,
    },
    Waiting {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Terminated {
        reason: String,
        #[serde(rename = "exitCode")]
        exit_code: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    pub unit: String,
    pub init: bool,
    pub state: ContainerState,
    pub ready: bool,
    pub restart_count: u32,
    /// The last exit code of the main process, when it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
    /// Kubernetes' `started`: its startup probe passed (or it has none).
    /// Absent for a container that is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
    /// Its probes' outcomes in this instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeReport>,
    /// Why the node last killed it (a failed probe), with when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kill: Option<String>,
    /// How its previous run ended (Kubernetes' `lastState.terminated`):
    /// `OOMKilled` with code 137 when the kernel's OOM killer ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<LastState>,
}

/// A container's previous run's end, as `lastState.terminated` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastState {
    /// `OOMKilled`, `Error`, `Completed`.
    pub reason: String,
    /// Absent when the node did not see the exit (the container was
    /// already running again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Seconds since the epoch: when the node saw it.
    pub finished_at: u64,
}

/// One probe of a running container, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    /// `startup`, `liveness` or `readiness`.
    pub probe: String,
    /// `Success`, `Failure` or `Unknown`, as the kubelet's results.
    pub result: String,
    pub runs: u64,
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub cpu_usage_usec: Option<u64>,
    pub oom_kills: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub phase: Phase,
    /// `Running`, `CrashLoopBackOff`, `ImageNotPresent`, `Init:0/1`, ...
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    pub containers: Vec<ContainerStatus>,
    /// Microseconds since the epoch the first container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_usec: Option<u64>,
    #[serde(default)]
    pub usage: Usage,
    /// Kubernetes' pod conditions: PodScheduled, Initialized,
    /// ContainersReady, Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PodCondition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
    /// The pod's address on the pod network (absent with `hostNetwork`).
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `"True"` or `"False"`, as Kubernetes writes them.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed (RFC 3339), as the node saw it.
    #[serde(
        rename = "lastTransitionTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub last_transition: Option<String>,
}

fn condition(kind: &str, ok: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        kind: kind.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.filter(|_| !ok).map(str::to_string),
        message: None,
        last_transition: None,
    }
}

impl PodStatus {
    /// Running, with its Ready condition true: what Services send traffic
    /// to, and what an OS update's health gate waits for again.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Running
            && self
                .conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True")
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A pod the node does not run, as the kubelet reports it: `OutOfcpu`
    /// or `OutOfmemory` when it cannot fit, `Forbidden` when its Pod
    /// Security level refuses it, `Evicted` when the node ended it.
    pub fn not_admitted(namespace: &str, name: &str, status: &str, reason: &str) -> Self {
        // Evicted: it was scheduled and ran; the node ended it.
        let (conditions, message) = if status == "Evicted" {
            let mut target = condition("DisruptionTarget", true, None);
            target.reason = Some("TerminationByKubelet".into());
            (
                vec![condition("PodScheduled", true, None), target],
                reason.to_string(),
            )
        } else {
            (
                vec![condition("PodScheduled", false, Some("Unschedulable"))],
                format!("not admitted: {reason}"),
            )
        };
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            phase: Phase::Failed,
            status: status.to_string(),
            qos_class: None,
            slice: None,
            containers: Vec::new(),
            start_usec: None,
            usage: Usage::default(),
            conditions,
            messages: vec![message],
            pod_ip: None,
        }
    }

    pub fn ready(&self) -> (usize, usize) {
        let main: Vec<&ContainerStatus> = self.containers.iter().filter(|c| !c.init).collect();
        (main.iter().filter(|c| c.ready).count(), main.len())
    }

    pub fn restarts(&self) -> u32 {
        self.containers.iter().map(|c| c.restart_count).sum()
    }
}

fn log_field<'a>(unit: &'a UnitDetails, field: &str) -> Option<&'a str> {
    match unit.properties.get("LogExtraFields") {
        Some(PropertyValue::List(fields)) => fields
            .iter()
            .find_map(|f| f.strip_prefix(field).and_then(|r| r.strip_prefix('='))),
        _ => None,
    }
}

/// Init containers are the pod's `Type=oneshot` services.
fn is_init(unit: &UnitDetails) -> bool {
    matches!(unit.properties.get("Type"), Some(PropertyValue::Text(t)) if &**t == "oneshot")
}

fn container_state(unit: &UnitDetails) -> (ContainerState, bool, Option<i32>) {
    let r = &unit.runtime;
    let exited = (r.exit_code != 0).then_some(if r.exit_code == 1 {
        r.exit_status
    } else {
        128 + r.exit_status
    });
    let init = is_init(unit);
    match (unit.active_state, unit.sub_state.as_str()) {
        // A container that ran to completion is not ready, as in kubectl.
        (ActiveState::Active, "exited") => (
            ContainerState::Terminated {
                reason: "Completed".into(),
                exit_code: exited.unwrap_or(0),
            },
            false,
            exited,
        ),
        (ActiveState::Active | ActiveState::Reloading, _) => (
            ContainerState::Running {
                started_usec: r.active_enter_usec,
            },
            true,
            exited,
        ),
        (ActiveState::Activating, "auto-restart") => (
            ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: Some(format!(
                    "back-off restarting the container; last exit: {}",
                    describe_exit(r.exit_code, r.exit_status, &r.result)
                )),
            },
            false,
            exited,
        ),
        (ActiveState::Activating, _) => (
            ContainerState::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: None,
            },
            false,
            exited,
        ),
        (ActiveState::Deactivating, _) => (
            ContainerState::Waiting {
                reason: "Terminating".into(),
                message: None,
            },
            false,
            exited,
        ),
        (ActiveState::Failed, _) => (
            ContainerState::Terminated {
                reason: match (r.exit_code, r.exit_status, r.result.as_str()) {
                    (_, _, "oom-kill") => "OOMKilled".into(),
                    (1, 203, _) => "ExecNotFound".into(),
                    (1, 217, _) => "UserNotFound".into(),
                    _ => "Error".into(),
                },
                exit_code: exited.unwrap_or(1),
            },
            false,
            exited,
        ),
        (ActiveState::Inactive, _) => (
            ContainerState::Terminated {
                reason: "Completed".into(),
                exit_code: exited.unwrap_or(0),
            },
            false,
            exited,
        ),
    }
}

fn describe_exit(code: i32, status: i32, result: &str) -> String {
    match code {
        1 => format!("exit code {status} ({result})"),
        2 | 3 => format!("killed by signal {status} ({result})"),
        _ => result.to_string(),
    }
}

/// Reads usage of a cgroup under `cgroup_root` (`/sys/fs/cgroup`).
pub fn read_usage(cgroup_root: &Path, control_group: &str) -> Usage {
    let dir = cgroup_root.join(control_group.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let keyed = |f: &str, key: &str| {
        read(f).and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
    };
    Usage {
        memory_bytes: read("memory.current").and_then(|t| t.trim().parse().ok()),
        cpu_usage_usec: keyed("cpu.stat", "usage_usec"),
        oom_kills: keyed("memory.events", "oom_kill"),
    }
}

/// Status of every pod that has units, plus pods the last apply could not
/// start (they have no units, only a failure).
pub fn pod_statuses(
    observed: &Observed,
    failures: &[ApplyFailure],
    cgroup_root: &Path,
) -> Vec<PodStatus> {
    let mut pods: BTreeMap<String, PodStatus> = BTreeMap::new();
    let entry = |pods: &mut BTreeMap<String, PodStatus>, id: &str| {
        let (ns, name) = id.split_once('/').unwrap_or(("", id));
        pods.entry(id.to_string())
            .or_insert_with(|| PodStatus {
                namespace: ns.to_string(),
                name: name.to_string(),
                phase: Phase::Pending,
                status: "Pending".into(),
                qos_class: None,
                slice: None,
                containers: Vec::new(),
                start_usec: None,
                usage: Usage::default(),
                conditions: Vec::new(),
                messages: Vec::new(),
                pod_ip: None,
            })
            .name
            .clone()
    };
    for unit in observed.units.values() {
        if unit.name.ends_with(".slice") {
            let Some(PropertyValue::Text(d)) = unit.properties.get("Description") else {
                continue;
            };
            let Some(rest) = d.strip_prefix(SLICE_DESCRIPTION_PREFIX) else {
                continue;
            };
            let (id, qos) = rest.split_once(' ').unwrap_or((rest, ""));
            entry(&mut pods, id);
            if let Some(p) = pods.get_mut(id) {
                p.qos_class = Some(qos.trim_matches(['(', ')']).to_string());
                p.slice = Some(unit.name.clone());
                p.usage = read_usage(cgroup_root, &unit.runtime.control_group);
            }
            continue;
        }
        let (Some(id), Some(container)) =
            (log_field(unit, POD_FIELD), log_field(unit, CONTAINER_FIELD))
        else {
            continue;
        };
        if !unit.properties.get("LogExtraFields").is_some_and(
            |f| matches!(f, PropertyValue::List(l) if l.iter().any(|x| x == berth_plan::units::MARKER_FIELD)),
        ) {
            continue;
        }
        entry(&mut pods, id);
        let (state, ready, last_exit_code) = container_state(unit);
        let init = is_init(unit);
        if let Some(p) = pods.get_mut(id) {
            if let ContainerState::Running { started_usec } = &state {
                p.start_usec = Some(p.start_usec.map_or(*started_usec, |s| s.min(*started_usec)));
            }
            p.containers.push(ContainerStatus {
                name: container.to_string(),
                unit: unit.name.clone(),
                init,
                state,
                ready,
                restart_count: unit.runtime.restarts,
                last_exit_code,
                started: None,
                probes: Vec::new(),
                last_kill: None,
                last_state: None,
            });
        }
    }
    let mut failure_reason: BTreeMap<String, String> = BTreeMap::new();
    for f in failures {
        let Some(id) = &f.pod else { continue };
        entry(&mut pods, id);
        if let Some(p) = pods.get_mut(id) {
            p.messages.push(format!("{}: {}", f.unit, f.message));
        }
        failure_reason
            .entry(id.clone())
            .or_insert_with(|| format!("{:?}", f.reason));
    }
    for (id, p) in pods.iter_mut() {
        p.containers
            .sort_by(|a, b| b.init.cmp(&a.init).then(a.name.cmp(&b.name)));
        derive_phase(p, failure_reason.get(id));
        derive_conditions(p);
    }
    pods.into_values().collect()
}

/// As the kubelet sets them: scheduled (admitted) once it has units,
/// initialized when every init container exited 0, ready when every app
/// container is.
fn derive_conditions(p: &mut PodStatus) {
    let init_done = p
        .containers
        .iter()
        .filter(|c| c.init)
        .all(|c| matches!(&c.state, ContainerState::Terminated { exit_code: 0, .. }));
    let (ready, total) = p.ready();
    let all_ready = total > 0 && ready == total;
    let not_ready = (!all_ready).then_some("ContainersNotReady");
    let unready: Vec<&str> = p
        .containers
        .iter()
        .filter(|c| !c.init && !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let message = (!all_ready && !unready.is_empty())
        .then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let with_message = |mut c: PodCondition| {
        c.message = message.clone();
        c
    };
    p.conditions = vec![
        condition("PodScheduled", true, None),
        condition("Initialized", init_done, Some("ContainersNotInitialized")),
        with_message(condition("ContainersReady", all_ready, not_ready)),
        with_message(condition("Ready", all_ready, not_ready)),
    ];
}

/// Probe results on a pod's status, as the kubelet's status manager puts
/// them: a running container is ready when its probes say so (see
/// [`ContainerHealth::ready`]), `started` once its startup probe passed;
/// the pod's conditions follow. `health` is by container name.
pub fn apply_health(
    p: &mut PodStatus,
    health: &BTreeMap<String, berth_plan::health::ContainerHealth>,
) {
    use berth_manifest::probe::ProbeKind;
    let mut any = false;
    for c in &mut p.containers {
        if !matches!(c.state, ContainerState::Running { .. }) {
            continue;
        }
        let Some(h) = health.get(&c.name) else {
            if !c.init {
                c.started = Some(true);
            }
            continue;
        };
        any = true;
        c.started = Some(h.started());
        c.ready = h.ready();
        c.probes = ProbeKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let s = h.get(kind)?;
                Some(ProbeReport {
                    probe: match kind {
                        ProbeKind::Startup => "startup",
                        ProbeKind::Liveness => "liveness",
                        ProbeKind::Readiness => "readiness",
                    }
                    .to_string(),
                    result: format!("{:?}", s.result),
                    runs: s.runs,
                    failures: s.failures,
                    last_failure: s.last_failure.clone(),
                })
            })
            .collect();
    }
    if any {
        derive_conditions(p);
    }
}

/// Carries each condition's transition time over from `before` (the same
/// pod's last status) while its status stays, and stamps `now` where it
/// changed or is new.
pub fn carry_transitions(p: &mut PodStatus, before: Option<&PodStatus>, now: &str) {
    for c in &mut p.conditions {
        let was = before.and_then(|b| b.conditions.iter().find(|o| o.kind == c.kind));
        c.last_transition = match was {
            Some(o) if o.status == c.status && o.last_transition.is_some() => {
                o.last_transition.clone()
            }
            _ => Some(now.to_string()),
        };
    }
}

fn derive_phase(p: &mut PodStatus, failure: Option<&String>) {
    let init: Vec<&ContainerStatus> = p.containers.iter().filter(|c| c.init).collect();
    let main: Vec<&ContainerStatus> = p.containers.iter().filter(|c| !c.init).collect();
    let waiting = |c: &&ContainerStatus| match &c.state {
        ContainerState::Waiting { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    let init_done = init
        .iter()
        .filter(|c| matches!(&c.state, ContainerState::Terminated { exit_code: 0, .. }))
        .count();
    let failed = main.iter().any(
        |c| matches!(&c.state, ContainerState::Terminated { exit_code, .. } if *exit_code != 0),
    );
    let all_completed = !main.is_empty()
        && main
            .iter()
            .all(|c| matches!(&c.state, ContainerState::Terminated { exit_code: 0, .. }));
    let running = main
        .iter()
        .any(|c| matches!(&c.state, ContainerState::Running { .. }));
    (p.phase, p.status) = if let Some(reason) = failure.filter(|_| main.is_empty() || !running) {
        (Phase::Pending, reason.clone())
    } else if init_done < init.len() {
        (Phase::Pending, format!("Init:{init_done}/{}", init.len()))
    } else if let Some(reason) = main.iter().find_map(waiting) {
        (
            if running {
                Phase::Running
            } else {
                Phase::Pending
            },
            reason,
        )
    } else if failed {
        (
            if running {
                Phase::Running
            } else {
                Phase::Failed
            },
            "Error".to_string(),
        )
    } else if all_completed {
        (Phase::Succeeded, "Completed".to_string())
    } else if running {
        (Phase::Running, "Running".to_string())
    } else {
        (Phase::Pending, "Pending".to_string())
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::FailureReason;
    use crate::systemd::UnitRuntime;
    use berth_plan::Properties;

    fn service(pod: &str, active: ActiveState, sub: &str, runtime: UnitRuntime) -> UnitDetails {
        let props: Properties = [
            (
                "LogExtraFields",
                PropertyValue::list(vec![
                    "BERTH_MANAGED=1".into(),
                    format!("BERTH_POD=default/{pod}"),
                    "BERTH_CONTAINER=main".into(),
                ]),
            ),
            ("Type", PropertyValue::text("exec")),
        ]
        .into_iter()
        .collect();
        UnitDetails {
            name: format!("berth-default_{pod}_main.service"),
            active_state: active,
            sub_state: sub.into(),
            properties: props,
            runtime,
        }
    }

    #[test]
    fn phases_and_reasons_read_like_kubectl() {
        let mut observed = Observed::default();
        let units = [
            service(
                "up",
                ActiveState::Active,
                "running",
                UnitRuntime {
                    active_enter_usec: 5,
                    restarts: 2,
                    ..UnitRuntime::default()
                },
            ),
            service(
                "looping",
                ActiveState::Activating,
                "auto-restart",
                UnitRuntime {
                    exit_code: 1,
                    exit_status: 3,
                    restarts: 4,
                    result: "exit-code".into(),
                    ..UnitRuntime::default()
                },
            ),
            service(
                "done",
                ActiveState::Active,
                "exited",
                UnitRuntime {
                    exit_code: 1,
                    exit_status: 0,
                    ..UnitRuntime::default()
                },
            ),
        ];
        for u in units {
            observed.units.insert(u.name.clone(), u);
        }
        let failures = [ApplyFailure {
            unit: "berth-default_ghost_main.service".into(),
            pod: Some("default/ghost".into()),
            verb: "start".into(),
            reason: FailureReason::ImageNotPresent,
            message: "image \"x\" is not present".into(),
        }];
        let pods = pod_statuses(&observed, &failures, Path::new("/nonexistent"));
        let by_name = |n: &str| pods.iter().find(|p| p.name == n).expect(n);
        let up = by_name("up");
        assert_eq!(
            (up.phase, up.status.as_str(), up.ready(), up.restarts()),
            (Phase::Running, "Running", (1, 1), 2)
        );
        let looping = by_name("looping");
        assert_eq!(
            (looping.phase, looping.status.as_str()),
            (Phase::Pending, "CrashLoopBackOff")
        );
        assert_eq!(looping.containers[0].last_exit_code, Some(3));
        let done = by_name("done");
        assert_eq!(
            (done.phase, done.status.as_str(), done.ready()),
            (Phase::Succeeded, "Completed", (0, 1))
        );
        let ghost = by_name("ghost");
        assert_eq!(
            (ghost.phase, ghost.status.as_str()),
            (Phase::Pending, "ImageNotPresent")
        );
        assert_eq!(ghost.messages.len(), 1);
        let conditions = |p: &PodStatus| -> Vec<(String, String)> {
            p.conditions
                .iter()
                .map(|c| (c.kind.clone(), c.status.clone()))
                .collect()
        };
        let all = |ready: &str| {
            vec![
                ("PodScheduled".to_string(), "True".to_string()),
                ("Initialized".into(), "True".into()),
                ("ContainersReady".into(), ready.to_string()),
                ("Ready".into(), ready.to_string()),
            ]
        };
        assert_eq!(conditions(up), all("True"));
        assert_eq!(conditions(looping), all("False"));
        assert_eq!(
            looping.conditions[3].reason.as_deref(),
            Some("ContainersNotReady")
        );
        let unfit = PodStatus::not_admitted("default", "huge", "OutOfcpu", "needs more CPU");
        assert_eq!(unfit.status, "OutOfcpu");
        assert_eq!(
            conditions(&unfit),
            vec![("PodScheduled".to_string(), "False".to_string())]
        );
        let evicted = PodStatus::not_admitted("default", "fill", "Evicted", "Usage of EmptyDir");
        assert_eq!(
            (evicted.phase, evicted.status.as_str()),
            (Phase::Failed, "Evicted")
        );
        assert_eq!(
            conditions(&evicted),
            [("PodScheduled", "True"), ("DisruptionTarget", "True")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(evicted.messages, ["Usage of EmptyDir"]);
    }
}

//! Kubernetes-style events: what happened to which object, and how often.
//!
//! The node keeps a bounded history (`events.json` in the state directory,
//! [`EVENTS_KEPT`] entries), shown by `berth get events [-w]` and, the last
//! few per object, in `status.yaml`. An event that repeats (the same object,
//! reason and message) is counted, as the API server's event aggregation
//! does, not repeated: its `count` grows and its `lastTimestamp` moves.
//!
//! [`Lifecycle`] turns what the node observes of its containers from one
//! look to the next (restarts, OOM kills in a pod's cgroup) into events and
//! into each container's last termination (`lastState.terminated`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use berth_runtime::status::{ContainerState, PodStatus};
use serde::{Deserialize, Serialize};

/// How many events the node keeps: the oldest go first.
pub const EVENTS_KEPT: usize = 1000;

/// How many of each object's last events `status.yaml` carries.
pub const EVENTS_PER_OBJECT_IN_STATUS: usize = 3;

/// The exit code Kubernetes reports for a container the OOM killer ended
/// (128 + SIGKILL).
pub const OOM_EXIT_CODE: i32 = 137;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// One event, under the names `kubectl get events -o json` uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `Pod/default/web-0`, `Deployment/default/web`, `Node/n1`.
    pub object: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub reason: String,
    pub message: String,
    pub count: u64,
    /// Seconds since the epoch.
    pub first_timestamp: u64,
    pub last_timestamp: u64,
}

/// The node's event history, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    events: VecDeque<Event>,
}

impl EventLog {
    /// Records an event `times` times at `now`: counted on the matching one
    /// (same object, reason and message), which moves to the end, or added.
    pub fn record(
        &mut self,
        object: &str,
        kind: EventType,
        reason: &str,
        message: &str,
        times: u64,
        now: u64,
    ) {
        if times == 0 {
            return;
        }
        let same = self
            .events
            .iter()
            .rposition(|e| e.object == object && e.reason == reason && e.message == message);
        let event = match same.and_then(|i| self.events.remove(i)) {
            Some(mut e) => {
                e.count += times;
                e.last_timestamp = now;
                e.kind = kind;
                e
            }
            None => Event {
                object: object.to_string(),
                kind,
                reason: reason.to_string(),
                message: message.to_string(),
                count: times,
                first_timestamp: now,
                last_timestamp: now,
            },
        };
        self.events.push_back(event);
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    /// Every event, oldest first (by when it last happened).
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The last `n` events of each object, oldest first, by object.
    pub fn last_per_object(&self, n: usize) -> BTreeMap<String, Vec<Event>> {
        let mut out: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for e in self.events.iter().rev() {
            let list = out.entry(e.object.clone()).or_default();
            if list.len() < n {
                list.insert(0, e.clone());
            }
        }
        out
    }

    /// Forgets the events of objects `keep` says no (a pod gone from Git
    /// keeps its story until its events age out, so it is not used for
    /// pods; it is for objects that can never come back).
    pub fn retain(&mut self, keep: impl Fn(&Event) -> bool) {
        self.events.retain(|e| keep(e));
    }
}

/// Where the event history lives: `events.json` beside the state file.
#[derive(Debug, Clone)]
pub struct EventStore {
    path: PathBuf,
}

impl EventStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("events.json"),
        }
    }

    /// The history on disk; an unreadable file is an empty history (the
    /// events are a record for people, not state anything depends on).
    pub fn load(&self) -> EventLog {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| {
                berth_schema::decode(&b, &self.path, crate::state::EVENTS_SCHEMA, |_, _| Ok(()))
                    .ok()
                    .map(|(log, _)| log)
            })
            .unwrap_or_default()
    }

    pub fn save(&self, log: &EventLog) -> std::io::Result<()> {
        let bytes = berth_schema::encode(log, crate::state::EVENTS_SCHEMA)
            .map_err(std::io::Error::other)?;
        crate::state::write_unsynced(&self.path, &bytes)
    }
}

/// How a container last ended, as `lastState.terminated` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Termination {
    /// `OOMKilled`, `Error`, `Completed`.
    pub reason: String,
    /// Absent when the node did not see the exit (the container had
    /// already been started again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Seconds since the epoch: when the node saw it.
    pub finished_at: u64,
}

/// What the node last saw of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerMark {
    pub restarts: u32,
    /// The last termination, once there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Termination>,
    /// The exit the node saw while the container waited to restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_exit: Option<(String, i32)>,
}

/// The containers' and pods' marks between two looks (kept in the state
/// file, so a restarted agent does not report old restarts again).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// By unit.
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerMark>,
    /// OOM kills counted in each pod's cgroup (`memory.events` `oom_kill`,
    /// which counts its containers' too), by `namespace/name`.
    #[serde(default)]
    pub oom_kills: BTreeMap<String, u64>,
}

/// An event [`Lifecycle::observe`] found, for its caller to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub object: String,
    pub kind: EventType,
    pub reason: &'static str,
    pub message: String,
    pub times: u64,
}

impl Lifecycle {
    /// Compares `pods` with the last look: restarts and OOM kills become
    /// events and last terminations. Containers and pods that are gone are
    /// forgotten.
    pub fn observe(&mut self, pods: &[PodStatus], now: u64) -> Vec<Found> {
        let mut found = Vec::new();
        let mut containers = BTreeMap::new();
        let mut ooms = BTreeMap::new();
        for pod in pods {
            let key = format!("{}/{}", pod.namespace, pod.name);
            let object = format!("Pod/{key}");
            let oom_now = pod.usage.oom_kills.unwrap_or(0);
            // A pod seen for the first time counts from zero: its cgroup
            // and units began with it (a restarted agent keeps its marks in
            // the state file, so nothing is told twice).
            let oom_before = self.oom_kills.get(&key).copied().unwrap_or(0);
            let new_ooms = oom_now.saturating_sub(oom_before);
            ooms.insert(key.clone(), oom_now);
            let restarted: Vec<&str> = pod
                .containers
                .iter()
                .filter(|c| {
                    c.restart_count > self.containers.get(&c.unit).map_or(0, |m| m.restarts)
                })
                .map(|c| c.name.as_str())
                .collect();
            if new_ooms > 0 {
                // The same words each time, so repeats are counted: which
                // container it was shows in its last state and BackOff.
                found.push(Found {
                    object: object.clone(),
                    kind: EventType::Warning,
                    reason: "OOMKilling",
                    message: format!(
                        "Memory cgroup out of memory: the kernel killed a process of pod {key}"
                    ),
                    times: new_ooms,
                });
            }
            for c in &pod.containers {
                let before = self.containers.get(&c.unit).cloned();
                let mut mark = before.clone().unwrap_or_default();
                // An exit seen while the container waits to start again
                // (systemd forgets it once the next run starts).
                let exited = match &c.state {
                    ContainerState::Waiting { message, .. } => message
                        .as_deref()
                        .and_then(|m| exit_of(m, c.last_exit_code)),
                    ContainerState::Terminated { reason, exit_code } => {
                        Some((reason.clone(), *exit_code))
                    }
                    ContainerState::Running { .. } => None,
                };
                if let Some(e) = exited {
                    mark.seen_exit = Some(e);
                }
                let runs = c.restart_count.saturating_sub(mark.restarts);
                if runs > 0 {
                    let (reason, exit_code) = match (&mark.seen_exit, new_ooms > 0) {
                        (Some((r, _)), _) if r == "OOMKilled" => {
                            ("OOMKilled".to_string(), Some(OOM_EXIT_CODE))
                        }
                        (_, true) if restarted.len() == 1 => {
                            ("OOMKilled".to_string(), Some(OOM_EXIT_CODE))
                        }
                        (Some((r, code)), _) => (r.clone(), Some(*code)),
                        (None, _) => ("Error".to_string(), c.last_exit_code),
                    };
                    mark.last = Some(Termination {
                        reason: reason.clone(),
                        exit_code,
                        finished_at: now,
                    });
                    mark.seen_exit = None;
                    found.push(Found {
                        object: object.clone(),
                        kind: EventType::Warning,
                        reason: "BackOff",
                        message: format!(
                            "Back-off restarting failed container {} in pod {key} (last exit: {reason}{})",
                            c.name,
                            exit_code.map_or(String::new(), |c| format!(", code {c}"))
                        ),
                        times: u64::from(runs),
                    });
                }
                mark.restarts = c.restart_count;
                containers.insert(c.unit.clone(), mark);
            }
        }
        self.containers = containers;
        self.oom_kills = ooms;
        found
    }

    /// Puts each container's last termination on its status.
    pub fn annotate(&self, pods: &mut [PodStatus]) {
        for c in pods.iter_mut().flat_map(|p| p.containers.iter_mut()) {
            if let Some(t) = self.containers.get(&c.unit).and_then(|m| m.last.as_ref()) {
                c.last_state = Some(berth_runtime::status::LastState {
                    reason: t.reason.clone(),
                    exit_code: t.exit_code,
                    finished_at: t.finished_at,
                });
            }
        }
    }
}

/// The reason and code of an exit from a waiting container's message
/// (`back-off restarting the container; last exit: killed by signal 9
/// (oom-kill)`).
fn exit_of(message: &str, code: Option<i32>) -> Option<(String, i32)> {
    let last = message.split("last exit: ").nth(1)?;
    if last.contains("oom-kill") {
        return Some(("OOMKilled".into(), OOM_EXIT_CODE));
    }
    Some(("Error".into(), code?))
}

impl crate::Agent {
    /// Records one event `times` times, now.
    pub(crate) fn event(
        &mut self,
        object: &str,
        kind: EventType,
        reason: &str,
        message: &str,
        times: u64,
    ) {
        self.events.record(
            object,
            kind,
            reason,
            message,
            times,
            crate::clock::now_secs(),
        );
        self.events_dirty = true;
    }

    /// Writes the history if it changed.
    pub(crate) fn flush_events(&mut self) {
        if std::mem::take(&mut self.events_dirty)
            && let Err(e) = self.event_store.save(&self.events)
        {
            self.log.warn(&format!(
                "cannot write the event history in {}: {e}",
                self.paths.state_dir.display()
            ));
        }
    }

    /// The events of an applied pass: pods scheduled, containers created,
    /// started and stopped, failures and waits, evictions.
    pub(crate) fn pass_events(
        &mut self,
        plan: &berth_plan::NodePlan,
        report: &berth_runtime::ApplyReport,
        node: &str,
    ) {
        use berth_plan::{FailureReason, Verb};
        let containers: BTreeMap<&str, (String, &str)> = plan
            .pods
            .iter()
            .flat_map(|p| {
                p.units()
                    .map(move |u| (u.name.as_str(), (p.id.to_string(), u.container.as_str())))
            })
            .collect();
        let done: BTreeMap<&str, Verb> =
            report.done.iter().map(|(u, v)| (u.as_str(), *v)).collect();
        for action in &plan.plan.actions {
            let Some(pod) = action.pod.as_ref().map(ToString::to_string) else {
                continue;
            };
            let object = format!("Pod/{pod}");
            let Some(verb) = done.get(action.unit.as_str()) else {
                continue;
            };
            let container = containers
                .get(action.unit.as_str())
                .map(|(_, c)| *c)
                .or_else(|| {
                    // A stopped container is no longer desired: its name
                    // is the unit's last part.
                    action
                        .unit
                        .as_str()
                        .strip_suffix(".service")
                        .and_then(|u| u.rsplit('_').next())
                });
            match (verb, container) {
                (Verb::CreateSlice, _) => self.event(
                    &object,
                    EventType::Normal,
                    "Scheduled",
                    &format!("Successfully assigned {pod} to {node}"),
                    1,
                ),
                (Verb::Start | Verb::Restart, Some(c)) => {
                    self.event(
                        &object,
                        EventType::Normal,
                        "Created",
                        &format!("Created container {c}"),
                        1,
                    );
                    self.event(
                        &object,
                        EventType::Normal,
                        "Started",
                        &format!("Started container {c}"),
                        1,
                    );
                }
                (Verb::Stop, Some(c)) => self.event(
                    &object,
                    EventType::Normal,
                    "Killing",
                    &format!("Stopping container {c}: {}", action.reason),
                    1,
                ),
                (Verb::Kill, Some(c)) => self.event(
                    &object,
                    EventType::Normal,
                    "Killing",
                    &format!("Killing container {c}: {}", action.reason),
                    1,
                ),
                _ => {}
            }
        }
        for f in &report.failed {
            let Some(pod) = &f.pod else { continue };
            let object = format!("Pod/{pod}");
            let (reason, message) = match f.reason {
                FailureReason::ImageNotPresent | FailureReason::ContainerCreating => continue,
                FailureReason::FailedMount => ("FailedMount", f.message.clone()),
                FailureReason::FailedCreatePodSandBox => {
                    ("FailedCreatePodSandBox", f.message.clone())
                }
                FailureReason::ImagePullBackOff => {
                    ("BackOff", format!("Back-off pulling image: {}", f.message))
                }
                r => ("Failed", format!("Error: {}: {}", r.as_str(), f.message)),
            };
            self.event(&object, EventType::Warning, reason, &message, 1);
        }
    }

    /// `Evicted` for each eviction the plan adds (before the agent keeps
    /// the plan's evictions as its own).
    pub(crate) fn eviction_events(&mut self, plan: &berth_plan::NodePlan) {
        for e in &plan.evictions {
            if !self
                .state
                .evictions
                .iter()
                .any(|k| k.pod == e.pod && k.at == e.at)
            {
                self.event(
                    &format!("Pod/{}", e.pod),
                    EventType::Warning,
                    "Evicted",
                    &e.message,
                    1,
                );
            }
        }
    }

    /// Pull notices from the image puller, on the pods that use the image.
    pub(crate) fn pull_events(
        &mut self,
        plan: &berth_plan::NodePlan,
        notices: Vec<crate::images::PullNotice>,
    ) {
        for n in notices {
            match n.reason {
                "Pulled" => self.exporter.figures.pull(true),
                "Failed" => self.exporter.figures.pull(false),
                _ => {}
            }
            let pods: Vec<String> = plan
                .pods
                .iter()
                .filter(|p| {
                    p.units().any(|u| {
                        berth_registry::Reference::parse(&u.image)
                            .is_ok_and(|r| r.to_string() == n.reference)
                    })
                })
                .map(|p| p.id.to_string())
                .collect();
            for pod in pods {
                self.event(&format!("Pod/{pod}"), n.kind, n.reason, &n.message, 1);
            }
        }
    }

    /// `Unhealthy` for each probe failure since the last results (counted),
    /// from the prober's results before (`self.state.health`) and now.
    pub(crate) fn probe_events(
        &mut self,
        health: &BTreeMap<String, BTreeMap<String, berth_plan::health::ContainerHealth>>,
    ) {
        let mut found = Vec::new();
        for (pod, containers) in health {
            for (container, h) in containers {
                let before = self
                    .state
                    .health
                    .get(pod)
                    .and_then(|c| c.get(container))
                    .filter(|b| b.since_usec == h.since_usec);
                for (name, now, was) in [
                    (
                        "Startup",
                        &h.startup,
                        before.and_then(|b| b.startup.as_ref()),
                    ),
                    (
                        "Liveness",
                        &h.liveness,
                        before.and_then(|b| b.liveness.as_ref()),
                    ),
                    (
                        "Readiness",
                        &h.readiness,
                        before.and_then(|b| b.readiness.as_ref()),
                    ),
                ] {
                    let Some(now) = now else { continue };
                    let new = now.failures - was.map_or(0, |w| w.failures.min(now.failures));
                    if new == 0 {
                        continue;
                    }
                    let why = now.last_failure.as_deref().unwrap_or("failed");
                    found.push((
                        format!("Pod/{pod}"),
                        format!("{name} probe failed (container {container}): {why}"),
                        new,
                    ));
                }
            }
        }
        for (object, message, times) in found {
            self.event(&object, EventType::Warning, "Unhealthy", &message, times);
        }
    }

    /// Restarts and OOM kills since the last look become events and each
    /// container's last state.
    pub(crate) fn lifecycle_events(&mut self, pods: &mut [PodStatus], now: u64) {
        let found = self.state.lifecycle.observe(pods, now);
        for f in found {
            self.event(&f.object, f.kind, f.reason, &f.message, f.times);
        }
        self.state.lifecycle.annotate(pods);
    }

    /// A Deployment's event (its rollout progressing, failing, rolled back).
    pub(crate) fn deployment_event(
        &mut self,
        deployment: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        self.event(
            &format!("Deployment/{deployment}"),
            kind,
            reason,
            message,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_runtime::status::{ContainerStatus, Phase, Usage};

    fn pod(restarts: u32, oom_kills: u64, state: ContainerState) -> PodStatus {
        PodStatus {
            namespace: "default".into(),
            name: "hog".into(),
            phase: Phase::Running,
            status: "Running".into(),
            qos_class: None,
            slice: None,
            containers: vec![ContainerStatus {
                name: "main".into(),
                unit: "berth-default_hog_main.service".into(),
                init: false,
                state,
                ready: true,
                restart_count: restarts,
                last_exit_code: None,
                started: None,
                probes: Vec::new(),
                last_kill: None,
                last_state: None,
            }],
            start_usec: None,
            usage: Usage {
                oom_kills: Some(oom_kills),
                ..Usage::default()
            },
            conditions: Vec::new(),
            messages: Vec::new(),
            pod_ip: None,
        }
    }

    fn running() -> ContainerState {
        ContainerState::Running { started_usec: 1 }
    }

    #[test]
    fn repeated_events_are_counted_not_repeated() {
        let mut log = EventLog::default();
        log.record(
            "Pod/default/a",
            EventType::Normal,
            "Started",
            "Started container main",
            1,
            10,
        );
        log.record("Pod/default/b", EventType::Warning, "BackOff", "x", 1, 11);
        log.record(
            "Pod/default/a",
            EventType::Normal,
            "Started",
            "Started container main",
            2,
            12,
        );
        assert_eq!(log.len(), 2);
        let last = log.events().last().expect("one");
        assert_eq!(
            (
                last.object.as_str(),
                last.count,
                last.first_timestamp,
                last.last_timestamp
            ),
            ("Pod/default/a", 3, 10, 12)
        );
        // Another message is another event.
        log.record(
            "Pod/default/a",
            EventType::Normal,
            "Started",
            "Started container side",
            1,
            13,
        );
        assert_eq!(log.len(), 3);
        log.record("Pod/default/a", EventType::Normal, "Started", "none", 0, 14);
        assert_eq!(log.len(), 3, "zero times records nothing");
    }

    #[test]
    fn the_history_is_bounded_and_the_oldest_go_first() {
        let mut log = EventLog::default();
        for i in 0..(EVENTS_KEPT as u64 + 10) {
            log.record(
                &format!("Pod/default/p{i}"),
                EventType::Normal,
                "Started",
                "m",
                1,
                i,
            );
        }
        assert_eq!(log.len(), EVENTS_KEPT);
        assert_eq!(log.events().next().expect("one").object, "Pod/default/p10");
        let per = log.last_per_object(2);
        assert_eq!(per.len(), EVENTS_KEPT);
    }

    #[test]
    fn the_last_events_per_object_are_the_newest_in_order() {
        let mut log = EventLog::default();
        for (i, r) in ["Pulled", "Created", "Started", "BackOff"]
            .iter()
            .enumerate()
        {
            log.record("Pod/default/a", EventType::Normal, r, r, 1, i as u64);
        }
        let per = log.last_per_object(3);
        let reasons: Vec<&str> = per["Pod/default/a"]
            .iter()
            .map(|e| e.reason.as_str())
            .collect();
        assert_eq!(reasons, ["Created", "Started", "BackOff"]);
    }

    #[test]
    fn an_oom_kill_seen_while_the_container_waits_is_its_last_state() {
        let mut life = Lifecycle::default();
        assert!(life.observe(&[pod(0, 0, running())], 100).is_empty());
        // Killed, waiting for its restart: systemd says why.
        let waiting = ContainerState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: Some(
                "back-off restarting the container; last exit: killed by signal 9 (oom-kill)"
                    .into(),
            ),
        };
        let found = life.observe(&[pod(0, 1, waiting)], 105);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].reason, "OOMKilling");
        // Started again: the restart is the BackOff, OOMKilled its cause.
        let found = life.observe(&[pod(1, 1, running())], 115);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].reason, "BackOff");
        assert!(
            found[0].message.contains("OOMKilled, code 137"),
            "{}",
            found[0].message
        );
        let mut pods = vec![pod(1, 1, running())];
        life.annotate(&mut pods);
        let last = pods[0].containers[0]
            .last_state
            .clone()
            .expect("last state");
        assert_eq!(
            (last.reason.as_str(), last.exit_code),
            ("OOMKilled", Some(137))
        );
    }

    #[test]
    fn an_oom_kill_missed_while_waiting_is_known_by_the_pods_counter() {
        let mut life = Lifecycle::default();
        life.observe(&[pod(0, 0, running())], 100);
        // Both the kill and the restart happened between two looks.
        let found = life.observe(&[pod(1, 1, running())], 130);
        let reasons: Vec<&str> = found.iter().map(|f| f.reason).collect();
        assert_eq!(reasons, ["OOMKilling", "BackOff"]);
        assert!(
            found[1].message.contains("OOMKilled, code 137"),
            "{}",
            found[1].message
        );
        let mut pods = vec![pod(1, 1, running())];
        life.annotate(&mut pods);
        assert_eq!(
            pods[0].containers[0]
                .last_state
                .as_ref()
                .map(|l| l.reason.as_str()),
            Some("OOMKilled")
        );
    }

    #[test]
    fn a_crash_without_oom_is_an_error_with_its_code_and_counts_restarts() {
        let mut life = Lifecycle::default();
        life.observe(&[pod(0, 0, running())], 100);
        let waiting = ContainerState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: Some("back-off restarting the container; last exit: exit status 3".into()),
        };
        let mut p = pod(0, 0, waiting);
        p.containers[0].last_exit_code = Some(3);
        assert!(life.observe(&[p], 101).is_empty());
        let found = life.observe(&[pod(2, 0, running())], 140);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].reason, found[0].times), ("BackOff", 2));
        assert!(
            found[0].message.contains("Error, code 3"),
            "{}",
            found[0].message
        );
        // A pod first seen after it restarted (the pass that started it
        // saw the node before): its restarts and kills are told.
        let mut fresh = Lifecycle::default();
        let found = fresh.observe(&[pod(4, 7, running())], 100);
        let told: Vec<(&str, u64)> = found.iter().map(|f| (f.reason, f.times)).collect();
        assert_eq!(told, [("OOMKilling", 7), ("BackOff", 4)]);
        // Told once: the next look with nothing new finds nothing.
        assert!(fresh.observe(&[pod(4, 7, running())], 110).is_empty());
    }
}

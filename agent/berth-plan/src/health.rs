//! Container health as the kubelet's prober judges it: per container and
//! probe, consecutive outcomes counted against the probe's thresholds into
//! a result, and what the results mean (started, ready, to be killed).
//!
//! The agent's prober runs the probes and keeps a [`ContainerHealth`] per
//! running container; it is a fact of the snapshot (`PodFacts.health`), so
//! the planner decides the kill a failed liveness or startup probe calls
//! for, and `berth plan --actual` replays it. Readiness reaches Services
//! through the pods' `Ready` condition. Probe results are never drift.
//!
//! The kubelet's rules, which the tests below check one by one:
//! - results start as the kubelet's initial values: readiness `Failure`
//!   (not ready), liveness `Success`, startup `Unknown`;
//! - no probe runs before `initialDelaySeconds` after the container
//!   started; liveness and readiness do not run until the startup probe
//!   succeeded, and the startup probe stops once it has;
//! - the result changes only after `failureThreshold` consecutive failures
//!   or `successThreshold` consecutive successes (1 for liveness and
//!   startup);
//! - a liveness or startup `Failure` kills the container, and its probe is
//!   held until the container starts again (a new instance starts afresh).

use berth_manifest::probe::{Probe, ProbeKind, Probes};
use serde::{Deserialize, Serialize};

/// A probe's result as the kubelet's results manager keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeResult {
    Unknown,
    Success,
    Failure,
}

/// One run of a probe. A timeout is a failure whose message says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

/// One probe of one container instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeState {
    pub result: ProbeResult,
    /// How many outcomes in a row were like the last one.
    #[serde(default)]
    pub run: u32,
    /// Whether the last outcome was a success.
    #[serde(default)]
    pub last_ok: bool,
    /// The message of the last failed run, kept after later successes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Runs so far, and failed runs so far, of this container instance.
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub failures: u64,
    /// Held after the failure that kills the container: no more runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_hold: bool,
}

impl ProbeState {
    pub fn new(kind: ProbeKind) -> Self {
        Self {
            result: match kind {
                ProbeKind::Readiness => ProbeResult::Failure,
                ProbeKind::Liveness => ProbeResult::Success,
                ProbeKind::Startup => ProbeResult::Unknown,
            },
            run: 0,
            last_ok: false,
            last_failure: None,
            runs: 0,
            failures: 0,
            on_hold: false,
        }
    }

    /// Counts one outcome; returns whether the result changed.
    pub fn record(&mut self, kind: ProbeKind, probe: &Probe, outcome: &Outcome) -> bool {
        let ok = matches!(outcome, Outcome::Success);
        self.runs += 1;
        if let Outcome::Failure(message) = outcome {
            self.failures += 1;
            self.last_failure = Some(message.clone());
        }
        if self.runs > 1 && self.last_ok == ok {
            self.run = self.run.saturating_add(1);
        } else {
            self.run = 1;
        }
        self.last_ok = ok;
        let threshold = if ok {
            probe.success_threshold
        } else {
            probe.failure_threshold
        };
        if self.run < threshold.max(1) {
            return false;
        }
        let new = if ok {
            ProbeResult::Success
        } else {
            ProbeResult::Failure
        };
        let changed = new != self.result;
        self.result = new;
        if !ok && kind != ProbeKind::Readiness {
            // The container is killed; nothing more to learn from it.
            self.on_hold = true;
            self.run = 0;
        }
        changed
    }
}

/// The probes of one running container instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerHealth {
    /// The instance these results are about: when its process started
    /// (microseconds since the epoch). Another instance starts afresh.
    pub since_usec: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<ProbeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<ProbeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeState>,
    /// The kill under way for a failed probe: it is not begun twice, and
    /// a process still there when its grace period ends gets SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killing: Option<Killing>,
}

/// A kill begun (SIGTERM sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Killing {
    /// Seconds since the epoch.
    pub at: u64,
    pub grace_seconds: u64,
}

impl Killing {
    /// Whether the grace period is over at `now` (seconds since the epoch).
    pub fn overdue(&self, now: u64) -> bool {
        now >= self.at.saturating_add(self.grace_seconds)
    }
}

impl ContainerHealth {
    /// A container instance that started at `since_usec`, before any probe.
    pub fn new(probes: &Probes, since_usec: u64) -> Self {
        Self::initial(&probes.kinds(), since_usec)
    }

    /// The same, from which probes it has.
    pub fn initial(kinds: &[ProbeKind], since_usec: u64) -> Self {
        let state = |kind| kinds.contains(&kind).then(|| ProbeState::new(kind));
        Self {
            since_usec,
            startup: state(ProbeKind::Startup),
            liveness: state(ProbeKind::Liveness),
            readiness: state(ProbeKind::Readiness),
            killing: None,
        }
    }

    pub fn get(&self, kind: ProbeKind) -> Option<&ProbeState> {
        match kind {
            ProbeKind::Startup => self.startup.as_ref(),
            ProbeKind::Liveness => self.liveness.as_ref(),
            ProbeKind::Readiness => self.readiness.as_ref(),
        }
    }

    pub fn get_mut(&mut self, kind: ProbeKind) -> Option<&mut ProbeState> {
        match kind {
            ProbeKind::Startup => self.startup.as_mut(),
            ProbeKind::Liveness => self.liveness.as_mut(),
            ProbeKind::Readiness => self.readiness.as_mut(),
        }
    }

    /// The kubelet's `started`: the startup probe succeeded, or there is none.
    pub fn started(&self) -> bool {
        self.startup
            .as_ref()
            .is_none_or(|s| s.result == ProbeResult::Success)
    }

    /// Ready as the kubelet's status manager has it: started, and the
    /// readiness probe (if any) succeeded.
    pub fn ready(&self) -> bool {
        self.started()
            && self
                .readiness
                .as_ref()
                .is_none_or(|r| r.result == ProbeResult::Success)
    }

    /// Whether `kind` runs at `now_usec`: a probe the container has, not
    /// held, past its initial delay; the startup probe only until it
    /// succeeds, the other two only after.
    pub fn due(&self, kind: ProbeKind, probe: &Probe, now_usec: u64) -> bool {
        let Some(state) = self.get(kind) else {
            return false;
        };
        if state.on_hold || self.killing.is_some() {
            return false;
        }
        let started = self.started();
        let phase_ok = match kind {
            ProbeKind::Startup => !started,
            ProbeKind::Liveness | ProbeKind::Readiness => started,
        };
        let delay = u64::from(probe.initial_delay_seconds) * 1_000_000;
        phase_ok && now_usec >= self.since_usec.saturating_add(delay)
    }

    /// Counts an outcome of `kind`; returns whether a result changed.
    pub fn record(&mut self, kind: ProbeKind, probe: &Probe, outcome: &Outcome) -> bool {
        match self.get_mut(kind) {
            Some(state) => state.record(kind, probe, outcome),
            None => false,
        }
    }

    /// The failed liveness or startup probe that calls for a kill, with
    /// the kubelet's message; `None` while a kill is under way.
    pub fn kill(&self) -> Option<(ProbeKind, String)> {
        if self.killing.is_some() {
            return None;
        }
        [ProbeKind::Startup, ProbeKind::Liveness]
            .into_iter()
            .find_map(|kind| {
                let state = self.get(kind)?;
                (state.result == ProbeResult::Failure).then(|| {
                    (
                        kind,
                        format!(
                            "{} probe failed: {}",
                            kind.title(),
                            state.last_failure.as_deref().unwrap_or("failure")
                        ),
                    )
                })
            })
    }
}

/// The kubelet's shortest grace period for a kill.
pub const MIN_KILL_GRACE_SECONDS: u64 = 2;

/// The grace period a probe's kill gets: the probe's own, else the pod's,
/// at least [`MIN_KILL_GRACE_SECONDS`].
pub fn kill_grace(probes: &Probes, kind: ProbeKind, pod_grace: u64) -> u64 {
    probes
        .get(kind)
        .and_then(|p| p.termination_grace_period_seconds)
        .unwrap_or(pod_grace)
        .max(MIN_KILL_GRACE_SECONDS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;
    use berth_manifest::probe::Action;

    fn probe(delay: u32, success: u32, failure: u32) -> Probe {
        Probe {
            action: Action::TcpSocket {
                host: None,
                port: 80,
            },
            initial_delay_seconds: delay,
            period_seconds: 1,
            timeout_seconds: 1,
            success_threshold: success,
            failure_threshold: failure,
            termination_grace_period_seconds: None,
        }
    }

    const S: u64 = 1_000_000;

    fn fail() -> Outcome {
        Outcome::Failure("connection refused".into())
    }

    #[test]
    fn results_start_as_the_kubelets_and_change_only_past_a_threshold() {
        // (kind, success threshold, failure threshold, outcomes, result after each)
        use ProbeResult::{Failure as F, Success as S_, Unknown as U};
        let ok = Outcome::Success;
        type Case = (ProbeKind, u32, u32, Vec<Outcome>, Vec<ProbeResult>);
        let table: Vec<Case> = vec![
            // Readiness: not ready at first, ready after 2 successes in a
            // row, not ready after 3 failures in a row; a success between
            // failures starts the count again.
            (
                ProbeKind::Readiness,
                2,
                3,
                vec![
                    ok.clone(),
                    ok.clone(),
                    fail(),
                    fail(),
                    ok.clone(),
                    fail(),
                    fail(),
                    fail(),
                ],
                vec![F, S_, S_, S_, S_, S_, S_, F],
            ),
            // Liveness: alive at first, dead after 3 failures in a row.
            (
                ProbeKind::Liveness,
                1,
                3,
                vec![fail(), ok.clone(), fail(), fail(), fail()],
                vec![S_, S_, S_, S_, F],
            ),
            // Startup: unknown until the first success or the last failure.
            (
                ProbeKind::Startup,
                1,
                2,
                vec![fail(), ok.clone()],
                vec![U, S_],
            ),
            (ProbeKind::Startup, 1, 2, vec![fail(), fail()], vec![U, F]),
        ];
        for (kind, success, failure, outcomes, want) in table {
            let p = probe(0, success, failure);
            let mut state = ProbeState::new(kind);
            let got: Vec<ProbeResult> = outcomes
                .iter()
                .map(|o| {
                    state.record(kind, &p, o);
                    state.result
                })
                .collect();
            assert_eq!(got, want, "{kind:?} {outcomes:?}");
        }
    }

    #[test]
    fn startup_holds_the_others_and_delays_hold_every_probe() {
        let probes = Probes {
            startup: Some(Box::new(probe(10, 1, 3))),
            liveness: Some(Box::new(probe(0, 1, 1))),
            readiness: Some(Box::new(probe(5, 1, 1))),
        };
        let started_at = 100 * S;
        let mut h = ContainerHealth::new(&probes, started_at);
        let due = |h: &ContainerHealth, kind, at| h.due(kind, probes.get(kind).expect("probe"), at);
        // Before the startup probe's delay, nothing runs.
        assert!(!due(&h, ProbeKind::Startup, started_at + 9 * S));
        assert!(due(&h, ProbeKind::Startup, started_at + 10 * S));
        // Until it succeeds, liveness and readiness wait: not ready, alive.
        assert!(!due(&h, ProbeKind::Liveness, started_at + 60 * S));
        assert!(!due(&h, ProbeKind::Readiness, started_at + 60 * S));
        assert!(!h.ready() && !h.started() && h.kill().is_none());
        h.record(
            ProbeKind::Startup,
            &probes.startup.clone().expect("startup"),
            &Outcome::Success,
        );
        assert!(h.started() && !h.ready());
        assert!(
            !due(&h, ProbeKind::Startup, started_at + 60 * S),
            "startup stops once it succeeded"
        );
        assert!(due(&h, ProbeKind::Liveness, started_at + 11 * S));
        // Readiness' own delay still counts from the container's start.
        assert!(!due(&h, ProbeKind::Readiness, started_at + 4 * S));
        assert!(due(&h, ProbeKind::Readiness, started_at + 5 * S));
        h.record(
            ProbeKind::Readiness,
            &probes.readiness.clone().expect("r"),
            &Outcome::Success,
        );
        assert!(h.ready());
    }

    #[test]
    fn a_failed_liveness_or_startup_probe_kills_once_and_holds() {
        let probes = Probes {
            startup: None,
            liveness: Some(Box::new(probe(0, 1, 2))),
            readiness: Some(Box::new(probe(0, 1, 1))),
        };
        let p = probes.liveness.clone().expect("liveness");
        let mut h = ContainerHealth::new(&probes, 0);
        h.record(
            ProbeKind::Liveness,
            &p,
            &Outcome::Failure("HTTP probe failed with statuscode: 500".into()),
        );
        assert_eq!(h.kill(), None, "one failure of two");
        h.record(
            ProbeKind::Liveness,
            &p,
            &Outcome::Failure("HTTP probe failed with statuscode: 500".into()),
        );
        assert_eq!(
            h.kill(),
            Some((
                ProbeKind::Liveness,
                "Liveness probe failed: HTTP probe failed with statuscode: 500".into()
            ))
        );
        assert!(
            !h.due(ProbeKind::Liveness, &p, 10 * S),
            "held after the kill"
        );
        h.killing = Some(Killing {
            at: 5,
            grace_seconds: 30,
        });
        assert!(
            !h.killing.expect("killing").overdue(34) && h.killing.expect("killing").overdue(35)
        );
        assert_eq!(h.kill(), None, "not killed twice");
        assert!(!h.due(
            ProbeKind::Readiness,
            probes.readiness.as_ref().expect("r"),
            10 * S
        ));
        // A readiness failure never kills.
        let mut r = ContainerHealth::new(&probes, 0);
        r.record(
            ProbeKind::Readiness,
            probes.readiness.as_ref().expect("r"),
            &fail(),
        );
        assert_eq!((r.kill(), r.ready()), (None, false));
        // A failed startup probe kills too.
        let sp = probe(0, 1, 1);
        let with_startup = Probes {
            startup: Some(Box::new(sp.clone())),
            ..Probes::default()
        };
        let mut s = ContainerHealth::new(&with_startup, 0);
        s.record(ProbeKind::Startup, &sp, &fail());
        assert_eq!(
            s.kill(),
            Some((
                ProbeKind::Startup,
                "Startup probe failed: connection refused".into()
            ))
        );
        assert_eq!(kill_grace(&with_startup, ProbeKind::Startup, 30), 30);
    }
}

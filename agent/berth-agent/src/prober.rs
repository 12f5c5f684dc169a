//! The prober: runs every running container's probes on one thread.
//!
//! Each probe of each container instance has a schedule: its next run is
//! one entry of a timer heap, and its runs go through one [`Engine`] (one
//! epoll set, see [`crate::probe_io`]): no thread per probe, no process
//! per network probe. `exec` probes run `berth exec-enter` in the
//! container, killed whole at their timeout.
//!
//! Outcomes are counted by [`berth_plan::health`] (the kubelet's rules).
//! The prober decides nothing: a result that changes wakes the loop
//! ([`Wake::Health`]), which reprograms endpoints from readiness at once
//! and leaves kills to the planner, which reads the results as facts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_manifest::probe::{Probe, ProbeKind, Probes};
use berth_plan::health::{ContainerHealth, Killing, Outcome};

use crate::probe_io::{Engine, Notifier};
pub use crate::probe_io::{http_request, parse_head, redirect_target, run_probe};
use crate::wake::Wake;

/// A running container and its probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    /// `namespace/name`.
    pub pod: String,
    pub container: String,
    /// The instance: when its process started (µs since the epoch).
    pub since_usec: u64,
    pub main_pid: u32,
    pub control_group: String,
    pub workdir: String,
    /// Where `httpGet` and `tcpSocket` go when they name no host.
    pub address: Ipv4Addr,
    pub probes: Probes,
}

impl ProbeTarget {
    /// A container as its unit runs now; `None` when it does not run.
    pub fn of_unit(
        pod: &str,
        container: &str,
        details: &berth_runtime::UnitDetails,
        address: Ipv4Addr,
        probes: Probes,
    ) -> Option<Self> {
        let (main_pid, workdir) = details.running_process()?;
        Some(Self {
            pod: pod.to_string(),
            container: container.to_string(),
            since_usec: details.runtime.active_enter_usec,
            main_pid,
            control_group: details.runtime.control_group.clone(),
            workdir,
            address,
            probes,
        })
    }
}

type Key = (String, String);

#[derive(Debug, Default)]
struct Shared {
    health: BTreeMap<Key, ContainerHealth>,
}

enum Message {
    Targets(Vec<ProbeTarget>),
    /// Wake the loop after this long (a kill's grace period).
    WakeAfter(Duration),
}

/// The prober thread and the results it keeps.
#[derive(Debug)]
pub struct Prober {
    shared: Arc<Mutex<Shared>>,
    tx: Option<Sender<Message>>,
    notifier: Notifier,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Prober {
    /// Starts the thread. `exe` is the berth binary (for `exec-enter`).
    pub fn start(exe: PathBuf, wake: Sender<Wake>) -> std::io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = Engine::new(exe)?;
        let notifier = engine.notifier();
        let inner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("berth-prober".into())
            .spawn(move || run(&inner, &rx, engine, &wake))?;
        Ok(Self {
            shared,
            tx: Some(tx),
            notifier,
            thread: Some(thread),
        })
    }

    fn send(&self, message: Message) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(message);
            self.notifier.notify();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Results kept from an earlier run of the agent: a container instance
    /// still running resumes from them.
    pub fn resume(&self, health: &BTreeMap<String, BTreeMap<String, ContainerHealth>>) {
        let mut s = self.lock();
        for (pod, containers) in health {
            for (container, h) in containers {
                s.health.insert((pod.clone(), container.clone()), h.clone());
            }
        }
    }

    /// The containers to probe now. A container instance already known
    /// keeps its results; a new instance (restarted) starts afresh.
    pub fn set_targets(&self, targets: Vec<ProbeTarget>) {
        {
            let mut s = self.lock();
            let mut next = BTreeMap::new();
            for t in &targets {
                let key = (t.pod.clone(), t.container.clone());
                let kept = s
                    .health
                    .remove(&key)
                    .filter(|h| h.since_usec == t.since_usec && same_probes(h, &t.probes));
                next.insert(
                    key,
                    kept.unwrap_or_else(|| ContainerHealth::new(&t.probes, t.since_usec)),
                );
            }
            s.health = next;
        }
        self.send(Message::Targets(targets));
    }

    /// Every container's results, by pod and container.
    pub fn health(&self) -> BTreeMap<String, BTreeMap<String, ContainerHealth>> {
        let mut out: BTreeMap<String, BTreeMap<String, ContainerHealth>> = BTreeMap::new();
        for ((pod, container), h) in &self.lock().health {
            out.entry(pod.clone())
                .or_default()
                .insert(container.clone(), h.clone());
        }
        out
    }

    /// Records a kill begun on a container (SIGTERM sent), and wakes the
    /// loop when its grace period ends.
    pub fn killing(&self, pod: &str, container: &str, killing: Killing) {
        if let Some(h) = self
            .lock()
            .health
            .get_mut(&(pod.to_string(), container.to_string()))
        {
            h.killing = Some(killing);
        }
        self.send(Message::WakeAfter(Duration::from_secs(
            killing.grace_seconds,
        )));
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // The thread ends when it finds the channel closed.
        self.tx = None;
        self.notifier.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether results kept are for these probes (a changed probe starts over).
fn same_probes(h: &ContainerHealth, probes: &Probes) -> bool {
    ProbeKind::ALL
        .into_iter()
        .all(|k| h.get(k).is_some() == probes.get(k).is_some())
}

/// One probe of one container instance.
struct Schedule {
    /// Its container's results: `(pod, container)`.
    key: (String, String),
    target: ProbeTarget,
    kind: ProbeKind,
    probe: Probe,
    /// When it runs next (its entry in the timer heap).
    next: Instant,
    /// The run in flight.
    running: Option<u64>,
    /// Its instance is gone or replaced: kept (so that it is not started
    /// again for the same instance) but never run.
    ended: bool,
}

impl Schedule {
    fn new(target: ProbeTarget, kind: ProbeKind, probe: Probe) -> Self {
        let period = period(&probe);
        // The first run at the end of the initial delay (or now, for an
        // instance found running), then every period; each probe of the
        // node shifted by its own fraction of a period (from a hash of
        // what it probes), so fifty containers started together are not
        // probed in the same instant.
        let delay_end = target
            .since_usec
            .saturating_add(u64::from(probe.initial_delay_seconds) * 1_000_000);
        let spread = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&target.pod, &target.container, kind).hash(&mut h);
            Duration::from_micros(h.finish() % (period.as_micros() as u64).max(1))
        };
        let next =
            Instant::now() + Duration::from_micros(delay_end.saturating_sub(now_usec())) + spread;
        Self {
            key: (target.pod.clone(), target.container.clone()),
            target,
            kind,
            probe,
            next,
            running: None,
            ended: false,
        }
    }
}

fn period(probe: &Probe) -> Duration {
    Duration::from_secs(u64::from(probe.period_seconds.max(1)))
}

fn run(
    shared: &Arc<Mutex<Shared>>,
    rx: &Receiver<Message>,
    mut engine: Engine,
    wake: &Sender<Wake>,
) {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut schedules: HashMap<u64, Schedule> = HashMap::new();
    let mut by_key: HashMap<(ProbeTarget, ProbeKind), u64> = HashMap::new();
    let mut timers: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut wake_at: BinaryHeap<Reverse<Instant>> = BinaryHeap::new();
    let mut running: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let soonest = [timers.peek().map(|t| t.0.0), wake_at.peek().map(|t| t.0)]
            .into_iter()
            .flatten()
            .min();
        let (finished, notified) = engine.poll(soonest);
        if notified {
            loop {
                match rx.try_recv() {
                    Ok(Message::Targets(targets)) => {
                        let mut next = HashMap::new();
                        for t in targets {
                            for kind in ProbeKind::ALL {
                                let Some(probe) = t.probes.get(kind).cloned() else {
                                    continue;
                                };
                                let key = (t.clone(), kind);
                                let id = by_key.remove(&key).unwrap_or_else(|| {
                                    let s = Schedule::new(t.clone(), kind, probe);
                                    let id = next_id;
                                    next_id += 1;
                                    timers.push(Reverse((s.next, id)));
                                    schedules.insert(id, s);
                                    id
                                });
                                next.insert(key, id);
                            }
                        }
                        // Containers gone or changed: their runs end.
                        for id in by_key.into_values() {
                            if let Some(run) = schedules.remove(&id).and_then(|s| s.running) {
                                engine.cancel(run);
                                running.remove(&run);
                            }
                        }
                        by_key = next;
                    }
                    Ok(Message::WakeAfter(after)) => wake_at.push(Reverse(Instant::now() + after)),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
        }
        for (run, outcome) in finished {
            let Some(id) = running.remove(&run) else {
                continue;
            };
            let Some(s) = schedules.get_mut(&id) else {
                continue;
            };
            s.running = None;
            // A container whose process is gone is not probed: the
            // kubelet throws away the result of a probe it could not run
            // (a failure, since the process that would answer is gone).
            if matches!(outcome, Outcome::Failure(_)) && !alive(s.target.main_pid) {
                s.ended = true;
                continue;
            }
            let changed = match lock().health.get_mut(&s.key) {
                Some(h) if h.since_usec == s.target.since_usec => {
                    h.record(s.kind, &s.probe, &outcome)
                }
                _ => {
                    s.ended = true;
                    continue;
                }
            };
            if changed {
                let _ = wake.send(Wake::Health);
            }
            let now = Instant::now();
            s.next += period(&s.probe);
            if s.next < now {
                // A run longer than its period: the next one a period from now.
                s.next = now + period(&s.probe);
            }
            timers.push(Reverse((s.next, id)));
        }
        let now = Instant::now();
        while let Some(Reverse((at, id))) = timers.peek().copied() {
            if at > now {
                break;
            }
            timers.pop();
            let Some(s) = schedules.get_mut(&id) else {
                continue;
            };
            if s.next != at || s.ended || s.running.is_some() {
                continue;
            }
            let due = match lock().health.get(&s.key) {
                Some(h) if h.since_usec == s.target.since_usec => {
                    h.due(s.kind, &s.probe, now_usec())
                }
                // Another instance, or gone: its own schedule takes over.
                _ => {
                    s.ended = true;
                    continue;
                }
            };
            if due {
                let timeout = Duration::from_secs(u64::from(s.probe.timeout_seconds.max(1)));
                let run = engine.start(&s.probe.action, &s.target, timeout);
                s.running = Some(run);
                running.insert(run, id);
            } else {
                s.next += period(&s.probe);
                if s.next < now {
                    s.next = now + period(&s.probe);
                }
                timers.push(Reverse((s.next, id)));
            }
        }
        while wake_at.peek().is_some_and(|t| t.0 <= now) {
            wake_at.pop();
            let _ = wake.send(Wake::Health);
        }
    }
}

/// Whether the process still exists (not yet reaped).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

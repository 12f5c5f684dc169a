//! The node's pressure signals, measured as the kubelet measures them, and
//! the watch between passes that wakes the agent when memory runs short.
//!
//! - `memory.available`: the node's memory less its working set, which is
//!   what `/proc/meminfo` calls `MemFree` plus `Inactive(file)` (page cache
//!   the kernel can drop at once; the kubelet subtracts it the same way).
//! - `nodefs.available`: `statvfs` of the state directory's filesystem
//!   (`/var`), whose images, layers and volumes all live there.
//! - `pid.available`: `kernel.pid_max` less the tasks that exist
//!   (`/proc/loadavg`'s count).
//!
//! A pod's memory is its cgroup's `memory.current` less its `inactive_file`
//! (`memory.stat`): the kubelet's working set.
//!
//! The watch reads `/proc/meminfo` while the agent waits between passes:
//! every 250 ms ([`PRESSURE_CHECK`]) when memory is within 512 MiB of a
//! threshold, every second otherwise. 250 ms is short enough that a process
//! allocating as fast as one does under TCG (about 100 MiB/s in the guest)
//! eats at most a quarter of the default 100Mi margin before a pass starts;
//! at a second's period far from any threshold, an idle node wakes once a
//! second for a read of about 1.5 KB from procfs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_plan::pressure::{Measure, NodePressure, Signal, Thresholds};

/// How often the wait between passes looks at the node's memory when it is
/// near a threshold (within [`NEAR`]).
pub const PRESSURE_CHECK: Duration = Duration::from_millis(250);

/// How often it looks when memory is plentiful: at 100 MiB/s an allocation
/// needs five seconds to cross [`NEAR`], five of these periods.
pub const PRESSURE_CHECK_IDLE: Duration = Duration::from_secs(1);

/// Memory closer than this to a threshold is watched every
/// [`PRESSURE_CHECK`].
const NEAR: u64 = 512 << 20;

/// While memory stays short, a pass at most this often: each evicts a pod.
const PRESSURE_PASS_EVERY: Duration = Duration::from_secs(1);

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `memory.available` from `/proc/meminfo`'s text.
pub fn memory_from_meminfo(text: &str) -> Option<Measure> {
    let total = meminfo_kib(text, "MemTotal")?;
    let free = meminfo_kib(text, "MemFree")?;
    let inactive_file = meminfo_kib(text, "Inactive(file)").unwrap_or(0);
    Some(Measure {
        available: (free + inactive_file).min(total) * 1024,
        capacity: total * 1024,
    })
}

fn memory() -> Option<Measure> {
    memory_from_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn nodefs(path: &Path) -> Option<Measure> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(Measure {
        available: st.f_bavail.saturating_mul(st.f_frsize),
        capacity: st.f_blocks.saturating_mul(st.f_frsize),
    })
}

/// `pid.available` from `kernel.pid_max` and `/proc/loadavg`'s text.
pub fn pids_from(pid_max: &str, loadavg: &str) -> Option<Measure> {
    let max: u64 = pid_max.trim().parse().ok()?;
    let tasks: u64 = loadavg
        .split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()?;
    Some(Measure {
        available: max.saturating_sub(tasks),
        capacity: max,
    })
}

fn pids() -> Option<Measure> {
    pids_from(
        &std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?,
        &std::fs::read_to_string("/proc/loadavg").ok()?,
    )
}

/// A cgroup's working set: `memory.current` less `inactive_file`.
pub fn working_set(cgroup_root: &Path, control_group: &str) -> Option<u64> {
    let dir = cgroup_root.join(control_group.trim_start_matches('/'));
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let inactive = std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("inactive_file ")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    Some(current.saturating_sub(inactive))
}

/// A cgroup's processes (`pids.current`).
pub fn pids_current(cgroup_root: &Path, control_group: &str) -> Option<u64> {
    std::fs::read_to_string(
        cgroup_root
            .join(control_group.trim_start_matches('/'))
            .join("pids.current"),
    )
    .ok()?
    .trim()
    .parse()
    .ok()
}

/// Every signal this node measures, now.
pub fn measure(state_dir: &Path) -> BTreeMap<Signal, Measure> {
    let mut out = BTreeMap::new();
    if let Some(m) = memory() {
        out.insert(Signal::MemoryAvailable, m);
    }
    if let Some(m) = nodefs(state_dir) {
        out.insert(Signal::NodefsAvailable, m);
    }
    if let Some(m) = pids() {
        out.insert(Signal::PidAvailable, m);
    }
    out
}

/// What the agent keeps between passes for the pressure decisions.
#[derive(Debug, Default)]
pub struct PressureWatch {
    /// When each soft threshold began to be met, seconds since the epoch.
    pub soft_since: BTreeMap<Signal, u64>,
    /// The signals the last pass found under pressure.
    pub pressured: Vec<Signal>,
    /// When the watch last woke a pass for memory.
    woke_at: Option<Instant>,
    /// The signals short at the last look.
    short: std::collections::BTreeSet<Signal>,
    /// Memory was within [`NEAR`] of a threshold at the last look.
    near: bool,
}

impl PressureWatch {
    /// A watch that starts from the signals a previous run left under
    /// pressure.
    pub fn resumed(pressured: Vec<Signal>) -> Self {
        Self {
            pressured,
            ..Self::default()
        }
    }

    /// How long until the next look at memory.
    pub fn period(&self) -> Duration {
        if self.near || !self.pressured.is_empty() {
            PRESSURE_CHECK
        } else {
            PRESSURE_CHECK_IDLE
        }
    }

    /// The snapshot's pressure fact: `signals` as measured, the soft
    /// thresholds' clocks brought up to `now`, and each pod's use of a
    /// signal's resource (`usage`: memory working set, local storage or
    /// processes), read only while that signal is short or was.
    pub fn fact(
        &mut self,
        thresholds: &Thresholds,
        signals: BTreeMap<Signal, Measure>,
        now: u64,
        mut usage: impl FnMut(Signal) -> BTreeMap<String, u64>,
    ) -> NodePressure {
        for (signal, amount) in &thresholds.soft {
            let met = signals
                .get(signal)
                .is_some_and(|m| m.available < amount.of(m.capacity));
            if met {
                self.soft_since.entry(*signal).or_insert(now);
            } else {
                self.soft_since.remove(signal);
            }
        }
        self.soft_since
            .retain(|s, _| thresholds.soft.contains_key(s));
        let mut weigh = |s: Signal| {
            if thresholds.met_now(s, &signals) || self.pressured.contains(&s) {
                usage(s)
            } else {
                BTreeMap::new()
            }
        };
        let memory = weigh(Signal::MemoryAvailable);
        let disk = weigh(Signal::NodefsAvailable);
        let pids = weigh(Signal::PidAvailable);
        NodePressure {
            signals,
            thresholds: thresholds.clone(),
            soft_since: self.soft_since.clone(),
            pressured: self.pressured.clone(),
            memory,
            disk,
            pids,
        }
    }

    /// Between passes: whether a signal in `signals` is short enough now
    /// (or relieved enough) that a pass must come at once, and, when that
    /// is news, why (to log once, not every second while it lasts).
    pub fn wants_pass(
        &mut self,
        thresholds: &Thresholds,
        signals: &BTreeMap<Signal, Measure>,
    ) -> (bool, Option<String>) {
        let mut wake = false;
        let mut lines = Vec::new();
        let may_wake = self
            .woke_at
            .is_none_or(|at| at.elapsed() >= PRESSURE_PASS_EVERY);
        self.near = false;
        for (signal, m) in signals {
            let Some(threshold) = thresholds
                .hard
                .get(signal)
                .into_iter()
                .chain(thresholds.soft.get(signal))
                .map(|a| a.of(m.capacity))
                .max()
            else {
                continue;
            };
            if *signal == Signal::MemoryAvailable {
                self.near = m.available < threshold.saturating_add(NEAR);
            }
            let show = |n: u64| {
                if signal.is_bytes() {
                    berth_manifest::quantity::format_bytes(n)
                } else {
                    n.to_string()
                }
            };
            let short = m.available < threshold;
            let news = if short {
                self.short.insert(*signal)
            } else {
                self.short.remove(signal)
            };
            let reclaim = thresholds
                .minimum_reclaim
                .get(signal)
                .map_or(0, |a| a.of(m.capacity));
            let why = if short {
                may_wake.then(|| {
                    format!(
                        "{signal} {} is under its eviction threshold {}: a pass now",
                        show(m.available),
                        show(threshold)
                    )
                })
            } else {
                // Relieved: one pass to start the replicas again.
                (self.pressured.contains(signal)
                    && m.available >= threshold.saturating_add(reclaim))
                .then(|| {
                    format!(
                        "{signal} {} is back over its eviction threshold {}: a pass now",
                        show(m.available),
                        show(threshold)
                    )
                })
            };
            if let Some(why) = why {
                wake = true;
                if news || !short {
                    lines.push(why);
                }
            }
        }
        if wake {
            self.woke_at = Some(Instant::now());
        }
        (wake, (!lines.is_empty()).then(|| lines.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_plan::pressure::Amount;

    const MEMINFO: &str = "MemTotal:        1000000 kB\nMemFree:          100000 kB\nMemAvailable:     500000 kB\nActive(file):     200000 kB\nInactive(file):    50000 kB\n";

    #[test]
    fn memory_available_is_free_plus_inactive_file() {
        let m = memory_from_meminfo(MEMINFO).expect("parsed");
        assert_eq!(m.available, 150_000 * 1024);
        assert_eq!(m.capacity, 1_000_000 * 1024);
        assert_eq!(memory_from_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn pids_available_is_pid_max_less_the_tasks() {
        let m = pids_from("4194304\n", "0.10 0.20 0.30 2/187 4242\n").expect("parsed");
        assert_eq!((m.available, m.capacity), (4_194_304 - 187, 4_194_304));
        assert_eq!(pids_from("x", "0 0 0 1/2 3"), None);
    }

    #[test]
    fn a_soft_thresholds_clock_starts_when_met_and_stops_when_not() {
        let mut watch = PressureWatch::default();
        let mut thresholds = Thresholds::default();
        thresholds
            .soft
            .insert(Signal::MemoryAvailable, Amount::Quantity(500 << 20));
        let at = |available: u64| {
            [(
                Signal::MemoryAvailable,
                Measure {
                    available,
                    capacity: 4 << 30,
                },
            )]
            .into_iter()
            .collect::<BTreeMap<_, _>>()
        };
        let f = watch.fact(&thresholds, at(400 << 20), 100, |_| BTreeMap::new());
        assert_eq!(f.soft_since.get(&Signal::MemoryAvailable), Some(&100));
        let mut read = false;
        let f = watch.fact(&thresholds, at(450 << 20), 130, |s| {
            assert_eq!(
                s,
                Signal::MemoryAvailable,
                "only the short signal is weighed"
            );
            read = true;
            BTreeMap::new()
        });
        assert_eq!(f.soft_since.get(&Signal::MemoryAvailable), Some(&100));
        assert!(read, "pods' memory is read while memory is short");
        let f = watch.fact(&thresholds, at(600 << 20), 140, |_| {
            panic!("not read when memory is plentiful")
        });
        assert!(f.soft_since.is_empty());
    }

    #[test]
    fn the_watch_wakes_a_pass_for_any_signal_short_and_once_when_relieved() {
        let thresholds = Thresholds::default();
        let at = |memory: u64, disk: u64| -> BTreeMap<Signal, Measure> {
            [
                (
                    Signal::MemoryAvailable,
                    Measure {
                        available: memory,
                        capacity: 4 << 30,
                    },
                ),
                (
                    Signal::NodefsAvailable,
                    Measure {
                        available: disk,
                        capacity: 1000 << 20,
                    },
                ),
            ]
            .into()
        };
        let mut watch = PressureWatch::default();
        assert_eq!(
            watch.wants_pass(&thresholds, &at(2 << 30, 500 << 20)),
            (false, None)
        );
        assert_eq!(watch.period(), PRESSURE_CHECK_IDLE);
        // /var under 10 %: a pass, said once.
        let (wake, why) = watch.wants_pass(&thresholds, &at(2 << 30, 50 << 20));
        assert!(wake);
        assert_eq!(
            why.as_deref(),
            Some("nodefs.available 50Mi is under its eviction threshold 100Mi: a pass now")
        );
        // Memory near its threshold: looked at more often.
        watch.woke_at = None;
        let (wake, why) = watch.wants_pass(&thresholds, &at(300 << 20, 50 << 20));
        assert!(wake, "still short");
        assert_eq!(why, None, "not news");
        assert_eq!(watch.period(), PRESSURE_CHECK);
        // Relieved after an eviction for it: one pass to start replicas.
        watch.pressured = vec![Signal::NodefsAvailable];
        let (wake, why) = watch.wants_pass(&thresholds, &at(2 << 30, 500 << 20));
        assert!(wake);
        assert!(why.is_some_and(|w| w.contains("back over")));
    }
}

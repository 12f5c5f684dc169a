//! Node pressure, decided as the kubelet's eviction manager decides it:
//! signals (`memory.available`, `nodefs.available`, `pid.available`)
//! against hard and soft thresholds, and when one is met, one pod evicted
//! per pass in the kubelet's order.
//!
//! The agent measures the signals and each pod's memory working set
//! ([`NodePressure`], facts of the snapshot); the thresholds come from the
//! node config. Which pod goes is decided here, so `berth plan --actual`
//! on the snapshot decides alike.
//!
//! The kubelet's order for memory: pods whose usage exceeds their request
//! first, then by priority (every pod has priority 0 here: there are no
//! PriorityClasses), then by how far usage exceeds the request. A
//! Guaranteed pod's usage cannot exceed its request (its limit), so it goes
//! last; a BestEffort pod's request is zero, so any usage exceeds it.

use std::collections::BTreeMap;
use std::fmt;

use berth_manifest::quantity::format_bytes;
use serde::{Deserialize, Serialize};

use crate::desired::DesiredPod;

/// What the node measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Signal {
    #[serde(rename = "memory.available")]
    MemoryAvailable,
    #[serde(rename = "nodefs.available")]
    NodefsAvailable,
    #[serde(rename = "pid.available")]
    PidAvailable,
}

impl Signal {
    pub const ALL: [Signal; 3] = [
        Signal::MemoryAvailable,
        Signal::NodefsAvailable,
        Signal::PidAvailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory.available",
            Signal::NodefsAvailable => "nodefs.available",
            Signal::PidAvailable => "pid.available",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The resource an eviction message names, as the kubelet names it.
    pub fn resource(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory",
            Signal::NodefsAvailable => "ephemeral-storage",
            Signal::PidAvailable => "pids",
        }
    }

    /// The node condition it sets.
    pub fn condition(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "MemoryPressure",
            Signal::NodefsAvailable => "DiskPressure",
            Signal::PidAvailable => "PIDPressure",
        }
    }

    /// Whether amounts of it are bytes (all but `pid.available`).
    pub fn is_bytes(self) -> bool {
        !matches!(self, Signal::PidAvailable)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A threshold's value: a quantity, or a share of the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Amount {
    /// Bytes, or a count for `pid.available`.
    Quantity(u64),
    /// Hundredths of a percent of the capacity, 0 to 10,000 (`7.5%` is 750).
    Percent(u32),
}

impl Amount {
    /// In the signal's unit, for a capacity.
    pub fn of(self, capacity: u64) -> u64 {
        match self {
            Amount::Quantity(q) => q,
            Amount::Percent(p) => {
                u64::try_from(u128::from(capacity) * u128::from(p) / 10_000).unwrap_or(u64::MAX)
            }
        }
    }

    /// As written in a config (`10%`, `100Mi`, `1000`), for messages.
    pub fn show(self, signal: Signal) -> String {
        match self {
            Amount::Percent(p) if p % 100 == 0 => format!("{}%", p / 100),
            Amount::Percent(p) => format!("{}%", f64::from(p) / 100.0),
            Amount::Quantity(q) if signal.is_bytes() => format_bytes(q),
            Amount::Quantity(q) => q.to_string(),
        }
    }
}

/// Parses one threshold value as the kubelet's flags take it: a quantity
/// (`100Mi`, `1G`, a count for `pid.available`) or a percentage (`10%`).
pub fn parse_amount(signal: Signal, text: &str) -> Result<Amount, String> {
    let text = text.trim();
    if let Some(p) = text.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a percentage"))?;
        if !(0.0..=100.0).contains(&p) || p.is_nan() {
            return Err(format!("{text:?}: a percentage is between 0% and 100%"));
        }
        return Ok(Amount::Percent((p * 100.0).round() as u32));
    }
    if signal.is_bytes() {
        berth_manifest::quantity::Quantity::parse(text)
            .and_then(|q| q.units())
            .map(Amount::Quantity)
            .map_err(|e| {
                format!("{text:?} is not a quantity of bytes ({e}); write e.g. 100Mi or 10%")
            })
    } else {
        text.parse()
            .map(Amount::Quantity)
            .map_err(|_| format!("{text:?} is not a count of processes; write e.g. 1000 or 5%"))
    }
}

/// The node's eviction settings (`eviction:` in the node config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Thresholds {
    pub hard: BTreeMap<Signal, Amount>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub soft: BTreeMap<Signal, Amount>,
    /// Seconds a soft threshold must stay met before it evicts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub soft_grace_seconds: BTreeMap<Signal, u64>,
    /// How far past the threshold an eviction reclaims before the pressure
    /// counts as gone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub minimum_reclaim: BTreeMap<Signal, Amount>,
}

impl Default for Thresholds {
    /// The kubelet's defaults on Linux: `memory.available<100Mi`,
    /// `nodefs.available<10%` (`imagefs` is the same filesystem here).
    fn default() -> Self {
        Self {
            hard: [
                (Signal::MemoryAvailable, Amount::Quantity(100 << 20)),
                (Signal::NodefsAvailable, Amount::Percent(1000)),
            ]
            .into_iter()
            .collect(),
            soft: BTreeMap::new(),
            soft_grace_seconds: BTreeMap::new(),
            minimum_reclaim: BTreeMap::new(),
        }
    }
}

/// One signal as measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Measure {
    pub available: u64,
    pub capacity: u64,
}

impl Thresholds {
    /// Whether `signal`, as measured in `signals`, is under any of its
    /// thresholds (hard, or soft whatever its grace period).
    pub fn met_now(&self, signal: Signal, signals: &BTreeMap<Signal, Measure>) -> bool {
        signals.get(&signal).is_some_and(|m| {
            self.hard
                .get(&signal)
                .into_iter()
                .chain(self.soft.get(&signal))
                .any(|a| m.available < a.of(m.capacity))
        })
    }
}

/// The node's signals and thresholds, and since when each soft threshold
/// has been met: a fact of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePressure {
    pub signals: BTreeMap<Signal, Measure>,
    pub thresholds: Thresholds,
    /// Seconds since the epoch: when each soft threshold began to be met.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub soft_since: BTreeMap<Signal, u64>,
    /// Signals under pressure at the last look (met, or not yet reclaimed
    /// past `minimumReclaim`): their conditions stay true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pressured: Vec<Signal>,
    /// Each pod's memory working set (bytes: usage less inactive file
    /// pages, as the kubelet counts it), by `namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub memory: BTreeMap<String, u64>,
    /// Each pod's local storage (bytes in its containers' writable layers
    /// and disk `emptyDir`s), measured while `nodefs.available` is short.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub disk: BTreeMap<String, u64>,
    /// Each pod's processes (its slice's `pids.current`), measured while
    /// `pid.available` is short.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pids: BTreeMap<String, u64>,
}

/// A threshold met, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Met {
    pub signal: Signal,
    pub threshold: u64,
    pub available: u64,
    /// `hard`, or `soft` once its grace period has passed.
    pub hard: bool,
    /// Written as configured, for messages.
    pub written: String,
}

impl NodePressure {
    /// The thresholds met now, hard ones first.
    pub fn met(&self, now: u64) -> Vec<Met> {
        let mut out = Vec::new();
        for (hard, list) in [
            (true, &self.thresholds.hard),
            (false, &self.thresholds.soft),
        ] {
            for (signal, amount) in list {
                let Some(m) = self.signals.get(signal) else {
                    continue;
                };
                let threshold = amount.of(m.capacity);
                if m.available >= threshold {
                    continue;
                }
                if !hard {
                    let grace = self
                        .thresholds
                        .soft_grace_seconds
                        .get(signal)
                        .copied()
                        .unwrap_or(0);
                    let since = self.soft_since.get(signal).copied().unwrap_or(now);
                    if now < since + grace {
                        continue;
                    }
                }
                out.push(Met {
                    signal: *signal,
                    threshold,
                    available: m.available,
                    hard,
                    written: amount.show(*signal),
                });
            }
        }
        out
    }

    /// Whether `signal` is under pressure: a threshold met, or an eviction
    /// made for it not yet reclaimed past the threshold and its
    /// `minimumReclaim`.
    pub fn pressured(&self, signal: Signal, now: u64) -> bool {
        if self.met(now).iter().any(|m| m.signal == signal) {
            return true;
        }
        if !self.pressured.contains(&signal) {
            return false;
        }
        let Some(m) = self.signals.get(&signal) else {
            return false;
        };
        let reclaim = self
            .thresholds
            .minimum_reclaim
            .get(&signal)
            .map_or(0, |a| a.of(m.capacity));
        let threshold = self
            .thresholds
            .hard
            .get(&signal)
            .into_iter()
            .chain(self.thresholds.soft.get(&signal))
            .map(|a| a.of(m.capacity))
            .max()
            .unwrap_or(0);
        m.available < threshold.saturating_add(reclaim)
    }
}

/// The pod to evict for the threshold `met`, in the kubelet's order, with
/// the kubelet's message; `None` when no pod can relieve it.
///
/// Pods using more than they request go first; then (all priorities being
/// equal: there are no PriorityClasses) the most over their request; the
/// pod's name last, for a stable order. The request is the memory request
/// for `memory.available`; for `nodefs.available` it is 0 (the node does
/// not keep `requests.ephemeral-storage`, so every pod using disk is over
/// it and the largest user goes first, as the kubelet ranks pods without
/// one); for `pid.available` the kubelet has no request either, and ranks
/// by processes.
pub fn choose<'a>(
    pods: &'a [DesiredPod],
    pressure: &NodePressure,
    met: &Met,
) -> Option<(&'a DesiredPod, String)> {
    type Request = fn(&DesiredPod) -> u64;
    let (usage, request): (&BTreeMap<String, u64>, Request) = match met.signal {
        Signal::MemoryAvailable => (&pressure.memory, |p| p.memory_request_bytes),
        Signal::NodefsAvailable => (&pressure.disk, |_| 0),
        Signal::PidAvailable => (&pressure.pids, |_| 0),
    };
    let mut ranked: Vec<(&DesiredPod, u64)> = pods
        .iter()
        .filter_map(|p| Some((p, *usage.get(&p.id.to_string())?)))
        .filter(|(_, usage)| *usage > 0)
        .collect();
    ranked.sort_by(|(a, ua), (b, ub)| {
        let over = |p: &DesiredPod, u: u64| u > request(p);
        let excess = |p: &DesiredPod, u: u64| i128::from(u) - i128::from(request(p));
        over(b, *ub)
            .cmp(&over(a, *ua))
            .then(excess(b, *ub).cmp(&excess(a, *ua)))
            .then(a.id.to_string().cmp(&b.id.to_string()))
    });
    let (pod, used) = ranked.first()?;
    let amount = |n: u64| {
        if met.signal.is_bytes() {
            format_bytes(n)
        } else {
            n.to_string()
        }
    };
    let message = format!(
        "The node was low on resource: {}. Threshold quantity: {}, available: {}. Pod {} was using {}, request is {}.",
        met.signal.resource(),
        met.written,
        amount(met.available),
        pod.id,
        amount(*used),
        amount(request(pod)),
    );
    Some((pod, message))
}

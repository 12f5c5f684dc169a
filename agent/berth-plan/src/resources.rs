//! Kubernetes resource arithmetic: QoS classes, CPU shares and cgroup v2
//! weights, CFS quotas, OOM score adjustments and memory.high, with the
//! numbers the kubelet and runc use.

use berth_manifest::model::Container;
use serde::Serialize;

/// Kubernetes' quality-of-service class of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The slice component: `berth-guaranteed.slice`, ...
    pub fn slice_word(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

impl std::fmt::Display for QosClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        })
    }
}

/// CPU and memory of one container after Kubernetes' defaulting: a resource
/// with a limit and no request gets a request equal to its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ContainerResources {
    pub cpu_request_milli: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub memory_request_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

impl ContainerResources {
    /// Applies the API server's defaulting (requests default to limits) and
    /// drops zero quantities, which Kubernetes treats as unset.
    pub fn defaulted(mut self) -> Self {
        let nz = |v: Option<u64>| v.filter(|x| *x > 0);
        self.cpu_limit_milli = nz(self.cpu_limit_milli);
        self.memory_limit_bytes = nz(self.memory_limit_bytes);
        self.cpu_request_milli = nz(self.cpu_request_milli).or(self.cpu_limit_milli);
        self.memory_request_bytes = nz(self.memory_request_bytes).or(self.memory_limit_bytes);
        self
    }
}

/// The QoS class of a pod from its (defaulted) containers, init containers
/// included, as the kubelet's `GetPodQOS` computes it.
pub fn qos_class(containers: &[ContainerResources]) -> QosClass {
    let mut any = false;
    let mut guaranteed = true;
    let (mut cpu_req, mut cpu_lim, mut mem_req, mut mem_lim) = (0u128, 0u128, 0u128, 0u128);
    for c in containers {
        any |= c.cpu_request_milli.is_some()
            || c.cpu_limit_milli.is_some()
            || c.memory_request_bytes.is_some()
            || c.memory_limit_bytes.is_some();
        if c.cpu_limit_milli.is_none() || c.memory_limit_bytes.is_none() {
            guaranteed = false;
        }
        cpu_req += u128::from(c.cpu_request_milli.unwrap_or(0));
        cpu_lim += u128::from(c.cpu_limit_milli.unwrap_or(0));
        mem_req += u128::from(c.memory_request_bytes.unwrap_or(0));
        mem_lim += u128::from(c.memory_limit_bytes.unwrap_or(0));
    }
    if !any {
        return QosClass::BestEffort;
    }
    if guaranteed && cpu_req == cpu_lim && mem_req == mem_lim {
        QosClass::Guaranteed
    } else {
        QosClass::Burstable
    }
}

/// The kubelet's minimum and maximum CPU shares.
pub const MIN_SHARES: u64 = 2;
pub const MAX_SHARES: u64 = 262_144;

/// CPU request in millicores → cgroup v1 shares (`milli · 1024 / 1000`, at least 2).
pub fn milli_to_shares(milli: u64) -> u64 {
    if milli == 0 {
        return MIN_SHARES;
    }
    let shares = (u128::from(milli) * 1024 / 1000) as u64;
    shares.clamp(MIN_SHARES, MAX_SHARES)
}

/// Shares → cgroup v2 `cpu.weight`, by the mapping runc 1.4 and crun use
/// (KEP 5474): a quadratic in log2(shares) that maps 2 → 1, 1024 → 100 and
/// 262144 → 10000, so one CPU gets the default weight of 100.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares <= MIN_SHARES {
        return 1;
    }
    if shares >= MAX_SHARES {
        return 10_000;
    }
    let l = (shares as f64).log2();
    let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
    (10f64.powf(exponent).ceil() as u64).clamp(1, 10_000)
}

/// The CFS period the kubelet uses, and systemd's default.
pub const CPU_PERIOD_USEC: u64 = 100_000;
/// The kubelet never sets a quota below 1 ms per period.
pub const MIN_QUOTA_USEC: u64 = 1_000;

/// CPU limit → quota per 100 ms period, as the kubelet's `milliCPUToQuota`.
pub fn milli_to_quota(milli: u64) -> u64 {
    let quota = (u128::from(milli) * u128::from(CPU_PERIOD_USEC) / 1000) as u64;
    quota.max(MIN_QUOTA_USEC)
}

/// Quota per period → systemd's `CPUQuotaPerSecUSec`.
pub fn quota_per_sec(quota: u64) -> u64 {
    quota * (1_000_000 / CPU_PERIOD_USEC)
}

pub const GUARANTEED_OOM_SCORE_ADJ: i32 = -997;
pub const BESTEFFORT_OOM_SCORE_ADJ: i32 = 1000;

/// The kubelet's `GetContainerOOMScoreAdjust` (without the critical-pod and
/// sidecar special cases, which Berth does not have).
pub fn oom_score_adj(qos: QosClass, memory_request: u64, memory_capacity: u64) -> i32 {
    match qos {
        QosClass::Guaranteed => GUARANTEED_OOM_SCORE_ADJ,
        QosClass::BestEffort => BESTEFFORT_OOM_SCORE_ADJ,
        QosClass::Burstable => {
            let capacity = i128::from(memory_capacity.max(1));
            let adj = 1000 - (1000 * i128::from(memory_request)) / capacity;
            let min = i128::from(1000 + GUARANTEED_OOM_SCORE_ADJ);
            if adj < min {
                min as i32
            } else if adj == i128::from(BESTEFFORT_OOM_SCORE_ADJ) {
                // A Burstable container must stay below BestEffort ones.
                999
            } else {
                adj as i32
            }
        }
    }
}

/// The memory throttling factor of Kubernetes' MemoryQoS (KEP 2570).
pub const MEMORY_THROTTLING_FACTOR_TENTHS: u64 = 9;
pub const PAGE_SIZE: u64 = 4096;

/// `memory.high`: `request + 0.9 · (limit − request)`, rounded down to a page,
/// where the limit is the node's capacity when the container has none.
/// `None` when it would not sit below `memory.max` (request equals limit).
pub fn memory_high(request: u64, limit: Option<u64>, capacity: u64) -> Option<u64> {
    let ceiling = limit.unwrap_or(capacity);
    if request >= ceiling {
        return None;
    }
    let high = u128::from(request)
        + u128::from(ceiling - request) * u128::from(MEMORY_THROTTLING_FACTOR_TENTHS) / 10;
    let high = (high as u64) / PAGE_SIZE * PAGE_SIZE;
    (high > request && high < ceiling).then_some(high)
}

pub fn container_resources(c: &Container) -> ContainerResources {
    let r = c.resources;
    ContainerResources {
        cpu_request_milli: r.cpu_request_milli,
        cpu_limit_milli: r.cpu_limit_milli,
        memory_request_bytes: r.memory_request_bytes,
        memory_limit_bytes: r.memory_limit_bytes,
    }
    .defaulted()
}

/// The pod's effective resources: the larger of the app containers' sum and
/// the largest init container; a limit only when every container has one.
pub fn pod_resources(
    init: &[ContainerResources],
    app: &[ContainerResources],
) -> ContainerResources {
    fn combine(
        init: &[ContainerResources],
        app: &[ContainerResources],
        get: impl Fn(&ContainerResources) -> Option<u64>,
        all_required: bool,
    ) -> Option<u64> {
        if all_required && init.iter().chain(app).any(|c| get(c).is_none()) {
            return None;
        }
        let sum: u64 = app.iter().filter_map(&get).sum();
        let max_init = init.iter().filter_map(&get).max().unwrap_or(0);
        let v = sum.max(max_init);
        (v > 0).then_some(v)
    }
    ContainerResources {
        cpu_request_milli: combine(init, app, |c| c.cpu_request_milli, false),
        cpu_limit_milli: combine(init, app, |c| c.cpu_limit_milli, true),
        memory_request_bytes: combine(init, app, |c| c.memory_request_bytes, false),
        memory_limit_bytes: combine(init, app, |c| c.memory_limit_bytes, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct WeightCase {
        cpu_milli: u64,
        shares: u64,
        weight: u64,
    }

    /// Shares as the kubelet computes them; weights as runc 1.4's
    /// `ConvertCPUSharesToCgroupV2Value` returns them.
    #[test]
    fn cpu_requests_map_to_kubernetes_shares_and_runc_weights() {
        let cases = [
            WeightCase {
                cpu_milli: 0,
                shares: 2,
                weight: 1,
            },
            WeightCase {
                cpu_milli: 1,
                shares: 2,
                weight: 1,
            },
            WeightCase {
                cpu_milli: 10,
                shares: 10,
                weight: 4,
            },
            WeightCase {
                cpu_milli: 100,
                shares: 102,
                weight: 17,
            },
            WeightCase {
                cpu_milli: 250,
                shares: 256,
                weight: 35,
            },
            WeightCase {
                cpu_milli: 500,
                shares: 512,
                weight: 59,
            },
            WeightCase {
                cpu_milli: 1000,
                shares: 1024,
                weight: 100,
            },
            WeightCase {
                cpu_milli: 1500,
                shares: 1536,
                weight: 138,
            },
            WeightCase {
                cpu_milli: 2000,
                shares: 2048,
                weight: 174,
            },
            WeightCase {
                cpu_milli: 256_000,
                shares: 262_144,
                weight: 10_000,
            },
            WeightCase {
                cpu_milli: 1_000_000,
                shares: 262_144,
                weight: 10_000,
            },
        ];
        for c in cases {
            assert_eq!(
                milli_to_shares(c.cpu_milli),
                c.shares,
                "shares for {}m",
                c.cpu_milli
            );
            assert_eq!(
                shares_to_weight(c.shares),
                c.weight,
                "weight for {} shares",
                c.shares
            );
        }
    }

    #[test]
    fn cpu_limits_map_to_a_quota_per_100ms_period() {
        for (milli, quota) in [
            (500, 50_000),
            (1000, 100_000),
            (250, 25_000),
            (1, 1_000),
            (5, 1_000),
            (2500, 250_000),
        ] {
            assert_eq!(milli_to_quota(milli), quota, "{milli}m");
        }
        assert_eq!(quota_per_sec(50_000), 500_000);
    }

    #[test]
    fn oom_score_adjustments_match_the_kubelet() {
        let gi = 1u64 << 30;
        let cap = 8 * gi;
        assert_eq!(oom_score_adj(QosClass::Guaranteed, gi, cap), -997);
        assert_eq!(oom_score_adj(QosClass::BestEffort, 0, cap), 1000);
        assert_eq!(oom_score_adj(QosClass::Burstable, gi, cap), 875);
        assert_eq!(oom_score_adj(QosClass::Burstable, 0, cap), 999);
        assert_eq!(oom_score_adj(QosClass::Burstable, cap, cap), 3);
        assert_eq!(oom_score_adj(QosClass::Burstable, 2 * cap, cap), 3);
        assert_eq!(oom_score_adj(QosClass::Burstable, 128 << 20, cap), 985);
    }

    fn res(
        cpu_req: Option<u64>,
        cpu_lim: Option<u64>,
        mem_req: Option<u64>,
        mem_lim: Option<u64>,
    ) -> ContainerResources {
        ContainerResources {
            cpu_request_milli: cpu_req,
            cpu_limit_milli: cpu_lim,
            memory_request_bytes: mem_req,
            memory_limit_bytes: mem_lim,
        }
        .defaulted()
    }

    struct QosCase {
        name: &'static str,
        containers: Vec<ContainerResources>,
        qos: QosClass,
    }

    #[test]
    fn qos_classes_follow_kubernetes_rules() {
        let cases = [
            QosCase {
                name: "nothing set",
                containers: vec![res(None, None, None, None)],
                qos: QosClass::BestEffort,
            },
            QosCase {
                name: "zero requests count as unset",
                containers: vec![res(Some(0), None, Some(0), None)],
                qos: QosClass::BestEffort,
            },
            QosCase {
                name: "limits only default the requests",
                containers: vec![res(None, Some(500), None, Some(64))],
                qos: QosClass::Guaranteed,
            },
            QosCase {
                name: "requests equal limits",
                containers: vec![res(Some(500), Some(500), Some(64), Some(64))],
                qos: QosClass::Guaranteed,
            },
            QosCase {
                name: "request below limit",
                containers: vec![res(Some(250), Some(500), Some(64), Some(64))],
                qos: QosClass::Burstable,
            },
            QosCase {
                name: "memory limit missing",
                containers: vec![res(Some(500), Some(500), Some(64), None)],
                qos: QosClass::Burstable,
            },
            QosCase {
                name: "requests only",
                containers: vec![res(Some(100), None, None, None)],
                qos: QosClass::Burstable,
            },
            QosCase {
                name: "one container without limits makes the pod burstable",
                containers: vec![
                    res(None, Some(500), None, Some(64)),
                    res(None, None, None, None),
                ],
                qos: QosClass::Burstable,
            },
            QosCase {
                name: "all containers guaranteed",
                containers: vec![
                    res(None, Some(500), None, Some(64)),
                    res(Some(100), Some(100), Some(32), Some(32)),
                ],
                qos: QosClass::Guaranteed,
            },
        ];
        for c in cases {
            assert_eq!(qos_class(&c.containers), c.qos, "{}", c.name);
        }
    }

    #[test]
    fn memory_high_sits_between_request_and_limit() {
        let mi = 1u64 << 20;
        assert_eq!(
            memory_high(64 * mi, Some(128 * mi), 0),
            Some(64 * mi + (64 * mi * 9 / 10) / 4096 * 4096)
        );
        assert_eq!(memory_high(128 * mi, Some(128 * mi), 0), None);
        assert_eq!(memory_high(0, None, 1000 * mi), Some(900 * mi));
    }
}

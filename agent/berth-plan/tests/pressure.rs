//! Node pressure as the planner decides it: when `memory.available` falls
//! under a threshold, one pod a pass is evicted in the kubelet's order
//! (BestEffort and pods over their requests first, the most over first,
//! Guaranteed last), killed at once for a hard threshold; an evicted
//! replica starts again once the pressure is gone, a bare pod does not.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;

use berth_manifest::{SourceFile, load_sources};
use berth_plan::actual::ActualState;
use berth_plan::plan::Verb;
use berth_plan::pressure::{Amount, Measure, NodePressure, Signal, Thresholds, parse_amount};
use berth_plan::{ImageCatalog, NodeInfo, NodePlan, plan_node};

mod common;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: gold}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["sleep", "3600"]
      resources: {limits: {cpu: 100m, memory: 256Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: silver}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["sleep", "3600"]
      resources: {requests: {memory: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: ["tail", "/dev/zero"]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cache}
spec:
  replicas: 1
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec:
      containers:
        - name: main
          image: busybox:1.37
          command: ["sleep", "3600"]
"#;

const MI: u64 = 1 << 20;

fn plan(actual: &ActualState) -> NodePlan {
    let catalog = load_sources(vec![SourceFile {
        path: "pods.yaml".into(),
        text: PODS.into(),
    }]);
    assert_eq!(catalog.error_count(), 0, "{:#?}", catalog.diagnostics);
    let node = NodeInfo::new("n1", Default::default(), 4 << 30, 2000);
    plan_node(&catalog, &node, &ImageCatalog::default(), actual, "rev1")
}

/// The node after `plan`, at `now`, with `available` memory and each
/// pod's working set.
fn under(plan: &NodePlan, now: u64, available: u64, memory: &[(&str, u64)]) -> ActualState {
    let cache = plan
        .pods
        .iter()
        .find(|p| p.id.name.starts_with("cache-"))
        .map(|p| p.id.to_string());
    let memory: BTreeMap<String, u64> = memory
        .iter()
        .map(|(pod, bytes)| {
            let key = match *pod {
                "cache" => cache.clone().unwrap_or_else(|| "default/cache".into()),
                p => format!("default/{p}"),
            };
            (key, *bytes)
        })
        .collect();
    let mut thresholds = Thresholds::default();
    thresholds
        .minimum_reclaim
        .insert(Signal::MemoryAvailable, Amount::Quantity(50 * MI));
    ActualState {
        observed_at: now,
        evictions: plan.evictions.clone(),
        pressure: Some(NodePressure {
            signals: [(
                Signal::MemoryAvailable,
                Measure {
                    available,
                    capacity: 1024 * MI,
                },
            )]
            .into(),
            thresholds,
            soft_since: BTreeMap::new(),
            pressured: plan.pressured.clone(),
            memory,
            disk: BTreeMap::new(),
            pids: BTreeMap::new(),
        }),
        ..common::applied(plan)
    }
}

/// The evicted pods, in the order they were evicted.
fn evicted(plan: &NodePlan) -> Vec<String> {
    let mut e: Vec<(u64, String)> = plan
        .evictions
        .iter()
        .map(|e| {
            let name = e.pod.trim_start_matches("default/");
            (e.at, name.split('-').next().unwrap_or("").to_string())
        })
        .collect();
    e.sort();
    e.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn memory_pressure_evicts_one_pod_a_pass_in_the_kubelets_order() {
    let first = plan(&ActualState::default());
    assert_eq!(first.pods.len(), 4);
    let usage = [
        ("gold", 250 * MI),
        ("silver", 300 * MI),
        ("hog", 400 * MI),
        ("cache", 20 * MI),
    ];
    // Enough memory: nothing happens.
    let calm = plan(&under(&first, 1000, 400 * MI, &usage));
    assert!(evicted(&calm).is_empty());
    assert!(calm.pressured.is_empty());

    // Under 100Mi: the pod most over its request goes first (the
    // BestEffort hog: 400Mi over a request of 0), killed at once (a hard
    // threshold).
    let p1 = plan(&under(&calm, 1001, 60 * MI, &usage));
    assert_eq!(evicted(&p1), ["hog"]);
    assert_eq!(p1.pressured, [Signal::MemoryAvailable]);
    let kill: Vec<(&str, Option<u64>)> = p1
        .plan
        .actions
        .iter()
        .filter(|a| a.verb == Verb::Stop)
        .map(|a| (a.unit.as_str(), a.grace_seconds))
        .collect();
    assert_eq!(kill, [("berth-default_hog_main.service", Some(0))]);
    let e = &p1.evictions[0];
    assert_eq!(e.pressure, Some(Signal::MemoryAvailable));
    assert!(
        e.message.starts_with(
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 60Mi."
        ),
        "{}",
        e.message
    );

    // Still short: next the Burstable pod most over its request (silver:
    // 236Mi over), before the BestEffort replica using 20Mi; the
    // Guaranteed pod, within its request, last.
    let p2 = plan(&under(&p1, 1002, 70 * MI, &usage));
    assert_eq!(evicted(&p2), ["hog", "silver"]);
    let p3 = plan(&under(&p2, 1003, 80 * MI, &usage));
    assert_eq!(evicted(&p3), ["hog", "silver", "cache"]);
    let p4 = plan(&under(&p3, 1004, 90 * MI, &usage));
    assert_eq!(evicted(&p4), ["hog", "silver", "cache", "gold"]);
    let p5 = plan(&under(&p4, 1005, 95 * MI, &usage));
    assert_eq!(p5.pods.len(), 0, "nothing left to evict, nothing restarted");

    // Back over the threshold, but not past the minimum reclaim (100Mi +
    // 50Mi): the pressure holds, nothing starts again.
    let p6 = plan(&under(&p5, 1006, 120 * MI, &[]));
    assert_eq!(p6.pressured, [Signal::MemoryAvailable]);
    assert!(p6.pods.is_empty());
    // Reclaimed: the replica starts again; the bare pods stay evicted
    // until Git changes them (a Pod that failed is not restarted).
    let p7 = plan(&under(&p6, 1007, 500 * MI, &[]));
    assert!(p7.pressured.is_empty());
    let running: Vec<String> = p7.pods.iter().map(|p| p.id.name.clone()).collect();
    assert_eq!(running.len(), 1, "{running:?}");
    assert!(running[0].starts_with("cache-"), "{running:?}");
    assert_eq!(evicted(&p7), ["hog", "silver", "gold"]);
}

#[test]
fn a_soft_threshold_evicts_after_its_grace_period_with_the_pods_own_grace() {
    let first = plan(&ActualState::default());
    let mut actual = under(&first, 1000, 300 * MI, &[("hog", 200 * MI)]);
    {
        let p = actual.pressure.as_mut().unwrap();
        p.thresholds
            .soft
            .insert(Signal::MemoryAvailable, Amount::Quantity(400 * MI));
        p.thresholds
            .soft_grace_seconds
            .insert(Signal::MemoryAvailable, 30);
        p.soft_since.insert(Signal::MemoryAvailable, 990);
    }
    let early = plan(&actual);
    assert!(evicted(&early).is_empty(), "10 s into a 30 s grace period");
    actual.observed_at = 1020;
    let due = plan(&actual);
    assert_eq!(evicted(&due), ["hog"]);
    // A soft eviction stops the pod with its own grace period.
    assert!(
        due.plan
            .actions
            .iter()
            .filter(|a| a.verb == Verb::Stop)
            .all(|a| a.grace_seconds.is_none())
    );
}

#[test]
fn thresholds_parse_as_the_kubelets_flags_and_refuse_what_is_not_one() {
    assert_eq!(
        parse_amount(Signal::MemoryAvailable, "100Mi"),
        Ok(Amount::Quantity(100 * MI))
    );
    assert_eq!(
        parse_amount(Signal::NodefsAvailable, "7.5%"),
        Ok(Amount::Percent(750))
    );
    assert_eq!(
        parse_amount(Signal::PidAvailable, "1000"),
        Ok(Amount::Quantity(1000))
    );
    for (signal, bad) in [
        (Signal::MemoryAvailable, "lots"),
        (Signal::MemoryAvailable, "-1Mi"),
        (Signal::NodefsAvailable, "150%"),
        (Signal::PidAvailable, "1Ki5"),
    ] {
        assert!(parse_amount(signal, bad).is_err(), "{bad}");
    }
    assert_eq!(Amount::Percent(1000).of(2000), 200);
    assert_eq!(
        Signal::parse("memory.available"),
        Some(Signal::MemoryAvailable)
    );
    assert_eq!(Signal::parse("imagefs.available"), None);
}

#[test]
fn disk_and_process_pressure_evict_the_largest_user_first_and_name_the_resource() {
    let first = plan(&ActualState::default());
    let calm = under(&first, 1000, 500 * MI, &[]);
    let key = |name: &str| {
        first
            .pods
            .iter()
            .find(|p| p.id.name.starts_with(name))
            .map(|p| p.id.to_string())
            .unwrap()
    };
    // /var 5% free against the default nodefs.available<10%: the pod
    // writing most goes first, whatever its QoS class (no
    // ephemeral-storage requests are kept: each pod's is 0).
    let mut disk = calm.clone();
    {
        let p = disk.pressure.as_mut().unwrap();
        p.signals.insert(
            Signal::NodefsAvailable,
            Measure {
                available: 50 * MI,
                capacity: 1000 * MI,
            },
        );
        p.disk = [
            (key("gold"), 300 * MI),
            (key("hog"), 10 * MI),
            (key("silver"), 0),
        ]
        .into();
    }
    let d1 = plan(&disk);
    assert_eq!(evicted(&d1), ["gold"]);
    assert_eq!(d1.pressured, [Signal::NodefsAvailable]);
    let e = &d1.evictions[0];
    assert_eq!(e.pressure, Some(Signal::NodefsAvailable));
    assert!(
        e.message.starts_with(
            "The node was low on resource: ephemeral-storage. Threshold quantity: 10%, available: 50Mi. Pod default/gold was using 300Mi, request is 0."
        ),
        "{}",
        e.message
    );
    // Memory short too: the hard memory threshold comes first in the order
    // thresholds are met, as configured (memory before nodefs).
    let mut both = disk.clone();
    {
        let p = both.pressure.as_mut().unwrap();
        p.signals
            .get_mut(&Signal::MemoryAvailable)
            .unwrap()
            .available = 50 * MI;
        p.memory = [(key("hog"), 200 * MI)].into();
    }
    assert_eq!(evicted(&plan(&both)), ["hog"]);

    // Processes: a pid.available threshold written in the config, and
    // the pod with the most processes goes.
    let mut pids = calm.clone();
    {
        let p = pids.pressure.as_mut().unwrap();
        p.signals.insert(
            Signal::PidAvailable,
            Measure {
                available: 900,
                capacity: 32768,
            },
        );
        p.thresholds
            .hard
            .insert(Signal::PidAvailable, Amount::Quantity(1000));
        p.pids = [(key("silver"), 3000), (key("hog"), 2)].into();
    }
    let q = plan(&pids);
    assert_eq!(evicted(&q), ["silver"]);
    assert!(
        q.evictions[0].message.starts_with(
            "The node was low on resource: pids. Threshold quantity: 1000, available: 900. Pod default/silver was using 3000, request is 0."
        ),
        "{}",
        q.evictions[0].message
    );
    // Nobody using the resource: nothing to evict, the condition stays.
    let mut idle = pids.clone();
    idle.pressure.as_mut().unwrap().pids.clear();
    let r = plan(&idle);
    assert!(evicted(&r).is_empty());
    assert_eq!(r.pressured, [Signal::PidAvailable]);
}

//! The opt-in Prometheus endpoint (`metrics.listen` in the node config).
//!
//! Resource usage is read from cgroups at scrape time, under the names
//! cAdvisor gives it (`container_cpu_usage_seconds_total`,
//! `container_memory_working_set_bytes`, ...) with the labels dashboards
//! select on (`namespace`, `pod`, `container`, `image`, `id`); pod and
//! container state under kube-state-metrics' names
//! (`kube_pod_status_phase`, `kube_pod_container_status_restarts_total`,
//! ...); probe results under the kubelet's `prober_probe_total`; the
//! agent's own figures under `berth_*`. The text is the Prometheus text
//! format 0.0.4, encoded by `prometheus-client`.
//!
//! A scrape's cost is bounded whatever the rate: the text is rendered at
//! most once per [`RENDER_EVERY`] and served from that copy meanwhile, at
//! most [`MAX_ANSWERS_PER_SECOND`] times a second (more wait); one
//! thread serves one connection at a time, a request head is read up to
//! [`MAX_REQUEST`] bytes within [`IO_TIMEOUT`], and nothing a client sends
//! reaches the agent's loop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `metrics:` in the node config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Where the endpoint listens; `None`: no endpoint (the default).
    pub listen: Option<SocketAddr>,
    /// Pods may reach the endpoint on the node's addresses. Off by
    /// default: the node's table refuses pod addresses on its port.
    pub allow_pods: bool,
}

impl MetricsSettings {
    /// The port pods are refused on, when the endpoint listens beyond
    /// loopback (pods cannot reach the node's loopback) and pods are not
    /// let in.
    pub fn closed_to_pods(&self) -> Option<u16> {
        let addr = self.listen?;
        (!self.allow_pods && !addr.ip().is_loopback()).then_some(addr.port())
    }
}

/// `listen` checked: an address and a port, the port not 0.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        format!("{text:?} is not an address and port; write e.g. 0.0.0.0:9100 or 127.0.0.1:9100")
    })?;
    if addr.port() == 0 {
        return Err(format!("{text:?} has no port; write e.g. 0.0.0.0:9100"));
    }
    Ok(addr)
}

/// The rendered text is kept this long: a scrape storm costs at most one
/// rendering (a few cgroup files per pod) per period.
pub const RENDER_EVERY: Duration = Duration::from_secs(1);
/// A client has this long to send its request and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// At most this many answers a second; more wait for the next second.
/// Prometheus scrapes a target every 15 s or so: ten a second leaves room
/// for several scrapers and bounds what a storm costs.
pub const MAX_ANSWERS_PER_SECOND: u32 = 10;
/// The text format's content type.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The agent's own counters, shared with the endpoint's thread.
#[derive(Debug, Clone)]
pub struct Figures {
    passes: Family<[(&'static str, &'static str); 1], Counter>,
    pass_seconds: Histogram,
    fetches: Family<[(&'static str, &'static str); 1], Counter>,
    pulls: Family<[(&'static str, &'static str); 1], Counter>,
}

/// Pass durations span a quiet 10 ms pass to a first boot's minute.
const PASS_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Default for Figures {
    fn default() -> Self {
        Self {
            passes: Family::default(),
            pass_seconds: Histogram::new(PASS_BUCKETS),
            fetches: Family::default(),
            pulls: Family::default(),
        }
    }
}

impl Figures {
    /// One pass ended with `outcome` (`applied`, `rejected`, `failed`)
    /// after `took`.
    pub fn pass(&self, outcome: &'static str, took: Duration) {
        self.passes.get_or_create(&[("outcome", outcome)]).inc();
        self.pass_seconds.observe(took.as_secs_f64());
    }

    pub fn fetch(&self, ok: bool) {
        self.fetches.get_or_create(&[("result", result(ok))]).inc();
    }

    pub fn pull(&self, ok: bool) {
        self.pulls.get_or_create(&[("result", result(ok))]).inc();
    }
}

fn result(ok: bool) -> &'static str {
    if ok { "success" } else { "failure" }
}

/// What the agent knew at its last pass, for the collector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub node: String,
    /// The revision running and the one last fetched.
    pub applied: Option<String>,
    pub attempted: Option<String>,
    /// Objects that differ from Git (the drift branch's items).
    pub drift_open: usize,
    /// Status and drift pushes, and their failures.
    pub pushes: u64,
    pub push_failures: u64,
    pub pods: Vec<PodSample>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSample {
    pub namespace: String,
    pub name: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    /// `Evicted` and the like, when the pod has one.
    pub reason: Option<String>,
    pub qos: Option<String>,
    /// The pod's slice, e.g. `/berth.slice/...slice`.
    pub cgroup: Option<String>,
    pub containers: Vec<ContainerSample>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSample {
    pub name: String,
    pub image: String,
    pub cgroup: Option<String>,
    pub restarts: u32,
    pub ready: bool,
    /// `running`, `waiting` or `terminated`.
    pub state: &'static str,
    pub waiting_reason: Option<String>,
    pub last_terminated_reason: Option<String>,
    /// `(Liveness|Readiness|Startup, runs, failures)`.
    pub probes: Vec<(String, u64, u64)>,
}

/// The snapshot of a pass: the pods as observed (`pods`), each container
/// unit's cgroup and image (`units`), and the agent's records.
pub fn snapshot(
    node: &str,
    state: &crate::state::AgentState,
    pods: &[berth_runtime::status::PodStatus],
    units: &BTreeMap<String, (String, String)>,
) -> Snapshot {
    use berth_runtime::status::ContainerState;
    Snapshot {
        node: node.to_string(),
        applied: state.last_good.as_ref().map(|g| g.revision.clone()),
        attempted: state.last_attempted.as_ref().map(|a| a.revision.clone()),
        drift_open: state.drift.len(),
        pushes: state.publish.attempts_total,
        push_failures: state.publish.failures_total,
        pods: pods
            .iter()
            .map(|p| {
                let phase = format!("{:?}", p.phase);
                PodSample {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    reason: (p.status == "Evicted").then(|| p.status.clone()),
                    phase,
                    qos: p.qos_class.clone(),
                    cgroup: p.slice.as_ref().and_then(|_| {
                        // The slice's cgroup: its containers' parent.
                        p.containers
                            .iter()
                            .find_map(|c| units.get(&c.unit))
                            .and_then(|(cg, _)| cg.rsplit_once('/').map(|(d, _)| d.to_string()))
                    }),
                    containers: p
                        .containers
                        .iter()
                        .filter(|c| !c.init)
                        .map(|c| {
                            let facts = units.get(&c.unit);
                            let (state, waiting_reason) = match &c.state {
                                ContainerState::Running { .. } => ("running", None),
                                ContainerState::Waiting { reason, .. } => {
                                    ("waiting", Some(reason.clone()))
                                }
                                ContainerState::Terminated { .. } => ("terminated", None),
                            };
                            ContainerSample {
                                name: c.name.clone(),
                                image: facts.map(|(_, i)| i.clone()).unwrap_or_default(),
                                cgroup: facts.map(|(cg, _)| cg.clone()),
                                restarts: c.restart_count,
                                ready: c.ready,
                                state,
                                waiting_reason,
                                last_terminated_reason: c
                                    .last_state
                                    .as_ref()
                                    .map(|l| l.reason.clone()),
                                probes: c
                                    .probes
                                    .iter()
                                    .map(|r| {
                                        let mut kind = r.probe.clone();
                                        if let Some(first) = kind.get_mut(0..1) {
                                            first.make_ascii_uppercase();
                                        }
                                        (kind, r.runs, r.failures)
                                    })
                                    .collect(),
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// Reads cgroups and the snapshot at each rendering.
#[derive(Debug)]
struct Collect {
    snapshot: Arc<Mutex<Snapshot>>,
    cgroup_root: PathBuf,
    /// For `berth_node_*_available`: the filesystem of the state directory.
    state_dir: PathBuf,
}

/// One cgroup's figures, as cAdvisor reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CgroupUsage {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub working_set_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    /// `memory.max`; `None` for `max` (cAdvisor reports 0 then).
    pub memory_limit_bytes: Option<u64>,
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `cpu.stat`, `memory.current`, `memory.stat`, `memory.events` and
/// `memory.max` of `control_group` below `root`.
pub fn cgroup_usage(root: &Path, control_group: &str) -> CgroupUsage {
    let dir = root.join(control_group.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let memory_bytes = read("memory.current").and_then(|t| t.trim().parse().ok());
    let inactive = read("memory.stat").and_then(|t| keyed(&t, "inactive_file"));
    CgroupUsage {
        cpu_seconds: read("cpu.stat")
            .and_then(|t| keyed(&t, "usage_usec"))
            .map(|us| us as f64 / 1e6),
        memory_bytes,
        working_set_bytes: memory_bytes.map(|m| m.saturating_sub(inactive.unwrap_or(0))),
        oom_kills: read("memory.events").and_then(|t| keyed(&t, "oom_kill")),
        memory_limit_bytes: read("memory.max").and_then(|t| t.trim().parse().ok()),
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Rows of one family: labels and a value.
struct Rows<'a> {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    rows: Vec<(Labels<'a>, f64)>,
}

impl<'a> Rows<'a> {
    fn new(name: &'static str, help: &'static str, kind: MetricType) -> Self {
        Self {
            name,
            help,
            kind,
            rows: Vec::new(),
        }
    }

    fn add(&mut self, labels: Labels<'a>, value: f64) {
        self.rows.push((labels, value));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in &self.rows {
            let m = family.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*value).encode(m)?,
                _ => ConstGauge::new(*value).encode(m)?,
            }
        }
        Ok(())
    }
}

const PHASES: [&str; 5] = ["Pending", "Running", "Succeeded", "Failed", "Unknown"];
const STATES: [&str; 3] = ["running", "waiting", "terminated"];

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let mut root_usage = cgroup_usage(&self.cgroup_root, "/");
        // The root cgroup has no memory files: the machine's, as cAdvisor
        // takes them from /proc/meminfo.
        if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
            let kib = |key: &str| {
                meminfo.lines().find_map(|l| {
                    l.strip_prefix(key)?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
            };
            if let (Some(total), Some(free)) = (kib("MemTotal:"), kib("MemFree:")) {
                let used = total.saturating_sub(free) * 1024;
                root_usage.memory_bytes = Some(used);
                root_usage.working_set_bytes =
                    Some(used.saturating_sub(kib("Inactive(file):").unwrap_or(0) * 1024));
            }
        }
        let mut usages: Vec<(&PodSample, Option<&ContainerSample>, String, CgroupUsage)> =
            Vec::new();
        for pod in &snapshot.pods {
            if let Some(cg) = &pod.cgroup {
                usages.push((pod, None, cg.clone(), cgroup_usage(&self.cgroup_root, cg)));
            }
            for c in &pod.containers {
                if let Some(cg) = &c.cgroup {
                    usages.push((
                        pod,
                        Some(c),
                        cg.clone(),
                        cgroup_usage(&self.cgroup_root, cg),
                    ));
                }
            }
        }
        let mut cpu = Rows::new(
            "container_cpu_usage_seconds",
            "Cumulative CPU time consumed, in seconds (cgroup cpu.stat usage_usec).",
            MetricType::Counter,
        );
        let mut memory = Rows::new(
            "container_memory_usage_bytes",
            "Current memory usage, including page cache (cgroup memory.current).",
            MetricType::Gauge,
        );
        let mut working = Rows::new(
            "container_memory_working_set_bytes",
            "Working set: memory.current less inactive_file, as the kubelet evicts on.",
            MetricType::Gauge,
        );
        let mut ooms = Rows::new(
            "container_oom_events",
            "OOM kills in the cgroup (memory.events oom_kill).",
            MetricType::Counter,
        );
        let mut limits = Rows::new(
            "container_spec_memory_limit_bytes",
            "Memory limit (cgroup memory.max; 0 when unlimited).",
            MetricType::Gauge,
        );
        // The whole machine, as cAdvisor's `id="/"`.
        if let Some(v) = root_usage.cpu_seconds {
            cpu.add(vec![("id", "/")], v);
        }
        if let Some(v) = root_usage.memory_bytes {
            memory.add(vec![("id", "/")], v as f64);
        }
        if let Some(v) = root_usage.working_set_bytes {
            working.add(vec![("id", "/")], v as f64);
        }
        for (pod, container, id, u) in &usages {
            let labels = || -> Labels<'_> {
                vec![
                    ("namespace", pod.namespace.as_str()),
                    ("pod", pod.name.as_str()),
                    ("container", container.map_or("", |c| c.name.as_str())),
                    ("image", container.map_or("", |c| c.image.as_str())),
                    ("id", id.as_str()),
                ]
            };
            if let Some(v) = u.cpu_seconds {
                cpu.add(labels(), v);
            }
            if let Some(v) = u.memory_bytes {
                memory.add(labels(), v as f64);
            }
            if let Some(v) = u.working_set_bytes {
                working.add(labels(), v as f64);
            }
            if let Some(v) = u.oom_kills {
                ooms.add(labels(), v as f64);
            }
            limits.add(labels(), u.memory_limit_bytes.unwrap_or(0) as f64);
        }

        let mut phase = Rows::new(
            "kube_pod_status_phase",
            "The pod's phase: 1 for the current one.",
            MetricType::Gauge,
        );
        let mut reason = Rows::new(
            "kube_pod_status_reason",
            "The pod's status reason (Evicted, ...).",
            MetricType::Gauge,
        );
        let mut qos = Rows::new(
            "kube_pod_status_qos_class",
            "The pod's QoS class.",
            MetricType::Gauge,
        );
        let mut restarts = Rows::new(
            "kube_pod_container_status_restarts",
            "Restarts of the container.",
            MetricType::Counter,
        );
        let mut ready = Rows::new(
            "kube_pod_container_status_ready",
            "Whether the container's readiness check succeeded.",
            MetricType::Gauge,
        );
        let mut state: Vec<Rows> = STATES
            .iter()
            .map(|s| {
                Rows::new(
                    match *s {
                        "running" => "kube_pod_container_status_running",
                        "waiting" => "kube_pod_container_status_waiting",
                        _ => "kube_pod_container_status_terminated",
                    },
                    match *s {
                        "running" => "Whether the container is running.",
                        "waiting" => "Whether the container is waiting.",
                        _ => "Whether the container has terminated.",
                    },
                    MetricType::Gauge,
                )
            })
            .collect();
        let mut waiting_reason = Rows::new(
            "kube_pod_container_status_waiting_reason",
            "Why the container waits.",
            MetricType::Gauge,
        );
        let mut last_reason = Rows::new(
            "kube_pod_container_status_last_terminated_reason",
            "Why the container last terminated (OOMKilled, Error, Completed).",
            MetricType::Gauge,
        );
        let mut probes = Rows::new(
            "prober_probe",
            "Probe runs by type and result, as the kubelet counts them.",
            MetricType::Counter,
        );
        for pod in &snapshot.pods {
            let pod_labels = || -> Labels<'_> {
                vec![
                    ("namespace", pod.namespace.as_str()),
                    ("pod", pod.name.as_str()),
                ]
            };
            for p in PHASES {
                let mut l = pod_labels();
                l.push(("phase", p));
                phase.add(l, f64::from(u8::from(pod.phase == p)));
            }
            if let Some(r) = &pod.reason {
                let mut l = pod_labels();
                l.push(("reason", r.as_str()));
                reason.add(l, 1.0);
            }
            if let Some(q) = &pod.qos {
                let mut l = pod_labels();
                l.push(("qos_class", q.as_str()));
                qos.add(l, 1.0);
            }
            for c in &pod.containers {
                let c_labels = || -> Labels<'_> {
                    let mut l = pod_labels();
                    l.push(("container", c.name.as_str()));
                    l
                };
                restarts.add(c_labels(), f64::from(c.restarts));
                ready.add(c_labels(), f64::from(u8::from(c.ready)));
                for (rows, s) in state.iter_mut().zip(STATES) {
                    rows.add(c_labels(), f64::from(u8::from(c.state == s)));
                }
                if let Some(r) = &c.waiting_reason {
                    let mut l = c_labels();
                    l.push(("reason", r.as_str()));
                    waiting_reason.add(l, 1.0);
                }
                if let Some(r) = &c.last_terminated_reason {
                    let mut l = c_labels();
                    l.push(("reason", r.as_str()));
                    last_reason.add(l, 1.0);
                }
                for (kind, runs, failures) in &c.probes {
                    for (result, n) in [
                        ("successful", runs.saturating_sub(*failures)),
                        ("failed", *failures),
                    ] {
                        let mut l = c_labels();
                        l.push(("probe_type", kind.as_str()));
                        l.push(("result", result));
                        probes.add(l, n as f64);
                    }
                }
            }
        }

        let mut machine = Rows::new(
            "machine_memory_bytes",
            "Memory of the machine.",
            MetricType::Gauge,
        );
        let mut cores = Rows::new(
            "machine_cpu_cores",
            "CPUs of the machine.",
            MetricType::Gauge,
        );
        if let Some(total) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        }) {
            machine.add(Vec::new(), (total * 1024) as f64);
        }
        if let Ok(n) = std::thread::available_parallelism() {
            cores.add(Vec::new(), n.get() as f64);
        }
        let mut available = Rows::new(
            "berth_node_available",
            "What the node has left of each eviction signal (bytes; pids for pid.available).",
            MetricType::Gauge,
        );
        let mut capacity = Rows::new(
            "berth_node_capacity",
            "The capacity each eviction signal is measured against.",
            MetricType::Gauge,
        );
        let signals = crate::pressure::measure(&self.state_dir);
        for (signal, m) in &signals {
            available.add(vec![("signal", signal.as_str())], m.available as f64);
            capacity.add(vec![("signal", signal.as_str())], m.capacity as f64);
        }
        let mut revision = Rows::new(
            "berth_revision_info",
            "The Git revision applied (running) and the one last attempted.",
            MetricType::Gauge,
        );
        for (kind, rev) in [
            ("applied", &snapshot.applied),
            ("attempted", &snapshot.attempted),
        ] {
            if let Some(r) = rev {
                revision.add(vec![("state", kind), ("revision", r.as_str())], 1.0);
            }
        }
        let mut drift = Rows::new(
            "berth_drift_open",
            "Objects that differ from Git and wait on the drift branch.",
            MetricType::Gauge,
        );
        drift.add(Vec::new(), snapshot.drift_open as f64);
        let mut pushes = Rows::new(
            "berth_git_pushes",
            "Pushes of the status and drift branches, by result.",
            MetricType::Counter,
        );
        pushes.add(
            vec![("result", "success")],
            snapshot.pushes.saturating_sub(snapshot.push_failures) as f64,
        );
        pushes.add(vec![("result", "failure")], snapshot.push_failures as f64);

        for rows in [
            &cpu, &memory, &working, &ooms, &limits, &phase, &reason, &qos, &restarts, &ready,
        ]
        .into_iter()
        .chain(state.iter())
        .chain([
            &waiting_reason,
            &last_reason,
            &probes,
            &machine,
            &cores,
            &available,
            &capacity,
            &revision,
            &drift,
            &pushes,
        ]) {
            rows.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// The registry and the latest snapshot: what a scrape renders.
#[derive(Debug, Clone)]
pub struct Exporter {
    registry: Arc<Registry>,
    snapshot: Arc<Mutex<Snapshot>>,
    pub figures: Figures,
}

impl Exporter {
    pub fn new(cgroup_root: &Path, state_dir: &Path) -> Self {
        let figures = Figures::default();
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let mut registry = Registry::default();
        registry.register(
            "berth_passes",
            "Passes of the agent's loop, by outcome",
            figures.passes.clone(),
        );
        registry.register(
            "berth_pass_duration_seconds",
            "How long a pass took (observe, plan, apply, report)",
            figures.pass_seconds.clone(),
        );
        registry.register(
            "berth_git_fetches",
            "Fetches of the desired branch, by result",
            figures.fetches.clone(),
        );
        registry.register(
            "berth_image_pulls",
            "Image pulls, by result",
            figures.pulls.clone(),
        );
        registry.register_collector(Box::new(Collect {
            snapshot: Arc::clone(&snapshot),
            cgroup_root: cgroup_root.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
        }));
        Self {
            registry: Arc::new(registry),
            snapshot,
            figures,
        }
    }

    pub fn update(&self, snapshot: Snapshot) {
        if let Ok(mut s) = self.snapshot.lock() {
            *s = snapshot;
        }
    }

    /// The whole text, now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String does not fail; a collector's error would
        // leave the text short, which a scraper reports.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The endpoint's thread. Dropping it stops the thread and closes the port.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: SocketAddr, exporter: Exporter) -> std::io::Result<Self> {
        Self::start_limited(addr, exporter, MAX_ANSWERS_PER_SECOND)
    }

    /// [`Server::start`] answering at most `per_second` scrapes a second.
    pub fn start_limited(
        addr: SocketAddr,
        exporter: Exporter,
        per_second: u32,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, &exporter, &flag, per_second))?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the accept loop looks at the stop flag when idle.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// What the serving thread keeps between connections: the last rendering,
/// and the answers given in the current second.
struct Served {
    cached: Option<(Instant, Arc<String>)>,
    window: Instant,
    answers: u32,
    per_second: u32,
}

impl Served {
    /// Waits, when this second's answers are given, for the next second.
    /// Meanwhile further clients wait in the kernel's accept queue, which
    /// costs the agent nothing (answering them at once, even with a short
    /// refusal, cost more than serving: a connection each).
    fn pace(&mut self) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.answers = 0;
        }
        if self.answers >= self.per_second {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(self.window.elapsed()));
            self.window = Instant::now();
            self.answers = 0;
        }
        self.answers += 1;
    }
}

fn serve(listener: &TcpListener, exporter: &Exporter, stop: &AtomicBool, per_second: u32) {
    let mut served = Served {
        cached: None,
        window: Instant::now(),
        answers: 0,
        per_second,
    };
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [rustix::event::PollFd::new(
                    listener,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: STOP_CHECK.as_nanos() as i64,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                continue;
            }
            Err(_) => {
                // Out of descriptors and the like: do not spin.
                std::thread::sleep(STOP_CHECK);
                continue;
            }
        };
        let _ = answer(stream, exporter, &mut served);
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    NotFound,
    NotAllowed,
    Bad,
}

/// The request line of `head` judged: `GET /metrics` (with any query).
pub fn judge(head: &[u8]) -> Request {
    let Some(line) = head
        .split(|b| *b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
    else {
        return Request::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Request::Bad;
    }
    if method != "GET" {
        return Request::NotAllowed;
    }
    match target.split('?').next() {
        Some("/metrics") => Request::Metrics,
        _ => Request::NotFound,
    }
}

fn answer(mut stream: TcpStream, exporter: &Exporter, served: &mut Served) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let started = Instant::now();
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST || started.elapsed() > IO_TIMEOUT {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    match judge(&head) {
        Request::Metrics => {
            served.pace();
            let cached = &mut served.cached;
            let body = match cached {
                Some((at, text)) if at.elapsed() < RENDER_EVERY => Arc::clone(text),
                _ => {
                    let text = Arc::new(exporter.render());
                    *cached = Some((Instant::now(), Arc::clone(&text)));
                    text
                }
            };
            reply(&mut stream, "200 OK", CONTENT_TYPE, &body)
        }
        Request::NotFound => reply(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n",
        ),
        Request::NotAllowed => reply(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served here\n",
        ),
        Request::Bad => reply(&mut stream, "400 Bad Request", "text/plain", ""),
    }
}

fn reply(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// The metrics server the agent runs, started, moved or stopped as the
/// config's `metrics.listen` says.
#[derive(Debug, Default)]
pub struct Endpoint {
    pub server: Option<Server>,
    /// The address last refused (logged once).
    failed: Option<SocketAddr>,
}

impl Endpoint {
    /// Brings the server in line with `settings`; a line to log when
    /// something changed.
    pub fn follow(
        &mut self,
        settings: &MetricsSettings,
        exporter: &Exporter,
    ) -> Option<Result<String, String>> {
        let want = settings.listen;
        let have = self.server.as_ref().map(|s| s.addr);
        if want == have || (want.is_some() && want == self.failed) {
            return None;
        }
        self.server = None;
        let addr = want?;
        match Server::start(addr, exporter.clone()) {
            Ok(s) => {
                self.failed = None;
                let line = format!("metrics served on http://{}/metrics", s.addr);
                self.server = Some(s);
                Some(Ok(line))
            }
            Err(e) => {
                self.failed = Some(addr);
                Some(Err(format!(
                    "metrics.listen: cannot listen on {addr}: {e}; no metrics are served"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_is_judged() {
        assert_eq!(judge(b"GET /metrics HTTP/1.1\r\n\r\n"), Request::Metrics);
        assert_eq!(
            judge(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(judge(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            judge(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::NotAllowed
        );
        assert_eq!(judge(b"GET /metrics\r\n\r\n"), Request::Bad);
        assert_eq!(judge(b"\xff\xfe\r\n\r\n"), Request::Bad);
    }

    #[test]
    fn listen_must_be_an_address_and_a_port() {
        assert!(parse_listen("0.0.0.0:9100").is_ok());
        assert!(parse_listen("[::1]:9100").is_ok());
        assert!(parse_listen("9100").is_err());
        assert!(parse_listen("node:9100").is_err());
        assert!(parse_listen("0.0.0.0:0").is_err());
    }

    #[test]
    fn pods_are_refused_only_beyond_loopback_and_unless_let_in() {
        let s = |listen: &str, allow_pods| MetricsSettings {
            listen: Some(parse_listen(listen).unwrap_or_else(|e| panic!("{e}"))),
            allow_pods,
        };
        assert_eq!(s("0.0.0.0:9100", false).closed_to_pods(), Some(9100));
        assert_eq!(s("0.0.0.0:9100", true).closed_to_pods(), None);
        assert_eq!(s("127.0.0.1:9100", false).closed_to_pods(), None);
        assert_eq!(MetricsSettings::default().closed_to_pods(), None);
    }
}

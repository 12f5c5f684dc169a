//! The node agent. One loop: read the config, fetch the branch, load and
//! validate the tree, plan, report; then wait for the next poll. A failure
//! is logged with its cause and retried with backoff; a bad commit is
//! reported once and the last good revision is kept until a new commit
//! arrives. Running pods (from later capabilities) never depend on this loop.
//!
//! Host paths are passed in ([`AgentPaths`]), so tests run it on temporary
//! directories.

pub mod config;
pub mod drift;
pub mod images;
pub mod network;
pub mod notify;
pub mod publisher;
pub mod report;
pub mod state;
pub mod storage;

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_git::{Mirror, Revision};
use berth_plan::{ActualState, ImageCatalog, NodeInfo};
use berth_runtime::images::ImageStore;
use berth_runtime::rootfs::{ContainerRoots, UserRecords};
use berth_runtime::{Host, Systemd, apply, observe};

use crate::config::{ConfigSources, NodeConfig};
use crate::notify::Notifier;
use crate::publisher::{DriftCommit, Outgoing, Publisher};
use crate::state::{AgentState, NotAdmittedRecord, RevisionRecord, StateStore};

/// Everything on the host the agent reads or writes.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub config: ConfigSources,
    /// `/var/lib/berth`: the mirror and the state file.
    pub state_dir: PathBuf,
    pub node_memory_bytes: u64,
    pub node_cpu_milli: u64,
}

/// The machine a pod runs on: systemd, the image store, container roots.
/// Without one the agent only fetches and plans (`--plan-only`).
pub struct Runtime {
    pub systemd: Box<dyn Systemd>,
    pub images: ImageStore,
    pub roots: ContainerRoots,
    pub users: UserRecords,
    /// `/sys/fs/cgroup`, for usage in status.
    pub cgroup_root: PathBuf,
    /// Where the containers' roots are, as the planner writes it into units.
    pub containers_dir: String,
    /// OCI archives imported at start (the appliance's air-gap images).
    pub image_archives: Option<PathBuf>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("images", &self.images)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// What wakes the loop besides its poll timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Fetch and reconcile now (`systemctl reload berth-agent`, SIGHUP).
    SyncNow,
    /// A Berth unit changed state: reconcile without fetching.
    UnitChanged,
    Shutdown,
}

/// Log lines go to stderr; under systemd a `<N>` prefix gives journald the priority.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    journal: bool,
}

impl Log {
    pub fn from_env() -> Self {
        Self {
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        }
    }
    fn line(&self, priority: u8, message: &str) {
        for line in message.lines() {
            if self.journal {
                eprintln!("<{priority}>berth: {line}");
            } else {
                eprintln!("berth: {line}");
            }
        }
    }
    pub fn info(&self, message: &str) {
        self.line(6, message);
    }
    pub fn warn(&self, message: &str) {
        self.line(4, message);
    }
    pub fn error(&self, message: &str) {
        self.line(3, message);
    }
}

/// What one pass ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassOutcome {
    /// A valid revision is in place (new or unchanged).
    Applied { revision: String, changed: bool },
    /// The fetched revision is invalid; the last good one stays.
    Rejected {
        revision: String,
        keeping: Option<String>,
    },
    /// Config, network, mirror or systemd trouble: try again after a backoff.
    Failed { reason: String },
}

/// The agent's loop state, between passes.
#[derive(Debug)]
pub struct Agent {
    paths: AgentPaths,
    store: StateStore,
    state: AgentState,
    log: Log,
    runtime: Option<Runtime>,
    /// Opened on the first pass that needs it and kept: opening cleans up
    /// what a crashed run left behind, which is needed once per process.
    mirror: Option<Mirror>,
    /// The last plan logged (verb and unit of each action): a plan that
    /// repeats (a pod waiting for its image) is logged once.
    last_logged_plan: Vec<String>,
    /// The revision last reconciled without error, and when.
    reconciled: Option<(String, Instant)>,
    /// Pushes status and drift, on its own thread (see [`Agent::publish`]).
    publisher: Option<Publisher>,
    /// Pod statuses from the last observation, for the status branch.
    pods: Vec<berth_runtime::status::PodStatus>,
    /// The drift branch's commit from the last reconcile, if anything drifted.
    drift_commit: Option<DriftCommit>,
    /// The resource files of every observed Berth cgroup as last read: an
    /// idle poll reads them again instead of observing every unit over
    /// D-Bus, and observes only when one changed (`systemctl set-property`
    /// writes them, and PID 1 signals nothing for it).
    limits: Option<CgroupLimits>,
    /// The pod network, when this node runs one (see [`Agent::with_network`]).
    network: Option<network::PodNetwork>,
    /// Claims and pod volumes, when this node keeps them (see [`Agent::with_storage`]).
    storage: Option<storage::Storage>,
    /// Pulls and collection of images.
    images: images::Images,
}

/// Resource-control files of Berth's cgroups, by cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct CgroupLimits(std::collections::BTreeMap<String, Vec<String>>);

/// What `SetUnitProperties` can change on a running unit shows up here.
const LIMIT_FILES: [&str; 6] = [
    "memory.max",
    "memory.low",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
];

impl CgroupLimits {
    fn read<'a>(root: &std::path::Path, groups: impl Iterator<Item = &'a str>) -> Self {
        let mut out = std::collections::BTreeMap::new();
        for group in groups.filter(|g| !g.is_empty()) {
            let dir = root.join(group.trim_start_matches('/'));
            let values = LIMIT_FILES
                .iter()
                .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
                .collect();
            out.insert(group.to_string(), values);
        }
        Self(out)
    }

    fn reread(&self, root: &std::path::Path) -> Self {
        Self::read(root, self.0.keys().map(String::as_str))
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first retry comes quickly (the network may still be coming up at
/// boot); later ones back off to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_LOGGED_ACTIONS: usize = 20;
/// Each fetch that brings something adds a pack to the mirror; beyond this
/// many they are repacked into one.
const MAX_PACKS: usize = 16;
/// How often units are observed and healed when nothing signalled a change,
/// like the kubelet's periodic sync.
const RESYNC: Duration = Duration::from_secs(60);
/// Unit changes come in bursts (a stop, a restart job, a start); one
/// reconcile after the burst is enough.
const UNIT_CHANGE_DEBOUNCE: Duration = Duration::from_secs(1);

/// The revision a pass works on, loaded.
struct Loaded {
    revision: String,
    catalog: berth_manifest::Catalog,
}

impl Agent {
    pub fn new(paths: AgentPaths, log: Log, runtime: Option<Runtime>) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&paths.state_dir)?;
        // Credentials, pull secrets and Secrets' data live below: the agent's
        // own, whatever umask it was started with.
        std::fs::set_permissions(&paths.state_dir, std::fs::Permissions::from_mode(0o700))?;
        let store = StateStore::new(&paths.state_dir);
        let state = store.load();
        Ok(Self {
            paths,
            store,
            state,
            log,
            runtime,
            mirror: None,
            last_logged_plan: Vec::new(),
            reconciled: None,
            publisher: None,
            pods: Vec::new(),
            drift_commit: None,
            limits: None,
            network: None,
            storage: None,
            images: images::Images::new(),
        })
    }

    /// A finished image pull wakes [`Agent::run`] through this sender.
    pub fn set_waker(&mut self, waker: std::sync::mpsc::Sender<Wake>) {
        self.images.set_waker(waker);
    }

    /// Provisions claims with `driver` (its book under `dir`) and makes
    /// pod volumes ready. Without it, pods with volumes do not start.
    pub fn with_storage(
        mut self,
        dir: impl Into<std::path::PathBuf>,
        driver: Box<dyn berth_storage::driver::VolumeDriver>,
    ) -> Self {
        self.storage = Some(storage::Storage::new(dir, driver));
        self
    }

    /// Gives every pod its own network namespace, address and DNS, and
    /// programs Services. Without it pods share the node's network.
    pub fn with_network(mut self, paths: network::NetworkPaths) -> Self {
        self.network = Some(network::PodNetwork::new(paths));
        self
    }

    /// Starts pushing status and drift branches after each pass.
    pub fn publish(&mut self) -> std::io::Result<()> {
        if self.publisher.is_none() {
            self.publisher = Some(Publisher::start(
                self.paths.state_dir.join("mirror.git"),
                self.log,
            )?);
        }
        Ok(())
    }

    /// How publishing goes right now, when it runs.
    pub fn publish_record(&self) -> Option<publisher::PublishRecord> {
        self.publisher.as_ref().map(Publisher::record)
    }

    /// Stops publishing after one last attempt to push what is pending.
    pub fn stop_publishing(&mut self) {
        if let Some(mut p) = self.publisher.take() {
            p.stop();
            self.state.publish = p.record();
            let _ = self.store.save(&self.state);
        }
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// Imports the OCI archives shipped with the node into the image store.
    /// A bad archive is logged and skipped; the others still come in.
    pub fn import_images(&mut self) {
        let Some(rt) = &self.runtime else { return };
        let Some(dir) = &rt.image_archives else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut archives: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        archives.sort();
        for archive in archives {
            match rt.images.import_archive(&archive) {
                Ok(images) => {
                    for i in images.iter().filter(|i| i.new) {
                        self.log.info(&format!(
                            "image {} imported from {} ({})",
                            i.reference,
                            archive.display(),
                            short(i.manifest.trim_start_matches("sha256:"))
                        ));
                    }
                }
                Err(e) => self.log.error(&format!("image import failed: {e}")),
            }
        }
    }

    /// One pass: config → fetch → load → validate → observe → plan →
    /// apply → record. With `fetch` false the last fetched revision is
    /// reconciled again (a unit changed).
    pub fn pass(&mut self, fetch: bool) -> (PassOutcome, Option<NodeConfig>) {
        let config = match config::load(&self.paths.config) {
            Ok(c) => c,
            Err(e) => {
                self.log.error(&format!("configuration error: {e}"));
                return (self.failed(format!("configuration error: {e}")), None);
            }
        };
        let mut mirror = match self.mirror.take() {
            Some(m) => m,
            None => match Mirror::open(&self.paths.state_dir.join("mirror.git")) {
                Ok(m) => m,
                Err(e) => {
                    self.log.error(&e.to_string());
                    return (self.failed(e.to_string()), Some(config));
                }
            },
        };
        let outcome = self.pass_with(&config, &mirror, fetch);
        if mirror.pack_count() > MAX_PACKS {
            let keep: Vec<Revision> = self
                .state
                .last_good
                .iter()
                .filter_map(|g| Revision::parse(&g.revision))
                .collect();
            match mirror.compact(&keep) {
                Ok(n) => self
                    .log
                    .info(&format!("mirror repacked: {n} packs into one")),
                Err(e) => self.log.warn(&format!("cannot repack the mirror: {e}")),
            }
        }
        self.mirror = Some(mirror);
        self.send_report(&config);
        (outcome, Some(config))
    }

    fn failed(&mut self, reason: String) -> PassOutcome {
        self.state.errors = vec![reason.clone()];
        let _ = self.store.save(&self.state);
        PassOutcome::Failed { reason }
    }

    fn pass_with(&mut self, config: &NodeConfig, mirror: &Mirror, fetch: bool) -> PassOutcome {
        let mut fetch_error = None;
        let mut outcome = None;
        // A revision accepted in this pass, already loaded: reconciled below
        // without reading and parsing it a second time.
        let mut accepted = None;
        if fetch {
            match mirror.fetch(&config.remote, config.credentials.as_ref()) {
                Ok(revision) => {
                    (outcome, accepted) = self.consider(config, mirror, revision);
                }
                Err(e) => {
                    let keeping = self
                        .state
                        .last_good
                        .as_ref()
                        .map_or("nothing yet".to_string(), |g| short(&g.revision));
                    self.log.error(&format!("{e}; keeping {keeping}; retrying"));
                    fetch_error = Some(e.to_string());
                }
            }
        }
        // Reconcile what is good, whether or not Git was reachable: pods
        // heal while the network is down.
        let good = self.state.last_good.as_ref().map(|g| g.revision.clone());
        // Observing every unit is the expensive part of a pass; a poll that
        // found nothing new skips it unless a unit changed (PID 1 signals
        // finished jobs), a resource file of a Berth cgroup changed (what
        // `systemctl set-property` does, which PID 1 does not signal), the
        // last pass left failures to retry, or the resync interval came
        // round (which catches whatever else systemd does not signal).
        let due = !fetch
            || good != self.reconciled.as_ref().map(|(r, _)| r.clone())
            || !self.state.failures.is_empty()
            || self
                .reconciled
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= RESYNC)
            || self.limits_changed()
            || self
                .network
                .as_mut()
                .is_some_and(network::PodNetwork::table_drifted);
        let reconciled = match good.filter(|_| due) {
            Some(rev) => match accepted
                .filter(|l: &Loaded| l.revision == rev)
                .map_or_else(|| self.load(config, mirror, &rev), Ok)
            {
                Ok(loaded) => {
                    let result = self.reconcile(config, &loaded);
                    if result.is_ok() {
                        self.reconciled = Some((rev, Instant::now()));
                    }
                    Some(result)
                }
                Err(e) => Some(Err(e)),
            },
            None => None,
        };
        if let Some(Err(e)) = &reconciled {
            self.log.error(e);
        }
        if let Some(reason) = fetch_error.or_else(|| reconciled.and_then(Result::err)) {
            self.state.errors = vec![reason.clone()];
            let _ = self.store.save(&self.state);
            return PassOutcome::Failed { reason };
        }
        if outcome.is_none()
            && let Some(g) = &self.state.last_good
        {
            outcome = Some(PassOutcome::Applied {
                revision: g.revision.clone(),
                changed: false,
            });
        }
        let _ = self.store.save(&self.state);
        outcome.unwrap_or_else(|| PassOutcome::Failed {
            reason: "no revision fetched yet".into(),
        })
    }

    /// A fetched revision: validated once; a good one becomes the one to
    /// run (and is returned loaded, for this pass to reconcile), a bad one
    /// waits for a new commit.
    fn consider(
        &mut self,
        config: &NodeConfig,
        mirror: &Mirror,
        revision: Revision,
    ) -> (Option<PassOutcome>, Option<Loaded>) {
        let rev = revision.to_string();
        let already_good = self
            .state
            .last_good
            .as_ref()
            .is_some_and(|g| g.revision == rev);
        let already_rejected = !already_good
            && self
                .state
                .last_attempted
                .as_ref()
                .is_some_and(|a| a.revision == rev)
            && !self.state.errors.is_empty();
        if already_good {
            return (None, None);
        }
        if already_rejected {
            let keeping = self.state.last_good.as_ref().map(|g| g.revision.clone());
            return (
                Some(PassOutcome::Rejected {
                    revision: rev,
                    keeping,
                }),
                None,
            );
        }
        self.log.info(&format!(
            "fetched {} branch {} at {}",
            config.remote.url,
            config.remote.branch,
            short(&rev)
        ));
        let now = now_secs();
        let signer = match &config.allowed_signers {
            None => None,
            Some(path) => {
                let checked = berth_git::AllowedSigners::load(path)
                    .and_then(|allowed| mirror.verify_commit(revision, &allowed));
                match checked {
                    Ok(s) => Some(format!("{} ({})", s.principals, s.fingerprint)),
                    Err(e) => {
                        let error = format!("signature check: {e}; not applied");
                        return (Some(self.reject(&rev, now, vec![error])), None);
                    }
                }
            }
        };
        let loaded = match self.load(config, mirror, &rev) {
            Ok(l) => l,
            Err(e) => return (Some(self.reject(&rev, now, vec![e])), None),
        };
        let node = self.node_info(config);
        let images = self.image_catalog();
        let plan = berth_plan::plan_node(
            &loaded.catalog,
            &node,
            &images,
            &ActualState::default(),
            &short(&rev),
        );
        let mut errors: Vec<String> = loaded
            .catalog
            .diagnostics
            .iter()
            .chain(&plan.diagnostics)
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        errors.sort();
        errors.dedup();
        for d in loaded
            .catalog
            .diagnostics
            .iter()
            .chain(&plan.diagnostics)
            .filter(|d| !d.is_error())
        {
            self.log.warn(&d.to_string());
        }
        if !errors.is_empty() {
            return (Some(self.reject(&rev, now, errors)), None);
        }
        let record = RevisionRecord {
            revision: rev.clone(),
            at: now,
            objects: loaded.catalog.objects.len(),
            pods: plan.pods.len(),
            actions: 0,
        };
        self.log.info(&format!(
            "revision {} accepted: {} objects, {} pods for node {}",
            short(&rev),
            record.objects,
            record.pods,
            config.node_name,
        ));
        if let Some(s) = &signer {
            self.log
                .info(&format!("revision {} is signed by {s}", short(&rev)));
        }
        self.state.signed_by = signer;
        self.state.node = Some(config.node_name.clone());
        self.state.last_good = Some(record.clone());
        self.state.last_attempted = Some(record);
        self.state.errors.clear();
        // Recorded before the apply, which may take a while (init
        // containers run to completion), so `berth status` says it at once.
        if let Err(e) = self.store.save(&self.state) {
            self.log
                .error(&format!("cannot save {}: {e}", self.store.path().display()));
        }
        (
            Some(PassOutcome::Applied {
                revision: rev,
                changed: true,
            }),
            Some(loaded),
        )
    }

    fn load(&self, config: &NodeConfig, mirror: &Mirror, rev: &str) -> Result<Loaded, String> {
        let revision =
            Revision::parse(rev).ok_or_else(|| format!("state names a bad revision {rev:?}"))?;
        let files = mirror
            .read_manifests(revision, &config.path)
            .map_err(|e| e.to_string())?;
        Ok(Loaded {
            revision: rev.to_string(),
            catalog: berth_manifest::load_sources(files),
        })
    }

    fn node_info(&self, config: &NodeConfig) -> NodeInfo {
        let mut node = NodeInfo::new(
            &config.node_name,
            config.labels.clone(),
            self.paths.node_memory_bytes,
            self.paths.node_cpu_milli,
        );
        node.netns_dir = self
            .network
            .as_ref()
            .map(|n| n.netns_dir().display().to_string());
        node.volumes.host_path_prefixes = config.host_path_prefixes.clone();
        node.allow_privileged = config.allow_privileged;
        if let Some(rt) = &self.runtime {
            node.containers_dir = rt.containers_dir.clone();
            if let Ok(v) = rt.systemd.version() {
                node.systemd_version = v;
            }
        }
        node
    }

    fn image_catalog(&self) -> ImageCatalog {
        self.runtime
            .as_ref()
            .map(|rt| ImageCatalog::new(rt.images.catalog()))
            .unwrap_or_default()
    }

    /// observe → plan → apply for a good revision; records what failed.
    fn reconcile(&mut self, config: &NodeConfig, loaded: &Loaded) -> Result<(), String> {
        let node = self.node_info(config);
        let images = self.image_catalog();
        let Some(rt) = self.runtime.take() else {
            let plan = berth_plan::plan_node(
                &loaded.catalog,
                &node,
                &images,
                &ActualState::default(),
                &short(&loaded.revision),
            );
            self.log_actions(&plan.plan.actions);
            return Ok(());
        };
        let result = self.reconcile_on(&rt, config, loaded, &node, &images);
        self.runtime = Some(rt);
        result
    }

    fn reconcile_on(
        &mut self,
        rt: &Runtime,
        config: &NodeConfig,
        loaded: &Loaded,
        node: &NodeInfo,
        images: &ImageCatalog,
    ) -> Result<(), String> {
        let observed =
            observe(rt.systemd.as_ref()).map_err(|e| format!("cannot observe units: {e}"))?;
        let plan = berth_plan::plan_node(
            &loaded.catalog,
            node,
            images,
            &observed.actual,
            &short(&loaded.revision),
        );
        let not_admitted: Vec<NotAdmittedRecord> = plan
            .not_admitted
            .iter()
            .map(|n| NotAdmittedRecord {
                pod: n.pod.to_string(),
                reason: n.reason.clone(),
            })
            .collect();
        if not_admitted != self.state.not_admitted {
            for n in &not_admitted {
                self.log
                    .warn(&format!("pod {} is not admitted: {}", n.pod, n.reason));
            }
        }
        self.state.not_admitted = not_admitted;
        let mut plan_errors: Vec<String> = plan
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(ToString::to_string)
            .collect();
        plan_errors.sort();
        plan_errors.dedup();
        if plan_errors != self.state.plan_errors {
            for e in &plan_errors {
                self.log.error(e);
            }
        }
        self.state.plan_errors = plan_errors;
        self.check_boot();
        let now = now_secs();
        let mut plan = plan;
        let classified = drift::classify(
            std::mem::take(&mut plan.plan.actions),
            &plan.pods,
            &loaded.catalog,
            &self.state.applied,
            &config.drift,
            now,
        );
        plan.plan.actions = classified.actions;
        let starting = images::starting(&plan);
        let waits = self
            .images
            .ensure(&config.images, rt, &plan.pods, &starting, &self.log);
        let mut blocked = Vec::new();
        for (reason, pods) in waits {
            blocked.extend(block_pods(&mut plan, pods, reason, image_of));
        }
        let (wired, pod_files) = self.wire_pods(config, &mut plan);
        blocked.extend(wired);
        let dirs = node.volumes.clone();
        blocked.extend(self.prepare_volumes(&loaded.catalog, &mut plan, &dirs));
        let mut report = if plan.plan.actions.is_empty() && self.state.failures.is_empty() {
            self.last_logged_plan.clear();
            berth_runtime::ApplyReport::default()
        } else {
            self.apply_plan(rt, &plan, &observed, &loaded.revision, pod_files.as_ref())
        };
        report.failed.extend(blocked);
        self.unwire_others(&plan.pods);
        if let Some(storage) = &self.storage {
            for line in storage.remove_others(&plan.pods, &dirs) {
                self.log.info(&line);
            }
        }
        let collected = self
            .images
            .collect(&config.images, rt, &plan.pods, &self.log);
        self.state.images = self.images.record(collected);
        let failed: std::collections::BTreeSet<&str> =
            report.failed.iter().map(|f| f.unit.as_str()).collect();
        // What is now as Git says, by digest: a later departure is drift.
        let digests = &classified.digests;
        self.state
            .applied
            .retain(|unit, _| digests.contains_key(unit));
        for (unit, (digest, _)) in digests {
            if !failed.contains(unit.as_str()) {
                self.state.applied.insert(unit.clone(), digest.clone());
            }
        }
        let mut outstanding = Vec::new();
        for mut item in classified.items {
            if let Some(f) = report.failed.iter().find(|f| f.unit == item.unit) {
                item.action = format!("heal failed: {:?}: {}", f.reason, f.message);
                outstanding.push(item);
            } else if item.policy == drift::Policy::Heal {
                self.log.warn(&format!(
                    "drift healed: {} {} {}: {} on the node, {} in Git",
                    item.object, item.unit, item.field, item.actual, item.desired
                ));
                self.state.healed.push(report::Healed {
                    at: now,
                    object: item.object,
                    unit: item.unit,
                    field: item.field,
                    found: item.actual,
                    restored: item.desired,
                });
            } else {
                outstanding.push(item);
            }
        }
        let excess = self.state.healed.len().saturating_sub(report::HEALED_KEPT);
        self.state.healed.drain(..excess);
        self.state.failures = report.failed;
        let pods = self.state.pod_statuses(&observed, &rt.cgroup_root);
        self.program_services(&loaded.catalog, &plan.pods, &pods, now);
        outstanding.extend(drift::standing(
            &pods,
            &self.state.failures,
            &plan.pods,
            &loaded.catalog,
            &config.drift,
            now,
        ));
        drift::carry_since(&mut outstanding, &self.state.drift);
        let was: std::collections::BTreeSet<String> =
            self.state.drift.iter().map(drift::DriftItem::key).collect();
        for item in outstanding.iter().filter(|i| !was.contains(&i.key())) {
            self.log.warn(&format!(
                "drift reported: {} {} {}: {} on the node, {} in Git",
                item.object, item.unit, item.field, item.actual, item.desired
            ));
        }
        self.drift_commit = self.drift_commit_for(config, loaded, &outstanding);
        self.state.drift = outstanding;
        self.pods = pods;
        // Read after the apply, so what it changed is not mistaken for a
        // change on the next poll.
        self.limits = Some(CgroupLimits::read(
            &rt.cgroup_root,
            observed
                .units
                .values()
                .filter(|u| u.name.starts_with("berth"))
                .map(|u| u.runtime.control_group.as_str()),
        ));
        Ok(())
    }

    fn apply_plan(
        &mut self,
        rt: &Runtime,
        plan: &berth_plan::NodePlan,
        observed: &berth_runtime::Observed,
        revision: &str,
        pod_files: Option<&network::PodFiles>,
    ) -> berth_runtime::ApplyReport {
        let summary: Vec<String> = plan
            .plan
            .actions
            .iter()
            .map(|a| format!("{} {}", a.verb.as_str(), a.unit))
            .collect();
        let repeated = summary == self.last_logged_plan;
        if !repeated {
            self.log_actions(&plan.plan.actions);
        }
        let host = Host {
            systemd: rt.systemd.as_ref(),
            images: &rt.images,
            roots: &rt.roots,
            users: &rt.users,
            pod_files,
        };
        let report = apply(&host, &plan.plan, &plan.pods, observed);
        if report.failed != self.state.failures {
            for f in &report.failed {
                self.log.error(&format!(
                    "{} {}: {:?}: {}",
                    f.verb, f.unit, f.reason, f.message
                ));
            }
        }
        for c in &report.cleaned {
            self.log.info(&format!("cleaned up {c}"));
        }
        if !plan.plan.actions.is_empty() && !repeated {
            self.log.info(&format!(
                "revision {}: {} actions applied, {} failed",
                short(revision),
                report.done.len(),
                report.failed.len()
            ));
        }
        if let Some(g) = self.state.last_good.as_mut() {
            g.actions = plan.plan.actions.len();
        }
        self.last_logged_plan = summary;
        report
    }

    /// Prepares the node's network and wires every pod that has its own.
    /// Pods that could not be wired lose their start actions (a container
    /// must not start outside its namespace) and come back as failures.
    fn wire_pods(
        &mut self,
        config: &NodeConfig,
        plan: &mut berth_plan::NodePlan,
    ) -> (Vec<berth_runtime::ApplyFailure>, Option<network::PodFiles>) {
        let Some(net) = self.network.as_mut() else {
            return (Vec::new(), None);
        };
        let wired = match net.prepare_node(&config.network) {
            Ok(notes) => {
                for n in notes {
                    self.log.warn(&n);
                }
                self.state.network.error = None;
                net.wire(&plan.pods)
            }
            Err(e) => {
                if self.state.network.error.as_deref() != Some(e.as_str()) {
                    self.log.error(&format!("pod network: {e}"));
                }
                self.state.network.error = Some(e.clone());
                plan.pods
                    .iter()
                    .filter(|p| !p.host_network)
                    .map(|p| {
                        (
                            p.id.key(),
                            network::Wired::Failed(format!(
                                "the node's pod network is not ready: {e}"
                            )),
                        )
                    })
                    .collect()
            }
        };
        self.state.network.pod_ips = plan
            .pods
            .iter()
            .filter(|p| !p.host_network)
            .filter_map(|p| Some((p.id.to_string(), net.pod_ip(&p.id.key())?.to_string())))
            .collect();
        let failed = wired
            .into_iter()
            .filter_map(|(key, w)| match w {
                network::Wired::Failed(message) => Some((key, message)),
                network::Wired::Ip(_) => None,
            })
            .collect();
        let netns_dir = net.netns_dir().display().to_string();
        let blocked = block_pods(
            plan,
            failed,
            berth_runtime::FailureReason::FailedCreatePodSandBox,
            |pod| format!("{netns_dir}/{}", pod.id.key()),
        );
        (blocked, Some(net.pod_files(&plan.pods)))
    }

    /// Binds claims, publishes their volumes and makes every pod's volumes
    /// ready. Pods whose volumes are not ready lose their start actions and
    /// show `FailedMount` with the reason.
    fn prepare_volumes(
        &mut self,
        catalog: &berth_manifest::Catalog,
        plan: &mut berth_plan::NodePlan,
        dirs: &berth_plan::volumes::VolumeDirs,
    ) -> Vec<berth_runtime::ApplyFailure> {
        let with_volumes = plan.pods.iter().any(|p| !p.volumes.is_empty());
        let Some(storage) = self.storage.as_mut() else {
            if !with_volumes {
                return Vec::new();
            }
            let unready = plan
                .pods
                .iter()
                .filter(|p| !p.volumes.is_empty())
                .map(|p| {
                    (
                        p.id.key(),
                        "this node keeps no volumes (the agent runs without storage)".to_string(),
                    )
                })
                .collect();
            return block_pods(
                plan,
                unready,
                berth_runtime::FailureReason::FailedMount,
                volumes_of,
            );
        };
        let (record, lines, remounted) = storage.reconcile(catalog, &plan.pods, dirs);
        for line in lines {
            self.log.info(&line);
        }
        for r in remounted {
            self.log.warn(&format!(
                "drift healed: the volume of claim {} was unmounted from {} outside Berth; mounted again",
                r.claim,
                r.path.display()
            ));
            self.state.healed.push(report::Healed {
                at: now_secs(),
                object: format!("PersistentVolumeClaim/{}", r.claim),
                unit: r.path.display().to_string(),
                field: "mount".into(),
                found: "not mounted".into(),
                restored: "the claim's volume".into(),
            });
            let excess = self.state.healed.len().saturating_sub(report::HEALED_KEPT);
            self.state.healed.drain(..excess);
        }
        let blocked = storage.prepare_pods(&plan.pods, dirs);
        for p in &record.problems {
            if !self.state.storage.problems.contains(p) {
                self.log.error(&format!("storage: {p}"));
            }
        }
        self.state.storage = record;
        block_pods(
            plan,
            blocked,
            berth_runtime::FailureReason::FailedMount,
            volumes_of,
        )
    }

    /// Removes the network of pods Git no longer wants (their containers
    /// stopped in this pass's apply) and of anything a crash left behind.
    fn unwire_others(&mut self, pods: &[berth_plan::DesiredPod]) {
        let Some(net) = self.network.as_mut() else {
            return;
        };
        let keep: std::collections::BTreeSet<String> = pods
            .iter()
            .filter(|p| !p.host_network)
            .map(|p| p.id.key())
            .collect();
        for removed in net.unwire_others(&keep) {
            self.log.info(&format!("pod network: removed {removed}"));
        }
    }

    /// Gives pod statuses their IPs and programs Services over the pods
    /// that are ready. A table edited or deleted by hand is put back and
    /// recorded as healed drift.
    fn program_services(
        &mut self,
        catalog: &berth_manifest::Catalog,
        desired: &[berth_plan::DesiredPod],
        pods: &[berth_runtime::status::PodStatus],
        now: u64,
    ) {
        let Some(net) = self.network.as_mut() else {
            return;
        };
        // Endpoints follow readiness (no probes yet: every container running).
        let ready: std::collections::BTreeMap<String, std::net::Ipv4Addr> = pods
            .iter()
            .filter(|p| {
                p.conditions
                    .iter()
                    .any(|c| c.kind == "Ready" && c.status == "True")
            })
            .filter_map(|p| {
                let ip = p.pod_ip.as_deref()?.parse().ok()?;
                Some((format!("{}_{}", p.namespace, p.name), ip))
            })
            .collect();
        if self.state.network.error.is_some() {
            return;
        }
        match net.program_services(catalog, desired, &ready) {
            Ok(drifted) => {
                if let Some(how) = drifted {
                    self.log.warn(&format!(
                        "drift healed: nftables table ip {} was {how} outside Berth; restored",
                        berth_net::nft::TABLE
                    ));
                    self.state.healed.push(report::Healed {
                        at: now,
                        object: "Services".into(),
                        unit: format!("nftables table ip {}", berth_net::nft::TABLE),
                        field: "rules".into(),
                        found: how,
                        restored: "the rules for every Service".into(),
                    });
                    let excess = self.state.healed.len().saturating_sub(report::HEALED_KEPT);
                    self.state.healed.drain(..excess);
                }
                if net.service_problems != self.state.network.problems {
                    for p in &net.service_problems {
                        self.log.warn(p);
                    }
                }
                self.state.network.problems = net.service_problems.clone();
                self.state.network.services = net.service_records();
            }
            Err(e) => {
                if self.state.network.error.as_deref() != Some(e.as_str()) {
                    self.log.error(&format!("Services: {e}"));
                }
                self.state.network.error = Some(format!("Services: {e}"));
            }
        }
    }

    /// Whether a resource file of a Berth cgroup differs from what the last
    /// observation read: a few small file reads per unit, where observing
    /// is two D-Bus calls per unit.
    fn limits_changed(&self) -> bool {
        match (&self.limits, &self.runtime) {
            (Some(before), Some(rt)) => before.reread(&rt.cgroup_root) != *before,
            _ => false,
        }
    }

    /// Transient units do not outlive a boot: digests recorded in an
    /// earlier boot say nothing about this one.
    fn check_boot(&mut self) {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_string())
            .ok();
        if boot != self.state.boot_id {
            self.state.applied.clear();
            self.state.boot_id = boot;
        }
    }

    /// The drift branch's commit: DRIFT.md and the manifest edits that
    /// adopt what can be adopted, on top of the applied revision.
    fn drift_commit_for(
        &self,
        config: &NodeConfig,
        loaded: &Loaded,
        items: &[drift::DriftItem],
    ) -> Option<DriftCommit> {
        if items.is_empty() {
            return None;
        }
        let (edits, notes) = drift::adopting_edits(items, &loaded.catalog, &config.path);
        let text = drift::report(
            &config.node_name,
            &short(&loaded.revision),
            items,
            &notes,
            &edits,
        );
        let mut files: Vec<berth_git::FileChange> = edits
            .iter()
            .map(|e| berth_git::FileChange {
                path: e.path.clone(),
                content: Some(e.text.clone().into_bytes()),
            })
            .collect();
        files.push(berth_git::FileChange {
            path: format!("drift/{}/DRIFT.md", config.node_name),
            content: Some(text.into_bytes()),
        });
        let objects: std::collections::BTreeSet<&str> =
            items.iter().map(|i| i.object.as_str()).collect();
        let mut message = format!(
            "drift on {}: {} field{} on {} object{}\n\n",
            config.node_name,
            items.len(),
            if items.len() == 1 { "" } else { "s" },
            objects.len(),
            if objects.len() == 1 { "" } else { "s" },
        );
        for item in items.iter().take(10) {
            message.push_str(&format!(
                "- {} {}: {} → {}\n",
                item.object, item.field, item.desired, item.actual
            ));
        }
        if items.len() > 10 {
            message.push_str(&format!(
                "- … and {} more (see DRIFT.md)\n",
                items.len() - 10
            ));
        }
        Some(DriftCommit {
            base: loaded.revision.clone(),
            files,
            message,
        })
    }

    /// Hands this pass's status (and drift) to the publishing thread.
    fn send_report(&mut self, config: &NodeConfig) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        self.state.publish = publisher.record();
        if !config.publish {
            return;
        }
        let doc = report::build(&report::Inputs {
            node: &config.node_name,
            labels: &config.labels,
            cpu_milli: self.paths.node_cpu_milli,
            memory_bytes: self.paths.node_memory_bytes,
            state_dir: &self.paths.state_dir,
            applied: self.state.last_good.as_ref(),
            attempted: self.state.last_attempted.as_ref(),
            signed_by: self.state.signed_by.as_deref(),
            errors: &self.state.errors,
            pods: &self.pods,
            policy: config.drift.policy,
            drift: &self.state.drift,
            healed: &self.state.healed,
            network: &self.state.network,
            storage: &self.state.storage,
            images: &self.state.images,
            now: now_secs(),
        });
        publisher.send(Outgoing {
            url: config.remote.url.clone(),
            credentials: config.credentials.clone(),
            node: config.node_name.clone(),
            status: doc,
            drift: self.drift_commit.clone(),
            heartbeat: config.heartbeat,
            history: config.history,
            push_options: config.push_options.clone(),
        });
    }

    fn log_actions(&self, actions: &[berth_plan::Action]) {
        for action in actions.iter().take(MAX_LOGGED_ACTIONS) {
            self.log.info(&format!(
                "plan: {} {}: {}",
                action.verb.as_str(),
                action.unit,
                action.reason
            ));
        }
        if actions.len() > MAX_LOGGED_ACTIONS {
            self.log.info(&format!(
                "plan: ... and {} more actions",
                actions.len() - MAX_LOGGED_ACTIONS
            ));
        }
    }

    fn reject(&mut self, rev: &str, now: u64, errors: Vec<String>) -> PassOutcome {
        let keeping = self.state.last_good.as_ref().map(|g| g.revision.clone());
        self.log.error(&format!(
            "revision {} rejected ({} errors); keeping {}",
            short(rev),
            errors.len(),
            keeping.as_deref().map_or("nothing yet".to_string(), short)
        ));
        for e in &errors {
            self.log.error(e);
        }
        self.state.last_attempted = Some(RevisionRecord {
            revision: rev.to_string(),
            at: now,
            objects: 0,
            pods: 0,
            actions: 0,
        });
        self.state.errors = errors;
        let _ = self.store.save(&self.state);
        PassOutcome::Rejected {
            revision: rev.to_string(),
            keeping,
        }
    }

    /// Runs passes until told to stop: after the (jittered) poll interval,
    /// at once on [`Wake::SyncNow`], shortly after [`Wake::UnitChanged`]
    /// (without fetching), and with a growing backoff after a failed pass.
    /// Pings the watchdog while waiting. Units keep running when it returns.
    pub fn run(&mut self, notifier: &Notifier, wake: &Receiver<Wake>) {
        notifier.ready("starting");
        self.log.info("agent started");
        if let Err(e) = self.publish() {
            self.log
                .error(&format!("cannot start publishing status to Git: {e}"));
        }
        // After readiness: an import (seconds on first boot) is the loop's
        // work, not start-up's.
        self.import_images();
        let mut backoff = FIRST_BACKOFF;
        let mut fetch = true;
        loop {
            let (outcome, config) = self.pass(fetch);
            let poll = config.as_ref().map_or(FIRST_BACKOFF, |c| c.poll_interval);
            let wait = match &outcome {
                PassOutcome::Applied { revision, .. } => {
                    notifier.status(&format!("running revision {}", short(revision)));
                    backoff = FIRST_BACKOFF;
                    poll
                }
                PassOutcome::Rejected { revision, keeping } => {
                    notifier.status(&format!(
                        "revision {} rejected; running {}",
                        short(revision),
                        keeping.as_deref().map_or("nothing".to_string(), short)
                    ));
                    backoff = FIRST_BACKOFF;
                    poll
                }
                PassOutcome::Failed { reason } => {
                    notifier.status(&format!("retrying in {}s: {reason}", backoff.as_secs()));
                    let w = backoff;
                    backoff = (backoff * 2)
                        .min(MAX_BACKOFF)
                        .min(poll.max(FIRST_BACKOFF) * 4);
                    w
                }
            };
            match wait_for_wake(jitter(wait), notifier, wake) {
                None => fetch = true,
                Some(Wake::SyncNow) => fetch = true,
                Some(Wake::UnitChanged) => fetch = false,
                Some(Wake::Shutdown) => {
                    notifier.stopping();
                    self.stop_publishing();
                    self.log.info("agent stopping; pods keep running");
                    return;
                }
            }
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Waits for the timer or a wake-up, pinging the watchdog. Unit changes are
/// debounced; a shutdown or sync request wins over them.
fn wait_for_wake(total: Duration, notifier: &Notifier, wake: &Receiver<Wake>) -> Option<Wake> {
    let end = Instant::now() + total;
    loop {
        notifier.watchdog();
        let now = Instant::now();
        if now >= end {
            return None;
        }
        match wake.recv_timeout((end - now).min(notifier.ping_interval())) {
            Ok(Wake::UnitChanged) => {
                let settle = Instant::now() + UNIT_CHANGE_DEBOUNCE;
                let mut result = Wake::UnitChanged;
                while let Some(left) = settle.checked_duration_since(Instant::now()) {
                    match wake.recv_timeout(left) {
                        Ok(Wake::UnitChanged) => {}
                        Ok(other) => {
                            result = other;
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                return Some(result);
            }
            Ok(other) => return Some(other),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep((end - Instant::now().min(end)).min(notifier.ping_interval()));
            }
        }
    }
}

fn short(rev: &str) -> String {
    rev.chars().take(12).collect()
}

/// ±10%, from the clock's nanoseconds: enough to keep a fleet from polling
/// in lockstep, without a random number crate.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let factor = 0.9 + f64::from(nanos % 1000) / 1000.0 * 0.2;
    d.mul_f64(factor)
}

/// Removes the start actions of pods that cannot start, and says why:
/// `reasons` maps a pod's key to the message, `unit` names what failed.
fn block_pods(
    plan: &mut berth_plan::NodePlan,
    reasons: std::collections::BTreeMap<String, String>,
    reason: berth_runtime::FailureReason,
    unit: impl Fn(&berth_plan::DesiredPod) -> String,
) -> Vec<berth_runtime::ApplyFailure> {
    let mut blocked = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for pod in &plan.pods {
        if let Some(message) = reasons.get(&pod.id.key()) {
            ids.insert(pod.id.to_string());
            blocked.push(berth_runtime::ApplyFailure {
                unit: unit(pod),
                pod: Some(pod.id.to_string()),
                verb: "start".into(),
                reason,
                message: message.clone(),
            });
        }
    }
    plan.plan.actions.retain(|a| {
        !(matches!(a.verb, berth_plan::Verb::Start | berth_plan::Verb::Restart)
            && a.pod.as_ref().is_some_and(|p| ids.contains(&p.to_string())))
    });
    blocked
}

/// What a pod waiting for its image failed at, for its status.
fn image_of(pod: &berth_plan::DesiredPod) -> String {
    pod.units()
        .next()
        .map_or_else(|| format!("image of {}", pod.id), |u| u.name.to_string())
}

/// What a pod whose volumes are not ready failed at, for its status.
fn volumes_of(pod: &berth_plan::DesiredPod) -> String {
    format!("volumes of {}", pod.id)
}

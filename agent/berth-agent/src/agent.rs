//! The agent's loop state and its pass: config → fetch → intake →
//! reconcile (`reconcile.rs`) → report, and the loop that runs passes on
//! the poll timer, "sync now" and unit changes, with back-off after a
//! failed one.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use berth_git::{Mirror, Revision};
use berth_plan::NodeInfo;

use crate::clock::{now_secs, short};
use crate::config::{self, NodeConfig};
use crate::host::{AgentPaths, Runtime};
use crate::limits::CgroupLimits;
use crate::log::Log;
use crate::notify::Notifier;
use crate::publisher::{self, DriftCommit, Outgoing, Publisher};
use crate::state::{AgentState, StateStore};
use crate::wake::{Wake, jitter, wait_for_wake};
use crate::{images, network, report, storage};

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
    pub(crate) paths: AgentPaths,
    pub(crate) store: StateStore,
    pub(crate) state: AgentState,
    pub(crate) log: Log,
    pub(crate) runtime: Option<Runtime>,
    /// Opened on the first pass that needs it and kept: opening cleans up
    /// what a crashed run left behind, which is needed once per process.
    pub(crate) mirror: Option<Mirror>,
    /// The last plan logged (verb and unit of each action): a plan that
    /// repeats (a pod waiting for its image) is logged once.
    pub(crate) last_logged_plan: Vec<String>,
    /// The revision last reconciled without error, and when.
    pub(crate) reconciled: Option<(String, Instant)>,
    /// Pushes status and drift, on its own thread (see [`Agent::publish`]).
    pub(crate) publisher: Option<Publisher>,
    /// Pod statuses from the last observation, for the status branch.
    pub(crate) pods: Vec<berth_runtime::status::PodStatus>,
    /// The drift branch's commit from the last reconcile, if anything drifted.
    pub(crate) drift_commit: Option<DriftCommit>,
    /// The resource files of every observed Berth cgroup as last read: an
    /// idle poll reads them again instead of observing every unit over
    /// D-Bus, and observes only when one changed (`systemctl set-property`
    /// writes them, and PID 1 signals nothing for it).
    pub(crate) limits: Option<CgroupLimits>,
    /// The pod network, when this node runs one (see [`Agent::with_network`]).
    pub(crate) network: Option<network::PodNetwork>,
    /// Claims and pod volumes, when this node keeps them (see [`Agent::with_storage`]).
    pub(crate) storage: Option<storage::Storage>,
    /// Pulls and collection of images.
    pub(crate) images: images::Images,
    /// `pod|reason` of every pod waiting in the last pass, so a wait is
    /// logged when it begins, not on every pass.
    pub(crate) waiting: std::collections::BTreeSet<String>,
    /// A fetch has succeeded since the agent started.
    pub(crate) fetched_once: bool,
    /// Called as a fetch or repack makes progress (see [`Agent::set_git_keepalive`]).
    pub(crate) git_alive: Option<berth_git::Liveness>,
    /// The line saying the agent waits for the network was logged.
    pub(crate) waiting_for_network: bool,
    /// Pods with local storage limits, as the last pass planned them:
    /// measured every [`STORAGE_CHECK`] between passes.
    pub(crate) storage_watch: Vec<berth_plan::DesiredPod>,
    /// Runs the containers' probes (see [`Agent::with_prober`]).
    pub(crate) prober: Option<crate::prober::Prober>,
    /// The berth binary, whose `exec-enter` runs exec probes and hooks.
    pub(crate) berth_exe: Option<std::path::PathBuf>,
    /// What the last pass programmed Services from: a readiness change
    /// between passes reprograms endpoints from it at once.
    pub(crate) services_input: Option<crate::reconcile::ServicesInput>,
    /// Catalogs of earlier revisions whose Deployment pods still run.
    pub(crate) older: std::collections::BTreeMap<String, berth_manifest::Catalog>,
    /// A pass is wanted at once (a rollback was decided).
    pub(crate) pass_again: bool,
    /// When each phase of the pass under way ended: the applied line says
    /// where a pass's time went.
    pub(crate) pass_marks: Vec<(&'static str, std::time::Instant)>,
    /// When a rollout wants a pass although nothing else changes (a pod
    /// reaching `minReadySeconds`, a progress deadline), seconds since the epoch.
    pub(crate) rollout_wake: Option<u64>,
    /// The node's event history (`events.json`), and whether it changed
    /// since it was last written.
    pub(crate) events: crate::events::EventLog,
    pub(crate) event_store: crate::events::EventStore,
    pub(crate) events_dirty: bool,
    /// Node pressure between passes: soft thresholds' clocks, the signals
    /// under pressure, the thresholds in force.
    pub(crate) pressure: crate::pressure::PressureWatch,
    pub(crate) eviction: berth_plan::pressure::Thresholds,
    /// What the metrics endpoint serves, and the endpoint itself when the
    /// config asks for one.
    pub(crate) exporter: crate::metrics::Exporter,
    pub(crate) metrics: crate::metrics::Endpoint,
    /// Each container unit's cgroup and image, from the last reconcile.
    pub(crate) unit_facts: std::collections::BTreeMap<String, (String, String)>,
    /// OS updates declared by a NodeImage: staging, and the reboot.
    pub(crate) os_updates: crate::osupdate::OsUpdates,
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first retry comes quickly (the network may still be coming up at
/// boot); later ones back off to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub(crate) const MAX_LOGGED_ACTIONS: usize = 20;
/// Each fetch that brings something adds a pack to the mirror; beyond this
/// many they are repacked into one.
const MAX_PACKS: usize = 16;
/// How often units are observed and healed when nothing signalled a change,
/// like the kubelet's periodic sync.
const RESYNC: Duration = Duration::from_secs(60);
/// How often the local storage of pods with limits is measured between
/// passes: the kubelet's housekeeping period. The root reserve of `/var`
/// (see README, "Local storage") covers what a pod writes meanwhile.
const STORAGE_CHECK: Duration = Duration::from_secs(10);

/// The revision a pass works on, loaded.
pub(crate) struct Loaded {
    pub(crate) revision: String,
    pub(crate) catalog: berth_manifest::Catalog,
    /// Who signed it, when the node requires signatures.
    pub(crate) signer: Option<String>,
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
        let event_store = crate::events::EventStore::new(&paths.state_dir);
        let events = event_store.load();
        let exporter = crate::metrics::Exporter::new(
            runtime
                .as_ref()
                .map_or(std::path::Path::new("/sys/fs/cgroup"), |r| &r.cgroup_root),
            &paths.state_dir,
        );
        // The ESP is the directory above the config's (`/efi/berth/config.yaml`).
        let esp = paths
            .config
            .esp_file
            .parent()
            .and_then(std::path::Path::parent)
            .map(std::path::Path::to_path_buf);
        let os_updates =
            crate::osupdate::OsUpdates::new(esp, &paths.config.kernel_cmdline, &paths.state_dir);
        Ok(Self {
            os_updates,
            paths,
            store,
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
            waiting: std::collections::BTreeSet::new(),
            fetched_once: false,
            git_alive: None,
            waiting_for_network: false,
            storage_watch: Vec::new(),
            prober: None,
            berth_exe: None,
            services_input: None,
            older: std::collections::BTreeMap::new(),
            pass_again: false,
            pass_marks: Vec::new(),
            rollout_wake: None,
            events,
            event_store,
            events_dirty: false,
            pressure: crate::pressure::PressureWatch::resumed(state.pressured.clone()),
            eviction: berth_plan::pressure::Thresholds::default(),
            exporter,
            metrics: crate::metrics::Endpoint::default(),
            unit_facts: std::collections::BTreeMap::new(),
            state,
        })
    }

    /// Runs the containers' probes on a thread of their own, and their
    /// `preStop` hooks before they are ended; `exe` is the berth binary,
    /// whose `exec-enter` runs exec probes and hooks in containers.
    /// Results the last run of the agent kept are resumed.
    pub fn with_prober(
        mut self,
        exe: std::path::PathBuf,
        waker: std::sync::mpsc::Sender<Wake>,
    ) -> std::io::Result<Self> {
        let prober = crate::prober::Prober::start(exe.clone(), waker)?;
        prober.resume(&self.state.health);
        self.prober = Some(prober);
        self.berth_exe = Some(exe);
        Ok(self)
    }

    /// A finished image pull wakes [`Agent::run`] through this sender.
    pub fn set_waker(&mut self, waker: std::sync::mpsc::Sender<Wake>) {
        self.os_updates.set_waker(waker.clone());
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
                self.paths.proc_net.clone(),
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
    /// What a fetch or repack calls as it moves on: the agent's watchdog
    /// ping, so a slow transfer that makes progress (a first fetch of a big
    /// repository) is never taken for a hung loop, while a stalled one ends
    /// at the stall timeout ([`berth_git::STALL_TIMEOUT`]), well inside it.
    pub fn set_git_keepalive(&mut self, alive: berth_git::Liveness) {
        self.git_alive = Some(alive);
    }

    pub fn pass(&mut self, fetch: bool) -> (PassOutcome, Option<NodeConfig>) {
        let started = Instant::now();
        let (outcome, config) = self.pass_timed(fetch);
        let kind = match outcome {
            PassOutcome::Applied { .. } => "applied",
            PassOutcome::Rejected { .. } => "rejected",
            PassOutcome::Failed { .. } => "failed",
        };
        self.exporter.figures.pass(kind, started.elapsed());
        (outcome, config)
    }

    fn pass_timed(&mut self, fetch: bool) -> (PassOutcome, Option<NodeConfig>) {
        let config = match config::load(&self.paths.config) {
            Ok(c) => c,
            Err(e) => {
                self.log.error(&format!("configuration error: {e}"));
                return (self.failed(format!("configuration error: {e}")), None);
            }
        };
        // Pods are refused on the endpoint's port before it listens.
        if let Some(net) = self.network.as_mut()
            && let Err(e) = net.refuse_pods(config.metrics.closed_to_pods().into_iter().collect())
        {
            self.log.error(&format!(
                "cannot refuse pods on the metrics port: {e}; not serving metrics"
            ));
            self.metrics.server = None;
            return (self.failed(e), Some(config));
        }
        match self.metrics.follow(&config.metrics, &self.exporter) {
            Some(Ok(line)) => self.log.info(&line),
            Some(Err(line)) => self.log.error(&line),
            None => {}
        }
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
        if let Some(alive) = &self.git_alive {
            mirror.set_liveness(alive.clone());
        }
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
        self.flush_events();
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
        // A new revision, verified and loaded: planned in this pass, and
        // accepted or rejected by that plan.
        let mut candidate = None;
        if fetch {
            let fetched = mirror.fetch(&config.remote, config.credentials.as_ref());
            self.exporter.figures.fetch(fetched.is_ok());
            match fetched {
                Ok(revision) => {
                    self.fetched_once = true;
                    self.state.fetched_at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs());
                    self.waiting_for_network = false;
                    self.health_checkpoint(config);
                    (outcome, candidate) = self.intake(config, mirror, revision);
                }
                Err(e) => {
                    let keeping = self
                        .state
                        .last_good
                        .as_ref()
                        .map_or("nothing yet".to_string(), |g| short(&g.revision));
                    if !self.fetched_once && !has_default_route(&self.paths.proc_net) {
                        // At boot the agent is up before the network: one
                        // line says so, not a failure at every retry.
                        if !self.waiting_for_network {
                            self.log.info(&format!(
                                "waiting for the network to reach {} ({e}); keeping {keeping}",
                                config.remote.url
                            ));
                            self.waiting_for_network = true;
                        }
                        fetch_error = Some(format!("waiting for the network: {e}"));
                    } else {
                        self.log.error(&format!("{e}; keeping {keeping}; retrying"));
                        fetch_error = Some(e.to_string());
                    }
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
        let due = candidate.is_some()
            || !fetch
            || good != self.reconciled.as_ref().map(|(r, _)| r.clone())
            || !self.state.failures.is_empty()
            || self
                .reconciled
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() >= RESYNC)
            || self.limits_changed()
            // A rollout under way: every poll takes its next step.
            || self.state.deployments.iter().any(|d| !d.settled())
            || self
                .network
                .as_mut()
                .is_some_and(network::PodNetwork::table_drifted);
        let reconciled = (due && (candidate.is_some() || good.is_some()))
            .then(|| self.reconcile(config, mirror, candidate, &mut outcome));
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
        // A pass that fetched and applied without errors clears the last
        // one's (a fetch that failed while the server was away is not
        // reported once it is back; a pass that did not fetch keeps it).
        if fetch && matches!(outcome, Some(PassOutcome::Applied { .. })) {
            self.state.errors.clear();
        }
        let _ = self.store.save(&self.state);
        outcome.unwrap_or_else(|| PassOutcome::Failed {
            reason: "no revision fetched yet".into(),
        })
    }

    pub(crate) fn node_info(&self, config: &NodeConfig) -> NodeInfo {
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
        node.pod_security = config.pod_security;
        node.drift = config.drift.clone();
        node.node_ports = berth_plan::services::NodePortRange {
            first: config.network.node_ports.0,
            last: config.network.node_ports.1,
        };
        if let Some(rt) = &self.runtime {
            node.containers_dir = rt.containers_dir.clone();
            if let Ok(v) = rt.systemd.version() {
                node.systemd_version = v;
            }
        }
        node
    }

    /// The configs of the images in the store, for the planner.
    pub(crate) fn image_configs(&self) -> Vec<berth_plan::ImageConfig> {
        self.runtime
            .as_ref()
            .map(|rt| rt.images.catalog())
            .unwrap_or_default()
    }

    /// Hands this pass's status (and drift) to the publishing thread.
    pub(crate) fn send_report(&mut self, config: &NodeConfig) {
        if let Some(publisher) = &self.publisher {
            self.state.publish = publisher.record();
        }
        self.exporter.update(crate::metrics::snapshot(
            &config.node_name,
            &self.state,
            &self.pods,
            &self.unit_facts,
        ));
        let Some(publisher) = &self.publisher else {
            return;
        };
        if !config.publish {
            return;
        }
        let os = self.os_updates.status();
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
            healthy: self.state.last_healthy.as_ref(),
            rolled_back: self.state.rolled_back.as_ref(),
            deployments: &self.state.deployments,
            events: &self.events,
            eviction: &config.eviction,
            pressured: &self.state.pressured,
            os: os.as_ref(),
            now: now_secs(),
        });
        publisher.send(Outgoing {
            url: config.status_url.clone(),
            credentials: config.status_credentials.clone(),
            node: config.node_name.clone(),
            status: doc,
            drift: self.drift_commit.clone(),
            heartbeat: config.heartbeat,
            history: config.history,
            push_options: config.push_options.clone(),
        });
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
            let poll_interval = config.as_ref().map(|c| c.poll_interval);
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
                    backoff = next_backoff(backoff, poll_interval);
                    w
                }
            };
            // Probe results between passes do not move the next poll.
            let deadline = Instant::now() + jitter(wait);
            // A rollout's own moments come before it.
            let rollout = if std::mem::take(&mut self.pass_again) {
                Some(Instant::now())
            } else {
                self.rollout_wake
                    .map(|at| Instant::now() + Duration::from_secs(at.saturating_sub(now_secs())))
            }
            .filter(|r| *r < deadline);
            let woke = loop {
                let end = rollout.unwrap_or(deadline);
                let left = end.saturating_duration_since(Instant::now());
                if rollout.is_some() && left.is_zero() {
                    break Some(Wake::UnitChanged);
                }
                match self.wait_watching_storage(left, notifier, wake) {
                    None if rollout.is_some() => break Some(Wake::UnitChanged),
                    Some(Wake::Health) => {
                        if self.refresh_health(config.as_ref()) {
                            break Some(Wake::UnitChanged);
                        }
                    }
                    other => break other,
                }
            };
            match woke {
                None => fetch = true,
                Some(Wake::SyncNow) => fetch = true,
                Some(Wake::UnitChanged | Wake::Health) => fetch = false,
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

impl Agent {
    /// [`wait_for_wake`], measuring the pods with storage limits every
    /// [`STORAGE_CHECK`] meanwhile: one over a limit ends the wait as a
    /// unit change would (a pass without fetching, which evicts it).
    fn wait_watching_storage(
        &mut self,
        total: Duration,
        notifier: &Notifier,
        wake: &Receiver<Wake>,
    ) -> Option<Wake> {
        let end = Instant::now() + total;
        let mut storage_at = Instant::now() + STORAGE_CHECK;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            // Memory is looked at every second, every 250 ms near a
            // threshold; storage limits every STORAGE_CHECK (measuring a
            // pod's disk costs more).
            let step = self.pressure.period();
            if left <= step {
                return wait_for_wake(left, notifier, wake);
            }
            if let Some(woke) = wait_for_wake(step, notifier, wake) {
                return Some(woke);
            }
            if self.runtime.is_some() {
                let signals = crate::pressure::measure(&self.paths.state_dir);
                let (wake_now, why) = self.pressure.wants_pass(&self.eviction, &signals);
                if let Some(why) = why {
                    self.log.warn(&why);
                }
                if wake_now {
                    return Some(Wake::UnitChanged);
                }
            }
            if Instant::now() >= storage_at {
                storage_at = Instant::now() + STORAGE_CHECK;
                if !self.storage_watch.is_empty() && self.storage_over_limits() {
                    return Some(Wake::UnitChanged);
                }
            }
        }
    }

    /// Whether a watched pod's local storage is over one of its limits.
    fn storage_over_limits(&self) -> bool {
        let Some(rt) = &self.runtime else {
            return false;
        };
        self.storage_watch.iter().any(|pod| {
            let usage = berth_runtime::usage::pod_usage(&rt.roots, pod);
            berth_plan::ephemeral::exceeded(&pod.ephemeral, &usage).is_some()
        })
    }
}

/// The wait after `current` when a pass failed again: doubling, up to four
/// poll intervals; without a config there is no interval, and a node left
/// unconfigured says so less and less often, up to every five minutes.
fn next_backoff(current: Duration, poll_interval: Option<Duration>) -> Duration {
    let ceiling = poll_interval
        .map_or(MAX_BACKOFF, |p| p.max(FIRST_BACKOFF) * 4)
        .min(MAX_BACKOFF);
    (current * 2).min(ceiling)
}

/// Whether `/proc/net/route` or `ipv6_route` holds a default route. When
/// neither can be read, the network is taken as up (errors are errors).
pub(crate) fn has_default_route(proc_net: &std::path::Path) -> bool {
    let v4 = std::fs::read_to_string(proc_net.join("route"));
    let v6 = std::fs::read_to_string(proc_net.join("ipv6_route"));
    if v4.is_err() && v6.is_err() {
        return true;
    }
    // IPv4: Iface, Destination (hex), Gateway, ...: a default route has
    // destination 00000000. IPv6: destination (32 hex digits) and its
    // prefix length first; the kernel lists the unreachable ::/0 of `lo`
    // too, so only a route through another device counts.
    let v4_default = v4.is_ok_and(|t| {
        t.lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
    });
    let v6_default = v6.is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 10
                && f[0] == "00000000000000000000000000000000"
                && f[1] == "00"
                && f[9] != "lo"
        })
    });
    v4_default || v6_default
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_four_polls_and_an_unconfigured_node_up_to_five_minutes() {
        let mut wait = FIRST_BACKOFF;
        let mut seen = Vec::new();
        for _ in 0..12 {
            wait = next_backoff(wait, None);
            seen.push(wait.as_secs());
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]);
        let poll = Some(Duration::from_secs(5));
        assert_eq!(
            next_backoff(Duration::from_secs(16), poll),
            Duration::from_secs(20)
        );
    }
}

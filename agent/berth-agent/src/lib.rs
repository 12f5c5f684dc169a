//! The node agent. One loop: read the config, fetch the branch, load and
//! validate the tree, plan, report; then wait for the next poll. A failure
//! is logged with its cause and retried with backoff; a bad commit is
//! reported once and the last good revision is kept until a new commit
//! arrives. Running pods (from later capabilities) never depend on this loop.
//!
//! Host paths are passed in ([`AgentPaths`]), so tests run it on temporary
//! directories.

pub mod config;
pub mod notify;
pub mod state;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_git::{Mirror, Revision};
use berth_plan::{ActualState, ImageCatalog, NodeInfo};

use crate::config::{ConfigSources, NodeConfig};
use crate::notify::Notifier;
use crate::state::{AgentState, RevisionRecord, StateStore};

/// Everything on the host the agent reads or writes.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub config: ConfigSources,
    /// `/var/lib/berth`: the mirror and the state file.
    pub state_dir: PathBuf,
    pub node_memory_bytes: u64,
    pub node_cpu_milli: u64,
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
    /// Config, network or mirror trouble: try again after a backoff.
    Failed { reason: String },
}

/// The agent's loop state, between passes.
#[derive(Debug)]
pub struct Agent {
    paths: AgentPaths,
    store: StateStore,
    state: AgentState,
    log: Log,
    /// Opened on the first pass that needs it and kept: opening cleans up
    /// what a crashed run left behind, which is needed once per process.
    mirror: Option<Mirror>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first retry comes quickly (the network may still be coming up at
/// boot); later ones back off to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_LOGGED_ACTIONS: usize = 20;

impl Agent {
    pub fn new(paths: AgentPaths, log: Log) -> std::io::Result<Self> {
        std::fs::create_dir_all(&paths.state_dir)?;
        let store = StateStore::new(&paths.state_dir);
        let state = store.load();
        Ok(Self {
            paths,
            store,
            state,
            log,
            mirror: None,
        })
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// One pass: config → fetch → load → validate → plan → record.
    pub fn pass(&mut self) -> (PassOutcome, Option<NodeConfig>) {
        let config = match config::load(&self.paths.config) {
            Ok(c) => c,
            Err(e) => {
                self.log.error(&format!("configuration error: {e}"));
                return (self.failed(format!("configuration error: {e}")), None);
            }
        };
        let outcome = self.fetch_and_plan(&config);
        (outcome, Some(config))
    }

    fn failed(&mut self, reason: String) -> PassOutcome {
        self.state.errors = vec![reason.clone()];
        let _ = self.store.save(&self.state);
        PassOutcome::Failed { reason }
    }

    fn fetch_and_plan(&mut self, config: &NodeConfig) -> PassOutcome {
        let mirror = match self.mirror.take() {
            Some(m) => m,
            None => match Mirror::open(&self.paths.state_dir.join("mirror.git")) {
                Ok(m) => m,
                Err(e) => {
                    self.log.error(&e.to_string());
                    return self.failed(e.to_string());
                }
            },
        };
        let outcome = self.fetch_with(config, &mirror);
        self.mirror = Some(mirror);
        outcome
    }

    fn fetch_with(&mut self, config: &NodeConfig, mirror: &Mirror) -> PassOutcome {
        let revision = match mirror.fetch(&config.remote, config.credentials.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                let keeping = self
                    .state
                    .last_good
                    .as_ref()
                    .map_or("nothing yet".to_string(), |g| short(&g.revision));
                self.log.error(&format!("{e}; keeping {keeping}; retrying"));
                return self.failed(e.to_string());
            }
        };
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
        if already_good || already_rejected {
            // Nothing new: a rejected revision waits for a new commit.
            return if already_good {
                PassOutcome::Applied {
                    revision: rev,
                    changed: false,
                }
            } else {
                PassOutcome::Rejected {
                    revision: rev,
                    keeping: self.state.last_good.as_ref().map(|g| g.revision.clone()),
                }
            };
        }
        self.log.info(&format!(
            "fetched {} branch {} at {}",
            config.remote.url,
            config.remote.branch,
            short(&rev)
        ));
        self.evaluate(config, mirror, revision)
    }

    fn evaluate(
        &mut self,
        config: &NodeConfig,
        mirror: &Mirror,
        revision: Revision,
    ) -> PassOutcome {
        let rev = revision.to_string();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let files = match mirror.read_manifests(revision, &config.path) {
            Ok(f) => f,
            Err(e) => return self.reject(&rev, now, vec![e.to_string()]),
        };
        let catalog = berth_manifest::load_sources(files);
        let node = NodeInfo::new(
            &config.node_name,
            config.labels.clone(),
            self.paths.node_memory_bytes,
            self.paths.node_cpu_milli,
        );
        let images = ImageCatalog::default();
        let plan = berth_plan::plan_node(
            &catalog,
            &node,
            &images,
            &ActualState::default(),
            &short(&rev),
        );
        let mut errors: Vec<String> = catalog
            .diagnostics
            .iter()
            .chain(&plan.diagnostics)
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        errors.sort();
        errors.dedup();
        for d in catalog
            .diagnostics
            .iter()
            .chain(&plan.diagnostics)
            .filter(|d| !d.is_error())
        {
            self.log.warn(&d.to_string());
        }
        if !errors.is_empty() {
            return self.reject(&rev, now, errors);
        }
        let record = RevisionRecord {
            revision: rev.clone(),
            at: now,
            objects: catalog.objects.len(),
            pods: plan.pods.len(),
            actions: plan.plan.actions.len(),
        };
        self.log.info(&format!(
            "revision {} accepted: {} objects, {} pods for node {}, {} actions planned",
            short(&rev),
            record.objects,
            record.pods,
            config.node_name,
            record.actions
        ));
        for action in plan.plan.actions.iter().take(MAX_LOGGED_ACTIONS) {
            self.log.info(&format!(
                "plan: {} {}: {}",
                action.verb.as_str(),
                action.unit,
                action.reason
            ));
        }
        if plan.plan.actions.len() > MAX_LOGGED_ACTIONS {
            self.log.info(&format!(
                "plan: ... and {} more actions",
                plan.plan.actions.len() - MAX_LOGGED_ACTIONS
            ));
        }
        self.state.node = Some(config.node_name.clone());
        self.state.last_good = Some(record.clone());
        self.state.last_attempted = Some(record);
        self.state.errors.clear();
        if let Err(e) = self.store.save(&self.state) {
            self.log
                .error(&format!("cannot save {}: {e}", self.store.path().display()));
        }
        PassOutcome::Applied {
            revision: rev,
            changed: true,
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

    /// Runs passes forever: the poll interval after a good or rejected pass,
    /// a growing backoff after a failed one. Pings the watchdog while waiting.
    pub fn run(&mut self, notifier: &Notifier) -> ! {
        notifier.ready("starting");
        self.log.info("agent started");
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (outcome, config) = self.pass();
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
            wait_with_watchdog(jitter(wait), notifier);
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

fn wait_with_watchdog(total: Duration, notifier: &Notifier) {
    let end = Instant::now() + total;
    loop {
        notifier.watchdog();
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(notifier.ping_interval()));
    }
}

//! Publishing runs on its own thread, so a slow, unreachable or refusing Git
//! server never holds up the reconcile loop. The loop hands over its latest
//! report; this thread commits it to local refs in an outbox repository (so nothing is
//! lost while the server is away: history keeps accumulating locally) and
//! pushes with a growing backoff. It commits the status when it changes in
//! substance and on every heartbeat, and pushes every ref again on each
//! heartbeat, which also recreates a branch someone deleted.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_git::{Credentials, FileChange, Mirror, PushUpdate, Revision};

use crate::log::Log;
use crate::report::{NodeStatusDoc, STATUS_FILE};
pub use crate::state::PublishRecord;

/// Local refs the commits are made on, before they are pushed.
pub const STATUS_REF: &str = "refs/berth/out/status";
pub const DRIFT_REF: &str = "refs/berth/out/drift";

pub fn status_branch(node: &str) -> String {
    format!("berth/status/{node}")
}

pub fn drift_branch(node: &str) -> String {
    format!("berth/drift/{node}")
}

/// The drift branch's one commit, on top of the applied desired commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftCommit {
    pub base: String,
    pub files: Vec<FileChange>,
    pub message: String,
}

/// One report from the loop.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub url: String,
    pub credentials: Option<Credentials>,
    pub node: String,
    pub status: NodeStatusDoc,
    /// `None`: no drift, so no drift branch.
    pub drift: Option<DriftCommit>,
    pub heartbeat: Duration,
    pub history: usize,
    /// Sent with the drift branch's push (it then goes out on its own).
    pub push_options: Vec<String>,
}

#[derive(Debug)]
pub struct Publisher {
    tx: Option<Sender<Outgoing>>,
    record: Arc<Mutex<PublishRecord>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

impl Publisher {
    /// `proc_net` (`/proc/net`) says whether the node has a route out yet.
    pub fn start(mirror: PathBuf, proc_net: PathBuf, log: Log) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let record = Arc::new(Mutex::new(PublishRecord::default()));
        let shared = Arc::clone(&record);
        let thread = std::thread::Builder::new()
            .name("publish".into())
            .spawn(move || Worker::new(mirror, proc_net, log, shared).run(&rx))?;
        Ok(Self {
            tx: Some(tx),
            record,
            thread: Some(thread),
        })
    }

    /// Hands over the latest report; never blocks.
    pub fn send(&self, outgoing: Outgoing) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(outgoing);
        }
    }

    pub fn record(&self) -> PublishRecord {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops the thread after one last attempt to push what is pending.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    mirror_path: PathBuf,
    /// `/proc/net`: whether the node has a route out yet.
    proc_net: PathBuf,
    /// Said once: the first push waits for the network (at boot).
    waiting_for_network: bool,
    /// `outbox.git` beside the mirror: the node's own commits.
    outbox_path: PathBuf,
    outbox: Option<Mirror>,
    log: Log,
    record: Arc<Mutex<PublishRecord>>,
    latest: Option<Outgoing>,
    /// The status last committed, without its volatile parts.
    committed: Option<String>,
    committed_at: Option<Instant>,
    /// The drift last committed (base and files), to commit only on change.
    drift_committed: Option<(String, Vec<FileChange>)>,
    /// Something is committed locally that the server may not have.
    dirty: bool,
    pushed_at: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    last_error: Option<String>,
}

impl Worker {
    fn new(
        mirror_path: PathBuf,
        proc_net: PathBuf,
        log: Log,
        record: Arc<Mutex<PublishRecord>>,
    ) -> Self {
        Self {
            outbox_path: mirror_path.with_file_name("outbox.git"),
            mirror_path,
            proc_net,
            waiting_for_network: false,
            outbox: None,
            log,
            record,
            latest: None,
            committed: None,
            committed_at: None,
            drift_committed: None,
            dirty: true,
            pushed_at: None,
            next_attempt: Instant::now(),
            backoff: FIRST_BACKOFF,
            last_error: None,
        }
    }

    fn run(mut self, rx: &Receiver<Outgoing>) {
        loop {
            let wait = self.wait();
            match rx.recv_timeout(wait) {
                Ok(o) => {
                    self.latest = Some(o);
                    while let Ok(newer) = rx.try_recv() {
                        self.latest = Some(newer);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if self.dirty {
                        self.next_attempt = Instant::now();
                        self.step();
                    }
                    return;
                }
            }
            self.step();
        }
    }

    /// Until the next push attempt or heartbeat; after a failure, never
    /// sooner than the backoff allows.
    fn wait(&self) -> Duration {
        let Some(o) = &self.latest else {
            return Duration::from_secs(3600);
        };
        let now = Instant::now();
        let retry = self.next_attempt.saturating_duration_since(now);
        if self.last_error.is_some() {
            return retry.max(Duration::from_millis(50));
        }
        let heartbeat = self.committed_at.map_or(Duration::ZERO, |at| {
            (at + o.heartbeat).saturating_duration_since(now)
        });
        if self.dirty {
            heartbeat.min(retry)
        } else {
            heartbeat
        }
        .max(Duration::from_millis(50))
    }

    fn step(&mut self) {
        let Some(o) = self.latest.clone() else { return };
        if self.outbox.is_none() {
            match Mirror::open_outbox(&self.outbox_path, &self.mirror_path) {
                Ok(m) => self.outbox = Some(m),
                Err(e) => {
                    self.fail(format!("cannot open the outbox to publish: {e}"));
                    return;
                }
            }
        }
        if let Err(e) = self.commit(&o) {
            self.fail(e);
            return;
        }
        if self.pushed_at.is_none_or(|at| at.elapsed() >= o.heartbeat) {
            // Pushed again on each heartbeat: a branch deleted by hand
            // comes back.
            self.dirty = true;
        }
        if self.dirty && Instant::now() >= self.next_attempt {
            self.push(&o);
        }
        self.publish_record();
    }

    fn commit(&mut self, o: &Outgoing) -> Result<(), String> {
        let Some(outbox) = &self.outbox else {
            return Ok(());
        };
        let author = (
            format!("berth on {}", o.node),
            format!("berth@{}.node.invalid", o.node),
        );
        let significant = o.status.significant();
        let heartbeat_due = self
            .committed_at
            .is_none_or(|at| at.elapsed() >= o.heartbeat);
        if self.committed.is_none() {
            // After a restart: what the local branch already says.
            self.committed = outbox
                .local(STATUS_REF)
                .and_then(|r| outbox.file_at(r, STATUS_FILE))
                .and_then(|b| NodeStatusDoc::from_yaml(&String::from_utf8_lossy(&b)).ok())
                .map(|d| d.significant());
        }
        if self.committed.as_ref() != Some(&significant) || heartbeat_due {
            let parent = outbox.local(STATUS_REF);
            if parent.is_some_and(|p| outbox.depth(p, o.history) >= o.history) {
                // History stays bounded, on the branch and on disk: the
                // outbox starts over empty, this commit becomes the first,
                // and the drift (if any) is committed again below.
                let Some(full) = self.outbox.take() else {
                    return Ok(());
                };
                let fresh = full
                    .reset_outbox(&self.mirror_path)
                    .map_err(|e| format!("cannot start the outbox over: {e}"))?;
                self.outbox = Some(fresh);
                self.drift_committed = None;
                return self.commit(o);
            }
            let Some(outbox) = &self.outbox else {
                return Ok(());
            };
            let subject = if self.committed.as_ref() == Some(&significant) {
                "heartbeat"
            } else {
                "status changed"
            };
            let message = format!(
                "{}: {subject}\n\n{} pods, {} drifted fields, applied {}\n",
                o.node,
                o.status.pods.len(),
                o.status.drift.count,
                o.status
                    .revisions
                    .applied
                    .as_ref()
                    .map_or("nothing".to_string(), |r| r.revision.clone())
            );
            outbox
                .commit(
                    STATUS_REF,
                    parent,
                    None,
                    &[FileChange {
                        path: STATUS_FILE.into(),
                        content: Some(o.status.to_yaml().into_bytes()),
                    }],
                    &message,
                    (&author.0, &author.1),
                )
                .map_err(|e| format!("cannot commit the status: {e}"))?;
            self.committed = Some(significant);
            self.committed_at = Some(Instant::now());
            self.dirty = true;
        }
        match &o.drift {
            Some(d) => {
                let same = self
                    .drift_committed
                    .as_ref()
                    .is_some_and(|(base, files)| base == &d.base && files == &d.files);
                if !same || outbox.local(DRIFT_REF).is_none() {
                    let base = Revision::parse(&d.base)
                        .ok_or_else(|| format!("bad drift base {:?}", d.base))?;
                    outbox
                        .commit(
                            DRIFT_REF,
                            Some(base),
                            Some(base),
                            &d.files,
                            &d.message,
                            (&author.0, &author.1),
                        )
                        .map_err(|e| format!("cannot commit the drift: {e}"))?;
                    self.drift_committed = Some((d.base.clone(), d.files.clone()));
                    self.dirty = true;
                }
            }
            None => {
                if outbox.local(DRIFT_REF).is_some() || self.drift_committed.is_some() {
                    outbox
                        .delete_local(DRIFT_REF)
                        .map_err(|e| format!("cannot drop the drift ref: {e}"))?;
                    self.drift_committed = None;
                    self.dirty = true;
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, o: &Outgoing) {
        let Some(outbox) = &self.outbox else { return };
        let mut updates = Vec::new();
        if outbox.local(STATUS_REF).is_some() {
            updates.push(PushUpdate {
                local: Some(STATUS_REF.into()),
                remote: format!("refs/heads/{}", status_branch(&o.node)),
            });
        }
        let drift = PushUpdate {
            local: outbox.local(DRIFT_REF).map(|_| DRIFT_REF.to_string()),
            remote: format!("refs/heads/{}", drift_branch(&o.node)),
        };
        let result = if o.push_options.is_empty() {
            updates.push(drift);
            outbox.push(&o.url, o.credentials.as_ref(), &updates)
        } else {
            // Options apply to a whole push: the drift branch goes on its
            // own, so a forge opens a merge request for it alone.
            outbox
                .push(&o.url, o.credentials.as_ref(), &updates)
                .and_then(|()| {
                    outbox.push_with_options(
                        &o.url,
                        o.credentials.as_ref(),
                        &[drift],
                        &o.push_options,
                    )
                })
        };
        match result {
            Ok(()) => {
                if self.waiting_for_network {
                    self.log.info("status and drift branches pushed");
                    self.waiting_for_network = false;
                } else if self.last_error.is_some() {
                    self.log.info("status and drift branches pushed again");
                }
                self.dirty = false;
                self.pushed_at = Some(Instant::now());
                self.backoff = FIRST_BACKOFF;
                self.last_error = None;
                if let Ok(mut r) = self.record.lock() {
                    r.last_push = Some(crate::clock::now_secs());
                    r.failures = 0;
                    r.attempts_total += 1;
                }
            }
            Err(e)
                if self.pushed_at.is_none()
                    && !e.is_rejection()
                    && !crate::agent::has_default_route(&self.proc_net) =>
            {
                // At boot the agent is up before the network: one line
                // says so, not a failure at every retry.
                if !self.waiting_for_network {
                    self.log.info(&format!(
                        "waiting for the network to push the status and drift branches ({e}); kept locally"
                    ));
                    self.waiting_for_network = true;
                }
                self.last_error = Some(format!("waiting for the network: {e}"));
                if let Ok(mut r) = self.record.lock() {
                    r.attempts_total += 1;
                    r.failures_total += 1;
                }
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.publish_record();
            }
            Err(e) => {
                let rejected = e.is_rejection();
                self.fail(if rejected {
                    format!("{e} (pods are unaffected; retrying)")
                } else {
                    format!("{e} (status kept locally; retrying)")
                });
            }
        }
    }

    fn fail(&mut self, message: String) {
        if self.last_error.as_ref() != Some(&message) {
            self.log.error(&message);
        }
        self.last_error = Some(message);
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        if let Ok(mut r) = self.record.lock() {
            r.failures += 1;
            r.attempts_total += 1;
            r.failures_total += 1;
        }
        self.publish_record();
    }

    fn publish_record(&self) {
        let Some(outbox) = &self.outbox else { return };
        if let Ok(mut r) = self.record.lock() {
            r.status_commit = outbox.local(STATUS_REF).map(|x| x.to_string());
            r.drift_commit = outbox.local(DRIFT_REF).map(|x| x.to_string());
            r.pending = self.dirty;
            r.error = self.last_error.clone();
        }
    }
}

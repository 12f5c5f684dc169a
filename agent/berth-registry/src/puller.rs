//! Pulls in the background, so a pass never waits on a registry: one pull
//! per image however many pods want it, a failed pull retried after a
//! growing back-off (10 s doubling to 5 min, as the kubelet does) and never
//! sooner, and the state of every pull written to `pulls.json` next to the
//! store for `berth images`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_images::ImageStore;
use serde::{Deserialize, Serialize};

use crate::auth::Credential;
use crate::client::{Client, Progress};
use crate::reference::Reference;

pub const FIRST_BACKOFF_SECS: u64 = 10;
pub const MAX_BACKOFF_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPhase {
    Queued,
    Pulling,
    Done,
    Failed,
}

/// The state of the last pull asked for one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullStatus {
    pub phase: PullPhase,
    /// Grows with every pull asked; a caller that needs a pull done after
    /// a moment compares against the number its request returned.
    pub seq: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The credentials were missing or refused.
    #[serde(default)]
    pub auth_error: bool,
    /// Failures in a row.
    #[serde(default)]
    pub failures: u32,
    /// A failed pull is not tried again before this (Unix seconds).
    #[serde(default)]
    pub retry_at: u64,
}

struct Job {
    reference: String,
    seq: u64,
    creds: Vec<Credential>,
}

struct Shared {
    states: Mutex<BTreeMap<String, PullStatus>>,
    progress: Mutex<BTreeMap<String, Arc<Progress>>>,
    next_seq: Mutex<u64>,
    file: PathBuf,
}

#[derive(Clone)]
pub struct Puller {
    shared: Arc<Shared>,
    tx: Sender<Job>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("file", &self.shared.file)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The back-off after `failures` failed pulls in a row.
pub fn backoff_secs(failures: u32) -> u64 {
    FIRST_BACKOFF_SECS
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_SECS)
}

/// Where the puller records its pulls, for readers in other processes.
pub fn pulls_file(store: &ImageStore) -> PathBuf {
    store.root().join("pulls.json")
}

/// Reads what a puller recorded (`berth images`).
pub fn read_pulls(store: &ImageStore) -> BTreeMap<String, PullStatus> {
    std::fs::read(pulls_file(store))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Puller {
    /// Starts the pulling thread. `on_done` runs after every pull, done or
    /// failed, and again when a failed pull's back-off is over (so the
    /// caller asks again then, not at its next periodic pass).
    pub fn start(client: Client, store: ImageStore, on_done: Box<dyn Fn() + Send + Sync>) -> Self {
        let shared = Arc::new(Shared {
            states: Mutex::new(BTreeMap::new()),
            progress: Mutex::new(BTreeMap::new()),
            next_seq: Mutex::new(0),
            file: pulls_file(&store),
        });
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("berth-puller".into())
            .spawn(move || work(&client, &store, &worker, &rx, Arc::from(on_done)))
            .map(drop)
            .unwrap_or_else(|e| eprintln!("berth: cannot start the image puller: {e}"));
        Self { shared, tx }
    }

    /// Asks for `reference` (normalized) to be pulled, unless a pull of it is
    /// queued or running, or failed and its back-off has not passed, or
    /// (without `again`) it was pulled already. Returns its status now.
    pub fn request(&self, reference: &str, creds: Vec<Credential>, again: bool) -> PullStatus {
        let reference =
            Reference::parse(reference).map_or_else(|_| reference.to_string(), |r| r.to_string());
        let now = now();
        let mut states = self
            .shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = states.get(&reference) {
            let keep = match s.phase {
                PullPhase::Queued | PullPhase::Pulling => true,
                PullPhase::Failed => now < s.retry_at,
                PullPhase::Done => !again,
            };
            if keep {
                return self.with_progress(&reference, s.clone());
            }
        }
        let seq = {
            let mut n = self
                .shared
                .next_seq
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *n += 1;
            *n
        };
        let previous = states.get(&reference);
        let status = PullStatus {
            phase: PullPhase::Queued,
            seq,
            bytes_done: 0,
            bytes_total: 0,
            started_at: now,
            finished_at: None,
            manifest: None,
            error: previous.and_then(|p| p.error.clone()),
            auth_error: false,
            failures: previous.map_or(0, |p| p.failures),
            retry_at: 0,
        };
        states.insert(reference.clone(), status.clone());
        drop(states);
        let job = Job {
            reference: reference.clone(),
            seq,
            creds,
        };
        if self.tx.send(job).is_err() {
            self.finish(
                &reference,
                seq,
                Err(("the puller thread is gone".into(), false)),
                None,
            );
        }
        self.save();
        status
    }

    pub fn status(&self, reference: &str) -> Option<PullStatus> {
        let reference =
            Reference::parse(reference).map_or_else(|_| reference.to_string(), |r| r.to_string());
        let s = self
            .shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&reference)
            .cloned()?;
        Some(self.with_progress(&reference, s))
    }

    /// Every pull this puller knows, with live byte counts.
    pub fn all(&self) -> BTreeMap<String, PullStatus> {
        let states = self
            .shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        states
            .into_iter()
            .map(|(r, s)| {
                let s = self.with_progress(&r, s);
                (r, s)
            })
            .collect()
    }

    /// A pull is queued or running (collection waits: its blobs are not yet
    /// any image's).
    pub fn busy(&self) -> bool {
        self.shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|s| matches!(s.phase, PullPhase::Queued | PullPhase::Pulling))
    }

    /// Forgets what it knew of images no pod wants any more.
    pub fn retain(&self, wanted: impl Fn(&str) -> bool) {
        self.shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r, s| wanted(r) || matches!(s.phase, PullPhase::Queued | PullPhase::Pulling));
        self.save();
    }

    fn with_progress(&self, reference: &str, s: PullStatus) -> PullStatus {
        live(&self.shared, reference, s)
    }

    fn finish(
        &self,
        reference: &str,
        seq: u64,
        result: Result<(String, u64), (String, bool)>,
        progress: Option<&Progress>,
    ) {
        finish(&self.shared, reference, seq, result, progress);
        self.save();
    }

    fn save(&self) {
        save(&self.shared, |r, s| self.with_progress(r, s));
    }
}

/// A status with the byte counts of its pull, if it runs.
fn live(shared: &Shared, reference: &str, mut s: PullStatus) -> PullStatus {
    if s.phase == PullPhase::Pulling
        && let Some(p) = shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(reference)
    {
        s.bytes_done = p.done.load(Ordering::Relaxed);
        s.bytes_total = p.total.load(Ordering::Relaxed);
    }
    s
}

fn finish(
    shared: &Shared,
    reference: &str,
    seq: u64,
    result: Result<(String, u64), (String, bool)>,
    progress: Option<&Progress>,
) {
    let now = now();
    let mut states = shared.states.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(s) = states.get_mut(reference).filter(|s| s.seq == seq) else {
        return;
    };
    s.finished_at = Some(now);
    if let Some(p) = progress {
        s.bytes_done = p.done.load(Ordering::Relaxed);
        s.bytes_total = p.total.load(Ordering::Relaxed);
    }
    match result {
        Ok((manifest, _)) => {
            s.phase = PullPhase::Done;
            s.manifest = Some(manifest);
            s.error = None;
            s.auth_error = false;
            s.failures = 0;
            s.retry_at = 0;
        }
        Err((message, auth)) => {
            s.phase = PullPhase::Failed;
            s.error = Some(message);
            s.auth_error = auth;
            s.failures += 1;
            s.retry_at = now + backoff_secs(s.failures);
        }
    }
}

fn save(shared: &Shared, live: impl Fn(&str, PullStatus) -> PullStatus) {
    let states: BTreeMap<String, PullStatus> = shared
        .states
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .into_iter()
        .map(|(r, s)| {
            let s = live(&r, s);
            (r, s)
        })
        .collect();
    let Ok(body) = serde_json::to_vec_pretty(&states) else {
        return;
    };
    let tmp = shared.file.with_extension("json.tmp");
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(&tmp, &shared.file);
    }
}

fn work(
    client: &Client,
    store: &ImageStore,
    shared: &Arc<Shared>,
    rx: &Receiver<Job>,
    on_done: Arc<dyn Fn() + Send + Sync>,
) {
    let live = |r: &str, st: PullStatus| live(shared, r, st);
    while let Ok(job) = rx.recv() {
        let progress = Arc::new(Progress::default());
        {
            let mut states = shared.states.lock().unwrap_or_else(PoisonError::into_inner);
            match states.get_mut(&job.reference).filter(|s| s.seq == job.seq) {
                Some(s) => {
                    s.phase = PullPhase::Pulling;
                    s.started_at = now();
                }
                None => continue,
            }
            shared
                .progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(job.reference.clone(), Arc::clone(&progress));
        }
        save(shared, live);
        // The pull runs on a thread of its own while this one writes its
        // progress to `pulls.json` every second.
        let result = std::thread::scope(|scope| {
            let handle = scope.spawn(|| client.pull(store, &job.reference, &job.creds, &progress));
            let mut ticks = 0u32;
            while !handle.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    save(shared, live);
                }
            }
            handle.join()
        });
        let result = match result {
            Ok(Ok(p)) => Ok((p.manifest, p.downloaded)),
            Ok(Err(e)) => Err((e.to_string(), e.is_auth())),
            Err(_) => Err(("the pull panicked".to_string(), false)),
        };
        if result.is_err() {
            let failures = shared
                .states
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&job.reference)
                .map_or(0, |s| s.failures);
            let wake = Arc::clone(&on_done);
            let delay = Duration::from_secs(backoff_secs(failures + 1) + 1);
            let _ = std::thread::Builder::new()
                .name("berth-pull-retry".into())
                .spawn(move || {
                    std::thread::sleep(delay);
                    wake();
                });
        }
        finish(shared, &job.reference, job.seq, result, Some(&progress));
        shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&job.reference);
        save(shared, live);
        on_done();
    }
}

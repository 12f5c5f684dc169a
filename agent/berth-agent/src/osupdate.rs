//! OS updates as the plan decides them ([`berth_plan::osupdate`]): the
//! facts the decision reads, staging a declared bundle on a thread of its
//! own (downloaded from a registry or an HTTPS URL, checked, written into
//! the other slot), and the reboot into it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use berth_plan::osupdate::{OsAction, OsDecision, OsFacts, StagingFailure, UpdateFact};
use berth_registry::{Client, Progress};
use berth_update::{OsStatus, bundle, install};

use crate::clock::now_secs;
use crate::config::ImageSettings;
use crate::wake::Wake;

/// Staging failures back off like image pulls: 10 s doubling to 5 min.
fn backoff(failures: u32) -> u64 {
    berth_registry::puller::backoff_secs(failures)
}

#[derive(Debug, Default)]
struct Staging {
    /// The declaration being staged now.
    running: Option<String>,
    version: String,
    /// `Downloading` or `Writing`.
    phase: &'static str,
    progress: Arc<Progress>,
    failed: Option<StagingFailure>,
    failures: u32,
}

/// See the module documentation.
#[derive(Debug)]
pub struct OsUpdates {
    esp: Option<PathBuf>,
    cmdline: String,
    state_dir: PathBuf,
    staging: Arc<Mutex<Staging>>,
    waker: Option<Sender<Wake>>,
    /// The last decision, for status and for logging each once.
    pub(crate) decision: Option<OsDecision>,
    rebooting: bool,
}

/// What the node is doing about its OS now, for status.
pub fn activity(
    decision: Option<&OsDecision>,
    staging: Option<(String, &'static str, u64, u64)>,
) -> Option<berth_update::status::Activity> {
    if let Some((version, phase, done, total)) = staging {
        let message = if phase == "Downloading" {
            format!("{done} of {total} bytes")
        } else {
            "into the other slot".to_string()
        };
        return Some(berth_update::status::Activity {
            phase: phase.into(),
            version,
            message,
        });
    }
    let d = decision?;
    let phase = match d.action {
        OsAction::Current => return None,
        OsAction::Stage => "Staging",
        OsAction::Reboot => "Rebooting",
        OsAction::Wait => "Waiting",
        OsAction::Refused => "Refused",
        OsAction::Unsupported => "Unsupported",
        OsAction::Withdraw => "Withdrawing",
    };
    Some(berth_update::status::Activity {
        phase: phase.into(),
        version: d.version.clone(),
        message: d.message.clone(),
    })
}

/// The journal's line for an OS decision. A withdrawal has no NodeImage
/// any more (none selects the node): it names the version it withdraws.
pub fn decision_line(d: &OsDecision) -> String {
    if d.node_image.is_empty() {
        format!(
            "OS update (version {}): {:?}: {}",
            d.version, d.action, d.message
        )
    } else {
        format!(
            "OS update (NodeImage {}): {:?}: {}",
            d.node_image, d.action, d.message
        )
    }
}

impl OsUpdates {
    /// `esp`: where the ESP is mounted; `cmdline`: the kernel command line.
    pub fn new(esp: Option<PathBuf>, cmdline: &str, state_dir: &Path) -> Self {
        Self {
            esp,
            cmdline: cmdline.to_string(),
            state_dir: state_dir.to_path_buf(),
            staging: Arc::default(),
            waker: None,
            decision: None,
            rebooting: false,
        }
    }

    pub fn set_waker(&mut self, waker: Sender<Wake>) {
        self.waker = Some(waker);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The OS's status: slots, versions, the last update, and what is
    /// under way.
    pub fn status(&self) -> Option<OsStatus> {
        let esp = self.esp.as_deref()?;
        let mut os = berth_update::os_status(esp, &self.cmdline, &self.state_dir);
        let staging = {
            let s = self.lock();
            s.running.as_ref().map(|_| {
                (
                    s.version.clone(),
                    s.phase,
                    s.progress.done.load(Ordering::Relaxed),
                    s.progress.total.load(Ordering::Relaxed),
                )
            })
        };
        os.activity = activity(self.decision.as_ref(), staging);
        Some(os)
    }

    /// What the decision reads: the booted slot and version, the other
    /// slot's, the last update, and the last staging failure.
    pub fn facts(&self) -> OsFacts {
        let Some(os) = self
            .esp
            .as_deref()
            .map(|esp| berth_update::os_status(esp, &self.cmdline, &self.state_dir))
        else {
            return OsFacts::default();
        };
        OsFacts {
            version: os.version,
            slot: (!os.slot.is_empty()).then_some(os.slot),
            other_slot_version: os.other_slot_version,
            update: os.update.map(|u| UpdateFact {
                version: u.version,
                declaration: u.declaration,
                state: u.state,
                message: u.message,
            }),
            staging_failed: self.lock().failed.clone(),
        }
    }

    /// A reboot was asked: nothing more is started.
    pub fn rebooting(&self) -> bool {
        self.rebooting
    }

    pub(crate) fn mark_rebooting(&mut self) {
        self.rebooting = true;
    }

    /// Takes back a staged update whose declaration left Git (see
    /// [`install::withdraw`]); waits while a staging runs (the next pass
    /// withdraws what it wrote).
    pub fn withdraw(&self) -> Result<Option<String>, String> {
        let Some(esp) = self.esp.as_deref() else {
            return Ok(None);
        };
        if self.lock().running.is_some() {
            return Ok(None);
        }
        let layout = berth_update::Layout::discover(esp).map_err(|e| e.to_string())?;
        let node = install::Node {
            esp,
            cmdline: &self.cmdline,
            state_dir: &self.state_dir,
        };
        install::withdraw(&layout, &node).map_err(|e| e.to_string())
    }

    /// Stages what `d` declares on a thread of its own, unless a staging
    /// runs already. `ready`: the pods running and ready now (the health
    /// gate on the new slot waits for each again).
    pub fn stage(
        &self,
        d: &OsDecision,
        images: &ImageSettings,
        signers: Option<&Path>,
        ready: Vec<String>,
    ) {
        let Some(esp) = self.esp.clone() else {
            return;
        };
        {
            let mut s = self.lock();
            if s.running.is_some() {
                return;
            }
            s.running = Some(d.declaration.clone());
            s.version.clone_from(&d.version);
            s.phase = "Downloading";
            s.progress = Arc::default();
        }
        let job = Job {
            decision: d.clone(),
            registry: images.registry_config(),
            signers: signers.map(Path::to_path_buf),
            ready,
            esp,
            cmdline: self.cmdline.clone(),
            state_dir: self.state_dir.clone(),
        };
        let staging = Arc::clone(&self.staging);
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-os-update".into())
            .spawn(move || {
                let result = job.run(&staging);
                let mut s = staging.lock().unwrap_or_else(PoisonError::into_inner);
                s.running = None;
                match result {
                    Ok(line) => {
                        tracing::info!("{line}");
                        s.failed = None;
                        s.failures = 0;
                    }
                    Err(message) => {
                        s.failures += 1;
                        let retry = backoff(s.failures);
                        tracing::warn!(
                            "staging {} failed: {message}; tried again in {retry} s",
                            job.decision.declaration
                        );
                        s.failed = Some(StagingFailure {
                            declaration: job.decision.declaration.clone(),
                            message,
                            retry_at: now_secs() + retry,
                        });
                    }
                }
                drop(s);
                if let Some(w) = &waker {
                    let _ = w.send(Wake::UnitChanged);
                }
            });
        if let Err(e) = spawned {
            let mut s = self.lock();
            s.running = None;
            s.failures += 1;
            s.failed = Some(StagingFailure {
                declaration: d.declaration.clone(),
                message: format!("cannot start a thread: {e}"),
                retry_at: now_secs() + backoff(s.failures),
            });
        }
    }
}

struct Job {
    decision: OsDecision,
    registry: berth_registry::RegistryConfig,
    signers: Option<PathBuf>,
    ready: Vec<String>,
    esp: PathBuf,
    cmdline: String,
    state_dir: PathBuf,
}

impl Job {
    fn run(&self, staging: &Mutex<Staging>) -> Result<String, String> {
        let d = &self.decision;
        let signers = self.signers.as_deref().ok_or(
            "updates.allowedSigners is not set in the node config: no bundle can be trusted",
        )?;
        let allowed = berth_git::AllowedSigners::load(signers).map_err(|e| e.to_string())?;
        let work = self.state_dir.join("update");
        let progress = staging
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .progress
            .clone();
        let started = std::time::Instant::now();
        let dir = download(d, &allowed, &self.registry, &work, &progress)?;
        let downloaded = started.elapsed();
        staging.lock().unwrap_or_else(PoisonError::into_inner).phase = "Writing";
        let request = install::Request {
            bundle: &dir,
            allowed: &allowed,
            architecture: berth_images::node_architecture(),
            tries: d.tries,
            gate_seconds: d.gate_seconds,
            pods: self.ready.clone(),
            version: Some(&d.version),
            declaration: Some(d.declaration.clone()),
        };
        let node = install::Node {
            esp: &self.esp,
            cmdline: &self.cmdline,
            state_dir: &self.state_dir,
        };
        let layout = berth_update::Layout::discover(&self.esp).map_err(|e| e.to_string())?;
        let entry = install::install(&request, &layout, &node, &mut |step| {
            tracing::info!("{step}");
        })
        .map_err(|e| e.to_string())?;
        // Written: the download is no longer needed (a failed one stays,
        // to resume from).
        if let Err(e) = std::fs::remove_dir_all(&work) {
            tracing::warn!("cannot remove {}: {e}", work.display());
        }
        Ok(format!(
            "{} staged: downloaded in {:.1} s, written and installed as {} in {:.1} s",
            d.declaration,
            downloaded.as_secs_f64(),
            entry.file,
            (started.elapsed() - downloaded).as_secs_f64()
        ))
    }
}

/// Fetches the bundle `d` names into a directory under `work`, resuming
/// what an earlier try left; returns the directory.
fn download(
    d: &OsDecision,
    allowed: &berth_git::AllowedSigners,
    registry: &berth_registry::RegistryConfig,
    work: &Path,
    progress: &Progress,
) -> Result<PathBuf, String> {
    let client = Client::new(registry.clone());
    let dir = work.join("bundle");
    let fresh_dir = || -> Result<(), String> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))
    };
    match (&d.bundle.image, &d.bundle.url) {
        (Some(image), _) => {
            let store =
                berth_images::ImageStore::open(&work.join("store")).map_err(|e| e.to_string())?;
            let artifact = client
                .pull_artifact(&store, image, &[], progress)
                .map_err(|e| e.to_string())?;
            fresh_dir()?;
            for (name, digest) in &artifact.parts {
                let blob = store.blob_file(digest).ok_or_else(|| {
                    format!("{image}: part {name} ({digest}) is not in the store")
                })?;
                std::fs::hard_link(&blob, dir.join(name))
                    .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
            }
        }
        (None, Some(url)) => {
            // Parts a cut download left stay (their `.partial` resumes);
            // the manifest and its signature are fetched again.
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let base = url.trim_end_matches('/');
            let get = |name: &str, max: u64, progress: &Progress| {
                client
                    .fetch_file(&format!("{base}/{name}"), &dir.join(name), max, progress)
                    .map_err(|e| e.to_string())
            };
            for name in [bundle::MANIFEST_FILE, bundle::SIGNATURE_FILE] {
                let _ = std::fs::remove_file(dir.join(name));
                get(name, 64 * 1024, &Progress::default())?;
            }
            // Checked before the parts are fetched: an unsigned or foreign
            // bundle costs two small files.
            let (m, _) = bundle::verify_manifest(&dir, allowed, berth_images::node_architecture())
                .map_err(|e| e.to_string())?;
            let parts = [
                (&m.root.file, m.root.size),
                (&m.kernel.file, m.kernel.size),
                (&m.initrd.file, m.initrd.size),
            ];
            progress
                .total
                .store(parts.iter().map(|(_, n)| n).sum(), Ordering::Relaxed);
            for (file, size) in parts {
                let have = std::fs::metadata(dir.join(file)).map_or(0, |m| m.len());
                if have == size {
                    progress.done.fetch_add(size, Ordering::Relaxed);
                    continue;
                }
                get(file, size, progress)?;
            }
        }
        (None, None) => return Err("the NodeImage names no bundle".into()),
    }
    Ok(dir)
}

/// Asks systemd to reboot (every pod stops with its grace period first).
pub(crate) fn reboot(systemd: &dyn berth_runtime::Systemd) -> Result<(), String> {
    systemd.reboot().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_plan::osupdate::OsAction;
    use std::collections::BTreeMap;
    use std::io::{Read as _, Write as _};
    use std::process::Command;

    #[test]
    fn a_decision_line_names_its_node_image_or_else_its_version() {
        let mut d = OsDecision {
            node_image: "fleet".into(),
            version: "2".into(),
            declaration: "2 bundle".into(),
            action: OsAction::Stage,
            message: "staging".into(),
            bundle: berth_manifest::nodeimage::BundleSource::default(),
            tries: 0,
            gate_seconds: 0,
            wake_at: None,
            stops: Vec::new(),
        };
        assert_eq!(
            decision_line(&d),
            "OS update (NodeImage fleet): Stage: staging"
        );
        d.node_image.clear();
        d.action = OsAction::Withdraw;
        assert_eq!(
            decision_line(&d),
            "OS update (version 2): Withdraw: staging"
        );
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("runs");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    /// A signed bundle as `image/build.sh` makes one, under `dir`.
    fn signed_bundle(dir: &Path) -> String {
        std::fs::create_dir_all(dir).expect("dir");
        let root: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.join("root.img"), root).expect("root");
        run(Command::new("zstd")
            .args(["-q", "-f", "-3", "--rm"])
            .arg(dir.join("root.img")));
        std::fs::write(dir.join("vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(dir.join("initrd.img"), b"initrd").expect("initrd");
        bundle::Manifest::describe(
            dir,
            "2",
            berth_images::node_architecture(),
            "root.img.zst",
            "vmlinuz",
            "initrd.img",
        )
        .expect("describes");
        let key = dir.join("../release");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "release", "-f"])
            .arg(&key));
        run(Command::new("ssh-keygen")
            .args(["-Y", "sign", "-q", "-n", "berth-bundle", "-f"])
            .arg(&key)
            .arg(dir.join("bundle.json")));
        let public = std::fs::read_to_string(key.with_extension("pub")).expect("public");
        let public: Vec<&str> = public.split_whitespace().take(2).collect();
        format!("release {} {}\n", public[0], public[1])
    }

    /// Serves the files of `dir` under `/b/`, with `Range: bytes=N-`;
    /// counts the requests for each file.
    fn web_server(dir: PathBuf) -> (u16, Arc<Mutex<BTreeMap<String, usize>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let asked = Arc::new(Mutex::new(BTreeMap::new()));
        let counter = Arc::clone(&asked);
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let name = request
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.strip_prefix("/b/"))
                    .unwrap_or("")
                    .to_string();
                *counter
                    .lock()
                    .expect("lock")
                    .entry(name.clone())
                    .or_insert(0) += 1;
                let Ok(body) = std::fs::read(dir.join(&name)) else {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            }
        });
        (port, asked)
    }

    fn decision(url: &str) -> OsDecision {
        OsDecision {
            node_image: "os".into(),
            version: "2".into(),
            declaration: format!("2 from url {url}"),
            action: OsAction::Stage,
            message: String::new(),
            bundle: berth_manifest::nodeimage::BundleSource {
                image: None,
                url: Some(url.into()),
            },
            tries: 3,
            gate_seconds: 300,
            wake_at: None,
            stops: Vec::new(),
        }
    }

    #[test]
    fn a_bundle_from_a_web_server_is_checked_before_its_parts_are_fetched() {
        let scratch = std::env::temp_dir().join(format!("berth-os-url-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let published = scratch.join("published");
        let signers = signed_bundle(&published);
        let allowed = berth_git::AllowedSigners::parse(&signers, "signers").expect("signers");
        let (port, asked) = web_server(published.clone());
        let host = format!("127.0.0.1:{port}");
        let mut registry = berth_registry::RegistryConfig::default();
        registry.hosts.insert(
            host.clone(),
            berth_registry::HostConfig {
                mirrors: Vec::new(),
                insecure: true,
            },
        );
        let url = format!("http://{host}/b/");
        let progress = Progress::default();
        let work = scratch.join("work");
        let dir =
            download(&decision(&url), &allowed, &registry, &work, &progress).expect("downloads");
        for name in [
            "bundle.json",
            "bundle.json.sig",
            "root.img.zst",
            "vmlinuz",
            "initrd.img",
        ] {
            assert_eq!(
                std::fs::read(dir.join(name)).expect("fetched"),
                std::fs::read(published.join(name)).expect("published"),
                "{name}"
            );
        }
        bundle::verify(&dir, &allowed, berth_images::node_architecture()).expect("verifies");
        assert_eq!(
            progress.done.load(Ordering::Relaxed),
            progress.total.load(Ordering::Relaxed)
        );
        // Again: the parts it has are not fetched again.
        asked.lock().expect("lock").clear();
        download(
            &decision(&url),
            &allowed,
            &registry,
            &work,
            &Progress::default(),
        )
        .expect("downloads");
        let again = asked.lock().expect("lock").clone();
        assert_eq!(again.get("root.img.zst"), None, "{again:?}");

        // Signed by a key the node does not allow: refused after the two
        // small files, before any part.
        std::fs::remove_dir_all(&work).expect("clean");
        asked.lock().expect("lock").clear();
        let stranger = berth_git::AllowedSigners::parse(
            "other ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0wmN/Cr3JXqmLW7u+g9pTh+wyqDHpSQEIQczXkVx9q\n",
            "signers",
        )
        .expect("signers");
        let e = download(
            &decision(&url),
            &stranger,
            &registry,
            &work,
            &Progress::default(),
        )
        .expect_err("refused");
        assert!(e.contains("bundle.json"), "{e}");
        let fetched: Vec<String> = asked.lock().expect("lock").keys().cloned().collect();
        assert_eq!(fetched, ["bundle.json", "bundle.json.sig"]);
        // Plain HTTP to a host the config does not mark insecure: refused.
        let e = download(
            &decision(&url),
            &allowed,
            &berth_registry::RegistryConfig::default(),
            &work,
            &Progress::default(),
        )
        .expect_err("refused");
        assert!(e.contains("only https://"), "{e}");
        let _ = std::fs::remove_dir_all(&scratch);
    }

    #[test]
    fn status_says_what_is_under_way() {
        let mut d = decision("https://u.example/b/");
        assert_eq!(
            activity(Some(&d), Some(("2".into(), "Downloading", 10, 100)))
                .map(|a| (a.phase, a.message)),
            Some(("Downloading".into(), "10 of 100 bytes".into()))
        );
        assert_eq!(
            activity(Some(&d), Some(("2".into(), "Writing", 0, 0))).map(|a| a.phase),
            Some("Writing".into())
        );
        d.action = OsAction::Wait;
        d.message = "the maintenance window opens in 60 s".into();
        let a = activity(Some(&d), None).expect("waiting");
        assert_eq!((a.phase.as_str(), a.version.as_str()), ("Waiting", "2"));
        assert!(a.message.contains("window"));
        d.action = OsAction::Current;
        assert_eq!(activity(Some(&d), None), None);
        assert_eq!(activity(None, None), None);
    }
}

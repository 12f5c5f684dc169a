//! The node's Git client. It owns one bare mirror under the agent's state
//! directory, fetches the configured branch into a private ref with libgit2,
//! and reads manifests straight from the fetched commit's tree: there is no
//! working tree to leave half-written when the power goes.
//!
//! It must not interpret manifests (that is `berth-manifest`) or decide what
//! is good (that is the agent); it only moves commits and bytes.

use std::path::{Path, PathBuf};

use berth_manifest::SourceFile;
use git2::{FetchOptions, Oid, RemoteCallbacks, Repository};

pub mod known_hosts;
pub mod publish;
pub mod sshsig;

pub use publish::{FileChange, PushError, PushUpdate};
pub use sshsig::{AllowedSigners, BUNDLE_NAMESPACE, GIT_NAMESPACE, SignatureError, Signer};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open or create the mirror at {path}: {source}")]
    Mirror { path: PathBuf, source: git2::Error },
    #[error("fetching branch {branch:?} from {url} failed: {message}")]
    Fetch {
        url: String,
        branch: String,
        message: String,
    },
    #[error("{url} has no branch {branch:?}")]
    NoSuchBranch { url: String, branch: String },
    #[error("revision {revision} has no directory {path:?}")]
    NoSuchPath { revision: String, path: String },
    #[error("cannot read revision {revision}: {source}")]
    Read {
        revision: String,
        source: git2::Error,
    },
}

impl GitError {
    /// Whether trying again later may help (the network, the server), as
    /// opposed to a problem only a new commit or new config can fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, GitError::Fetch { .. } | GitError::Mirror { .. })
    }
}

/// Where to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub url: String,
    pub branch: String,
}

/// How to authenticate, when the remote needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An SSH deploy key (private key file), for `ssh://` and `git@` URLs,
    /// with the known-hosts file the server's host key must be in.
    SshKey {
        user: String,
        private_key: PathBuf,
        known_hosts: Option<PathBuf>,
    },
    /// A token for HTTPS, sent as the password (user `x-access-token` or as given).
    Token { user: String, token: String },
}

/// A fetched commit, as 40 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Revision(Oid);

impl Revision {
    pub fn parse(hex: &str) -> Option<Self> {
        Oid::from_str(hex).ok().map(Self)
    }
    pub fn short(&self) -> String {
        self.0.to_string()[..12].to_string()
    }
    pub(crate) fn oid(self) -> Oid {
        self.0
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The agent's bare mirror. Not `Sync` (libgit2 repositories are not): keep
/// it on one thread.
pub struct Mirror {
    path: PathBuf,
    repo: Repository,
    /// A fetch that brings more than this is stopped: a node's disk and
    /// memory are not the repository host's.
    max_fetch_bytes: u64,
    /// Called as a fetch or a repack makes progress (the agent pings its
    /// watchdog): a slow transfer that moves is alive, a stalled one is
    /// ended by the stall timeout.
    alive: Option<Liveness>,
}

/// What [`Mirror::set_liveness`] takes: called as a transfer moves on.
#[derive(Clone)]
pub struct Liveness(std::sync::Arc<dyn Fn() + Send + Sync>);

impl Liveness {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    pub fn beat(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Liveness")
    }
}

/// How long connecting may take, and how long a connection may go without
/// a byte, in every fetch and push of this process (libgit2's defaults are
/// none: a server that accepts and then stalls would hold the caller
/// forever).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets libgit2's connect and stall timeouts for the whole process. They
/// are process-wide C globals: call this once, before any thread that uses
/// Git starts (the agent does, first thing).
#[allow(unsafe_code)]
pub fn set_network_timeouts(connect: std::time::Duration, stall: std::time::Duration) {
    let ms = |d: std::time::Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: libgit2 documents these options as plain integer globals read
    // when a connection is made; this runs before the process's other
    // threads use libgit2, as the function's contract says.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect));
        let _ = git2::opts::set_server_timeout_in_milliseconds(ms(stall));
    }
}

/// Makes libgit2 sync what it writes into a repository (loose objects,
/// packs, refs) before renaming it into place, for the whole process: a
/// node loses power, and a ref or object written just before must not come
/// back empty (which fails every later fetch and read of that revision).
/// libgit2 does not by default, and git2 has no setter for it. Call once,
/// before any thread that uses Git starts.
#[allow(unsafe_code)]
pub fn sync_writes() {
    // SAFETY: GIT_OPT_ENABLE_FSYNC_GITDIR takes one int and sets a plain
    // global that writers read; libgit2 is initialised first (as git2 does
    // before its own calls), and this runs before other threads use it.
    libgit2_sys::init();
    unsafe {
        libgit2_sys::git_libgit2_opts(
            libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as std::ffi::c_int,
            1 as std::ffi::c_int,
        );
    }
}

/// The default for [`Mirror::with_fetch_limit`]: 1 GiB in one fetch.
pub const MAX_FETCH_BYTES: u64 = 1 << 30;

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("path", &self.path).finish()
    }
}

/// The private ref the fetched branch lands on.
fn tracking_ref(branch: &str) -> String {
    format!("refs/berth/fetched/{branch}")
}

impl Mirror {
    /// Opens the mirror at `path`, creating it if needed. Lock files left by a
    /// fetch that a power cut interrupted are removed first, and so are refs
    /// it left torn (empty or cut short): the agent is the only writer. A
    /// mirror that cannot be opened at all is moved aside and created
    /// afresh; everything in it can be fetched again.
    pub fn open(path: &Path) -> Result<Self, GitError> {
        let err = |source| GitError::Mirror {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            recover_after_crash(path);
            match Repository::open_bare(path) {
                Ok(repo) => {
                    return Ok(Self {
                        path: path.to_path_buf(),
                        repo,
                        max_fetch_bytes: MAX_FETCH_BYTES,
                        alive: None,
                    });
                }
                Err(_) => {
                    let aside = path.with_extension("broken");
                    let _ = std::fs::remove_dir_all(&aside);
                    std::fs::rename(path, &aside)
                        .map_err(|e| err(git2::Error::from_str(&e.to_string())))?;
                }
            }
        }
        let repo = Repository::init_bare(path).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            repo,
            max_fetch_bytes: MAX_FETCH_BYTES,
            alive: None,
        })
    }

    /// Called whenever a fetch or a repack moves on.
    pub fn set_liveness(&mut self, alive: Liveness) {
        self.alive = Some(alive);
    }

    /// Stops any fetch that brings more than `bytes`.
    pub fn with_fetch_limit(mut self, bytes: u64) -> Self {
        self.max_fetch_bytes = bytes;
        self
    }

    /// Fetches `remote.branch` and returns the commit it points to.
    pub fn fetch(
        &self,
        remote: &Remote,
        credentials: Option<&Credentials>,
    ) -> Result<Revision, GitError> {
        let fail = |message: String| GitError::Fetch {
            url: remote.url.clone(),
            branch: remote.branch.clone(),
            message,
        };
        let refusal = Refusal::default();
        let mut callbacks = remote_callbacks(&remote.url, credentials, &refusal);
        let limit = self.max_fetch_bytes;
        let stopped_at = std::cell::Cell::new(None);
        let alive = self.alive.clone();
        let stopped = &stopped_at;
        callbacks.transfer_progress(move |p| {
            if let Some(alive) = &alive {
                alive.beat();
            }
            let received = p.received_bytes() as u64;
            if received > limit {
                stopped.set(Some(received));
                return false;
            }
            true
        });
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        options.download_tags(git2::AutotagOption::None);
        let mut anonymous = self
            .repo
            .remote_anonymous(&remote.url)
            .map_err(|e| fail(e.message().to_string()))?;
        let refspec = format!(
            "+refs/heads/{0}:{1}",
            remote.branch,
            tracking_ref(&remote.branch)
        );
        // Forget the previous fetch of this branch first, so a branch that
        // disappeared upstream is noticed rather than served from the mirror.
        if let Ok(mut old) = self.repo.find_reference(&tracking_ref(&remote.branch)) {
            let _ = old.delete();
        }
        let fetched = anonymous.fetch(&[&refspec], Some(&mut options), None);
        drop(options);
        if let Some(received) = stopped_at.get() {
            return Err(fail(format!(
                "stopped after {received} bytes: one fetch may bring at most {limit} bytes to a node; the branch's history is too big for it"
            )));
        }
        fetched.map_err(|e| fail(transfer_error(&refusal, &e)))?;
        match self.repo.refname_to_id(&tracking_ref(&remote.branch)) {
            Ok(oid) => Ok(Revision(oid)),
            Err(_) => Err(GitError::NoSuchBranch {
                url: remote.url.clone(),
                branch: remote.branch.clone(),
            }),
        }
    }

    /// How many pack files the mirror holds: every fetch that brings
    /// anything adds one (libgit2 does not repack).
    pub fn pack_count(&self) -> usize {
        std::fs::read_dir(self.path.join("objects/pack"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Repacks the mirror into one pack of what its refs and `keep` reach,
    /// and deletes every other pack and loose object: libgit2 has no
    /// garbage collection, and without this each fetch adds a pack that
    /// stays mapped in memory and on disk for good. Returns how many packs
    /// were replaced. A crash midway leaves the new pack beside the old
    /// ones (objects are never missing).
    pub fn compact(&mut self, keep: &[Revision]) -> Result<usize, GitError> {
        let err = |source| GitError::Mirror {
            path: self.path.clone(),
            source,
        };
        let pack_dir = self.path.join("objects/pack");
        let before: Vec<PathBuf> = std::fs::read_dir(&pack_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let old_packs = before
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "pack"))
            .count();
        let written = {
            let mut walk = self.repo.revwalk().map_err(err)?;
            walk.push_glob("*").map_err(err)?;
            for k in keep {
                if self.repo.find_commit(k.0).is_ok() {
                    walk.push(k.0).map_err(err)?;
                }
            }
            let mut builder = self.repo.packbuilder().map_err(err)?;
            if let Some(alive) = self.alive.clone() {
                builder
                    .set_progress_callback(move |_, _, _| {
                        alive.beat();
                        true
                    })
                    .map_err(err)?;
            }
            builder.insert_walk(&mut walk).map_err(err)?;
            std::fs::create_dir_all(&pack_dir)
                .map_err(|e| err(git2::Error::from_str(&e.to_string())))?;
            builder.write(&pack_dir, 0).map_err(err)?;
            builder
                .name()
                .map_err(err)?
                .map(|n| format!("pack-{n}."))
                .ok_or_else(|| err(git2::Error::from_str("the new pack has no name")))?
        };
        // Everything else goes: old packs (with their indexes) and loose
        // objects, which the new pack now holds. The new pack may carry the
        // name of an old one (same objects): that one stays.
        for p in before {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| !n.starts_with(&written)) {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Ok(dirs) = std::fs::read_dir(self.path.join("objects")) {
            for d in dirs.flatten() {
                let name = d.file_name();
                let name = name.to_string_lossy();
                if name.len() == 2 && name.chars().all(|c| c.is_ascii_hexdigit()) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        self.repo = Repository::open_bare(&self.path).map_err(err)?;
        Ok(old_packs)
    }

    /// Whether the mirror holds this commit (a last good revision survives
    /// restarts only if its objects do).
    pub fn has(&self, revision: Revision) -> bool {
        self.repo.find_commit(revision.0).is_ok()
    }

    /// Whether `revision` has `ancestor` in its history (a commit is not its
    /// own descendant). An ancestor the mirror does not hold is not in the
    /// history it fetched: false.
    pub fn descends_from(&self, revision: Revision, ancestor: Revision) -> bool {
        self.has(ancestor)
            && self
                .repo
                .graph_descendant_of(revision.0, ancestor.0)
                .unwrap_or(false)
    }

    /// The YAML files under `subpath` of a revision, as the loader takes them,
    /// with paths relative to `subpath`, and the files it refuses by the
    /// loader's own rule (`berth_manifest::accept_file`: over the size limit,
    /// unread; not UTF-8): what `berth validate` would read in a checkout.
    pub fn read_manifests(
        &self,
        revision: Revision,
        subpath: &str,
        options: &berth_manifest::LoadOptions,
    ) -> Result<(Vec<SourceFile>, Vec<berth_manifest::Diagnostic>), GitError> {
        let rev = revision.to_string();
        let read = |source| GitError::Read {
            revision: rev.clone(),
            source,
        };
        let commit = self.repo.find_commit(revision.0).map_err(read)?;
        let root = commit.tree().map_err(read)?;
        let subpath = subpath.trim_matches('/');
        let tree = if subpath.is_empty() || subpath == "." {
            root
        } else {
            let entry = root
                .get_path(Path::new(subpath))
                .map_err(|_| GitError::NoSuchPath {
                    revision: rev.clone(),
                    path: subpath.to_string(),
                })?;
            self.repo
                .find_tree(entry.id())
                .map_err(|_| GitError::NoSuchPath {
                    revision: rev.clone(),
                    path: subpath.to_string(),
                })?
        };
        let mut files = Vec::new();
        let mut refused = Vec::new();
        let mut walk_error = None;
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
            let name = entry.name().unwrap_or("");
            if name.starts_with('.') {
                return git2::TreeWalkResult::Skip;
            }
            let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if entry.kind() == Some(git2::ObjectType::Blob) && is_yaml {
                let path = PathBuf::from(format!("{dir}{name}"));
                // The size from the object header: a huge blob is refused unread.
                let size = match self.repo.odb().and_then(|db| db.read_header(entry.id())) {
                    Ok((size, _)) => size as u64,
                    Err(e) => {
                        walk_error = Some(e);
                        return git2::TreeWalkResult::Abort;
                    }
                };
                let read = || {
                    self.repo
                        .find_blob(entry.id())
                        .map(|b| b.content().to_vec())
                        .map_err(std::io::Error::other)
                };
                match berth_manifest::accept_file(&path, size, options, read) {
                    Ok(Ok(file)) => files.push(file),
                    Ok(Err(refusal)) => refused.push(refusal),
                    Err(e) => {
                        walk_error = Some(git2::Error::from_str(&e.to_string()));
                        return git2::TreeWalkResult::Abort;
                    }
                }
            }
            git2::TreeWalkResult::Ok
        })
        .map_err(read)?;
        if let Some(e) = walk_error {
            return Err(read(e));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        refused.sort_by(|a, b| a.source.file.cmp(&b.source.file));
        Ok((files, refused))
    }
}

/// Callbacks that answer the server's credential requests from the node's
/// configured credentials, giving up after three refusals (libgit2 asks
/// again and again otherwise).
/// Why the callbacks refused a server: libgit2 reports only that the
/// check failed, so the reason is kept here for the caller's error.
pub(crate) type Refusal = std::cell::RefCell<Option<String>>;

/// The error a transfer ended with: the callbacks' reason when they
/// refused the server, else libgit2's message.
pub(crate) fn transfer_error(refusal: &Refusal, e: &git2::Error) -> String {
    refusal
        .borrow_mut()
        .take()
        .unwrap_or_else(|| e.message().to_string())
}

fn remote_callbacks<'a>(
    url: &str,
    credentials: Option<&'a Credentials>,
    refusal: &'a Refusal,
) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    // An SSH server's host key must be in the known hosts file; TLS keeps
    // libgit2's own checks.
    let ssh = known_hosts::ssh_host(url);
    let url = url.to_string();
    let known = match credentials {
        Some(Credentials::SshKey { known_hosts, .. }) => known_hosts.clone(),
        _ => None,
    };
    callbacks.certificate_check(move |cert, _| {
        let (Some(hostkey), Some((host, port))) = (cert.as_hostkey(), &ssh) else {
            return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
        };
        let refuse = |e: known_hosts::HostKeyError| {
            *refusal.borrow_mut() = Some(e.to_string());
            git2::Error::from_str(&e.to_string())
        };
        let path = known
            .as_ref()
            .ok_or_else(|| refuse(known_hosts::HostKeyError::NotConfigured { url: url.clone() }))?;
        let key = hostkey
            .hostkey()
            .ok_or_else(|| git2::Error::from_str("the SSH server sent no host key"))?;
        known_hosts::KnownHosts::load(path)
            .and_then(|k| k.check(host, *port, key))
            .map(|()| git2::CertificateCheckStatus::CertificateOk)
            .map_err(refuse)
    });
    let mut attempts = 0;
    callbacks.credentials(move |_url, user_from_url, allowed| {
        attempts += 1;
        if attempts > 3 {
            return Err(git2::Error::from_str("the remote refused the credentials"));
        }
        match credentials {
            Some(Credentials::SshKey {
                user, private_key, ..
            }) if allowed.contains(git2::CredentialType::SSH_KEY) => {
                git2::Cred::ssh_key(user_from_url.unwrap_or(user), None, private_key, None)
            }
            Some(Credentials::Token { user, token })
                if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) =>
            {
                git2::Cred::userpass_plaintext(user, token)
            }
            _ => Err(git2::Error::from_str(
                "the remote asks for credentials and none are configured",
            )),
        }
    });
    callbacks
}

fn recover_after_crash(path: &Path) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                if !p.ends_with("objects") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|e| e == "lock") {
                let _ = std::fs::remove_file(&p);
            } else if p.starts_with(path.join("refs")) && !is_whole_ref(&p) {
                // A ref libgit2 was writing when the power went (it does not
                // sync them): empty or cut short, it fails every fetch with
                // "corrupted loose reference file". Every ref here is the
                // agent's and is made again by the next fetch or publish.
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// A loose ref file as Git writes one: an object id, or `ref: <name>`.
fn is_whole_ref(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return true;
    };
    let line = text.trim_end_matches('\n');
    line.starts_with("ref: ")
        || (matches!(line.len(), 40 | 64) && line.bytes().all(|b| b.is_ascii_hexdigit()))
}

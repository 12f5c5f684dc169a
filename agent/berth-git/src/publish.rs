//! The node's own branches: commits built from in-memory files on local refs
//! under `refs/berth/out/`, then pushed. A push the server turns down
//! (non-fast-forward, a hook, branch protection) is still a successful
//! transfer for libgit2; the refusal arrives only through the
//! `push_update_reference` callback, which is where it is read here.

use std::path::Path;

use git2::build::TreeUpdateBuilder;
use git2::{FileMode, PushOptions, Repository};

use crate::{Credentials, GitError, Mirror, Revision, remote_callbacks};

/// One file of a commit: new content, or `None` to delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Slash-separated, relative to the repository root.
    pub path: String,
    pub content: Option<Vec<u8>>,
}

/// One ref to push: a local ref to the remote one, or a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushUpdate {
    /// `None` deletes `remote`.
    pub local: Option<String>,
    /// A full ref name, such as `refs/heads/berth/status/node-1`.
    pub remote: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("cannot push to {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url} rejected the push: {}", describe(.rejected))]
    Rejected {
        url: String,
        /// Each refused ref with the server's reason.
        rejected: Vec<(String, String)>,
    },
    #[error("cannot prepare the push: {0}")]
    Local(String),
}

fn describe(rejected: &[(String, String)]) -> String {
    rejected
        .iter()
        .map(|(r, why)| format!("{r}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl PushError {
    /// A refusal will repeat until someone changes the server; a transport
    /// error may go away by itself.
    pub fn is_rejection(&self) -> bool {
        matches!(self, PushError::Rejected { .. })
    }
}

impl Mirror {
    /// Opens a mirror another handle created, without the crash clean-up
    /// [`Mirror::open`] does: for a second thread working on other refs
    /// while the first one fetches.
    pub fn open_existing(path: &Path) -> Result<Self, GitError> {
        let repo = Repository::open_bare(path).map_err(|source| GitError::Mirror {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            repo,
            max_fetch_bytes: crate::MAX_FETCH_BYTES,
            alive: None,
        })
    }

    /// Opens (creating it if needed) a bare repository for the node's own
    /// commits that borrows the objects of `mirror` through Git's
    /// alternates, so a drift commit can sit on a fetched commit without
    /// copying it. Kept apart from the mirror so it can be thrown away and
    /// started afresh, which is how its disk use stays bounded (libgit2 has
    /// no garbage collection).
    pub fn open_outbox(path: &Path, mirror: &Path) -> Result<Self, GitError> {
        let err = |source| GitError::Mirror {
            path: path.to_path_buf(),
            source,
        };
        if Repository::open_bare(path).is_err() {
            let _ = std::fs::remove_dir_all(path);
            Repository::init_bare(path).map_err(err)?;
        }
        let objects = mirror.join("objects");
        let alternates = path.join("objects/info/alternates");
        let want = format!("{}\n", objects.display());
        if std::fs::read_to_string(&alternates).ok().as_deref() != Some(want.as_str()) {
            std::fs::create_dir_all(path.join("objects/info"))
                .and_then(|()| std::fs::write(&alternates, &want))
                .map_err(|e| err(git2::Error::from_str(&e.to_string())))?;
        }
        // Opened after the alternates are in place, so its object database
        // reads them.
        let repo = Repository::open_bare(path).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            repo,
            max_fetch_bytes: crate::MAX_FETCH_BYTES,
            alive: None,
        })
    }

    /// Empties an outbox made by [`Mirror::open_outbox`]: every commit and
    /// object in it is gone, the borrowed mirror stays.
    pub fn reset_outbox(self, mirror: &Path) -> Result<Self, GitError> {
        let path = self.path.clone();
        drop(self);
        let aside = path.with_extension("old");
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&path, &aside).map_err(|e| GitError::Mirror {
            path: path.clone(),
            source: git2::Error::from_str(&e.to_string()),
        })?;
        let _ = std::fs::remove_dir_all(&aside);
        Self::open_outbox(&path, mirror)
    }

    /// Where a local ref points, if it exists.
    pub fn local(&self, refname: &str) -> Option<Revision> {
        self.repo.refname_to_id(refname).ok().map(Revision)
    }

    pub fn delete_local(&self, refname: &str) -> Result<(), GitError> {
        match self.repo.find_reference(refname) {
            Ok(mut r) => r.delete().map_err(|e| self.local_error(refname, e)),
            Err(_) => Ok(()),
        }
    }

    fn local_error(&self, what: &str, source: git2::Error) -> GitError {
        GitError::Read {
            revision: what.to_string(),
            source,
        }
    }

    /// Writes a commit whose tree is `base`'s tree (empty without one) with
    /// `changes` applied, whose parent is `parent` (none makes a root
    /// commit), and points `refname` at it.
    pub fn commit(
        &self,
        refname: &str,
        parent: Option<Revision>,
        base: Option<Revision>,
        changes: &[FileChange],
        message: &str,
        author: (&str, &str),
    ) -> Result<Revision, GitError> {
        let err = |e| self.local_error(refname, e);
        let baseline = match base {
            Some(b) => self.repo.find_commit(b.0).and_then(|c| c.tree()),
            None => {
                let empty = self.repo.treebuilder(None).and_then(|t| t.write());
                empty.and_then(|id| self.repo.find_tree(id))
            }
        }
        .map_err(err)?;
        let mut update = TreeUpdateBuilder::new();
        for change in changes {
            match &change.content {
                Some(bytes) => {
                    let blob = self.repo.blob(bytes).map_err(err)?;
                    update.upsert(change.path.as_str(), blob, FileMode::Blob);
                }
                None => {
                    update.remove(change.path.as_str());
                }
            }
        }
        let tree_id = update.create_updated(&self.repo, &baseline).map_err(err)?;
        let tree = self.repo.find_tree(tree_id).map_err(err)?;
        let signature = git2::Signature::now(author.0, author.1).map_err(err)?;
        let parents = match parent {
            Some(p) => vec![self.repo.find_commit(p.0).map_err(err)?],
            None => Vec::new(),
        };
        let parent_refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
        let id = self
            .repo
            .commit(None, &signature, &signature, message, &tree, &parent_refs)
            .map_err(err)?;
        self.repo
            .reference(refname, id, true, "berth: commit")
            .map_err(err)?;
        Ok(Revision(id))
    }

    /// The tree a commit points to, as hex: two commits with the same tree
    /// say the same thing.
    pub fn tree_of(&self, revision: Revision) -> Option<String> {
        self.repo
            .find_commit(revision.0)
            .ok()
            .map(|c| c.tree_id().to_string())
    }

    /// The bytes of `path` in `revision`, if it has that file.
    pub fn file_at(&self, revision: Revision, path: &str) -> Option<Vec<u8>> {
        let commit = self.repo.find_commit(revision.0).ok()?;
        let entry = commit.tree().ok()?.get_path(Path::new(path)).ok()?;
        let blob = self.repo.find_blob(entry.id()).ok()?;
        Some(blob.content().to_vec())
    }

    /// How many commits the first-parent chain from `revision` has, counting
    /// up to `limit`.
    pub fn depth(&self, revision: Revision, limit: usize) -> usize {
        let mut n = 0;
        let mut next = self.repo.find_commit(revision.0).ok();
        while let Some(c) = next {
            n += 1;
            if n >= limit {
                break;
            }
            next = c.parent(0).ok();
        }
        n
    }

    /// Pushes the updates in one connection. Every update is forced: each
    /// node is the only writer of its branches, and a status or drift
    /// branch someone deleted or rewrote is simply written again. A server
    /// that refuses a ref (a hook, branch protection) says so per ref; those
    /// refusals come back as [`PushError::Rejected`].
    pub fn push(
        &self,
        url: &str,
        credentials: Option<&Credentials>,
        updates: &[PushUpdate],
    ) -> Result<(), PushError> {
        self.push_with_options(url, credentials, updates, &[])
    }

    /// [`Mirror::push`] with push options (`git push -o`), which forges
    /// such as GitLab read to open a merge request from the push. The
    /// server must advertise them (`receive.advertisePushOptions`).
    pub fn push_with_options(
        &self,
        url: &str,
        credentials: Option<&Credentials>,
        updates: &[PushUpdate],
        push_options: &[String],
    ) -> Result<(), PushError> {
        let mut rejected = Vec::new();
        let transport = |e: git2::Error| PushError::Transport {
            url: url.to_string(),
            message: e.message().to_string(),
        };
        let mut remote = self
            .repo
            .remote_anonymous(url)
            .map_err(|e| PushError::Local(e.message().to_string()))?;
        let refusal = crate::Refusal::default();
        let mut connection = remote
            .connect_auth(
                git2::Direction::Push,
                Some(remote_callbacks(url, credentials, &refusal)),
                None,
            )
            .map_err(|e| PushError::Transport {
                url: url.to_string(),
                message: crate::transfer_error(&refusal, &e),
            })?;
        // Deleting a ref the server does not have is a refusal in the Git
        // protocol; a deletion only goes out for a ref that exists there.
        let advertised: std::collections::BTreeSet<String> = connection
            .list()
            .map_err(transport)?
            .iter()
            .map(|h| h.name().to_string())
            .collect();
        let specs: Vec<String> = updates
            .iter()
            .filter_map(|u| match &u.local {
                Some(local) => Some(format!("+{local}:{}", u.remote)),
                None if advertised.contains(&u.remote) => Some(format!(":{}", u.remote)),
                None => None,
            })
            .collect();
        if specs.is_empty() {
            return Ok(());
        }
        let result = {
            let mut callbacks = remote_callbacks(url, credentials, &refusal);
            callbacks.push_update_reference(|refname, status| {
                if let Some(why) = status {
                    rejected.push((refname.to_string(), why.to_string()));
                }
                Ok(())
            });
            let mut options = PushOptions::new();
            options.remote_callbacks(callbacks);
            let push_options: Vec<&str> = push_options.iter().map(String::as_str).collect();
            options.remote_push_options(&push_options);
            connection.remote().push(&specs, Some(&mut options))
        };
        match result {
            Err(e) => Err(PushError::Transport {
                url: url.to_string(),
                message: crate::transfer_error(&refusal, &e),
            }),
            Ok(()) if !rejected.is_empty() => Err(PushError::Rejected {
                url: url.to_string(),
                rejected,
            }),
            Ok(()) => Ok(()),
        }
    }
}

/// A branch tip and one file in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchFile {
    pub revision: Revision,
    /// `None` when the commit has no such file.
    pub content: Option<Vec<u8>>,
}

/// Reads `file` from the tip of `branch` in any clone (bare or not): the
/// local branch if there is one, else a remote-tracking branch of that name.
/// Returns the commit and the file's bytes; `Ok(None)` when the branch does
/// not exist.
pub fn read_branch_file(
    repo: &Path,
    branch: &str,
    file: &str,
) -> Result<Option<BranchFile>, GitError> {
    let repository = Repository::open(repo).map_err(|source| GitError::Mirror {
        path: repo.to_path_buf(),
        source,
    })?;
    let mut candidates = vec![format!("refs/heads/{branch}")];
    if let Ok(refs) = repository.references_glob(&format!("refs/remotes/*/{branch}")) {
        let mut remote: Vec<String> = refs
            .flatten()
            .filter_map(|r| r.name().ok().map(str::to_string))
            .collect();
        remote.sort();
        candidates.extend(remote);
    }
    for name in candidates {
        let Ok(id) = repository.refname_to_id(&name) else {
            continue;
        };
        let content = repository
            .find_commit(id)
            .and_then(|c| c.tree())
            .ok()
            .and_then(|t| t.get_path(Path::new(file)).ok())
            .and_then(|e| repository.find_blob(e.id()).ok())
            .map(|b| b.content().to_vec());
        return Ok(Some(BranchFile {
            revision: Revision(id),
            content,
        }));
    }
    Ok(None)
}

/// The names after `prefix` of every branch under it, local or
/// remote-tracking, sorted and without repeats: the nodes of a fleet that
/// reported to this repository.
pub fn list_branches(repo: &Path, prefix: &str) -> Result<Vec<String>, GitError> {
    let repository = Repository::open(repo).map_err(|source| GitError::Mirror {
        path: repo.to_path_buf(),
        source,
    })?;
    let mut names = std::collections::BTreeSet::new();
    for glob in [
        format!("refs/heads/{prefix}*"),
        format!("refs/remotes/*/{prefix}*"),
    ] {
        if let Ok(refs) = repository.references_glob(&glob) {
            for r in refs.flatten() {
                if let Some(rest) = r
                    .name()
                    .ok()
                    .and_then(|n| n.split_once(prefix))
                    .map(|x| x.1)
                {
                    names.insert(rest.to_string());
                }
            }
        }
    }
    Ok(names.into_iter().collect())
}

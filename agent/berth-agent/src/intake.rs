//! Revision intake: a fetched commit is verified (its signature, when the
//! node requires one) and loaded, then accepted or rejected by the
//! diagnostics of the very plan the pass applies. A rejected commit is
//! remembered, and waits for a new one; the last good revision keeps running.

use berth_git::{Mirror, Revision};
use berth_plan::DesiredNode;

use crate::agent::{Agent, Loaded, PassOutcome};
use crate::clock::{now_secs, short};
use crate::config::NodeConfig;
use crate::state::RevisionRecord;

impl Agent {
    /// A fetched revision: one already applied needs nothing, one already
    /// refused waits for a new commit, a new one is verified and loaded
    /// and returned as the candidate this pass plans (and accepts or
    /// rejects by that plan's diagnostics).
    pub(crate) fn intake(
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
            && (self
                .state
                .last_attempted
                .as_ref()
                .is_some_and(|a| a.revision == rev)
                && !self.state.errors.is_empty()
                || self.rolled_back_from(&rev));
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
        // A good signature is not enough: an older signed commit pushed
        // back over the branch would bring back what was replaced.
        if signer.is_some()
            && !config.allow_rewind
            && let Some(last) = self
                .state
                .last_good
                .as_ref()
                .and_then(|g| Revision::parse(&g.revision))
            && !mirror.descends_from(revision, last)
        {
            let error = format!(
                "commit {} does not descend from {}, the last one applied: a push that rewinds the branch (to an older signed commit, say) is not applied; set git.allowRewind: true in the node config to allow it",
                short(&rev),
                short(&last.to_string())
            );
            return (Some(self.reject(&rev, now, vec![error])), None);
        }
        match self.load(config, mirror, &rev) {
            Ok(mut loaded) => {
                loaded.signer = signer;
                (None, Some(loaded))
            }
            Err(e) => (Some(self.reject(&rev, now, vec![e])), None),
        }
    }

    /// A new revision's verdict, from the diagnostics of the plan this pass
    /// applies: with errors it is rejected and the last good one keeps
    /// running; without, it becomes the one to run. Recorded before the
    /// apply, which may take a while (init containers run to completion),
    /// so `berth status` says it at once.
    pub(crate) fn accept(
        &mut self,
        config: &NodeConfig,
        loaded: &Loaded,
        desired: &DesiredNode,
    ) -> Result<PassOutcome, PassOutcome> {
        let rev = &loaded.revision;
        let now = now_secs();
        let diagnostics = || {
            loaded
                .catalog
                .diagnostics
                .iter()
                .chain(&desired.diagnostics)
        };
        let mut errors: Vec<String> = diagnostics()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        errors.sort();
        errors.dedup();
        for d in diagnostics().filter(|d| !d.is_error()) {
            self.log.warn(&d.to_string());
        }
        if !errors.is_empty() {
            return Err(self.reject(rev, now, errors));
        }
        let record = RevisionRecord {
            revision: rev.clone(),
            at: now,
            objects: loaded.catalog.objects.len(),
            pods: desired.pods.len(),
            actions: 0,
        };
        self.log.info(&format!(
            "revision {} accepted: {} objects, {} pods for node {}",
            short(rev),
            record.objects,
            record.pods,
            config.node_name,
        ));
        if let Some(s) = &loaded.signer {
            self.log
                .info(&format!("revision {} is signed by {s}", short(rev)));
        }
        self.state.signed_by = loaded.signer.clone();
        self.state.node = Some(config.node_name.clone());
        self.state.last_good = Some(record.clone());
        self.state.last_attempted = Some(record);
        self.state.errors.clear();
        if let Err(e) = self.store.save(&self.state) {
            self.log
                .error(&format!("cannot save {}: {e}", self.store.path().display()));
        }
        Ok(PassOutcome::Applied {
            revision: rev.clone(),
            changed: true,
        })
    }

    pub(crate) fn load(
        &self,
        config: &NodeConfig,
        mirror: &Mirror,
        rev: &str,
    ) -> Result<Loaded, String> {
        let revision =
            Revision::parse(rev).ok_or_else(|| format!("state names a bad revision {rev:?}"))?;
        let (files, refused) = mirror
            .read_manifests(
                revision,
                &config.path,
                &berth_manifest::LoadOptions::default(),
            )
            .map_err(|e| e.to_string())?;
        Ok(Loaded {
            revision: rev.to_string(),
            catalog: berth_manifest::load_with_refusals(files, refused),
            signer: None,
        })
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
}

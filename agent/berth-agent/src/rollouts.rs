//! Rollouts in the agent: the earlier revisions whose Deployment pods still
//! run (the planner keeps those pods as these revisions made them), the
//! records and statuses the planner hands back, and the health gate: a
//! revision whose rollout fails is rejected, and the node returns to the
//! last revision that was healthy on it with the same rolling machinery.

use std::collections::BTreeSet;

use berth_plan::rollout::replica_of;
use berth_plan::{ActualState, DesiredNode, ImageCatalog, NodeInfo, NodePlan};

use crate::agent::{Agent, Loaded};
use crate::clock::{now_secs, short};
use crate::config::NodeConfig;
use crate::log::Level;
use crate::state::RollbackRecord;

/// Revisions kept as possible makers of running pods, at most.
const MAX_APPLIED_REVISIONS: usize = 8;

impl Agent {
    /// Stage 1 of the plan for `loaded`, with the catalogs of the earlier
    /// revisions whose pods still run.
    pub(crate) fn desire(
        &mut self,
        config: &NodeConfig,
        mirror: &berth_git::Mirror,
        loaded: &Loaded,
        node: &NodeInfo,
        images: &ImageCatalog,
        actual: &ActualState,
    ) -> DesiredNode {
        let revisions = self.older_revisions(config, mirror, &loaded.revision, actual);
        let cache = std::mem::take(&mut self.older);
        let older: Vec<&berth_manifest::Catalog> =
            revisions.iter().filter_map(|r| cache.get(r)).collect();
        let desired = berth_plan::desire_with(
            &loaded.catalog,
            &older,
            node,
            images,
            actual,
            &short(&loaded.revision),
        );
        drop(older);
        self.older = cache;
        desired
    }

    /// The revisions applied here before `current` that made a Deployment
    /// pod still running (by its template hash), newest first, loaded into
    /// the cache; the newest is kept whatever, for pods named before
    /// rollouts. Others leave the list and the cache.
    fn older_revisions(
        &mut self,
        config: &NodeConfig,
        mirror: &berth_git::Mirror,
        current: &str,
        actual: &ActualState,
    ) -> Vec<String> {
        // (namespace/deployment, hash) of every running replica.
        let mut running: BTreeSet<(String, String)> = BTreeSet::new();
        for u in actual.units.iter().filter(|u| u.is_berths()) {
            let (Some(owner), Some(pod)) = (u.owner(), u.pod()) else {
                continue;
            };
            let Some((namespace, name)) = owner
                .strip_prefix("Deployment/")
                .and_then(|o| o.split_once('/'))
            else {
                continue;
            };
            let pod_name = pod.split_once('/').map_or(pod.as_str(), |(_, n)| n);
            if let Some(hash) = replica_of(name, pod_name).and_then(|r| r.hash) {
                running.insert((format!("{namespace}/{name}"), hash.to_string()));
            }
        }
        let mut kept = Vec::new();
        // The current revision stays in the list: pods named before
        // rollouts were made by the newest one, which may be it. A node
        // upgraded from before rollouts starts from its last good revision.
        let mut listed = self.state.applied_revisions.clone();
        if listed.is_empty()
            && let Some(g) = &self.state.last_good
        {
            listed.push(g.revision.clone());
        }
        let _ = current;
        for (i, revision) in listed.iter().enumerate() {
            if !self.older.contains_key(revision) {
                match self.load(config, mirror, revision) {
                    Ok(l) => {
                        self.older.insert(revision.clone(), l.catalog);
                    }
                    Err(e) => {
                        self.log.warn(&format!(
                            "cannot load revision {} whose pods may still run: {e}",
                            short(revision)
                        ));
                        continue;
                    }
                }
            }
            let Some(catalog) = self.older.get(revision) else {
                continue;
            };
            let makes_running = catalog.objects.iter().any(|o| {
                let berth_manifest::Object::Deployment(d) = &o.object else {
                    return false;
                };
                let Some(spec) = &d.spec else { return false };
                let namespace = o.id.namespace.as_deref().unwrap_or("");
                let hash = berth_plan::rollout::template_hash(spec, namespace, catalog);
                running.contains(&(format!("{namespace}/{}", o.id.name), hash))
            });
            if makes_running || i == 0 {
                kept.push(revision.clone());
            }
        }
        self.older.retain(|r, _| kept.contains(r));
        kept
    }

    /// After the plan: the rollouts and statuses it hands back, the
    /// revisions whose pods run, and the health gate.
    pub(crate) fn record_rollouts(
        &mut self,
        config: &NodeConfig,
        revision: &str,
        plan: &NodePlan,
        judge: bool,
    ) {
        let now = now_secs();
        for d in &plan.deployments {
            let before = self
                .state
                .deployments
                .iter()
                .find(|b| b.deployment == d.deployment);
            let progressing = |s: &berth_plan::rollout::DeploymentStatus| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "Progressing")
                    .map(|c| c.reason.clone())
            };
            if before.and_then(progressing) != progressing(d) {
                let line = format!(
                    "Deployment {}: {} ({} of {} updated, {} available)",
                    d.deployment,
                    d.conditions
                        .iter()
                        .find(|c| c.type_ == "Progressing")
                        .map_or(String::new(), |c| format!("{}: {}", c.reason, c.message)),
                    d.updated_replicas,
                    d.desired,
                    d.available_replicas
                );
                let level = if d.failed.is_some() {
                    Level::Error
                } else {
                    Level::Info
                };
                self.log.pod(level, &d.deployment, "", &line);
                if let Some(c) = d.conditions.iter().find(|c| c.type_ == "Progressing") {
                    let kind = if d.failed.is_some() {
                        crate::events::EventType::Warning
                    } else {
                        crate::events::EventType::Normal
                    };
                    self.deployment_event(&d.deployment, kind, &c.reason, &c.message);
                }
            }
        }
        self.state.rollouts = plan.rollouts.clone();
        self.state.deployments = plan.deployments.clone();
        self.rollout_wake = plan.wake_at;
        // Old pods stopped for a rollout under way: the next step (new
        // pods in their place) is planned at once, not at the next poll.
        let rolling = plan.deployments.iter().any(|d| !d.settled());
        if rolling
            && plan
                .plan
                .actions
                .iter()
                .any(|a| a.verb == berth_plan::Verb::Stop && a.pod.is_some())
        {
            self.pass_again = true;
        }
        self.state.applied_revisions.retain(|r| r != revision);
        self.state.applied_revisions.insert(0, revision.to_string());
        self.state.applied_revisions.truncate(MAX_APPLIED_REVISIONS);

        if !judge {
            return;
        }
        let failed: Vec<String> = plan
            .deployments
            .iter()
            .filter_map(|d| {
                d.failed
                    .as_ref()
                    .map(|f| format!("Deployment {}: {}: {}", d.deployment, f.reason, f.message))
            })
            .collect();
        let current = self
            .state
            .last_good
            .as_ref()
            .is_some_and(|g| g.revision == revision);
        if !failed.is_empty() {
            if self
                .state
                .rolled_back
                .as_ref()
                .is_some_and(|r| r.revision == revision)
            {
                return;
            }
            let reason = failed.join("; ");
            let back_to = self
                .state
                .last_healthy
                .clone()
                .filter(|h| h.revision != revision && config.auto_rollback);
            match &back_to {
                Some(h) => self.log.error(&format!(
                    "revision {} failed its rollout: {reason}; rolling back to {}, the last revision healthy on this node; {} is not tried again until a new commit arrives",
                    short(revision),
                    short(&h.revision),
                    short(revision)
                )),
                None => self.log.error(&format!(
                    "revision {} failed its rollout: {reason}; {}",
                    short(revision),
                    if config.auto_rollback {
                        "no earlier revision was healthy on this node, so it stays"
                    } else {
                        "rollout.autoRollback is off, so it stays"
                    }
                )),
            }
            for d in plan.deployments.iter().filter(|d| d.failed.is_some()) {
                self.deployment_event(
                    &d.deployment,
                    crate::events::EventType::Warning,
                    "RolledBack",
                    &match &back_to {
                        Some(h) => format!(
                            "revision {} failed its rollout; back to {}, the last revision healthy on this node",
                            short(revision),
                            short(&h.revision)
                        ),
                        None => format!(
                            "revision {} failed its rollout; it stays (no healthy revision to return to, or rollout.autoRollback is off)",
                            short(revision)
                        ),
                    },
                );
            }
            self.state.rolled_back = Some(RollbackRecord {
                revision: revision.to_string(),
                at: now,
                reason,
                to: back_to.as_ref().map(|h| h.revision.clone()),
            });
            if let Some(h) = back_to {
                self.state.last_good = Some(h);
                self.pass_again = true;
            }
            let _ = self.store.save(&self.state);
        } else if current
            && plan.deployments.iter().all(|d| d.settled())
            && self
                .state
                .last_healthy
                .as_ref()
                .is_none_or(|h| h.revision != revision)
        {
            if !plan.deployments.is_empty() {
                self.log.info(&format!(
                    "revision {} is healthy: every rollout is complete",
                    short(revision)
                ));
            }
            self.state.last_healthy = self.state.last_good.clone();
        }
    }

    /// Whether `rev` was rejected by a failed rollout the node rolled back
    /// from: it waits for a new commit, as an invalid one does.
    pub(crate) fn rolled_back_from(&self, rev: &str) -> bool {
        self.state
            .rolled_back
            .as_ref()
            .is_some_and(|r| r.revision == rev && r.to.is_some())
    }
}

//! Reconcile: one pass over a revision, as the stages of the design say.
//!
//! 1. observe systemd: the units that run;
//! 2. desired: the pods this node runs (`berth_plan::desire`), and for a
//!    new revision the verdict on it from that same plan's diagnostics;
//! 3. prepare what those pods need before they start: the node's network
//!    and each pod's wiring, claims and volumes; how it went, the images'
//!    state and the digests last applied are facts of the observed state;
//! 4. plan (`berth_plan::plan_desired`): every action and every hold,
//!    drift classified; written with the observed state to the state
//!    directory, so `berth plan --actual` replays it;
//! 5. apply: the plan's pulls, then its unit actions, nothing else;
//! 6. record: failures and holds for pod status, digests, drift, Services.

use std::collections::{BTreeMap, BTreeSet};

use berth_plan::pressure::Signal;
use berth_plan::{
    ActualState, DesiredNode, HoldReason, ImageCatalog, NodeInfo, PodFacts, Verb, Wiring,
};
use berth_runtime::{ApplyFailure, Host, Observed, apply, observe};

use crate::agent::{Agent, Loaded, MAX_LOGGED_ACTIONS, PassOutcome};
use crate::clock::{now_secs, short};
use crate::config::NodeConfig;
use crate::drift::DriftItem;
use crate::host::Runtime;
use crate::limits::CgroupLimits;
use crate::log::Level;
use crate::publisher::DriftCommit;
use crate::state::NotAdmittedRecord;
use crate::{drift, network, state};

impl Agent {
    /// Plans and applies `candidate` (a new revision, accepted here by its
    /// plan or rejected) or else the last good revision. `outcome` gets the
    /// verdict on the candidate.
    pub(crate) fn reconcile(
        &mut self,
        config: &NodeConfig,
        mirror: &berth_git::Mirror,
        candidate: Option<Loaded>,
        outcome: &mut Option<PassOutcome>,
    ) -> Result<(), String> {
        let node = self.node_info(config);
        let image_configs = self.image_configs();
        let rt = self.runtime.take();
        let result = self.reconcile_with(
            rt.as_ref(),
            config,
            mirror,
            candidate,
            outcome,
            &node,
            image_configs,
        );
        self.runtime = rt;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn reconcile_with(
        &mut self,
        rt: Option<&Runtime>,
        config: &NodeConfig,
        mirror: &berth_git::Mirror,
        candidate: Option<Loaded>,
        outcome: &mut Option<PassOutcome>,
        node: &NodeInfo,
        image_configs: Vec<berth_plan::ImageConfig>,
    ) -> Result<(), String> {
        let images = &ImageCatalog::new(image_configs.clone());
        self.pass_marks = vec![("", std::time::Instant::now())];
        let mut observed = match rt {
            Some(rt) => {
                observe(rt.systemd.as_ref()).map_err(|e| format!("cannot observe units: {e}"))?
            }
            None => Observed::default(),
        };
        self.mark("observe");
        // A readiness change while this pass observed reaches the Services
        // now, not at the pass's end (see `health_checkpoint`).
        self.health_checkpoint(config);
        // The planner's clock, and the evictions it keeps in force.
        observed.actual.observed_at = now_secs();
        observed.actual.evictions = self.state.evictions.clone();
        self.check_boot();
        // Probe results and the rollouts kept: a rollout weighs both.
        if let Some(prober) = &self.prober {
            for (pod, containers) in prober.health() {
                observed.actual.pods.entry(pod).or_default().health = containers;
            }
        }
        observed.actual.rollouts = self.state.rollouts.clone();
        let mut chosen = None;
        if let Some(loaded) = candidate {
            let desired = self.desire(config, mirror, &loaded, node, images, &observed.actual);
            match self.accept(config, &loaded, &desired) {
                Ok(o) => {
                    *outcome = Some(o);
                    chosen = Some((loaded, desired));
                }
                Err(o) => *outcome = Some(o),
            }
        }
        let (loaded, desired) = match chosen {
            Some(c) => c,
            None => {
                let Some(good) = self.state.last_good.as_ref().map(|g| g.revision.clone()) else {
                    return Ok(());
                };
                let loaded = self.load(config, mirror, &good)?;
                let desired = self.desire(config, mirror, &loaded, node, images, &observed.actual);
                (loaded, desired)
            }
        };
        self.mark("load");
        // Every line of the pass from here names its revision.
        let _pass =
            tracing::info_span!("pass", berth_revision = %short(&loaded.revision)).entered();
        match rt {
            // Going down: pods stop with the system, and what a pass would
            // see of them (units half gone, slices unloaded) is no ground
            // to start, refuse or unwire anything.
            Some(rt) if rt.systemd.shutting_down() => {
                self.log
                    .info("the system is shutting down: nothing applied in this pass");
                return Ok(());
            }
            Some(rt) => {
                self.reconcile_on(rt, config, &loaded, desired, &observed, node, image_configs)?
            }
            None => {
                // Plan only: nothing runs, nothing is prepared.
                let actual = ActualState {
                    node: Some(node.clone()),
                    observed_at: now_secs(),
                    ..ActualState::default()
                };
                let plan = berth_plan::plan_desired(
                    desired,
                    &loaded.catalog,
                    node,
                    &actual,
                    &short(&loaded.revision),
                );
                self.log_actions(&plan.plan.actions);
            }
        }
        self.reconciled = Some((loaded.revision.clone(), std::time::Instant::now()));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn reconcile_on(
        &mut self,
        rt: &Runtime,
        config: &NodeConfig,
        loaded: &Loaded,
        desired: DesiredNode,
        observed: &Observed,
        node: &NodeInfo,
        image_configs: Vec<berth_plan::ImageConfig>,
    ) -> Result<(), String> {
        let now = observed.actual.observed_at;
        // Prepare, and gather the facts the plan weighs.
        let (wiring, pod_files) = self.wire_pods(config, &desired.pods);
        self.mark("wire");
        let dirs = node.volumes.clone();
        // Pods on their way out whose containers still run: their claims
        // wait for them.
        let wanted: BTreeSet<String> = desired.pods.iter().map(|p| p.id.to_string()).collect();
        let departing: BTreeSet<String> = observed
            .actual
            .units
            .iter()
            .filter(|u| {
                u.is_berths()
                    && !u.name.is_slice()
                    && !matches!(
                        u.active_state,
                        berth_plan::ActiveState::Inactive | berth_plan::ActiveState::Failed
                    )
            })
            .filter_map(berth_plan::ActualUnit::pod)
            .filter(|p| !wanted.contains(p))
            .collect();
        let volumes = self.prepare_volumes(&loaded.catalog, &desired.pods, &departing, &dirs);
        let mut pods: BTreeMap<String, PodFacts> = BTreeMap::new();
        for (pod, w) in wiring {
            pods.entry(pod).or_default().network = Some(w);
        }
        for (pod, message) in volumes {
            pods.entry(pod).or_default().volumes_not_ready = Some(message);
        }
        // What the pods with storage limits hold, for the planner to weigh.
        self.storage_watch = desired
            .pods
            .iter()
            .filter(|p| p.ephemeral.any())
            .cloned()
            .collect();
        for pod in &self.storage_watch {
            pods.entry(pod.id.to_string()).or_default().storage =
                Some(berth_runtime::usage::pod_usage(&rt.roots, pod));
        }
        // Probe results: facts the planner weighs (a failed liveness or
        // startup probe is a kill it plans).
        if let Some(prober) = &self.prober {
            for (pod, containers) in prober.health() {
                pods.entry(pod).or_default().health = containers;
            }
        }
        // Node pressure: the signals now, and (when memory is short) each
        // pod's working set, read from its slice's cgroup.
        self.eviction = config.eviction.clone();
        let slices: BTreeMap<&str, &str> = desired
            .pods
            .iter()
            .filter_map(|p| {
                let u = observed.units.get(p.slice.name.as_str())?;
                Some((p.slice.name.as_str(), u.runtime.control_group.as_str()))
            })
            .collect();
        let mut signals = crate::pressure::measure(&self.paths.state_dir);
        // Disk short: the node reclaims what is its own first (unused
        // images, by the collection's thresholds), as the kubelet does
        // before it evicts, and measures again.
        if config.eviction.met_now(Signal::NodefsAvailable, &signals) {
            let collected = self
                .images
                .collect(&config.images, rt, &desired.pods, &self.log);
            if !collected.is_empty() {
                self.state.images = self.images.record(collected);
                signals = crate::pressure::measure(&self.paths.state_dir);
            }
        }
        let pressure = self
            .pressure
            .fact(&config.eviction, signals, now, |signal| {
                desired
                    .pods
                    .iter()
                    .filter_map(|p| {
                        let cgroup = slices.get(p.slice.name.as_str());
                        let used = match signal {
                            Signal::MemoryAvailable => {
                                crate::pressure::working_set(&rt.cgroup_root, cgroup?)?
                            }
                            Signal::PidAvailable => {
                                crate::pressure::pids_current(&rt.cgroup_root, cgroup?)?
                            }
                            // Its writable layers and disk emptyDirs, as
                            // local storage limits measure them.
                            Signal::NodefsAvailable => {
                                let u = berth_runtime::usage::pod_usage(&rt.roots, p);
                                u.volumes.values().chain(u.containers.values()).sum()
                            }
                        };
                        Some((p.id.to_string(), used))
                    })
                    .collect()
            });
        let actual = ActualState {
            node: Some(node.clone()),
            observed_at: now,
            units: observed.actual.units.clone(),
            applied: self.state.applied.clone(),
            images: self.images.facts(&config.images, rt, &desired.pods),
            image_configs,
            pods,
            environment_digests: false,
            evictions: self.state.evictions.clone(),
            rollouts: self.state.rollouts.clone(),
            pressure: Some(pressure),
            os: Some(self.os_updates.facts()),
        };
        let plan = berth_plan::plan_desired(
            desired,
            &loaded.catalog,
            node,
            &actual,
            &short(&loaded.revision),
        );
        self.mark("plan");
        // Checked again as late as possible: a shutdown that began while
        // this pass observed must not see it start or unwire anything.
        if rt.systemd.shutting_down() {
            self.log
                .info("the system is shutting down: nothing applied in this pass");
            return Ok(());
        }
        if let Err(e) = self.store.save_pass(&actual, &plan.plan) {
            self.log.warn(&format!(
                "cannot record the pass in {}: {e}",
                self.paths.state_dir.display()
            ));
        }
        self.eviction_events(&plan);
        self.record_plan_problems(&plan);
        if plan.pressured != self.pressure.pressured {
            for signal in &plan.pressured {
                if !self.pressure.pressured.contains(signal) {
                    self.log.warn(&format!(
                        "node condition {} is true: {signal} is under its eviction threshold",
                        signal.condition()
                    ));
                }
            }
            for signal in &self.pressure.pressured {
                if !plan.pressured.contains(signal) {
                    self.log.info(&format!(
                        "node condition {} is false again: {signal} reclaimed",
                        signal.condition()
                    ));
                }
            }
        }
        self.pressure.pressured.clone_from(&plan.pressured);
        self.state.pressured.clone_from(&plan.pressured);
        // A shutdown under way fails starts: no ground to judge a revision.
        let judge = !rt.systemd.shutting_down();
        self.record_rollouts(config, &loaded.revision, &plan, judge);
        // Apply: the pulls, then the units.
        let pulls = self.images.pull(&config.images, rt, &plan, &self.log);
        self.pull_events(&plan, pulls);
        let units_to_apply = plan.plan.actions.iter().any(|a| a.verb != Verb::Pull);
        let mut report = if !units_to_apply && self.state.failures.is_empty() {
            self.last_logged_plan.clear();
            berth_runtime::ApplyReport::default()
        } else {
            self.health_checkpoint(config);
            // Pods about to stop leave their Services first: no new
            // connection goes to a pod on its way out (a rollout's old pods).
            if plan
                .plan
                .actions
                .iter()
                .any(|a| a.verb == Verb::Stop && a.pod.is_some())
            {
                let diagnostics = service_diagnostics(&plan);
                let pods = std::mem::take(&mut self.pods);
                self.program_services(&plan.services, &plan.pods, &diagnostics, &pods, now);
                self.pods = pods;
            }
            // The units about to start with probes are known as such before
            // they run: `berth get pods` reads the state file, and a unit
            // running before this pass saves it must not read as ready.
            let mut probed = self.state.probed.clone();
            probed.extend(probed_units(&plan.pods));
            if probed != self.state.probed {
                self.state.probed = probed;
                let _ = self.store.save(&self.state);
            }
            self.end_gracefully(rt, &plan.plan, observed);
            self.apply_plan(rt, &plan, observed, &loaded.revision, pod_files.as_ref())
        };
        crate::hooks::record(&mut self.state.pre_stop, &plan.pods, observed);
        self.log_waits(&plan.plan.held);
        // What waits shows on the pod as a failure would, with its reason.
        report
            .failed
            .extend(plan.plan.held.iter().filter_map(|h| match h.reason {
                HoldReason::Waiting(reason) => Some(ApplyFailure {
                    unit: h.unit.clone(),
                    pod: h.pod.as_ref().map(ToString::to_string),
                    verb: "start".into(),
                    reason,
                    message: h.message.clone(),
                }),
                _ => None,
            }));
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
        // What is now as Git says, by digest: a later departure is drift.
        // A unit whose action failed, or that waits, is not in place.
        let not_in_place: BTreeSet<&str> = report
            .failed
            .iter()
            .map(|f| f.unit.as_str())
            .chain(
                plan.plan
                    .held
                    .iter()
                    .flat_map(|h| h.units.iter().map(|u| u.as_str())),
            )
            .collect();
        let digests = berth_plan::drift::unit_digests(&plan.pods);
        self.state
            .applied
            .retain(|unit, _| digests.contains_key(unit));
        for (unit, digest) in &digests {
            if !not_in_place.contains(unit.as_str()) {
                self.state.applied.insert(unit.clone(), digest.clone());
            }
        }
        let mut outstanding = Vec::new();
        for mut item in plan.drift.iter().cloned() {
            if let Some(f) = report.failed.iter().find(|f| f.unit == item.unit) {
                item.action = format!("heal failed: {:?}: {}", f.reason, f.message);
                outstanding.push(item);
            } else if item.policy == drift::Policy::Heal {
                self.log.pod(
                    Level::Warn,
                    &item.pod,
                    &item.unit,
                    &format!(
                        "drift healed: {} {} {}: {} on the node, {} in Git",
                        item.object, item.unit, item.field, item.actual, item.desired
                    ),
                );
                self.state.healed.push(state::Healed {
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
        let excess = self.state.healed.len().saturating_sub(state::HEALED_KEPT);
        self.state.healed.drain(..excess);
        self.pass_events(&plan, &report, &node.name);
        self.state.failures = report.failed;
        self.begin_kills(&plan, &report.done, &actual, now);
        // The running containers with probes first: one the prober did not
        // know yet gets the kubelet's initial results (not ready) before
        // any status or endpoint is made from them.
        self.probe_targets(&plan.pods, observed);
        if let Some(prober) = &self.prober {
            let health = prober.health();
            self.log_readiness(&health);
            self.probe_events(&health);
            self.state.health = health;
        }
        self.state.probed = probed_units(&plan.pods);
        let mut pods = self.state.pod_statuses(observed, &rt.cgroup_root);
        self.lifecycle_events(&mut pods, now);
        self.state.stamp_transitions(&mut pods, now);
        let service_diagnostics = service_diagnostics(&plan);
        self.program_services(&plan.services, &plan.pods, &service_diagnostics, &pods, now);
        outstanding.extend(drift::standing(
            &pods,
            &self.state.failures,
            &plan.pods,
            &loaded.catalog,
            &config.drift,
            now,
        ));
        drift::carry_since(&mut outstanding, &self.state.drift);
        let was: BTreeSet<String> = self.state.drift.iter().map(DriftItem::key).collect();
        for item in outstanding.iter().filter(|i| !was.contains(&i.key())) {
            self.log.pod(
                Level::Warn,
                &item.pod,
                &item.unit,
                &format!(
                    "drift reported: {} {} {}: {} on the node, {} in Git",
                    item.object, item.unit, item.field, item.actual, item.desired
                ),
            );
        }
        self.drift_commit = self.drift_commit_for(config, loaded, &outstanding);
        self.state.drift = outstanding;
        self.unit_facts = plan
            .pods
            .iter()
            .flat_map(|p| p.units())
            .filter_map(|u| {
                let cgroup = &observed.units.get(u.name.as_str())?.runtime.control_group;
                (!cgroup.is_empty())
                    .then(|| (u.name.to_string(), (cgroup.clone(), u.image.clone())))
            })
            .collect();
        self.pods = pods;
        self.services_input = Some(ServicesInput {
            services: plan.services,
            pods: plan.pods,
            diagnostics: service_diagnostics,
        });
        self.act_on_os(rt, config, plan.os, observed);
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

    /// The `preStop` hooks of the containers `plan` ends, then SIGTERM and
    /// SIGKILL at the end of each grace period (see [`crate::hooks`]).
    fn end_gracefully(&self, rt: &Runtime, plan: &berth_plan::Plan, observed: &Observed) {
        if let Some(exe) = &self.berth_exe {
            crate::hooks::run_before(
                plan,
                &self.state.pre_stop,
                observed,
                &self.state.network.pod_ips,
                rt.systemd.as_ref(),
                exe,
                &self.log,
            );
        }
    }

    /// Carries out the plan's OS decision: stages the declared bundle, or
    /// stops every pod (each with its `preStop` hook and grace period) and
    /// reboots into the staged slot.
    fn act_on_os(
        &mut self,
        rt: &Runtime,
        config: &NodeConfig,
        decision: Option<berth_plan::osupdate::OsDecision>,
        observed: &Observed,
    ) {
        use berth_plan::osupdate::OsAction;
        let Some(d) = decision else {
            self.os_updates.decision = None;
            return;
        };
        let changed = self
            .os_updates
            .decision
            .as_ref()
            .is_none_or(|p| p.action != d.action || p.message != d.message);
        if changed {
            let line = crate::osupdate::decision_line(&d);
            match d.action {
                OsAction::Refused | OsAction::Unsupported => self.log.warn(&line),
                _ => self.log.info(&line),
            }
        }
        match d.action {
            OsAction::Stage => {
                let ready = self
                    .pods
                    .iter()
                    .filter(|p| p.is_ready())
                    .map(berth_runtime::status::PodStatus::key)
                    .collect();
                self.os_updates
                    .stage(&d, &config.images, config.bundle_signers.as_deref(), ready);
            }
            OsAction::Withdraw => match self.os_updates.withdraw() {
                Ok(Some(version)) => self.log.info(&format!(
                    "OS version {version} withdrawn: its NodeImage left Git before the node rebooted into it"
                )),
                Ok(None) => {}
                Err(e) => self.log.warn(&format!("cannot withdraw the staged OS update: {e}")),
            },
            OsAction::Reboot if !self.os_updates.rebooting() => {
                self.log.info(&format!(
                    "rebooting into OS version {}: the pods' containers stop first ({})",
                    d.version,
                    d.stops.len()
                ));
                let plan = berth_plan::Plan {
                    node: config.node_name.clone(),
                    revision: String::new(),
                    actions: d.stops.clone(),
                    held: Vec::new(),
                    beside: BTreeSet::new(),
                };
                self.end_gracefully(rt, &plan, observed);
                let names: Vec<&str> = d.stops.iter().map(|a| a.unit.as_str()).collect();
                for (name, result) in names.iter().zip(rt.systemd.stop_all(&names)) {
                    if let Err(e) = result {
                        self.log
                            .warn(&format!("stopping {name} before the reboot: {e}"));
                    }
                }
                if let Err(e) = self.store.save(&self.state) {
                    self.log
                        .warn(&format!("cannot save the state before the reboot: {e}"));
                }
                match crate::osupdate::reboot(rt.systemd.as_ref()) {
                    Ok(()) => {
                        self.log
                            .info(&format!("rebooting into OS version {}", d.version));
                        self.os_updates.mark_rebooting();
                    }
                    Err(e) => self.log.warn(&format!("cannot reboot: {e}")),
                }
            }
            _ => {}
        }
        self.os_updates.decision = Some(d);
    }

    /// Pods that wait (for an image, their network, their volumes): each
    /// logged when it starts waiting or its reason changes.
    fn log_waits(&mut self, held: &[berth_plan::Held]) {
        let mut now = BTreeSet::new();
        for h in held {
            let (HoldReason::Waiting(reason), Some(pod)) = (h.reason, &h.pod) else {
                continue;
            };
            let key = format!("{pod}|{}", reason.as_str());
            if !self.waiting.contains(&key) {
                self.log.pod(
                    Level::Info,
                    &pod.to_string(),
                    &h.unit,
                    &format!("pod {pod} waits: {}: {}", reason.as_str(), h.message),
                );
            }
            now.insert(key);
        }
        self.waiting = now;
    }

    /// Pods not admitted and pods refused against what runs: logged when
    /// they change, kept for status.
    fn record_plan_problems(&mut self, plan: &berth_plan::NodePlan) {
        for e in &plan.evictions {
            if !self.state.evictions.iter().any(|k| k.pod == e.pod) {
                self.log.pod(
                    Level::Warn,
                    &e.pod,
                    "",
                    &format!("pod {} evicted: {}", e.pod, e.message),
                );
            }
        }
        self.state.evictions.clone_from(&plan.evictions);
        let not_admitted: Vec<NotAdmittedRecord> = plan
            .not_admitted
            .iter()
            .map(|n| NotAdmittedRecord {
                pod: n.pod.to_string(),
                status: n.status.to_string(),
                reason: n.reason.clone(),
            })
            .collect();
        if not_admitted != self.state.not_admitted {
            for n in not_admitted.iter().filter(|n| n.status != "Evicted") {
                self.log.pod(
                    Level::Warn,
                    &n.pod,
                    "",
                    &format!("pod {} is not admitted: {}", n.pod, n.reason),
                );
            }
        }
        self.state.not_admitted = not_admitted;
        let mut plan_errors: Vec<String> = plan
            .diagnostics
            .iter()
            .chain(&plan.conflicts)
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
        self.mark("prepare");
        let report = apply(&host, &plan.plan, &plan.pods, observed);
        self.mark("apply");
        if report.failed != self.state.failures {
            for f in &report.failed {
                let line = format!("{} {}: {:?}: {}", f.verb, f.unit, f.reason, f.message);
                match &f.pod {
                    Some(pod) => self.log.pod(Level::Error, pod, &f.unit, &line),
                    None => self.log.error(&line),
                }
            }
        }
        for c in &report.cleaned {
            self.log.info(&format!("cleaned up {c}"));
        }
        if !plan.plan.actions.is_empty() && !repeated {
            let phases: Vec<String> = report
                .phases
                .iter()
                .map(|(what, took)| format!("{what} {} ms", took.as_millis()))
                .collect();
            self.log.info(&format!(
                "revision {}: {} actions applied, {} failed ({} [{}])",
                short(revision),
                report.done.len(),
                report.failed.len(),
                self.pass_timing(),
                phases.join(", ")
            ));
        }
        if let Some(g) = self.state.last_good.as_mut() {
            g.actions = plan.plan.actions.len();
        }
        self.last_logged_plan = summary;
        report
    }

    /// Notes that the pass's phase `what` ended now.
    pub(crate) fn mark(&mut self, what: &'static str) {
        self.pass_marks.push((what, std::time::Instant::now()));
    }

    /// Where the pass's time went so far: `observe 120 ms, load 40 ms, ...`.
    fn pass_timing(&self) -> String {
        self.pass_marks
            .windows(2)
            .map(|w| format!("{} {} ms", w[1].0, (w[1].1 - w[0].1).as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Prepares the node's network and wires every pod that has its own.
    /// Returns how each pod's wiring stands, by pod, for the plan (a pod
    /// not wired does not start: a container must not run outside its
    /// namespace), and the files each pod's containers get.
    fn wire_pods(
        &mut self,
        config: &NodeConfig,
        pods: &[berth_plan::DesiredPod],
    ) -> (BTreeMap<String, Wiring>, Option<network::PodFiles>) {
        let Some(net) = self.network.as_mut() else {
            return (BTreeMap::new(), None);
        };
        let wired = match net.prepare_node(&config.network) {
            Ok(notes) => {
                for n in notes {
                    self.log.warn(&n);
                }
                self.state.network.error = None;
                self.pass_marks
                    .push(("node network", std::time::Instant::now()));
                net.wire(pods)
            }
            Err(e) => {
                if self.state.network.error.as_deref() != Some(e.as_str()) {
                    self.log.error(&format!("pod network: {e}"));
                }
                self.state.network.error = Some(e.clone());
                pods.iter()
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
        self.state.network.pod_ips = pods
            .iter()
            .filter(|p| !p.host_network)
            .filter_map(|p| Some((p.id.to_string(), net.pod_ip(&p.id.key())?.to_string())))
            .collect();
        let by_key: BTreeMap<String, String> = pods
            .iter()
            .map(|p| (p.id.key(), p.id.to_string()))
            .collect();
        let wiring = wired
            .into_iter()
            .filter_map(|(key, w)| {
                let pod = by_key.get(&key)?.clone();
                Some(match w {
                    network::Wired::Failed(message) => (pod, Wiring::Failed { message }),
                    network::Wired::Ip(ip) => (pod, Wiring::Wired { ip: ip.to_string() }),
                })
            })
            .collect();
        (wiring, Some(net.pod_files(pods)))
    }

    /// Binds claims, publishes their volumes and makes every pod's volumes
    /// ready. Returns, by pod, why its volumes are not ready: the plan
    /// holds those pods, and they show `FailedMount` with the reason.
    fn prepare_volumes(
        &mut self,
        catalog: &berth_manifest::Catalog,
        pods: &[berth_plan::DesiredPod],
        departing: &BTreeSet<String>,
        dirs: &berth_plan::volumes::VolumeDirs,
    ) -> BTreeMap<String, String> {
        let Some(storage) = self.storage.as_mut() else {
            return pods
                .iter()
                .filter(|p| !p.volumes.is_empty())
                .map(|p| {
                    (
                        p.id.to_string(),
                        "this node keeps no volumes (the agent runs without storage)".to_string(),
                    )
                })
                .collect();
        };
        let (record, lines, remounted) = storage.reconcile(catalog, pods, departing, dirs);
        for line in lines {
            self.log.info(&line);
        }
        for r in remounted {
            self.log.warn(&format!(
                "drift healed: the volume of claim {} was unmounted from {} outside Berth; mounted again",
                r.claim,
                r.path.display()
            ));
            self.state.healed.push(state::Healed {
                at: now_secs(),
                object: format!("PersistentVolumeClaim/{}", r.claim),
                unit: r.path.display().to_string(),
                field: "mount".into(),
                found: "not mounted".into(),
                restored: "the claim's volume".into(),
            });
            let excess = self.state.healed.len().saturating_sub(state::HEALED_KEPT);
            self.state.healed.drain(..excess);
        }
        let unready = storage.prepare_pods(pods, dirs);
        for p in &record.problems {
            if !self.state.storage.problems.contains(p) {
                self.log.error(&format!("storage: {p}"));
            }
        }
        self.state.storage = record;
        let by_key: BTreeMap<String, String> = pods
            .iter()
            .map(|p| (p.id.key(), p.id.to_string()))
            .collect();
        unready
            .into_iter()
            .filter_map(|(key, message)| Some((by_key.get(&key)?.clone(), message)))
            .collect()
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

    /// Programs Services over the pods that are ready (their `Ready`
    /// condition, which probes govern). A table edited or deleted by hand
    /// is put back and recorded as healed drift.
    pub(crate) fn program_services(
        &mut self,
        services: &berth_plan::services::ServicePlan,
        desired: &[berth_plan::DesiredPod],
        service_diagnostics: &[String],
        pods: &[berth_runtime::status::PodStatus],
        now: u64,
    ) {
        let Some(net) = self.network.as_mut() else {
            return;
        };
        let mut ready = std::collections::BTreeMap::new();
        let mut addresses = std::collections::BTreeMap::new();
        for p in pods {
            let Some(ip) = p.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            let key = format!("{}_{}", p.namespace, p.name);
            if p.conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True")
            {
                ready.insert(key.clone(), ip);
            }
            addresses.insert(key, ip);
        }
        if self.state.network.error.is_some() {
            return;
        }
        match net.program_services(services, desired, &ready, &addresses) {
            Ok(drifted) => {
                if let Some(how) = drifted {
                    self.log.warn(&format!(
                        "drift healed: nftables table ip {} was {how} outside Berth; restored",
                        berth_net::nft::TABLE
                    ));
                    self.state.healed.push(state::Healed {
                        at: now,
                        object: "Services".into(),
                        unit: format!("nftables table ip {}", berth_net::nft::TABLE),
                        field: "rules".into(),
                        found: how,
                        restored: "the rules for every Service".into(),
                    });
                    let excess = self.state.healed.len().saturating_sub(state::HEALED_KEPT);
                    self.state.healed.drain(..excess);
                }
                // The planner's word on Services, then what leasing could not do.
                let problems: Vec<String> = service_diagnostics
                    .iter()
                    .cloned()
                    .chain(net.service_problems.iter().cloned())
                    .collect();
                if problems != self.state.network.problems {
                    for p in &problems {
                        self.log.warn(p);
                    }
                }
                self.state.network.problems = problems;
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
    pub(crate) fn limits_changed(&self) -> bool {
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

    fn log_actions(&self, actions: &[berth_plan::Action]) {
        for action in actions.iter().take(MAX_LOGGED_ACTIONS) {
            let line = format!(
                "plan: {} {}: {}",
                action.verb.as_str(),
                action.image.as_deref().unwrap_or(action.unit.as_str()),
                action.reason
            );
            match &action.pod {
                Some(pod) => {
                    self.log
                        .pod(Level::Info, &pod.to_string(), action.unit.as_str(), &line)
                }
                None => self.log.info(&line),
            }
        }
        if actions.len() > MAX_LOGGED_ACTIONS {
            self.log.info(&format!(
                "plan: ... and {} more actions",
                actions.len() - MAX_LOGGED_ACTIONS
            ));
        }
    }
}

/// The units with probes, and which: a running one's status shows the
/// kubelet's initial results until the prober has its own.
/// The planner's problems with Services, as their status shows them.
fn service_diagnostics(plan: &berth_plan::NodePlan) -> Vec<String> {
    plan.diagnostics
        .iter()
        .filter(|d| d.object.as_ref().is_some_and(|o| o.kind == "Service"))
        .map(ToString::to_string)
        .collect()
}

/// Counters move with every probe; only readiness matters to Services
/// and rollouts.
fn readiness(
    health: &BTreeMap<String, BTreeMap<String, berth_plan::health::ContainerHealth>>,
) -> Vec<(&str, &str, u64, bool)> {
    health
        .iter()
        .flat_map(|(pod, cs)| {
            cs.iter()
                .map(move |(c, h)| (pod.as_str(), c.as_str(), h.since_usec, h.ready()))
        })
        .collect()
}

fn probed_units(
    pods: &[berth_plan::DesiredPod],
) -> BTreeMap<String, Vec<berth_manifest::probe::ProbeKind>> {
    pods.iter()
        .flat_map(|p| p.units())
        .filter(|u| !u.probes.is_empty())
        .map(|u| (u.name.to_string(), u.probes.kinds()))
        .collect()
}

/// What the last pass programmed Services from (see [`Agent::refresh_health`]).
#[derive(Debug)]
pub(crate) struct ServicesInput {
    pub(crate) services: berth_plan::services::ServicePlan,
    pub(crate) pods: Vec<berth_plan::DesiredPod>,
    pub(crate) diagnostics: Vec<String>,
}

impl Agent {
    /// The kills of this pass that were begun (SIGTERM sent): the prober
    /// holds those containers' probes and wakes the loop when the grace
    /// period ends; status keeps why.
    fn begin_kills(
        &mut self,
        plan: &berth_plan::NodePlan,
        done: &[(String, Verb)],
        actual: &ActualState,
        now: u64,
    ) {
        for action in plan.plan.actions.iter().filter(|a| a.verb == Verb::Kill) {
            let Some(grace) = action.grace_seconds.filter(|g| *g > 0) else {
                continue;
            };
            if !done
                .iter()
                .any(|(u, v)| *v == Verb::Kill && u == action.unit.as_str())
            {
                continue;
            }
            let Some(pod) = &action.pod else { continue };
            let pod = pod.to_string();
            let Some(unit) = plan
                .pods
                .iter()
                .flat_map(|p| p.units())
                .find(|u| u.name == action.unit)
            else {
                continue;
            };
            let why = actual
                .pods
                .get(&pod)
                .and_then(|f| f.health.get(&unit.container))
                .and_then(berth_plan::health::ContainerHealth::kill)
                .map_or_else(|| action.reason.clone(), |(_, message)| message);
            self.log.pod(
                Level::Warn,
                &pod,
                action.unit.as_str(),
                &format!(
                    "container {} of pod {pod}: {why}; killing it (grace period {grace} s)",
                    unit.container
                ),
            );
            self.state.kills.insert(
                format!("{pod}/{}", unit.container),
                format!("{why} (killed at {})", state::rfc3339(now)),
            );
            if let Some(prober) = &self.prober {
                prober.killing(
                    &pod,
                    &unit.container,
                    berth_plan::health::Killing {
                        at: now,
                        grace_seconds: grace,
                    },
                );
            }
        }
        let live: BTreeSet<String> = plan
            .pods
            .iter()
            .flat_map(|p| p.units().map(move |u| format!("{}/{}", p.id, u.container)))
            .collect();
        self.state.kills.retain(|k, _| live.contains(k));
    }

    /// Tells the prober which containers run now, with their probes: each
    /// running container of a planned pod that has any.
    fn probe_targets(&self, desired: &[berth_plan::DesiredPod], observed: &Observed) {
        let Some(prober) = &self.prober else { return };
        let mut targets = Vec::new();
        for pod in desired {
            let id = pod.id.to_string();
            let address = if pod.host_network {
                Some(std::net::Ipv4Addr::LOCALHOST)
            } else {
                self.state
                    .network
                    .pod_ips
                    .get(&id)
                    .and_then(|ip| ip.parse().ok())
            };
            for unit in pod.units().filter(|u| !u.probes.is_empty()) {
                let Some(details) = observed.units.get(unit.name.as_str()) else {
                    continue;
                };
                // No address yet (no pod network): network probes fail as
                // a refused connection to nowhere would.
                let address = address.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                targets.extend(crate::prober::ProbeTarget::of_unit(
                    &id,
                    &unit.container,
                    details,
                    address,
                    unit.probes.clone(),
                ));
            }
        }
        prober.set_targets(targets);
    }

    /// Between passes, after the prober reported a change: readiness goes
    /// to the pods' status and to Service endpoints at once (only the
    /// endpoints that changed are touched). Returns whether a pass is
    /// needed: a probe failed in a way that kills, or a kill's grace
    /// period ended.
    pub(crate) fn refresh_health(&mut self, config: Option<&NodeConfig>) -> bool {
        let Some(prober) = &self.prober else {
            return false;
        };
        let health = prober.health();
        let now = now_secs();
        let needs_pass = health
            .values()
            .flat_map(|c| c.values())
            .any(|h| h.kill().is_some() || h.killing.is_some_and(|k| k.overdue(now)));
        // A rollout under way moves on as soon as a pod is ready.
        let rolling = self.state.deployments.iter().any(|d| !d.settled());
        let needs_pass =
            needs_pass || rolling && readiness(&health) != readiness(&self.state.health);
        if health != self.state.health {
            self.log_readiness(&health);
            self.probe_events(&health);
            self.state.health = health;
            let mut pods = std::mem::take(&mut self.pods);
            for p in &mut pods {
                self.state.health_of(p);
            }
            self.state.stamp_transitions(&mut pods, now);
            if let Some(input) = self.services_input.take() {
                self.program_services(&input.services, &input.pods, &input.diagnostics, &pods, now);
                self.services_input = Some(input);
            }
            self.pods = pods;
            let _ = self.store.save(&self.state);
            self.flush_events();
            if let Some(config) = config {
                self.send_report(config);
            }
        }
        needs_pass
    }

    /// Within a pass, between its long steps (observing, applying): a
    /// readiness change reprograms the Services from what the last pass
    /// programmed, as it would between passes, so a pass under way (a few
    /// seconds under TCG with 50 pods) does not hold an endpoint that is
    /// no longer ready. Kills wait for the pass's plan.
    pub(crate) fn health_checkpoint(&mut self, config: &NodeConfig) {
        let Some(prober) = &self.prober else {
            return;
        };
        if readiness(&prober.health()) != readiness(&self.state.health) {
            let _ = self.refresh_health(Some(config));
        }
    }

    /// Logs each container whose readiness changed, with the failure that
    /// made it not ready (the kubelet's `Unhealthy` event).
    fn log_readiness(
        &self,
        health: &BTreeMap<String, BTreeMap<String, berth_plan::health::ContainerHealth>>,
    ) {
        for (pod, containers) in health {
            for (container, h) in containers {
                let was = self
                    .state
                    .health
                    .get(pod)
                    .and_then(|c| c.get(container))
                    .filter(|w| w.since_usec == h.since_usec)
                    .is_some_and(berth_plan::health::ContainerHealth::ready);
                if was == h.ready() {
                    continue;
                }
                let line = if h.ready() {
                    format!("container {container} of pod {pod} is ready")
                } else {
                    let why = h
                        .readiness
                        .as_ref()
                        .and_then(|r| r.last_failure.as_deref())
                        .unwrap_or("its startup probe has not passed");
                    format!(
                        "container {container} of pod {pod} is not ready: Readiness probe failed: {why}"
                    )
                };
                self.log.pod(Level::Info, pod, container, &line);
            }
        }
    }
}

//! How `berth` prints validation reports and plans: text for people, YAML
//! and JSON for tools. Secrets never reach here: plans carry redacted values.

use std::io::{self, Write};

use berth_manifest::{Catalog, Diagnostic, Rejected, Severity};
use berth_plan::pipeline::NodePlan;
use berth_plan::plan::Action;
use berth_plan::rollout::DeploymentStatus;
use berth_plan::{HoldReason, Properties, PropertyValue};
use berth_runtime::status::PodStatus;
use serde::Serialize;

use crate::Output;

#[derive(Debug, Serialize)]
pub struct ValidationReport {
    pub files: usize,
    pub objects: usize,
    pub errors: usize,
    pub warnings: usize,
    pub rejected: Vec<Rejected>,
    pub diagnostics: Vec<Diagnostic>,
}

impl ValidationReport {
    pub fn new(
        catalog: &Catalog,
        pod_diagnostics: Vec<Diagnostic>,
        pod_rejected: Vec<Rejected>,
    ) -> Self {
        let mut diagnostics = catalog.diagnostics.clone();
        diagnostics.extend(pod_diagnostics);
        sort(&mut diagnostics);
        let mut rejected = catalog.rejected.clone();
        rejected.extend(pod_rejected);
        rejected.sort_by(|a, b| a.source.cmp(&b.source));
        rejected.dedup();
        let errors = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        let warnings = diagnostics.len() - errors;
        Self {
            files: catalog.files.len(),
            objects: catalog.objects.len(),
            errors,
            warnings,
            rejected,
            diagnostics,
        }
    }
}

fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| a.source.cmp(&b.source).then(a.severity.cmp(&b.severity)));
}

/// Machine formats; text output is written by hand.
pub fn emit<T: Serialize>(value: &T, output: Output) -> anyhow::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
        }
        Output::Yaml => write!(out, "{}", serde_saphyr::to_string(value)?)?,
        Output::Text => {}
    }
    out.flush()?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct StatusReport<'a> {
    #[serde(flatten)]
    agent: &'a berth_agent::state::AgentState,
    pods: &'a [PodStatus],
}

pub fn print_status(
    state: &berth_agent::state::AgentState,
    pods: &[PodStatus],
    node: &str,
    now_usec: u64,
    output: Output,
) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(&StatusReport { agent: state, pods }, output);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "node: {}",
        state.node.as_deref().unwrap_or("(not configured yet)")
    )?;
    match &state.last_good {
        Some(g) => writeln!(
            out,
            "running: {} ({} objects, {} pods, {} actions in the last change)",
            g.revision, g.objects, g.pods, g.actions
        )?,
        None => writeln!(out, "running: nothing yet")?,
    }
    if let Some(a) = &state.last_attempted {
        writeln!(out, "last attempted: {}", a.revision)?;
    }
    write_revision_health(
        &mut out,
        state.last_healthy.as_ref(),
        state.rolled_back.as_ref(),
    )?;
    for e in state.errors.iter().chain(&state.plan_errors) {
        writeln!(out, "error: {e}")?;
    }
    if let Some(s) = &state.signed_by {
        writeln!(out, "signed by: {s}")?;
    }
    write_drift(&mut out, &state.drift)?;
    let net = &state.network;
    if let Some(e) = &net.error {
        writeln!(out, "pod network: {e}")?;
    }
    for s in &net.services {
        writeln!(
            out,
            "service {}: {} {} → {}",
            s.name,
            s.cluster_ip,
            s.ports.join(","),
            if s.endpoints.is_empty() {
                "no endpoints".to_string()
            } else {
                s.endpoints.join(" ")
            }
        )?;
    }
    for p in &net.problems {
        writeln!(out, "service problem: {p}")?;
    }
    for c in &state.storage.claims {
        let size = |b: Option<u64>| b.map_or("-".to_string(), berth_storage::format_size);
        write!(
            out,
            "claim {}/{}: {} {} {} used of {}",
            c.namespace,
            c.name,
            c.phase,
            c.volume.as_deref().unwrap_or("-"),
            size(c.used_bytes),
            size(c.capacity_bytes)
        )?;
        for cond in &c.conditions {
            write!(out, " [{cond}]")?;
        }
        if let (Some(r), Some(m)) = (&c.reason, &c.message) {
            write!(out, " ({r}: {m})")?;
        }
        writeln!(out)?;
    }
    for v in state.storage.volumes.iter().filter(|v| v.phase != "Bound") {
        writeln!(
            out,
            "volume {}: {} ({}), was claim {}",
            v.name, v.phase, v.reclaim_policy, v.claim
        )?;
    }
    for p in &state.storage.problems {
        writeln!(out, "storage problem: {p}")?;
    }
    for (reference, p) in &state.images.pulls {
        match &p.error {
            Some(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                writeln!(
                    out,
                    "image {reference}: pull failed {} time(s), next try in {}s: {e}",
                    p.failures,
                    p.retry_at.saturating_sub(now)
                )?
            }
            None => writeln!(
                out,
                "image {reference}: {:?}, {:.1} of {:.1} MB",
                p.phase,
                p.bytes_done as f64 / 1e6,
                p.bytes_total as f64 / 1e6
            )?,
        }
    }
    for reference in &state.images.collected {
        writeln!(out, "image {reference}: collected (unused)")?;
    }
    let p = &state.publish;
    match (&p.error, p.last_push) {
        (Some(e), _) => writeln!(out, "publishing: failing ({} attempts): {e}", p.failures)?,
        (None, Some(at)) => writeln!(
            out,
            "publishing: last push {} ago{}",
            age((now_usec / 1_000_000).saturating_sub(at)),
            if p.pending { ", more pending" } else { "" }
        )?,
        (None, None) => writeln!(out, "publishing: nothing pushed yet")?,
    }
    writeln!(out)?;
    drop(out);
    if !state.deployments.is_empty() {
        print_deployments(&state.deployments, Output::Text)?;
        let mut out = io::stdout().lock();
        write_rollouts(&mut out, &state.deployments)?;
        writeln!(out)?;
    }
    print_pods(pods, node, now_usec, Output::Text)?;
    let mut out = io::stdout().lock();
    for p in pods {
        for m in &p.messages {
            writeln!(out, "{}/{}: {m}", p.namespace, p.name)?;
        }
        for line in health_lines(p) {
            writeln!(out, "{}/{}: {line}", p.namespace, p.name)?;
        }
    }
    Ok(())
}

/// What probes say of a pod, for `berth status`: a condition that is not
/// true (since when, and why), each probe that ever failed in the running
/// instance, and the container's last kill for a failed probe.
fn health_lines(p: &berth_runtime::status::PodStatus) -> Vec<String> {
    let mut out = Vec::new();
    for c in p
        .conditions
        .iter()
        .filter(|c| c.status != "True" && c.kind == "Ready")
    {
        out.push(format!(
            "{} {}{}{}",
            c.kind,
            c.status,
            c.last_transition
                .as_deref()
                .map(|t| format!(" since {t}"))
                .unwrap_or_default(),
            c.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    for c in &p.containers {
        for probe in p_failed(c) {
            out.push(format!(
                "container {}: {} probe {} ({} of {} runs failed); last failure: {}",
                c.name,
                probe.probe,
                probe.result,
                probe.failures,
                probe.runs,
                probe.last_failure.as_deref().unwrap_or("")
            ));
        }
        if let Some(kill) = &c.last_kill {
            out.push(format!(
                "container {}: restarted {} times; last killed: {kill}",
                c.name, c.restart_count
            ));
        }
    }
    out
}

fn p_failed(
    c: &berth_runtime::status::ContainerStatus,
) -> impl Iterator<Item = &berth_runtime::status::ProbeReport> {
    c.probes.iter().filter(|p| p.failures > 0)
}

/// `5s`, `3m12s`, `2h5m`, `4d3h`: kubectl's AGE column.
fn write_drift(out: &mut impl Write, drift: &[berth_agent::drift::DriftItem]) -> io::Result<()> {
    if drift.is_empty() {
        return writeln!(out, "drift: none");
    }
    writeln!(out, "drift: {} fields", drift.len())?;
    for d in drift.iter().take(20) {
        writeln!(
            out,
            "  {} {} {}: {} in Git, {} on the node ({})",
            d.object,
            d.container.as_deref().unwrap_or("-"),
            d.field,
            d.desired,
            d.actual,
            d.action
        )?;
    }
    if drift.len() > 20 {
        writeln!(out, "  … and {} more", drift.len() - 20)?;
    }
    Ok(())
}

/// A node's status as its status branch says it.
pub fn print_node_status(
    doc: &berth_agent::report::NodeStatusDoc,
    now_usec: u64,
    output: Output,
) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(doc, output);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "node: {} (reported {})", doc.node.name, doc.heartbeat)?;
    match &doc.revisions.applied {
        Some(g) => writeln!(out, "running: {} ({} pods)", g.revision, g.pods)?,
        None => writeln!(out, "running: nothing yet")?,
    }
    if let Some(a) = &doc.revisions.attempted {
        writeln!(out, "last attempted: {}", a.revision)?;
    }
    write_revision_health(
        &mut out,
        doc.revisions.healthy.as_ref(),
        doc.revisions.rolled_back.as_ref(),
    )?;
    for c in &doc.node.conditions {
        writeln!(
            out,
            "condition {}: {} ({}){}",
            c.kind,
            c.status,
            c.reason,
            if c.message.is_empty() {
                String::new()
            } else {
                format!(": {}", c.message)
            }
        )?;
    }
    for e in &doc.errors {
        writeln!(out, "error: {e}")?;
    }
    write_drift(&mut out, &doc.drift.items)?;
    for h in &doc.drift.healed {
        writeln!(
            out,
            "healed: {} {} {}: {} put back to {}",
            h.object, h.unit, h.field, h.found, h.restored
        )?;
    }
    writeln!(out)?;
    drop(out);
    if !doc.deployments.is_empty() {
        print_deployments(&doc.deployments, Output::Text)?;
        let mut out = io::stdout().lock();
        write_rollouts(&mut out, &doc.deployments)?;
        writeln!(out)?;
    }
    print_pods(&doc.pods, &doc.node.name, now_usec, Output::Text)
}

/// One line per node of the fleet.
pub fn print_fleet(
    docs: &[berth_agent::report::NodeStatusDoc],
    output: Output,
) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(&docs, output);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "NODE\tREADY\tREVISION\tPODS\tDRIFT\tREPORTED")?;
    for d in docs {
        let ready = d
            .node
            .conditions
            .iter()
            .find(|c| c.kind == "Ready")
            .map_or("Unknown", |c| c.status.as_str());
        let running = d
            .pods
            .iter()
            .filter(|p| p.phase == berth_runtime::status::Phase::Running)
            .count();
        writeln!(
            out,
            "{}\t{}\t{}\t{}/{}\t{}\t{}",
            d.node.name,
            ready,
            d.revisions.applied.as_ref().map_or("-".to_string(), |r| r
                .revision
                .chars()
                .take(12)
                .collect()),
            running,
            d.pods.len(),
            d.drift.count,
            d.heartbeat
        )?;
    }
    Ok(())
}

pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub fn print_pods(
    pods: &[PodStatus],
    node: &str,
    now_usec: u64,
    output: Output,
) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(&pods, output);
    }
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "QOS",
            "MEMORY",
            "CPU",
            "IP",
            "NODE",
        ]
        .map(String::from),
    ];
    for p in pods {
        let (ready, total) = p.ready();
        rows.push([
            p.namespace.clone(),
            p.name.clone(),
            format!("{ready}/{total}"),
            p.status.clone(),
            p.restarts().to_string(),
            p.start_usec
                .map_or("-".into(), |s| age(now_usec.saturating_sub(s) / 1_000_000)),
            p.qos_class.clone().unwrap_or_else(|| "-".into()),
            p.usage
                .memory_bytes
                .map_or("-".into(), |b| format!("{:.1}Mi", b as f64 / 1_048_576.0)),
            p.usage
                .cpu_usage_usec
                .map_or("-".into(), |u| format!("{:.2}s", u as f64 / 1e6)),
            p.pod_ip.clone().unwrap_or_else(|| "-".into()),
            node.to_string(),
        ]);
    }
    let mut out = io::stdout().lock();
    if pods.is_empty() {
        writeln!(out, "No pods on this node.")?;
        return Ok(());
    }
    write_table(&mut out, &rows)?;
    // How containers that restarted last ended (`lastState.terminated`).
    let now = now_usec / 1_000_000;
    for p in pods {
        for c in &p.containers {
            if let Some(l) = &c.last_state {
                writeln!(
                    out,
                    "{}/{} {}: last terminated {}{}, {} ago",
                    p.namespace,
                    p.name,
                    c.name,
                    l.reason,
                    l.exit_code
                        .map_or(String::new(), |code| format!(" (exit code {code})")),
                    age(now.saturating_sub(l.finished_at))
                )?;
            }
        }
    }
    Ok(())
}

/// Rows in columns as wide as their widest cell, three spaces apart
/// (kubectl's layout).
fn write_table<const N: usize>(out: &mut impl Write, rows: &[[String; N]]) -> io::Result<()> {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("   ").trim_end())?;
    }
    Ok(())
}

pub fn print_validation(report: &ValidationReport, output: Output) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(report, output);
    }
    let mut out = io::stdout().lock();
    for d in &report.diagnostics {
        writeln!(out, "{d}")?;
    }
    writeln!(
        out,
        "{} objects in {} files: {} rejected, {} errors, {} warnings",
        report.objects + report.rejected.len(),
        report.files,
        report.rejected.len(),
        report.errors,
        report.warnings
    )?;
    Ok(())
}

#[derive(Debug, Serialize)]
struct PlanReport<'a> {
    #[serde(flatten)]
    node_plan: &'a NodePlan,
    #[serde(rename = "loadDiagnostics")]
    load_diagnostics: &'a [Diagnostic],
    #[serde(rename = "loadRejected")]
    load_rejected: &'a [Rejected],
}

pub fn print_plan(catalog: &Catalog, node_plan: &NodePlan, output: Output) -> anyhow::Result<()> {
    if output != Output::Text {
        let report = PlanReport {
            node_plan,
            load_diagnostics: &catalog.diagnostics,
            load_rejected: &catalog.rejected,
        };
        return emit(&report, output);
    }
    let mut out = io::BufWriter::new(io::stdout().lock());
    let plan = &node_plan.plan;
    writeln!(
        out,
        "Plan for node {} at revision {}: {} pods, {} actions",
        plan.node,
        plan.revision,
        node_plan.pods.len(),
        plan.actions.len()
    )?;
    if plan.actions.is_empty() {
        writeln!(
            out,
            "\nNothing to do: the node already runs what Git describes."
        )?;
    }
    for (i, action) in plan.actions.iter().enumerate() {
        write_action(&mut out, i + 1, action)?;
    }
    if !plan.beside.is_empty() {
        let units: Vec<&str> = plan.beside.iter().map(|u| u.as_str()).collect();
        writeln!(
            out,
            "\nStopped beside the starts (a rollout's old pods wind down while their replacements start): {}",
            units.join(", ")
        )?;
    }
    write_rollouts(&mut out, &node_plan.deployments)?;
    if let Some(os) = &node_plan.os {
        let from = if os.node_image.is_empty() {
            "no NodeImage".to_string()
        } else {
            format!("NodeImage {}", os.node_image)
        };
        writeln!(
            out,
            "\nOS ({from}, version {}): {:?}: {}",
            os.version, os.action, os.message
        )?;
        for (i, action) in os.stops.iter().enumerate() {
            write_action(&mut out, i + 1, action)?;
        }
        if !os.stops.is_empty() {
            writeln!(out, "\n  then: reboot")?;
        }
    }
    let (rolling, held): (Vec<_>, Vec<_>) = plan
        .held
        .iter()
        .partition(|h| h.reason == HoldReason::Rollout);
    if !rolling.is_empty() {
        writeln!(out, "\nHeld by rollouts ({}):", rolling.len())?;
        for h in rolling {
            writeln!(out, "  {}: {}", h.unit, h.message)?;
        }
    }
    let (waiting, kept): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|h| matches!(h.reason, HoldReason::Waiting(_)));
    if !waiting.is_empty() {
        writeln!(out, "\nWaiting, not started yet ({}):", waiting.len())?;
        for h in waiting {
            let pod = h
                .pod
                .as_ref()
                .map(|p| format!("pod {p}: "))
                .unwrap_or_default();
            writeln!(
                out,
                "  {pod}{}: {}: {}",
                h.unit,
                h.reason.as_str(),
                h.message
            )?;
        }
    }
    if !kept.is_empty() {
        writeln!(out, "\nLeft running on purpose ({}):", kept.len())?;
        for h in kept {
            writeln!(out, "  {}: {}", h.unit, h.message)?;
        }
    }
    if !node_plan.drift.is_empty() {
        writeln!(
            out,
            "\nDrift from the units last applied ({}):",
            node_plan.drift.len()
        )?;
        for d in &node_plan.drift {
            writeln!(
                out,
                "  {} {} {}: {} on the node, {} in Git; {}",
                d.object, d.unit, d.field, d.actual, d.desired, d.action
            )?;
        }
    }
    if !node_plan.elsewhere.is_empty() {
        writeln!(out, "\nNot for this node ({}):", node_plan.elsewhere.len())?;
        for n in &node_plan.elsewhere {
            writeln!(out, "  {}: {}", n.object, n.reason)?;
        }
    }
    let mut rejected: Vec<&Rejected> = catalog.rejected.iter().chain(&node_plan.rejected).collect();
    rejected.sort_by(|a, b| a.source.cmp(&b.source));
    rejected.dedup();
    if !rejected.is_empty() {
        writeln!(
            out,
            "\nRejected ({}), nothing of theirs is changed:",
            rejected.len()
        )?;
        for r in rejected {
            match &r.object {
                Some(o) => writeln!(out, "  {}: {o}", r.source)?,
                None => writeln!(
                    out,
                    "  {}: a document that is not a readable object",
                    r.source
                )?,
            }
        }
    }
    let mut diagnostics: Vec<Diagnostic> = catalog
        .diagnostics
        .iter()
        .chain(&node_plan.diagnostics)
        .cloned()
        .collect();
    sort(&mut diagnostics);
    if !diagnostics.is_empty() {
        writeln!(out, "\nProblems ({}):", diagnostics.len())?;
        for d in diagnostics {
            writeln!(out, "  {d}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Each rollout under way (or failed): where it stands, and the steps this
/// pass takes (which pods start, which stop, which are waited on).
fn write_rollouts(out: &mut impl Write, deployments: &[DeploymentStatus]) -> io::Result<()> {
    for d in deployments
        .iter()
        .filter(|d| !d.settled() || d.failed.is_some())
    {
        let progressing = d.conditions.iter().find(|c| c.type_ == "Progressing");
        writeln!(
            out,
            "\nRollout of Deployment {} ({}, template {}): {} of {} updated, {} available, {} pods in all{}",
            d.deployment,
            d.strategy,
            d.template_hash,
            d.updated_replicas,
            d.desired,
            d.available_replicas,
            d.replicas,
            progressing.map_or(String::new(), |c| format!("; {}: {}", c.reason, c.message))
        )?;
        for (i, step) in d.steps.iter().enumerate() {
            writeln!(out, "  {}. {step}", i + 1)?;
        }
    }
    Ok(())
}

/// `berth get deployments`: kubectl's columns, and the rollout's state.
pub fn print_deployments(deployments: &[DeploymentStatus], output: Output) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(&deployments, output);
    }
    let mut out = io::stdout().lock();
    if deployments.is_empty() {
        writeln!(out, "No Deployments on this node.")?;
        return Ok(());
    }
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "STRATEGY",
            "PROGRESSING",
        ]
        .map(String::from),
    ];
    for d in deployments {
        let (namespace, name) = d.deployment.split_once('/').unwrap_or(("", &d.deployment));
        let progressing = d
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .map_or("-".to_string(), |c| c.reason.clone());
        rows.push([
            namespace.to_string(),
            name.to_string(),
            format!("{}/{}", d.ready_replicas, d.desired),
            d.updated_replicas.to_string(),
            d.available_replicas.to_string(),
            d.strategy.clone(),
            progressing,
        ]);
    }
    write_table(&mut out, &rows)?;
    for d in deployments {
        if let Some(f) = &d.failed {
            writeln!(
                out,
                "{}: rollout failed: {}: {}",
                d.deployment, f.reason, f.message
            )?;
        }
    }
    Ok(())
}

/// `berth get events`: kubectl's columns; a repeated event says how often
/// and over how long.
pub fn print_events(
    events: &[&berth_agent::events::Event],
    now: u64,
    output: Output,
    header: bool,
) -> anyhow::Result<()> {
    if output != Output::Text {
        return emit(&events, output);
    }
    let mut out = io::stdout().lock();
    if events.is_empty() && header {
        writeln!(out, "No events on this node.")?;
        return Ok(());
    }
    let mut rows = Vec::new();
    if header {
        rows.push(["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"].map(String::from));
    }
    for e in events {
        let seen = age(now.saturating_sub(e.last_timestamp));
        let seen = if e.count > 1 {
            format!(
                "{seen} (x{} over {})",
                e.count,
                age(e.last_timestamp.saturating_sub(e.first_timestamp))
            )
        } else {
            seen
        };
        rows.push([
            seen,
            format!("{:?}", e.kind),
            e.reason.clone(),
            e.object.clone(),
            e.message.clone(),
        ]);
    }
    write_table(&mut out, &rows)?;
    out.flush()?;
    Ok(())
}

/// The revision lines every status shows: healthy, and the last rollback.
fn write_revision_health(
    out: &mut impl Write,
    healthy: Option<&berth_agent::state::RevisionRecord>,
    rolled_back: Option<&berth_agent::state::RollbackRecord>,
) -> io::Result<()> {
    if let Some(h) = healthy {
        writeln!(out, "last healthy: {}", h.revision)?;
    }
    if let Some(r) = rolled_back {
        match &r.to {
            Some(to) => writeln!(
                out,
                "rolled back: {} failed its rollout ({}); returned to {to}",
                r.revision, r.reason
            )?,
            None => writeln!(
                out,
                "rollout failed: {} ({}); no rollback",
                r.revision, r.reason
            )?,
        }
    }
    Ok(())
}

fn write_action(out: &mut impl Write, n: usize, action: &Action) -> io::Result<()> {
    let pod = action
        .pod
        .as_ref()
        .map(|p| format!("  [pod {p}]"))
        .unwrap_or_default();
    let what = match &action.image {
        Some(image) => format!("image {image}"),
        None => action.unit.to_string(),
    };
    writeln!(out, "\n{n:>3}. {} {what}{pod}", action.verb.as_str())?;
    writeln!(out, "     why: {}", action.reason)?;
    match action.grace_seconds {
        Some(0) => writeln!(out, "     grace: none (SIGKILL to every process at once)")?,
        Some(g) => writeln!(out, "     grace: {g} s, then SIGKILL")?,
        None => {}
    }
    write_properties(out, &action.properties)?;
    if !action.after_start.is_empty() {
        writeln!(
            out,
            "     then, once it runs: {} (left out of the start so the sandbox is set up unthrottled)",
            action.after_start.join(", ")
        )?;
    }
    if !action.properties.is_empty() {
        return Ok(());
    }
    for c in &action.changes {
        let show = |v: &Option<PropertyValue>| v.as_ref().map_or("(unset)".to_string(), value_text);
        match &c.from {
            Some(_) => writeln!(
                out,
                "       {}: {} → {}",
                c.property,
                show(&c.from),
                show(&c.to)
            )?,
            None => writeln!(out, "       {} = {}", c.property, show(&c.to))?,
        }
    }
    Ok(())
}

fn write_properties(out: &mut impl Write, props: &Properties) -> io::Result<()> {
    for (k, v) in props.iter() {
        match v {
            PropertyValue::List(items) if k == "Environment" || k == "LogExtraFields" => {
                writeln!(out, "       {k}:")?;
                for item in items.iter() {
                    writeln!(out, "         {item}")?;
                }
            }
            _ => writeln!(out, "       {k} = {}", value_text(v))?,
        }
    }
    Ok(())
}

/// Shell-like quoting for display only: nothing is ever run through a shell.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

fn value_text(v: &PropertyValue) -> String {
    match v {
        PropertyValue::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        PropertyValue::Unsigned(n) => n.to_string(),
        PropertyValue::Signed(n) => n.to_string(),
        PropertyValue::Text(t) => t.to_string(),
        PropertyValue::Exec(cmds) => cmds
            .iter()
            .map(|c| {
                c.argv
                    .iter()
                    .map(|a| quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("; "),
        PropertyValue::List(items) => items.join(" "),
        PropertyValue::Binds(binds) => berth_plan::units::binds_text(binds),
    }
}

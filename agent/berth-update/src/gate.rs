//! The health gate of a new slot: what must hold before the boot is called
//! complete (and systemd-bless-boot makes the slot the default). Pure: the
//! caller observes, this decides.

use std::collections::BTreeSet;

use crate::record::UpdateRecord;

/// The agent restarting this often on the new slot fails the gate at once.
pub const MAX_AGENT_RESTARTS: u32 = 3;

/// What the gate sees on the new slot, each time it looks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The agent finished a pass on this boot (its state names this boot).
    pub agent_passed: bool,
    /// The agent fetched from Git on this boot.
    pub fetched: bool,
    /// The errors of the agent's last pass (a config it cannot parse, a
    /// revision it rejects), empty when it went well.
    pub errors: Vec<String>,
    /// Pods (`namespace/name`) the agent runs now, and those of them
    /// running with every container ready.
    pub declared: BTreeSet<String>,
    pub ready: BTreeSet<String>,
    /// systemd's count of the agent unit's restarts on this boot.
    pub agent_restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass(String),
    Wait(String),
    Fail(String),
}

/// The gate's verdict after `elapsed_secs` of this boot's gate.
pub fn evaluate(record: &UpdateRecord, seen: &Observed, elapsed_secs: u64) -> Verdict {
    if seen.agent_restarts >= MAX_AGENT_RESTARTS {
        return Verdict::Fail(format!(
            "the agent restarted {} times on the new slot",
            seen.agent_restarts
        ));
    }
    let waiting = if !seen.agent_passed {
        Some("the agent has not finished a pass on this boot".to_string())
    } else if let Some(e) = seen.errors.first() {
        Some(format!("the agent's last pass failed: {e}"))
    } else if !seen.fetched {
        Some("Git has not been fetched on this boot".to_string())
    } else {
        // A pod no longer declared (removed from Git meanwhile) is not
        // waited for; one declared and not ready is.
        let missing: Vec<&str> = record
            .pods
            .iter()
            .filter(|p| !seen.ready.contains(*p))
            .filter(|p| seen.declared.contains(*p))
            .map(String::as_str)
            .collect();
        (!missing.is_empty()).then(|| {
            let more = if missing.len() > 3 {
                format!(" and {} more", missing.len() - 3)
            } else {
                String::new()
            };
            format!(
                "pod {}{more} not running and ready",
                missing
                    .iter()
                    .take(3)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    };
    match waiting {
        Some(why) if elapsed_secs >= record.gate_seconds => {
            Verdict::Fail(format!("{why} within {} s", record.gate_seconds))
        }
        Some(why) => Verdict::Wait(why),
        None => {
            let back = record
                .pods
                .iter()
                .filter(|p| seen.ready.contains(*p))
                .count();
            Verdict::Pass(format!(
                "agent passed, Git fetched, {back} of {} pods ready again after {elapsed_secs} s",
                record.pods.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::Slot;

    fn record(pods: &[&str]) -> UpdateRecord {
        UpdateRecord {
            schema: crate::record::SCHEMA,
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
            from_slot: Slot::A,
            to_slot: Slot::B,
            installed_at: 0,
            tries: 3,
            gate_seconds: 120,
            pods: pods.iter().map(|p| p.to_string()).collect(),
            attempts: Vec::new(),
            declaration: None,
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_gate_waits_for_the_agent_git_and_every_pod_then_passes_or_fails_at_the_deadline() {
        let r = record(&["default/web", "default/db"]);
        let mut seen = Observed::default();
        assert_eq!(
            evaluate(&r, &seen, 5),
            Verdict::Wait("the agent has not finished a pass on this boot".into())
        );
        assert_eq!(
            evaluate(&r, &seen, 120),
            Verdict::Fail("the agent has not finished a pass on this boot within 120 s".into())
        );
        seen.agent_passed = true;
        seen.errors = vec!["config: git.url is missing".into()];
        assert!(matches!(evaluate(&r, &seen, 5), Verdict::Wait(w) if w.contains("git.url")));
        seen.errors.clear();
        assert!(
            matches!(evaluate(&r, &seen, 5), Verdict::Wait(w) if w.contains("Git has not been fetched"))
        );
        seen.fetched = true;
        seen.declared = set(&["default/web", "default/db"]);
        seen.ready = set(&["default/web"]);
        assert_eq!(
            evaluate(&r, &seen, 60),
            Verdict::Wait("pod default/db not running and ready".into())
        );
        assert_eq!(
            evaluate(&r, &seen, 121),
            Verdict::Fail("pod default/db not running and ready within 120 s".into())
        );
        seen.ready.insert("default/db".into());
        assert_eq!(
            evaluate(&r, &seen, 61),
            Verdict::Pass("agent passed, Git fetched, 2 of 2 pods ready again after 61 s".into())
        );
        // A pod removed from Git meanwhile is not waited for.
        seen.declared = set(&["default/web"]);
        seen.ready = set(&["default/web"]);
        assert!(matches!(evaluate(&r, &seen, 10), Verdict::Pass(_)));
        // An agent that keeps failing fails the gate before the deadline.
        seen.agent_restarts = 3;
        assert_eq!(
            evaluate(&r, &seen, 10),
            Verdict::Fail("the agent restarted 3 times on the new slot".into())
        );
    }

    #[test]
    fn many_missing_pods_are_counted_not_listed() {
        let pods: Vec<String> = (0..6).map(|i| format!("default/p{i}")).collect();
        let refs: Vec<&str> = pods.iter().map(String::as_str).collect();
        let r = record(&refs);
        let seen = Observed {
            agent_passed: true,
            fetched: true,
            declared: set(&refs),
            ..Observed::default()
        };
        assert_eq!(
            evaluate(&r, &seen, 1),
            Verdict::Wait(
                "pod default/p0, default/p1, default/p2 and 3 more not running and ready".into()
            )
        );
    }
}

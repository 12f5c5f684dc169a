//! The OS update decision: given the `NodeImage` that selects this node,
//! what the node knows of its slots and of the last update, the rollouts
//! under way and the clock, whether to do nothing, stage the bundle
//! (download it and write the other slot), wait, or reboot into it.
//!
//! The agent carries out what this says and nothing else; `berth plan`
//! prints it.

use berth_manifest::nodeimage::{BundleSource, NodeImage};
use berth_manifest::validate::selector_matches;
use berth_manifest::{Catalog, Diagnostic, FieldIssue, FieldPath, LoadedObject, Object};
use serde::{Deserialize, Serialize};

use crate::node::NodeInfo;

/// What the node knows of its OS, observed before the plan (`ActualState::os`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OsFacts {
    /// The booted version.
    pub version: String,
    /// `A` or `B`; none when the node did not boot from a slot (no
    /// `berth.slot=` on its command line), and cannot update itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_slot_version: Option<String>,
    /// The last update the node's record knows of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateFact>,
    /// The last time staging a declared update failed (the download or
    /// the write): it is tried again at `retry_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_failed: Option<StagingFailure>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateFact {
    pub version: String,
    /// The declaration that asked for it ([`declaration`]); none for an
    /// update installed by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declaration: Option<String>,
    /// `Installed`, `Incomplete`, `Gating`, `Promoted` or `RolledBack`.
    pub state: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagingFailure {
    pub declaration: String,
    pub message: String,
    /// Seconds since the epoch.
    pub retry_at: u64,
}

/// What the node does about its OS in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OsAction {
    /// The declared version is the one booted.
    Current,
    /// Download the bundle, check it, write it into the other slot and
    /// make that slot boot next (counted).
    Stage,
    /// Staged, and the time is right: stop the pods and reboot.
    Reboot,
    /// Not now: outside the maintenance window, a rollout under way, a
    /// staging failure backing off, or a slot being tried.
    Wait,
    /// This declaration failed before: not tried again until it changes.
    Refused,
    /// The node cannot update itself (not booted from a slot).
    Unsupported,
    /// No NodeImage selects the node any more, and the update one staged
    /// has not booted: its boot entry is removed, so the node stays.
    Withdraw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OsDecision {
    /// The NodeImage's name.
    pub node_image: String,
    pub version: String,
    /// What a failed update is remembered by: the version and the bundle.
    pub declaration: String,
    pub action: OsAction,
    pub message: String,
    #[serde(skip)]
    pub bundle: BundleSource,
    #[serde(skip)]
    pub tries: u32,
    #[serde(skip)]
    pub gate_seconds: u64,
    /// When to plan again (the window opens, a retry is due).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<u64>,
    /// For a reboot: every running container of Berth's pods, stopped
    /// first as any stop is (`preStop`, SIGTERM, the grace period).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stops: Vec<crate::plan::Action>,
}

/// The stops before a reboot into `version`: each running container unit
/// of Berth's.
pub fn stops_before_reboot(actual: &crate::ActualState, version: &str) -> Vec<crate::plan::Action> {
    use crate::ActiveState;
    actual
        .units
        .iter()
        .filter(|u| {
            u.is_berths()
                && !u.name.is_slice()
                && matches!(
                    u.active_state,
                    ActiveState::Active | ActiveState::Activating | ActiveState::Reloading
                )
        })
        .map(|u| {
            let pod = u.pod();
            crate::plan::Action {
                verb: crate::plan::Verb::Stop,
                unit: u.name.clone(),
                pod: pod.as_deref().and_then(crate::plan::parse_pod_id),
                reason: format!("the node reboots into OS version {version}"),
                image: None,
                properties: Default::default(),
                changes: Vec::new(),
                grace_seconds: None,
                after_start: Vec::new(),
            }
        })
        .collect()
}

/// What identifies a declared update: its version and where its bundle is.
/// A failed one is retried only when this changes.
pub fn declaration(image: &NodeImage) -> String {
    format!("{} from {}", image.spec.version, image.spec.source())
}

fn node_images(catalog: &Catalog) -> impl Iterator<Item = (&LoadedObject, &NodeImage)> {
    catalog.objects.iter().filter_map(|o| match &o.object {
        Object::NodeImage(n) => Some((o, n.as_ref())),
        _ => None,
    })
}

/// The NodeImage that selects `node`. Two that both select it are an
/// error of the revision (which version would win is not for the node to
/// guess); the diagnostics say so.
pub fn selected<'a>(
    catalog: &'a Catalog,
    node: &NodeInfo,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<&'a NodeImage> {
    let mut chosen: Vec<(&LoadedObject, &NodeImage)> = node_images(catalog)
        .filter(|(_, n)| {
            n.spec
                .node_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, &node.labels).unwrap_or(false))
        })
        .collect();
    if chosen.len() > 1 {
        let names: Vec<&str> = chosen.iter().map(|(o, _)| o.id.name.as_str()).collect();
        for (o, _) in &chosen {
            diagnostics.push(catalog.diagnostic(
                o,
                &FieldIssue::error(
                    FieldPath::root().key("spec").key("nodeSelector"),
                    format!(
                        "NodeImages {} all select node {}: one NodeImage per node",
                        names.join(", "),
                        node.name
                    ),
                ),
            ));
        }
        return None;
    }
    chosen.pop().map(|(_, n)| n)
}

/// With no NodeImage selecting the node: an update a declaration staged
/// (written, not booted yet) is withdrawn; Git no longer asks for it.
pub fn withdrawn(facts: &OsFacts) -> Option<OsDecision> {
    let u = facts.update.as_ref().filter(|u| u.state == "Installed")?;
    let declaration = u.declaration.clone()?;
    Some(OsDecision {
        node_image: String::new(),
        version: u.version.clone(),
        declaration,
        action: OsAction::Withdraw,
        message: format!(
            "no NodeImage selects this node any more: version {} leaves the next boot",
            u.version
        ),
        bundle: BundleSource::default(),
        tries: 0,
        gate_seconds: 0,
        wake_at: None,
        stops: Vec::new(),
    })
}

/// The decision. `rollouts_settled`: no Deployment on the node is rolling
/// out. `now`: seconds since the epoch.
pub fn decide(image: &NodeImage, facts: &OsFacts, rollouts_settled: bool, now: u64) -> OsDecision {
    let spec = &image.spec;
    let wanted = declaration(image);
    let mut d = OsDecision {
        node_image: image.metadata.name.clone().unwrap_or_default(),
        version: spec.version.clone(),
        declaration: wanted.clone(),
        action: OsAction::Wait,
        message: String::new(),
        bundle: spec.bundle.clone(),
        tries: spec.tries(),
        gate_seconds: spec.gate_seconds(),
        wake_at: None,
        stops: Vec::new(),
    };
    let mut set = |action, message: String| {
        d.action = action;
        d.message = message;
    };
    let update = facts.update.as_ref().filter(|u| u.version == spec.version);
    let ours = update.filter(|u| u.declaration.as_deref() == Some(wanted.as_str()));
    if facts.version == spec.version {
        set(
            OsAction::Current,
            format!("version {} is booted", spec.version),
        );
    } else if facts.slot.is_none() {
        set(
            OsAction::Unsupported,
            "this node did not boot from a root slot (no berth.slot= on its kernel command line)"
                .into(),
        );
    } else if let Some(u) = facts.update.as_ref().filter(|u| u.state == "Gating") {
        set(
            OsAction::Wait,
            format!("version {} is being tried on this boot", u.version),
        );
    } else if let Some(u) = ours.filter(|u| u.state == "RolledBack") {
        set(
            OsAction::Refused,
            format!(
                "{wanted} failed before ({}): change the version or the bundle to try again",
                u.message
            ),
        );
    } else if ours.is_some_and(|u| u.state == "Installed")
        && facts.other_slot_version.as_deref() == Some(spec.version.as_str())
    {
        let window = spec
            .maintenance_window
            .as_ref()
            .map(|w| w.check(now).unwrap_or(Err(u64::MAX)));
        match window {
            Some(Err(opens)) => {
                set(
                    OsAction::Wait,
                    format!(
                        "version {} is written to the other slot; the maintenance window opens in {} s",
                        spec.version,
                        opens.saturating_sub(now)
                    ),
                );
                d.wake_at = Some(opens);
            }
            _ if !rollouts_settled => set(
                OsAction::Wait,
                format!(
                    "version {} is written to the other slot; a rollout is under way, the reboot waits for it",
                    spec.version
                ),
            ),
            _ => set(
                OsAction::Reboot,
                format!(
                    "version {} is written to the other slot: stop the pods and reboot into it ({} tries)",
                    spec.version,
                    spec.tries()
                ),
            ),
        }
    } else if let Some(f) = facts
        .staging_failed
        .as_ref()
        .filter(|f| f.declaration == wanted && f.retry_at > now)
    {
        set(
            OsAction::Wait,
            format!(
                "staging {wanted} failed: {}; tried again in {} s",
                f.message,
                f.retry_at - now
            ),
        );
        d.wake_at = Some(f.retry_at);
    } else {
        set(
            OsAction::Stage,
            format!(
                "download {wanted}, check it and write it into the other slot (version {} now)",
                facts.other_slot_version.as_deref().unwrap_or("none")
            ),
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_manifest::nodeimage::{MaintenanceWindow, NodeImageSpec};

    fn image(window: Option<(&str, &str)>) -> NodeImage {
        NodeImage {
            api_version: "berth.dev/v1alpha1".into(),
            kind: "NodeImage".into(),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("os".into()),
                ..Default::default()
            },
            spec: NodeImageSpec {
                version: "2".into(),
                bundle: BundleSource {
                    image: Some("r.example/os:2".into()),
                    url: None,
                },
                node_selector: None,
                maintenance_window: window.map(|(s, d)| MaintenanceWindow {
                    start: s.into(),
                    duration: d.into(),
                }),
                max_unavailable: None,
                tries: None,
                gate_seconds: None,
            },
        }
    }

    fn facts(update: Option<(&str, &str)>, other: Option<&str>) -> OsFacts {
        OsFacts {
            version: "1".into(),
            slot: Some("A".into()),
            other_slot_version: other.map(Into::into),
            update: update.map(|(v, state)| UpdateFact {
                version: v.into(),
                declaration: Some(format!("{v} from image r.example/os:{v}")),
                state: state.into(),
                message: "slot B never reached its health gate in 3 boots".into(),
            }),
            staging_failed: None,
        }
    }

    const NOON: u64 = 20_000 * 86_400 + 12 * 3600;

    #[test]
    fn the_steps_of_an_update_in_order() {
        let i = image(None);
        let d = decide(&i, &facts(None, None), true, NOON);
        assert_eq!(d.action, OsAction::Stage, "{}", d.message);
        assert_eq!(d.declaration, "2 from image r.example/os:2");
        let staged = facts(Some(("2", "Installed")), Some("2"));
        assert_eq!(decide(&i, &staged, true, NOON).action, OsAction::Reboot);
        let trying = facts(Some(("2", "Gating")), Some("1"));
        assert_eq!(decide(&i, &trying, true, NOON).action, OsAction::Wait);
        let mut booted = facts(Some(("2", "Promoted")), Some("1"));
        booted.version = "2".into();
        assert_eq!(decide(&i, &booted, true, NOON).action, OsAction::Current);
    }

    #[test]
    fn a_failed_declaration_is_not_retried_until_it_changes() {
        let i = image(None);
        let failed = facts(Some(("2", "RolledBack")), Some("2"));
        let d = decide(&i, &failed, true, NOON);
        assert_eq!(d.action, OsAction::Refused);
        assert!(
            d.message.contains("never reached its health gate"),
            "{}",
            d.message
        );
        let mut moved = image(None);
        moved.spec.bundle.image = Some("r.example/os:2-fixed".into());
        assert_eq!(decide(&moved, &failed, true, NOON).action, OsAction::Stage);
    }

    #[test]
    fn the_reboot_waits_for_the_window_and_for_rollouts() {
        let staged = facts(Some(("2", "Installed")), Some("2"));
        let night = image(Some(("02:00", "1h")));
        let d = decide(&night, &staged, true, NOON);
        assert_eq!(d.action, OsAction::Wait);
        assert_eq!(d.wake_at, Some(NOON + 14 * 3600));
        let at_two = NOON + 14 * 3600 + 60;
        assert_eq!(
            decide(&night, &staged, true, at_two).action,
            OsAction::Reboot
        );
        let d = decide(&night, &staged, false, at_two);
        assert_eq!(d.action, OsAction::Wait);
        assert!(d.message.contains("rollout"), "{}", d.message);
        // Staging itself does not wait for the window.
        assert_eq!(
            decide(&night, &facts(None, None), false, NOON).action,
            OsAction::Stage
        );
    }

    #[test]
    fn staging_failures_back_off_and_hand_installs_are_replaced() {
        let i = image(None);
        let mut f = facts(None, None);
        f.staging_failed = Some(StagingFailure {
            declaration: declaration(&i),
            message: "registry unreachable".into(),
            retry_at: NOON + 60,
        });
        let d = decide(&i, &f, true, NOON);
        assert_eq!((d.action, d.wake_at), (OsAction::Wait, Some(NOON + 60)));
        assert_eq!(decide(&i, &f, true, NOON + 60).action, OsAction::Stage);
        // The same version installed by hand (no declaration) is staged again.
        let mut by_hand = facts(Some(("2", "Installed")), Some("2"));
        if let Some(u) = by_hand.update.as_mut() {
            u.declaration = None;
        }
        assert_eq!(decide(&i, &by_hand, true, NOON).action, OsAction::Stage);
        let mut no_slot = facts(None, None);
        no_slot.slot = None;
        assert_eq!(
            decide(&i, &no_slot, true, NOON).action,
            OsAction::Unsupported
        );
    }

    #[test]
    fn a_staged_update_whose_declaration_left_git_is_withdrawn() {
        let staged = facts(Some(("2", "Installed")), Some("2"));
        let d = withdrawn(&staged).expect("withdrawn");
        assert_eq!((d.action, d.version.as_str()), (OsAction::Withdraw, "2"));
        // Not one being tried, promoted, rolled back, or installed by hand.
        for state in ["Gating", "Promoted", "RolledBack", "Incomplete"] {
            assert_eq!(
                withdrawn(&facts(Some(("2", state)), Some("2"))),
                None,
                "{state}"
            );
        }
        let mut by_hand = staged;
        if let Some(u) = by_hand.update.as_mut() {
            u.declaration = None;
        }
        assert_eq!(withdrawn(&by_hand), None);
        assert_eq!(withdrawn(&OsFacts::default()), None);
    }
}

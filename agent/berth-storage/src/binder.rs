//! Binding claims to volumes, as Kubernetes' PV controller does, on one
//! node: pure, so every rule is tested without a disk.

use std::collections::{BTreeMap, BTreeSet};

use crate::book::{Book, ClaimRef, Phase, Reclaim, volume_name};

/// A PersistentVolumeClaim from Git.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSpec {
    pub claim: ClaimRef,
    /// `storageClassName` as written: `None` takes the default class,
    /// `Some("")` asks for a PV without a class.
    pub class: Option<String>,
    pub request_bytes: u64,
    pub access_modes: Vec<String>,
    pub volume_name: Option<String>,
}

/// A static PersistentVolume from Git (`local` or `hostPath`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPv {
    pub name: String,
    pub class: String,
    pub capacity_bytes: u64,
    pub access_modes: Vec<String>,
    pub path: String,
    /// `spec.claimRef`: reserved for that claim.
    pub reserved_for: Option<ClaimRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    pub provisioner: String,
    pub reclaim: Reclaim,
    pub wait_for_first_consumer: bool,
    pub allow_expansion: bool,
    pub default: bool,
}

/// What a claim is bound to, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    Provisioned { volume: String },
    Static { pv: String, path: String },
    Pending { reason: String, message: String },
}

/// A change to make on disk, in order, each recorded in the book first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Provision {
        volume: String,
        claim: ClaimRef,
        class: String,
        bytes: u64,
        reclaim: Reclaim,
    },
    Expand {
        volume: String,
        bytes: u64,
    },
    /// The claim is gone; policy Retain: keep the data, never bind again.
    Release {
        volume: String,
    },
    /// The claim is gone; policy Delete (or the volume was never used).
    Delete {
        volume: String,
    },
    BindStatic {
        pv: String,
        claim: ClaimRef,
    },
    ReleaseStatic {
        pv: String,
    },
    /// The PV object left Git: forget its binding.
    ForgetStatic {
        pv: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub bindings: BTreeMap<ClaimRef, Binding>,
    pub steps: Vec<Step>,
    /// Per claim: a condition to show (for example a resize not allowed).
    pub notes: BTreeMap<ClaimRef, String>,
}

fn modes_fit(asked: &[String], offered: &[String]) -> bool {
    asked.iter().all(|m| offered.contains(m))
}

fn pending(reason: &str, message: String) -> Binding {
    Binding::Pending {
        reason: reason.into(),
        message,
    }
}

/// Decides bindings and the steps to reach them. `in_use` holds claims a
/// desired pod mounts: their volumes are never released, even when the
/// claim itself left Git. `consumers` holds claims a desired pod mounts
/// and that exist (what `WaitForFirstConsumer` waits for).
pub fn decide(
    book: &Book,
    claims: &[ClaimSpec],
    pvs: &[StaticPv],
    classes: &[ClassSpec],
    in_use: &BTreeSet<ClaimRef>,
) -> Decision {
    let mut d = Decision::default();
    let default_class = classes.iter().find(|c| c.default).map(|c| c.name.clone());
    let mut serial = book.next_serial;
    // Static PVs taken by earlier claims in this pass, or before.
    let mut taken: BTreeMap<String, ClaimRef> = book
        .static_bindings
        .iter()
        .chain(book.static_released.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let mut sorted: Vec<&ClaimSpec> = claims.iter().collect();
    sorted.sort_by(|a, b| a.claim.cmp(&b.claim));
    for c in sorted {
        let class = match &c.class {
            Some(name) => name.clone(),
            None => default_class.clone().unwrap_or_default(),
        };
        // 1. Already bound: keep it. One still `Creating` was cut short by
        // a crash: made again under the same name (creation is idempotent).
        if let Some((name, v)) = book.volume_of(&c.claim) {
            if v.phase == Phase::Creating {
                d.steps.push(Step::Provision {
                    volume: name.clone(),
                    claim: c.claim.clone(),
                    class: v.class.clone(),
                    bytes: v.capacity_bytes,
                    reclaim: v.reclaim,
                });
            } else if c.request_bytes > v.capacity_bytes {
                let allows = classes
                    .iter()
                    .find(|k| k.name == v.class)
                    .is_some_and(|k| k.allow_expansion);
                if allows {
                    d.steps.push(Step::Expand {
                        volume: name.clone(),
                        bytes: c.request_bytes,
                    });
                } else {
                    d.notes.insert(
                        c.claim.clone(),
                        format!(
                            "the claim asks for {} but its volume has {} and StorageClass {:?} does not set allowVolumeExpansion",
                            crate::format_size(c.request_bytes),
                            crate::format_size(v.capacity_bytes),
                            v.class
                        ),
                    );
                }
            }
            d.bindings.insert(
                c.claim.clone(),
                Binding::Provisioned {
                    volume: name.clone(),
                },
            );
            continue;
        }
        if let Some((pv, _)) = book.static_bindings.iter().find(|(_, cl)| **cl == c.claim) {
            let binding = match pvs.iter().find(|p| &p.name == pv) {
                Some(p) => Binding::Static {
                    pv: pv.clone(),
                    path: p.path.clone(),
                },
                None => pending(
                    "Lost",
                    format!("its PersistentVolume {pv} is no longer in Git"),
                ),
            };
            d.bindings.insert(c.claim.clone(), binding);
            continue;
        }
        // 2. A static PV that fits.
        let fits = |p: &StaticPv| {
            p.class == class
                && modes_fit(&c.access_modes, &p.access_modes)
                && p.capacity_bytes >= c.request_bytes
                && p.reserved_for.as_ref().is_none_or(|r| *r == c.claim)
        };
        if let Some(wanted) = &c.volume_name {
            let binding = match pvs.iter().find(|p| &p.name == wanted) {
                None => pending(
                    "VolumeNotFound",
                    format!("PersistentVolume {wanted:?} (spec.volumeName) does not exist"),
                ),
                Some(p) if taken.contains_key(&p.name) => pending(
                    "VolumeBound",
                    format!(
                        "PersistentVolume {wanted} is already bound to claim {}",
                        taken[&p.name]
                    ),
                ),
                Some(p) if !fits(p) => pending(
                    "VolumeMismatch",
                    format!(
                        "PersistentVolume {wanted} does not fit: class {:?}, {} and modes {:?}, for a claim of class {class:?}, {} and modes {:?}",
                        p.class,
                        crate::format_size(p.capacity_bytes),
                        p.access_modes,
                        crate::format_size(c.request_bytes),
                        c.access_modes
                    ),
                ),
                Some(p) => {
                    taken.insert(p.name.clone(), c.claim.clone());
                    d.steps.push(Step::BindStatic {
                        pv: p.name.clone(),
                        claim: c.claim.clone(),
                    });
                    Binding::Static {
                        pv: p.name.clone(),
                        path: p.path.clone(),
                    }
                }
            };
            d.bindings.insert(c.claim.clone(), binding);
            continue;
        }
        let best = pvs
            .iter()
            .filter(|p| !taken.contains_key(&p.name) && fits(p))
            .min_by_key(|p| (p.capacity_bytes, p.name.clone()));
        if let Some(p) = best {
            taken.insert(p.name.clone(), c.claim.clone());
            d.steps.push(Step::BindStatic {
                pv: p.name.clone(),
                claim: c.claim.clone(),
            });
            d.bindings.insert(
                c.claim.clone(),
                Binding::Static {
                    pv: p.name.clone(),
                    path: p.path.clone(),
                },
            );
            continue;
        }
        // 3. Provision, when the class has a provisioner on this node.
        let binding = match classes.iter().find(|k| k.name == class) {
            _ if class.is_empty() => pending(
                "NoMatch",
                "no PersistentVolume without a storage class fits this claim, and no StorageClass is marked default".into(),
            ),
            None => pending(
                "ClassNotFound",
                format!("StorageClass {class:?} does not exist and no PersistentVolume of that class fits"),
            ),
            Some(k) if k.provisioner != crate::loopfs::PROVISIONER => pending(
                "NoMatch",
                format!(
                    "no PersistentVolume of class {class:?} fits, and its provisioner {:?} does not run on this node",
                    k.provisioner
                ),
            ),
            Some(k) if k.wait_for_first_consumer && !in_use.contains(&c.claim) => pending(
                "WaitForFirstConsumer",
                "waiting for a pod that uses the claim before provisioning".into(),
            ),
            Some(k) => {
                let volume = volume_name(&c.claim, serial);
                serial += 1;
                d.steps.push(Step::Provision {
                    volume: volume.clone(),
                    claim: c.claim.clone(),
                    class: k.name.clone(),
                    bytes: c.request_bytes,
                    reclaim: k.reclaim,
                });
                Binding::Provisioned { volume }
            }
        };
        d.bindings.insert(c.claim.clone(), binding);
    }

    // Volumes whose claims left Git.
    let wanted: BTreeSet<&ClaimRef> = claims.iter().map(|c| &c.claim).collect();
    for (name, v) in &book.volumes {
        let gone = !wanted.contains(&v.claim) && !in_use.contains(&v.claim);
        match v.phase {
            Phase::Deleting => d.steps.push(Step::Delete {
                volume: name.clone(),
            }),
            Phase::Creating if gone => d.steps.push(Step::Delete {
                volume: name.clone(),
            }),
            Phase::Bound if gone => d.steps.push(match v.reclaim {
                Reclaim::Delete => Step::Delete {
                    volume: name.clone(),
                },
                Reclaim::Retain => Step::Release {
                    volume: name.clone(),
                },
            }),
            _ => {}
        }
    }
    let in_git: BTreeSet<&str> = pvs.iter().map(|p| p.name.as_str()).collect();
    for (pv, claim) in &book.static_bindings {
        if !in_git.contains(pv.as_str()) {
            if !in_use.contains(claim) {
                d.steps.push(Step::ForgetStatic { pv: pv.clone() });
            }
        } else if !wanted.contains(claim) && !in_use.contains(claim) {
            d.steps.push(Step::ReleaseStatic { pv: pv.clone() });
        }
    }
    for pv in book.static_released.keys() {
        if !in_git.contains(pv.as_str()) {
            d.steps.push(Step::ForgetStatic { pv: pv.clone() });
        }
    }
    d
}

/// Applies a step's bookkeeping (the disk work is the caller's).
pub fn record(book: &mut Book, step: &Step) {
    match step {
        Step::Provision {
            volume,
            claim,
            class,
            bytes,
            reclaim,
        } => {
            book.next_serial = book
                .next_serial
                .max(crate::book::parse_volume_name(volume).map_or(0, |(_, s)| s + 1));
            book.volumes.insert(
                volume.clone(),
                crate::book::Provisioned {
                    claim: claim.clone(),
                    class: class.clone(),
                    capacity_bytes: *bytes,
                    reclaim: *reclaim,
                    phase: Phase::Creating,
                },
            );
        }
        Step::Expand { .. } => {}
        Step::Release { volume } => {
            if let Some(v) = book.volumes.get_mut(volume) {
                v.phase = Phase::Released;
            }
        }
        Step::Delete { volume } => {
            if let Some(v) = book.volumes.get_mut(volume) {
                v.phase = Phase::Deleting;
            }
        }
        Step::BindStatic { pv, claim } => {
            book.static_bindings.insert(pv.clone(), claim.clone());
        }
        Step::ReleaseStatic { pv } => {
            if let Some(claim) = book.static_bindings.remove(pv) {
                book.static_released.insert(pv.clone(), claim);
            }
        }
        Step::ForgetStatic { pv } => {
            book.static_bindings.remove(pv);
            book.static_released.remove(pv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::book::Provisioned;

    fn claim(name: &str) -> ClaimRef {
        ClaimRef {
            namespace: "apps".into(),
            name: name.into(),
        }
    }

    fn spec(name: &str, class: Option<&str>, mib: u64) -> ClaimSpec {
        ClaimSpec {
            claim: claim(name),
            class: class.map(str::to_string),
            request_bytes: mib << 20,
            access_modes: vec!["ReadWriteOnce".into()],
            volume_name: None,
        }
    }

    fn local(wait: bool, expand: bool, reclaim: Reclaim) -> ClassSpec {
        ClassSpec {
            name: "local".into(),
            provisioner: crate::loopfs::PROVISIONER.into(),
            reclaim,
            wait_for_first_consumer: wait,
            allow_expansion: expand,
            default: true,
        }
    }

    fn pv(name: &str, mib: u64) -> StaticPv {
        StaticPv {
            name: name.into(),
            class: "manual".into(),
            capacity_bytes: mib << 20,
            access_modes: vec!["ReadWriteOnce".into(), "ReadOnlyMany".into()],
            path: format!("/srv/{name}"),
            reserved_for: None,
        }
    }

    #[test]
    fn a_claim_of_the_default_class_is_provisioned_once_a_pod_uses_it() {
        let classes = [local(true, false, Reclaim::Delete)];
        let claims = [spec("data", None, 64)];
        let waiting = decide(&Book::default(), &claims, &[], &classes, &BTreeSet::new());
        assert!(waiting.steps.is_empty());
        assert!(matches!(
            &waiting.bindings[&claim("data")],
            Binding::Pending { reason, .. } if reason == "WaitForFirstConsumer"
        ));
        let used = BTreeSet::from([claim("data")]);
        let d = decide(&Book::default(), &claims, &[], &classes, &used);
        assert_eq!(
            d.steps,
            [Step::Provision {
                volume: "pvc_apps_data_0".into(),
                claim: claim("data"),
                class: "local".into(),
                bytes: 64 << 20,
                reclaim: Reclaim::Delete
            }]
        );
        // Made and recorded, the next pass keeps it and provisions nothing again.
        let mut book = Book::default();
        record(&mut book, &d.steps[0]);
        for v in book.volumes.values_mut() {
            v.phase = Phase::Bound;
        }
        let again = decide(&book, &claims, &[], &classes, &used);
        assert!(again.steps.is_empty(), "{:?}", again.steps);
        assert_eq!(
            again.bindings[&claim("data")],
            Binding::Provisioned {
                volume: "pvc_apps_data_0".into()
            }
        );
    }

    #[test]
    fn a_provisioning_cut_short_by_a_crash_is_finished_under_the_same_name() {
        let classes = [local(false, false, Reclaim::Delete)];
        let claims = [spec("data", None, 64)];
        let first = decide(&Book::default(), &claims, &[], &classes, &BTreeSet::new());
        let mut book = Book::default();
        record(&mut book, &first.steps[0]);
        // The agent died here: the intent is in the book, the disk has nothing.
        let again = decide(&book, &claims, &[], &classes, &BTreeSet::new());
        assert_eq!(
            again.steps, first.steps,
            "the same volume, not a second one"
        );
    }

    #[test]
    fn static_volumes_bind_smallest_fit_and_never_twice() {
        let pvs = [pv("big", 1024), pv("small", 128), pv("tiny", 16)];
        let claims = [
            spec("a", Some("manual"), 100),
            spec("b", Some("manual"), 100),
            spec("c", Some("manual"), 100),
        ];
        let d = decide(&Book::default(), &claims, &pvs, &[], &BTreeSet::new());
        let bound: Vec<String> = d
            .bindings
            .values()
            .map(|b| match b {
                Binding::Static { pv, .. } => pv.clone(),
                Binding::Pending { reason, .. } => reason.clone(),
                Binding::Provisioned { volume } => volume.clone(),
            })
            .collect();
        assert_eq!(bound, ["small", "big", "ClassNotFound"]);
        // A claim naming a PV that another claim holds stays Pending.
        let mut book = Book::default();
        for s in &d.steps {
            record(&mut book, s);
        }
        let mut thief = spec("d", Some("manual"), 10);
        thief.volume_name = Some("small".into());
        let d2 = decide(
            &book,
            &[claims[0].clone(), thief],
            &pvs,
            &[],
            &BTreeSet::new(),
        );
        assert!(matches!(
            &d2.bindings[&claim("d")],
            Binding::Pending { reason, message } if reason == "VolumeBound" && message.contains("apps/a")
        ));
        // Claim b left Git: its PV is Released and not bound again.
        assert!(d2.steps.contains(&Step::ReleaseStatic { pv: "big".into() }));
    }

    #[test]
    fn gone_claims_follow_their_reclaim_policy_but_never_while_a_pod_mounts_them() {
        let mut book = Book::default();
        for (name, reclaim) in [("keep", Reclaim::Retain), ("drop", Reclaim::Delete)] {
            book.volumes.insert(
                volume_name(&claim(name), 0),
                Provisioned {
                    claim: claim(name),
                    class: "local".into(),
                    capacity_bytes: 1 << 20,
                    reclaim,
                    phase: Phase::Bound,
                },
            );
        }
        let d = decide(&book, &[], &[], &[], &BTreeSet::new());
        assert_eq!(
            d.steps,
            [
                Step::Delete {
                    volume: "pvc_apps_drop_0".into()
                },
                Step::Release {
                    volume: "pvc_apps_keep_0".into()
                }
            ]
        );
        let held = decide(&book, &[], &[], &[], &BTreeSet::from([claim("drop")]));
        assert_eq!(
            held.steps,
            [Step::Release {
                volume: "pvc_apps_keep_0".into()
            }]
        );
    }

    #[test]
    fn growth_needs_a_class_that_allows_it() {
        let mut book = Book::default();
        book.volumes.insert(
            "pvc_apps_data_0".into(),
            Provisioned {
                claim: claim("data"),
                class: "local".into(),
                capacity_bytes: 64 << 20,
                reclaim: Reclaim::Delete,
                phase: Phase::Bound,
            },
        );
        let claims = [spec("data", None, 128)];
        let no = decide(
            &book,
            &claims,
            &[],
            &[local(false, false, Reclaim::Delete)],
            &BTreeSet::new(),
        );
        assert!(no.steps.is_empty());
        assert!(no.notes[&claim("data")].contains("allowVolumeExpansion"));
        let yes = decide(
            &book,
            &claims,
            &[],
            &[local(false, true, Reclaim::Delete)],
            &BTreeSet::new(),
        );
        assert_eq!(
            yes.steps,
            [Step::Expand {
                volume: "pvc_apps_data_0".into(),
                bytes: 128 << 20
            }]
        );
    }
}

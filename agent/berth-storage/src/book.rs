//! Which volumes exist, whose they are and what may happen to them, kept
//! in `/var/lib/berth/storage/volumes.json` and written before every step
//! that changes the disk, so a crash at any point is finished or undone on
//! the next start and never leaves a second volume for one claim.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A claim, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reclaim {
    Delete,
    Retain,
}

impl Reclaim {
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some("Retain") => Self::Retain,
            _ => Self::Delete,
        }
    }
}

/// Where a volume is in its life. `Creating` and `Deleting` are intents:
/// seen at start, they are carried out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Creating,
    Bound,
    /// Its claim is gone and the policy said Retain: kept, never bound again.
    Released,
    Deleting,
}

/// A volume the built-in provisioner made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provisioned {
    pub claim: ClaimRef,
    pub class: String,
    pub capacity_bytes: u64,
    pub reclaim: Reclaim,
    pub phase: Phase,
}

/// The schema of the volume book (see [`berth_schema`]).
pub const BOOK_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    /// Provisioned volumes by name (`pvc_<namespace>_<claim>_<n>`).
    pub volumes: BTreeMap<String, Provisioned>,
    /// Static PersistentVolumes from Git, by name, and the claim each is
    /// bound to; a PV appears here once, so it is never bound twice.
    pub static_bindings: BTreeMap<String, ClaimRef>,
    /// Static PVs whose claim went away: Released, as in Kubernetes, until
    /// the PV object itself is removed from Git.
    #[serde(default)]
    pub static_released: BTreeMap<String, ClaimRef>,
    /// Makes every provisioned name new, so a claim made again after a
    /// Retain never meets its old data.
    pub next_serial: u64,
}

/// `pvc_<namespace>_<claim>_<n>`: `_` occurs in neither name, so the claim
/// can be read back from an image even without the book.
pub fn volume_name(claim: &ClaimRef, serial: u64) -> String {
    format!("pvc_{}_{}_{serial}", claim.namespace, claim.name)
}

pub fn parse_volume_name(name: &str) -> Option<(ClaimRef, u64)> {
    let rest = name.strip_prefix("pvc_")?;
    let mut parts = rest.split('_');
    let (ns, claim, serial) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ns.is_empty() || claim.is_empty() {
        return None;
    }
    Some((
        ClaimRef {
            namespace: ns.into(),
            name: claim.into(),
        },
        serial.parse().ok()?,
    ))
}

impl Book {
    /// Reads the book. A missing one is empty; a corrupt one is moved
    /// aside, and the caller rebuilds from the driver's volumes.
    pub fn load(path: &Path) -> (Self, Option<String>) {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Self::default(), None),
            Err(e) => return (Self::default(), Some(format!("{}: {e}", path.display()))),
        };
        match berth_schema::decode::<Book>(&text, path, BOOK_SCHEMA, |_, _| Ok(())) {
            // Left as it is: a newer agent's book is not this one's to move.
            Err(e @ berth_schema::SchemaError::Newer { .. }) => {
                (Self::default(), Some(e.to_string()))
            }
            Ok((book, _)) => (book, None),
            Err(e) => {
                let mut aside = path.as_os_str().to_os_string();
                aside.push(".corrupt");
                let aside = PathBuf::from(aside);
                let moved = match std::fs::rename(path, &aside) {
                    Ok(()) => format!("moved to {}", aside.display()),
                    Err(m) => format!("could not move it aside: {m}"),
                };
                (
                    Self::default(),
                    Some(format!(
                        "{}: not a volume book ({e}); {moved}; volumes are adopted from their images and kept (Retain) until their claims bind them again",
                        path.display()
                    )),
                )
            }
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        berth_schema::save(path, self, BOOK_SCHEMA)
    }

    /// Volumes on disk the book does not know (after a lost or corrupt
    /// book): adopted for the claim their name says, with Retain, so no
    /// data is ever removed on a guess. Returns the adopted names.
    pub fn adopt(&mut self, on_disk: &[(String, u64)]) -> Vec<String> {
        let mut adopted = Vec::new();
        for (name, bytes) in on_disk {
            if self.volumes.contains_key(name) {
                continue;
            }
            let Some((claim, serial)) = parse_volume_name(name) else {
                continue;
            };
            self.next_serial = self.next_serial.max(serial + 1);
            let taken = self
                .volumes
                .values()
                .any(|v| v.claim == claim && v.phase != Phase::Released);
            self.volumes.insert(
                name.clone(),
                Provisioned {
                    claim,
                    class: String::new(),
                    capacity_bytes: *bytes,
                    reclaim: Reclaim::Retain,
                    phase: if taken { Phase::Released } else { Phase::Bound },
                },
            );
            adopted.push(name.clone());
        }
        adopted
    }

    /// The live volume of a claim (not Released or being deleted).
    pub fn volume_of(&self, claim: &ClaimRef) -> Option<(&String, &Provisioned)> {
        self.volumes
            .iter()
            .find(|(_, v)| &v.claim == claim && matches!(v.phase, Phase::Creating | Phase::Bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(ns: &str, name: &str) -> ClaimRef {
        ClaimRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn names_carry_their_claim() {
        let c = claim("apps", "web-content");
        let name = volume_name(&c, 7);
        assert_eq!(name, "pvc_apps_web-content_7");
        assert_eq!(parse_volume_name(&name), Some((c, 7)));
        assert_eq!(parse_volume_name("pvc_a_b"), None);
        assert_eq!(parse_volume_name("other.img"), None);
    }

    #[test]
    fn a_lost_book_adopts_images_without_deleting_anything() {
        let mut book = Book::default();
        let adopted = book.adopt(&[
            ("pvc_apps_data_3".into(), 64 << 20),
            ("pvc_apps_data_5".into(), 64 << 20),
            ("stray".into(), 1),
        ]);
        assert_eq!(adopted, ["pvc_apps_data_3", "pvc_apps_data_5"]);
        assert_eq!(book.next_serial, 6);
        let bound: Vec<_> = book
            .volumes
            .values()
            .map(|v| (v.phase, v.reclaim))
            .collect();
        assert_eq!(
            bound,
            [
                (Phase::Bound, Reclaim::Retain),
                (Phase::Released, Reclaim::Retain)
            ]
        );
    }

    #[test]
    fn a_corrupt_book_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("berth-book-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("volumes.json");
        std::fs::write(&path, b"{not json").unwrap();
        let (book, note) = Book::load(&path);
        assert_eq!(book, Book::default());
        assert!(note.unwrap().contains("moved to"));
        assert!(dir.join("volumes.json.corrupt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

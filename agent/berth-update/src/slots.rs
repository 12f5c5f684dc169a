//! The node's two root slots and their boot entries on the ESP.
//!
//! Each slot has a partition (GPT names `root-a`, `root-b`), a directory on
//! the ESP (`/berth/a/`: `vmlinuz`, `initrd.img`, and the `bundle.json` it
//! was installed from), and at most one boot loader entry,
//! `/loader/entries/berth-<slot>[+LEFT[-DONE]].conf`, in the Boot Loader
//! Specification's format with systemd-boot's boot counting in the name.
//!
//! Which entry boots is left to systemd-boot: `loader.conf` says `default
//! berth-*`, every entry has `sort-key berth` and a `version` that is the
//! install's generation, and systemd-boot takes the first match of its
//! sorted list, which puts entries with no tries left last and then the
//! highest version first. So a new slot is tried while it has tries left
//! (each boot of it takes one: `+3` → `+2-1`), `systemd-bless-boot` drops
//! the counter once the health gate passes, and when the tries run out the
//! old slot's entry is first again, with nobody on the node doing anything.
//!
//! Writing is ordered so that a power cut at any point leaves the old slot
//! booting: the target slot's entry is removed (and the directory synced)
//! before its partition is touched, and the new entry is written last, to a
//! temporary name, synced, then renamed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::bundle::{self, BundleError, Verified};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }

    /// The GPT partition name of the slot's root.
    pub fn partition_name(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// The slot the kernel command line names (`berth.slot=a`).
pub fn booted_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("berth.slot="))
        .and_then(Slot::parse)
}

/// A boot loader entry of a slot, as found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file name under `/loader/entries/`.
    pub file: String,
    pub slot: Slot,
    /// Boot counting: `None` for a blessed (or never counted) entry.
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    /// The install generation (the entry's `version` line).
    pub generation: u64,
    pub title: String,
    pub options: String,
}

impl Entry {
    /// Counted and out of tries: systemd-boot sorts it last, never picks
    /// it while another entry can boot.
    pub fn is_bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// Counted with tries left: being tried, not yet blessed.
    pub fn is_trying(&self) -> bool {
        self.tries_left.is_some_and(|n| n > 0)
    }
}

/// `berth-b+2-1.conf` → (b, Some(2), Some(1)).
fn parse_entry_name(name: &str) -> Option<(Slot, Option<u32>, Option<u32>)> {
    let stem = name.strip_prefix("berth-")?.strip_suffix(".conf")?;
    let (slot, counter) = match stem.split_once('+') {
        Some((s, c)) => (s, Some(c)),
        None => (stem, None),
    };
    let slot = Slot::parse(slot).filter(|_| slot.len() == 1)?;
    let Some(counter) = counter else {
        return Some((slot, None, None));
    };
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (l.parse().ok()?, Some(d.parse().ok()?)),
        None => (counter.parse().ok()?, None),
    };
    Some((slot, Some(left), done))
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(
        "slot {slot} ({path}) holds {capacity} bytes; the bundle's root image is {needed}: the disk is too small for this bundle, nothing pointed at it"
    )]
    TooSmall {
        slot: Slot,
        path: PathBuf,
        capacity: u64,
        needed: u64,
    },
    #[error(
        "slot {slot}: {what} has sha256 {actual}, the signed manifest says {expected}; the slot is left without a boot entry"
    )]
    Mismatch {
        slot: Slot,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Layout(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SlotError + '_ {
    move |source| SlotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a node's slots are: the ESP's mount point and each slot's
/// partition (a block device on a node, a file in tests) with its GPT
/// partition UUID (what `root=` names).
#[derive(Debug, Clone)]
pub struct Layout {
    pub esp: PathBuf,
    pub devices: [PathBuf; 2],
    pub partuuids: [String; 2],
}

impl Layout {
    /// The node's own: `/dev/disk/by-partlabel/root-{a,b}` and their
    /// PARTUUIDs from `/dev/disk/by-partuuid`.
    pub fn discover(esp: &Path) -> Result<Self, SlotError> {
        let mut devices = Vec::new();
        let mut partuuids = Vec::new();
        for slot in [Slot::A, Slot::B] {
            let link = Path::new("/dev/disk/by-partlabel").join(slot.partition_name());
            let device = fs::canonicalize(&link).map_err(|e| {
                SlotError::Layout(format!(
                    "{}: no partition named {} ({e}); this disk has no A/B root slots",
                    link.display(),
                    slot.partition_name()
                ))
            })?;
            let uuid = fs::read_dir("/dev/disk/by-partuuid")
                .map_err(io_at(Path::new("/dev/disk/by-partuuid")))?
                .flatten()
                .find(|e| fs::canonicalize(e.path()).is_ok_and(|p| p == device))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .ok_or_else(|| {
                    SlotError::Layout(format!(
                        "{}: no partition UUID found in /dev/disk/by-partuuid",
                        device.display()
                    ))
                })?;
            devices.push(device);
            partuuids.push(uuid);
        }
        let [a, b] =
            <[PathBuf; 2]>::try_from(devices).map_err(|_| SlotError::Layout("two slots".into()))?;
        let [ua, ub] = <[String; 2]>::try_from(partuuids)
            .map_err(|_| SlotError::Layout("two slots".into()))?;
        Ok(Self {
            esp: esp.to_path_buf(),
            devices: [a, b],
            partuuids: [ua, ub],
        })
    }

    /// The ESP alone, for reading its entries and manifests (status);
    /// writing a slot needs the partitions of [`Layout::discover`].
    pub fn esp_only(esp: &Path) -> Self {
        Self {
            esp: esp.to_path_buf(),
            devices: [PathBuf::new(), PathBuf::new()],
            partuuids: [String::new(), String::new()],
        }
    }

    fn index(slot: Slot) -> usize {
        match slot {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    pub fn device(&self, slot: Slot) -> &Path {
        &self.devices[Self::index(slot)]
    }

    pub fn partuuid(&self, slot: Slot) -> &str {
        &self.partuuids[Self::index(slot)]
    }

    fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.esp.join("berth").join(slot.letter())
    }

    /// The slots' entries on the ESP, in no particular order. Files that
    /// are not a slot's entry are not Berth's and are left alone.
    pub fn entries(&self) -> Result<Vec<Entry>, SlotError> {
        let dir = self.entries_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let e = e.map_err(io_at(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((slot, tries_left, tries_done)) = parse_entry_name(&name) else {
                continue;
            };
            let text = fs::read_to_string(e.path()).map_err(io_at(&e.path()))?;
            let field = |key: &str| {
                text.lines()
                    .filter_map(|l| l.trim().split_once(char::is_whitespace))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default()
            };
            out.push(Entry {
                file: name,
                slot,
                tries_left,
                tries_done,
                generation: field("version").parse().unwrap_or(0),
                title: field("title"),
                options: field("options"),
            });
        }
        out.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    /// The entry systemd-boot boots by default, by its rules for `default
    /// berth-*`: entries out of tries last, then the highest generation.
    /// The newest entry (highest generation) that boots `slot`.
    pub fn newest_entry(&self, slot: Slot) -> Result<Option<Entry>, SlotError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.slot == slot)
            .max_by_key(|e| e.generation))
    }

    pub fn default_entry(&self) -> Result<Option<Entry>, SlotError> {
        let mut entries = self.entries()?;
        entries.sort_by(|a, b| {
            a.is_bad()
                .cmp(&b.is_bad())
                .then(b.generation.cmp(&a.generation))
        });
        Ok(entries.into_iter().next())
    }

    /// The manifest a slot was installed from, if it was installed by an
    /// update (or by the image build).
    pub fn installed(&self, slot: Slot) -> Option<bundle::Manifest> {
        let path = self.slot_dir(slot).join(bundle::MANIFEST_FILE);
        let bytes = fs::read(&path).ok()?;
        bundle::Manifest::parse(&bytes, &path).ok()
    }

    /// Step 1 of an install: the slot has no entry any more (synced), so a
    /// power cut from here on boots the other slot.
    pub fn retire(&self, slot: Slot) -> Result<(), SlotError> {
        for e in self.entries()? {
            if e.slot == slot {
                let path = self.entries_dir().join(&e.file);
                fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        sync_dir(&self.entries_dir())
    }

    /// Step 2: the root image into the slot's partition, its digest checked
    /// as it is written and again read back from the partition.
    pub fn write_root(&self, slot: Slot, bundle: &Verified) -> Result<Written, SlotError> {
        let root = &bundle.manifest.root;
        let device = self.device(slot);
        let mut out = OpenOptions::new()
            .write(true)
            .read(true)
            .open(device)
            .map_err(io_at(device))?;
        let capacity = out.seek(SeekFrom::End(0)).map_err(io_at(device))?;
        if capacity < root.image_size {
            return Err(SlotError::TooSmall {
                slot,
                path: device.to_path_buf(),
                capacity,
                needed: root.image_size,
            });
        }
        out.seek(SeekFrom::Start(0)).map_err(io_at(device))?;
        let source = bundle.path(&root.file);
        let input = File::open(&source).map_err(io_at(&source))?;
        let mut image = bundle::decompress(BufReader::with_capacity(1 << 20, input), &source)?;
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = match image.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_at(&source)(e)),
            };
            if written + n as u64 > root.image_size {
                return Err(SlotError::Mismatch {
                    slot,
                    what: "the decompressed root image",
                    expected: format!("{} bytes", root.image_size),
                    actual: format!("more than {} bytes", root.image_size),
                });
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_at(device))?;
            written += n as u64;
        }
        let streamed = bundle::hex(&hash.finalize());
        if written != root.image_size || streamed != root.image_sha256 {
            return Err(SlotError::Mismatch {
                slot,
                what: "the decompressed root image",
                expected: root.image_sha256.clone(),
                actual: format!("{streamed} ({written} bytes)"),
            });
        }
        out.sync_all().map_err(io_at(device))?;
        drop(out);
        // Read back what the partition holds, not what was meant for it.
        let back = File::open(device).map_err(io_at(device))?;
        let (size, readback) = bundle::digest(back.take(root.image_size)).map_err(io_at(device))?;
        if size != root.image_size || readback != root.image_sha256 {
            return Err(SlotError::Mismatch {
                slot,
                what: "the root image read back from the partition",
                expected: root.image_sha256.clone(),
                actual: readback,
            });
        }
        Ok(Written { bytes: written })
    }

    /// Step 3: the slot's kernel, initrd and manifest on the ESP (each
    /// written, synced and renamed into place), then its entry, counted
    /// with `tries` boots and above every other entry's generation.
    pub fn install_boot(
        &self,
        slot: Slot,
        bundle: &Verified,
        options: &str,
        tries: u32,
    ) -> Result<Entry, SlotError> {
        let dir = self.slot_dir(slot);
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let m = &bundle.manifest;
        copy_checked(
            &bundle.path(&m.kernel.file),
            &dir.join("vmlinuz"),
            &m.kernel.sha256,
            slot,
            "the kernel",
        )?;
        copy_checked(
            &bundle.path(&m.initrd.file),
            &dir.join("initrd.img"),
            &m.initrd.sha256,
            slot,
            "the initrd",
        )?;
        let manifest = bundle.path(bundle::MANIFEST_FILE);
        let bytes = fs::read(&manifest).map_err(io_at(&manifest))?;
        write_synced(&dir.join(bundle::MANIFEST_FILE), &bytes)?;
        sync_dir(&dir)?;
        let generation = self
            .entries()?
            .iter()
            .map(|e| e.generation)
            .max()
            .unwrap_or(0)
            + 1;
        let options = slot_options(options, slot, self.partuuid(slot));
        let title = format!("Berth {} (slot {slot})", m.version);
        let text = format!(
            "title   {title}\nsort-key berth\nversion {generation}\nlinux   /berth/{l}/vmlinuz\ninitrd  /berth/{l}/initrd.img\noptions {options}\n",
            l = slot.letter()
        );
        let file = if tries == 0 {
            format!("berth-{}.conf", slot.letter())
        } else {
            format!("berth-{}+{tries}.conf", slot.letter())
        };
        write_synced(&self.entries_dir().join(&file), text.as_bytes())?;
        sync_dir(&self.entries_dir())?;
        Ok(Entry {
            file,
            slot,
            tries_left: (tries > 0).then_some(tries),
            tries_done: None,
            generation,
            title,
            options,
        })
    }
}

/// What writing a slot's root did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
}

/// The booted entry's kernel options with the root and the slot replaced.
pub fn slot_options(current: &str, slot: Slot, partuuid: &str) -> String {
    let mut words: Vec<String> = current
        .split_whitespace()
        .filter(|w| !w.starts_with("root=") && !w.starts_with("berth.slot="))
        .map(str::to_string)
        .collect();
    words.insert(0, format!("root=PARTUUID={partuuid}"));
    words.insert(1, format!("berth.slot={}", slot.letter()));
    words.join(" ")
}

/// Writes `bytes` to `path` by a temporary file, synced, then renamed.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SlotError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(bytes).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_at(path))
}

/// Copies a bundle part to the ESP by a temporary file, checking the copy's
/// digest before it is renamed into place.
fn copy_checked(
    from: &Path,
    to: &Path,
    sha256: &str,
    slot: Slot,
    what: &'static str,
) -> Result<(), SlotError> {
    let tmp = to.with_extension("tmp");
    let mut input = File::open(from).map_err(io_at(from))?;
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    io::copy(&mut input, &mut f).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    drop(f);
    let (_, got) = File::open(&tmp)
        .and_then(bundle::digest)
        .map_err(io_at(&tmp))?;
    if got != sha256 {
        let _ = fs::remove_file(&tmp);
        return Err(SlotError::Mismatch {
            slot,
            what,
            expected: sha256.to_string(),
            actual: got,
        });
    }
    fs::rename(&tmp, to).map_err(io_at(to))
}

fn sync_dir(dir: &Path) -> Result<(), SlotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_carry_the_slot_and_the_boot_counter() {
        assert_eq!(
            parse_entry_name("berth-a.conf"),
            Some((Slot::A, None, None))
        );
        assert_eq!(
            parse_entry_name("berth-b+3.conf"),
            Some((Slot::B, Some(3), None))
        );
        assert_eq!(
            parse_entry_name("berth-b+2-1.conf"),
            Some((Slot::B, Some(2), Some(1)))
        );
        assert_eq!(
            parse_entry_name("berth-b+0-3.conf"),
            Some((Slot::B, Some(0), Some(3)))
        );
        for other in [
            "debian.conf",
            "berth-c.conf",
            "berth-ab.conf",
            "berth-a+x.conf",
            "berth-a",
            "berth-a+1-.conf",
        ] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }

    #[test]
    fn a_slot_entry_names_its_own_root_and_keeps_every_other_option() {
        let current = "root=PARTUUID=aaaa ro berth.slot=a console=ttyS0,115200 quiet";
        assert_eq!(
            slot_options(current, Slot::B, "bbbb"),
            "root=PARTUUID=bbbb berth.slot=b ro console=ttyS0,115200 quiet"
        );
        assert_eq!(booted_slot("ro berth.slot=b quiet"), Some(Slot::B));
        assert_eq!(booted_slot("ro quiet"), None);
        assert_eq!(booted_slot("berth.slot=c"), None);
    }
}

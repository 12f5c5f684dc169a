//! Installing a bundle into the slot that did not boot, in the order that
//! survives a power cut at any point: the bundle checked whole first
//! (signature, every part's digest), the target slot's entry removed, its
//! root written and read back, the record saved, then the kernel, initrd
//! and a counted entry on the ESP. `berth update install` and the agent
//! (an update declared in Git) both come here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_git::AllowedSigners;

use crate::bundle::{self, BundleError};
use crate::record::{RecordError, SCHEMA, UpdateRecord};
use crate::slots::{Entry, Layout, Slot, SlotError, booted_slot};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no berth.slot= on the kernel command line: this node was not booted from a slot")]
    NoSlot,
    #[error("the bundle installs version {bundle}, not the {declared} declared")]
    Version { declared: String, bundle: String },
    #[error("slot {0} booted but has no boot entry")]
    NoEntry(Slot),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("cannot remount {path} {mode}: {message}")]
    Remount {
        path: PathBuf,
        mode: &'static str,
        message: String,
    },
}

/// What to install, and what the gate on the new slot will need.
#[derive(Debug)]
pub struct Request<'a> {
    pub bundle: &'a Path,
    pub allowed: &'a AllowedSigners,
    /// The node's architecture: a bundle for another is refused.
    pub architecture: &'a str,
    pub tries: u32,
    pub gate_seconds: u64,
    /// Pods (`namespace/name`) running and ready now.
    pub pods: Vec<String>,
    /// The version the bundle must install (the NodeImage's); any by hand.
    pub version: Option<&'a str>,
    /// The NodeImage declaration that asked for it; none by hand.
    pub declaration: Option<String>,
}

/// Where the node keeps what an install touches.
#[derive(Debug)]
pub struct Node<'a> {
    pub esp: &'a Path,
    pub cmdline: &'a str,
    pub state_dir: &'a Path,
}

/// Installs `req.bundle` into the slots of `layout` (see
/// [`Layout::discover`]); `progress` hears each step as it ends.
pub fn install(
    req: &Request<'_>,
    layout: &Layout,
    node: &Node<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<Entry, InstallError> {
    let booted = booted_slot(node.cmdline).ok_or(InstallError::NoSlot)?;
    let verified = bundle::verify(req.bundle, req.allowed, req.architecture)?;
    if let Some(declared) = req.version
        && declared != verified.manifest.version
    {
        return Err(InstallError::Version {
            declared: declared.to_string(),
            bundle: verified.manifest.version.clone(),
        });
    }
    let current = layout
        .newest_entry(booted)?
        .ok_or(InstallError::NoEntry(booted))?;
    let target = booted.other();
    let record = UpdateRecord {
        schema: SCHEMA,
        version: verified.manifest.version.clone(),
        from_version: layout
            .installed(booted)
            .map_or_else(|| "unknown".into(), |m| m.version),
        from_slot: booted,
        to_slot: target,
        installed_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        tries: req.tries,
        gate_seconds: req.gate_seconds,
        pods: req.pods.clone(),
        attempts: Vec::new(),
        declaration: req.declaration.clone(),
    };
    let _writable = EspWritable::new(node.esp)?;
    layout.retire(target)?;
    progress(&format!(
        "slot {target}: entry removed; writing {} …",
        layout.device(target).display()
    ));
    let written = layout.write_root(target, &verified)?;
    progress(&format!(
        "slot {target}: {} bytes written and read back, sha256 matches",
        written.bytes
    ));
    record.save(node.state_dir)?;
    let entry = layout.install_boot(target, &verified, &current.options, req.tries)?;
    progress(&format!(
        "slot {target}: {} installed as {} (generation {}); it boots next, {} tries",
        verified.manifest.version, entry.file, entry.generation, req.tries
    ));
    Ok(entry)
}

/// Takes back an update that is written but has not booted (its
/// declaration left Git): the target slot's boot entries are removed, so
/// the slot that runs stays the next boot, and the record goes. Returns
/// the version withdrawn; none when there was nothing to take back (no
/// record, or its slot booted or is being tried).
pub fn withdraw(layout: &Layout, node: &Node<'_>) -> Result<Option<String>, InstallError> {
    let booted = booted_slot(node.cmdline).ok_or(InstallError::NoSlot)?;
    let Some(record) = UpdateRecord::load(node.state_dir)? else {
        return Ok(None);
    };
    if record.from_slot != booted || !record.attempts.is_empty() {
        return Ok(None);
    }
    let _writable = EspWritable::new(node.esp)?;
    layout.retire(record.to_slot)?;
    let path = node.state_dir.join(crate::record::FILE);
    std::fs::remove_file(&path).map_err(|source| RecordError::Io { path, source })?;
    Ok(Some(record.version))
}

/// The ESP is mounted read-only; writable while an install runs, and
/// read-only again after, whatever happened.
#[derive(Debug)]
pub struct EspWritable {
    esp: Option<PathBuf>,
}

impl EspWritable {
    pub fn new(esp: &Path) -> Result<Self, InstallError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let target = esp.to_string_lossy();
        let read_only = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == target && f[3].split(',').any(|o| o == "ro")
        });
        if !read_only {
            return Ok(Self { esp: None });
        }
        remount(esp, "rw")?;
        Ok(Self {
            esp: Some(esp.to_path_buf()),
        })
    }
}

impl Drop for EspWritable {
    fn drop(&mut self) {
        if let Some(esp) = &self.esp
            && let Err(e) = remount(esp, "ro")
        {
            eprintln!("berth: warning: {e}");
        }
    }
}

fn remount(esp: &Path, mode: &'static str) -> Result<(), InstallError> {
    let fail = |message: String| InstallError::Remount {
        path: esp.to_path_buf(),
        mode,
        message,
    };
    let status = Command::new("mount")
        .arg("-o")
        .arg(format!("remount,{mode}"))
        .arg(esp)
        .status()
        .map_err(|e| fail(format!("mount: {e}")))?;
    if !status.success() {
        return Err(fail(format!("mount exited with {status}")));
    }
    Ok(())
}

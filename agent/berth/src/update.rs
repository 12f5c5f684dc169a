//! `berth bundle …` (making and checking update bundles) and `berth update
//! …` (a node's slots, and installing a bundle by hand).

// A command's answer is its output.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use berth_update::gate::{self, Verdict};
use berth_update::slots::{self, Layout, Slot};
use berth_update::{Attempt, UpdateRecord, bundle};

#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Write bundle.json for the parts in DIR (root.img.zst, vmlinuz,
    /// initrd.img); sign it with `ssh-keygen -Y sign -n berth-bundle -f KEY
    /// DIR/bundle.json`.
    Describe {
        dir: PathBuf,
        /// The OS version the bundle installs.
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "amd64")]
        architecture: String,
    },
    /// Check a bundle's signature and every part's digest.
    Verify {
        dir: PathBuf,
        /// Keys allowed to sign bundles, in ssh-keygen's allowed-signers
        /// format.
        #[arg(long)]
        allowed_signers: PathBuf,
        #[arg(long, default_value = "amd64")]
        architecture: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// The node's root slots: which one booted, each one's version, and
    /// the boot entries systemd-boot chooses from.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Install a bundle into the slot that did not boot and make it the
    /// next boot, counted: if it does not come up `--tries` times, the
    /// node boots the current slot again by itself.
    Install {
        dir: PathBuf,
        #[arg(long)]
        allowed_signers: PathBuf,
        /// Boots the new slot gets before systemd-boot falls back.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
        tries: u32,
        /// How long the health gate on each boot of the new slot waits for
        /// the agent, Git and the pods, in seconds.
        #[arg(long, default_value_t = 300)]
        gate_seconds: u64,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// The health gate, run by berth-update-gate.service on a boot of a
    /// slot still being tried: waits until the agent has passed, Git is
    /// fetched and every pod that ran before the update is ready again,
    /// and fails (the node reboots, taking one of the slot's tries) when
    /// that does not happen in time.
    #[command(hide = true)]
    Gate {
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Where the ESP is mounted.
    #[arg(long, default_value = "/efi")]
    esp: PathBuf,
    #[arg(long, hide = true, default_value = "/proc/cmdline")]
    kernel_cmdline: PathBuf,
    /// The agent's state directory, where the update record is kept.
    #[arg(long, env = "STATE_DIRECTORY", default_value = "/var/lib/berth")]
    state_dir: PathBuf,
}

pub fn bundle(command: BundleCommand) -> anyhow::Result<ExitCode> {
    match command {
        BundleCommand::Describe {
            dir,
            version,
            architecture,
        } => {
            let m = bundle::Manifest::describe(
                &dir,
                &version,
                &architecture,
                "root.img.zst",
                "vmlinuz",
                "initrd.img",
            )?;
            println!(
                "{}: version {}, root image {} bytes ({} compressed)",
                dir.join(bundle::MANIFEST_FILE).display(),
                m.version,
                m.root.image_size,
                m.root.size
            );
        }
        BundleCommand::Verify {
            dir,
            allowed_signers,
            architecture,
        } => {
            let allowed = berth_git::AllowedSigners::load(&allowed_signers)?;
            let v = bundle::verify(&dir, &allowed, &architecture)?;
            println!(
                "{}: version {}, signed by {} ({}), every part matches",
                dir.display(),
                v.manifest.version,
                v.signer.principals,
                v.signer.fingerprint
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn update(command: UpdateCommand) -> anyhow::Result<ExitCode> {
    match command {
        UpdateCommand::Status { node } => {
            let (layout, booted) = open(&node)?;
            for slot in [Slot::A, Slot::B] {
                let version = layout
                    .installed(slot)
                    .map(|m| m.version)
                    .unwrap_or_else(|| "-".into());
                let mark = if Some(slot) == booted {
                    " (booted)"
                } else {
                    ""
                };
                println!("slot {slot}: {version}{mark}");
            }
            let default = layout.default_entry()?;
            let cmdline = std::fs::read_to_string(&node.kernel_cmdline).unwrap_or_default();
            let os = berth_update::os_status(&node.esp, &cmdline, &node.state_dir);
            if let Some(u) = &os.update {
                println!(
                    "update to {} in slot {}: {} ({})",
                    u.version, u.slot, u.state, u.message
                );
            }
            if let Some(e) = &os.error {
                println!("error: {e}");
            }
            for e in layout.entries()? {
                let state = match (e.tries_left, e.tries_done) {
                    (None, _) => "good".to_string(),
                    (Some(0), done) => format!("bad ({} tries used)", done.unwrap_or(0)),
                    (Some(left), done) => {
                        format!("trying ({left} left, {} used)", done.unwrap_or(0))
                    }
                };
                let next = if default.as_ref() == Some(&e) {
                    ", next boot"
                } else {
                    ""
                };
                println!(
                    "entry {}: {}, generation {}, {state}{next}",
                    e.file, e.title, e.generation
                );
            }
        }
        UpdateCommand::Gate { node } => return run_gate(&node),
        UpdateCommand::Install {
            dir,
            allowed_signers,
            tries,
            gate_seconds,
            node,
        } => {
            let (layout, booted) = open(&node)?;
            let Some(booted) = booted else {
                bail!(
                    "{}: no berth.slot= on the kernel command line; this node was not booted from a slot",
                    node.kernel_cmdline.display()
                );
            };
            let allowed = berth_git::AllowedSigners::load(&allowed_signers)?;
            let verified = bundle::verify(&dir, &allowed, "amd64")?;
            let current = layout
                .entries()?
                .into_iter()
                .filter(|e| e.slot == booted)
                .max_by_key(|e| e.generation)
                .with_context(|| format!("slot {booted} booted but has no boot entry"))?;
            let target = booted.other();
            let (_, _, ready) = observe(&node.state_dir)?;
            let record = UpdateRecord {
                schema: berth_update::record::SCHEMA,
                version: verified.manifest.version.clone(),
                from_version: layout
                    .installed(booted)
                    .map_or_else(|| "unknown".into(), |m| m.version),
                from_slot: booted,
                to_slot: target,
                installed_at: now(),
                tries,
                gate_seconds,
                pods: ready.into_iter().collect(),
                attempts: Vec::new(),
            };
            let _writable = EspWritable::new(&node.esp)?;
            layout.retire(target)?;
            println!(
                "slot {target}: entry removed; writing {} …",
                layout.device(target).display()
            );
            let written = layout.write_root(target, &verified)?;
            println!(
                "slot {target}: {} bytes written and read back, sha256 matches",
                written.bytes
            );
            record.save(&node.state_dir)?;
            let entry = layout.install_boot(target, &verified, &current.options, tries)?;
            println!(
                "slot {target}: {} installed as {} (generation {}); it boots next, {tries} tries",
                verified.manifest.version, entry.file, entry.generation
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The agent's state, the pods it runs, and those running and ready.
fn observe(
    state_dir: &Path,
) -> anyhow::Result<(
    berth_agent::state::AgentState,
    BTreeSet<String>,
    BTreeSet<String>,
)> {
    let state = berth_agent::state::StateStore::new(state_dir).load();
    let systemd = berth_runtime::dbus::DbusSystemd::connect(Duration::from_secs(30), None, None)?;
    let observed = berth_runtime::observe(&systemd)?;
    let pods = state.pod_statuses(&observed, Path::new("/sys/fs/cgroup"));
    let mut declared = BTreeSet::new();
    let mut ready = BTreeSet::new();
    for p in pods {
        let name = format!("{}/{}", p.namespace, p.name);
        let is_ready = p.phase == berth_runtime::status::Phase::Running
            && p.conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True");
        if is_ready {
            ready.insert(name.clone());
        }
        declared.insert(name);
    }
    Ok((state, declared, ready))
}

fn agent_restarts() -> u32 {
    Process::new("systemctl")
        .args(["show", "-P", "NRestarts", "berth-agent.service"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// `berth update gate`: see [`UpdateCommand::Gate`]. Each verdict that ends
/// the gate is written to the update record first, so the slot that boots
/// next knows what this one found.
fn run_gate(node: &NodeArgs) -> anyhow::Result<ExitCode> {
    let cmdline = std::fs::read_to_string(&node.kernel_cmdline)
        .with_context(|| node.kernel_cmdline.display().to_string())?;
    let booted = slots::booted_slot(&cmdline);
    let Some(mut record) = UpdateRecord::load(&node.state_dir)? else {
        println!("no update record: nothing to gate");
        return Ok(ExitCode::SUCCESS);
    };
    if booted != Some(record.to_slot) {
        println!(
            "booted slot {} is not the updated slot {}: nothing to gate",
            booted.map_or("?".into(), |s| s.to_string()),
            record.to_slot
        );
        return Ok(ExitCode::SUCCESS);
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let booted_at = now().saturating_sub(uptime as u64);
    let started = Instant::now();
    let mut last = String::new();
    let verdict = loop {
        let elapsed = started.elapsed().as_secs();
        let seen = match observe(&node.state_dir) {
            Ok((state, declared, ready)) => gate::Observed {
                agent_passed: state.boot_id.as_deref() == Some(boot_id.as_str()),
                fetched: state.fetched_at.is_some_and(|t| t >= booted_at),
                errors: state.errors.clone(),
                declared,
                ready,
                agent_restarts: agent_restarts(),
            },
            Err(e) => gate::Observed {
                errors: vec![format!("cannot observe the node: {e:#}")],
                agent_restarts: agent_restarts(),
                ..gate::Observed::default()
            },
        };
        match gate::evaluate(&record, &seen, elapsed) {
            Verdict::Wait(why) => {
                if why != last {
                    println!("gate: waiting: {why}");
                    last = why;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            done => break done,
        }
    };
    let (passed, detail) = match verdict {
        Verdict::Pass(d) => (true, d),
        Verdict::Fail(d) | Verdict::Wait(d) => (false, d),
    };
    record.attempts.push(Attempt {
        boot_id,
        at: now(),
        passed,
        detail: detail.clone(),
    });
    record.save(&node.state_dir)?;
    if passed {
        println!("gate: passed: {detail}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("gate: failed: {detail}");
        Ok(ExitCode::FAILURE)
    }
}

fn open(node: &NodeArgs) -> anyhow::Result<(Layout, Option<Slot>)> {
    let cmdline = std::fs::read_to_string(&node.kernel_cmdline)
        .with_context(|| node.kernel_cmdline.display().to_string())?;
    Ok((Layout::discover(&node.esp)?, slots::booted_slot(&cmdline)))
}

/// The ESP is mounted read-only; writable while an install runs, and
/// read-only again after, whatever happened.
struct EspWritable {
    esp: Option<PathBuf>,
}

impl EspWritable {
    fn new(esp: &Path) -> anyhow::Result<Self> {
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
            eprintln!("berth: warning: {e:#}");
        }
    }
}

fn remount(esp: &Path, mode: &str) -> anyhow::Result<()> {
    let status = Process::new("mount")
        .arg("-o")
        .arg(format!("remount,{mode}"))
        .arg(esp)
        .status()
        .context("mount")?;
    if !status.success() {
        bail!(
            "cannot remount {} {mode}: mount exited with {status}",
            esp.display()
        );
    }
    Ok(())
}

//! `berth bundle …` (making and checking update bundles) and `berth update
//! …` (a node's slots, and installing a bundle by hand).

// A command's answer is its output.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use berth_update::gate::{self, Verdict};
use berth_update::slots::{self, Layout, Slot};
use berth_update::{Attempt, UpdateRecord, bundle, install};

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
        /// The architecture it runs on (`amd64`, `arm64`); this build's
        /// own unless given.
        #[arg(long, default_value_t = berth_images::node_architecture().to_string())]
        architecture: String,
    },
    /// Publish a signed bundle to a registry as an OCI artifact (each
    /// part a layer named by its file name), for a NodeImage's
    /// `bundle.image` to name.
    Push {
        dir: PathBuf,
        /// Where to: `registry.example/berth/os:1.2.0`.
        reference: String,
        /// The registry speaks plain HTTP.
        #[arg(long)]
        insecure: bool,
        /// A Docker config file (`{"auths": …}`) with a login for the
        /// registry, as `docker login` writes it.
        #[arg(long)]
        auth_file: Option<PathBuf>,
    },
    /// Check a bundle's signature and every part's digest.
    Verify {
        dir: PathBuf,
        /// Keys allowed to sign bundles, in ssh-keygen's allowed-signers
        /// format.
        #[arg(long)]
        allowed_signers: PathBuf,
        /// The architecture the node runs on; this build's own unless
        /// given.
        #[arg(long, default_value_t = berth_images::node_architecture().to_string())]
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
        BundleCommand::Push {
            dir,
            reference,
            insecure,
            auth_file,
        } => {
            let manifest_path = dir.join(bundle::MANIFEST_FILE);
            let bytes = std::fs::read(&manifest_path)
                .with_context(|| manifest_path.display().to_string())?;
            let m = bundle::Manifest::parse(&bytes, &manifest_path)?;
            if !dir.join(bundle::SIGNATURE_FILE).is_file() {
                anyhow::bail!(
                    "{}: the bundle is not signed (ssh-keygen -Y sign -n berth-bundle -f KEY {}); nodes refuse it",
                    dir.display(),
                    manifest_path.display()
                );
            }
            let files: Vec<(String, PathBuf)> = [
                bundle::MANIFEST_FILE,
                bundle::SIGNATURE_FILE,
                &m.root.file,
                &m.kernel.file,
                &m.initrd.file,
            ]
            .into_iter()
            .map(|name| (name.to_string(), dir.join(name)))
            .collect();
            let creds = match &auth_file {
                Some(f) => {
                    let body = std::fs::read(f).with_context(|| f.display().to_string())?;
                    berth_registry::parse_docker_config(".dockerconfigjson", &body)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                }
                None => Vec::new(),
            };
            let mut config = berth_registry::RegistryConfig::default();
            let r = berth_registry::Reference::parse(&reference)?;
            config.hosts.insert(
                r.registry.clone(),
                berth_registry::HostConfig {
                    mirrors: Vec::new(),
                    insecure,
                },
            );
            let started = Instant::now();
            let digest =
                berth_registry::Client::new(config).push_artifact(&reference, &files, &creds)?;
            println!(
                "{reference}: version {} pushed as {digest} in {:.1} s",
                m.version,
                started.elapsed().as_secs_f64()
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
            let cmdline = std::fs::read_to_string(&node.kernel_cmdline)
                .with_context(|| node.kernel_cmdline.display().to_string())?;
            let allowed = berth_git::AllowedSigners::load(&allowed_signers)?;
            let (_, _, ready) = observe(&node.state_dir)?;
            let request = install::Request {
                bundle: &dir,
                allowed: &allowed,
                architecture: berth_images::node_architecture(),
                tries,
                gate_seconds,
                pods: ready.into_iter().collect(),
                version: None,
                declaration: None,
            };
            let target = install::Node {
                esp: &node.esp,
                cmdline: &cmdline,
                state_dir: &node.state_dir,
            };
            let layout = Layout::discover(&node.esp)?;
            install::install(&request, &layout, &target, &mut |step| println!("{step}"))?;
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
        let name = p.key();
        if p.is_ready() {
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

//! `berth`: the command users run. This binary parses flags, reads files,
//! and prints; every decision lives in the library crates.

mod exec;
mod logging;
mod render;
mod update;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use berth_manifest::{LoadOptions, Quantity, names};
use berth_plan::images::ImageCatalogFile;
use berth_plan::{ActualState, ImageCatalog, NodeInfo};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Run Kubernetes-shaped YAML from Git on a bare node, with systemd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Yaml,
    Json,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// A directory of manifests (every *.yaml and *.yml below it), or one file.
    dir: PathBuf,
    /// Image configs (Entrypoint, Cmd, Env, WorkingDir, User) the plan may use.
    #[arg(long, value_name = "FILE")]
    images: Option<PathBuf>,
    /// Refuse manifest files larger than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = LoadOptions::default().max_file_bytes)]
    max_file_size: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check every manifest as strictly as `kubectl apply --validate=strict`.
    Validate {
        #[command(flatten)]
        load: LoadArgs,
        /// Treat warnings (fields Berth does not act on yet) as errors.
        #[arg(long)]
        strict: bool,
        /// The Pod Security level pods are checked against (a node's
        /// `security.podSecurity`; a namespace's label may ask for stricter).
        #[arg(long, value_enum, default_value_t = PodSecurityArg::Baseline)]
        pod_security: PodSecurityArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show what a node would run and the actions that would get it there.
    Plan {
        #[command(flatten)]
        load: LoadArgs,
        /// The node's name (default: this machine's hostname).
        #[arg(long)]
        node: Option<String>,
        /// Extra node labels, for nodeSelector and node affinity: k=v,k2=v2
        #[arg(long, value_name = "LABELS", default_value = "")]
        node_labels: String,
        /// Only plan these namespaces (repeatable; default: all).
        #[arg(long = "namespace", value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        /// The node's memory, as a quantity (default: this machine's).
        #[arg(long, value_name = "QUANTITY")]
        node_memory: Option<String>,
        /// The node's CPUs, as a quantity (default: this machine's).
        #[arg(long, value_name = "QUANTITY")]
        node_cpus: Option<String>,
        /// The node's Pod Security level (default: baseline, or the snapshot's).
        #[arg(long, value_enum)]
        pod_security: Option<PodSecurityArg>,
        /// What the node has now: a snapshot of units and facts, as `berth
        /// observe` prints it (default: nothing runs, every image is here).
        /// Its node is used unless --node and the like describe another.
        #[arg(long, value_name = "FILE")]
        actual: Option<PathBuf>,
        /// The revision to name in reasons (default: a digest of the files).
        #[arg(long)]
        revision: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Print how long each stage took, on stderr.
        #[arg(long, hide = true)]
        timings: bool,
    },
    /// Run the node agent: fetch the configured branch, validate, plan; repeat.
    Agent {
        #[command(flatten)]
        dirs: AgentDirs,
        /// Run one pass and exit: 0 applied, 1 rejected, 3 failed (config, network).
        #[arg(long)]
        once: bool,
        /// Fetch, validate and plan, but touch no unit (no systemd needed).
        #[arg(long)]
        plan_only: bool,
        /// OCI image-layout archives (*.tar) to import at start.
        #[arg(long, value_name = "DIR", default_value = "/usr/share/berth/images")]
        image_archives: PathBuf,
    },
    /// Show what the agent runs: revision, errors, drift and every pod.
    /// With --from-git, read a node's status branch from a clone instead
    /// (every node's, without --node).
    Status {
        #[command(flatten)]
        dirs: AgentDirs,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// A clone of the desired-state repository (bare or not).
        #[arg(long, value_name = "REPO")]
        from_git: Option<PathBuf>,
        /// The node whose branch to read (with --from-git).
        #[arg(long, requires = "from_git")]
        node: Option<String>,
    },
    /// Show a node's drift report from its drift branch in a clone: what
    /// drifted, and what merging the branch would adopt.
    Drift {
        /// A clone of the desired-state repository (bare or not).
        #[arg(long, value_name = "REPO")]
        from_git: PathBuf,
        #[arg(long)]
        node: String,
    },
    /// Show pods like `kubectl get pods -o wide`, read live from systemd.
    Get {
        /// `pods`, `deployments` or `events`.
        #[arg(value_parser = ["pods", "pod", "po", "deployments", "deployment", "deploy", "events", "event", "ev"])]
        kind: String,
        #[command(flatten)]
        dirs: AgentDirs,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Events: after the list, print each new or repeated event as it
        /// happens, until interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Runs Berth's systemd contract cases against this machine's PID 1
    /// (the QEMU tier uses it to keep the in-memory fake honest).
    #[command(hide = true)]
    SystemdContract,
    /// Runs Berth's volume driver contract cases against the loop-device
    /// driver in DIR (the QEMU tier uses it to keep the fake driver honest).
    #[command(hide = true)]
    StorageContract { dir: PathBuf },
    /// Show a container's log from the journal.
    Logs {
        /// `NAMESPACE/NAME`, or `NAME` with `-n`.
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Which container; needed when the pod has more than one.
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command in a running container, like `kubectl exec`.
    Exec {
        /// `NAMESPACE/NAME`, or `NAME` with `-n`.
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Which container; needed when the pod has more than one.
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The second half of `exec`: enter process PID's namespaces and run.
    #[command(hide = true)]
    ExecEnter {
        pid: u32,
        /// The container unit's cgroup: the process must be in it.
        #[arg(long)]
        cgroup: String,
        #[arg(long, default_value = "/")]
        workdir: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// At shutdown, once the pods have stopped: undo every mount under the
    /// agent's state and /run/berth, and detach the claims' loop devices,
    /// so /var unmounts (berth-storage-teardown.service runs it).
    #[command(hide = true)]
    StorageTeardown {
        /// The agent's state directory.
        #[arg(long, env = "STATE_DIRECTORY", default_value = "/var/lib/berth")]
        state_dir: PathBuf,
    },
    /// List the node's images and the pulls under way, like `crictl images`.
    Images {
        #[command(flatten)]
        dirs: AgentDirs,
    },
    /// Make and check OS update bundles.
    #[command(subcommand)]
    Bundle(update::BundleCommand),
    /// The node's A/B root slots; install an update bundle by hand.
    #[command(subcommand)]
    Update(update::UpdateCommand),
    /// Print what the agent's last pass planned from: its units, images,
    /// pulls, pod wiring, volumes, applied digests and the node's config.
    /// `berth plan --actual FILE` on it prints the plan that pass applied.
    Observe {
        #[command(flatten)]
        dirs: AgentDirs,
        /// Print the plan the last pass applied instead.
        #[arg(long)]
        applied: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Yaml)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
struct AgentDirs {
    /// The node config on the ESP.
    #[arg(
        long,
        env = "BERTH_ESP_CONFIG",
        default_value = "/efi/berth/config.yaml"
    )]
    esp_config: PathBuf,
    /// The agent's state: the Git mirror and state.json.
    #[arg(long, env = "STATE_DIRECTORY", default_value = "/var/lib/berth")]
    state_dir: PathBuf,
    /// systemd credentials (berth.*), when systemd passes them.
    #[arg(long, env = "CREDENTIALS_DIRECTORY")]
    credentials_dir: Option<PathBuf>,
    /// Read instead of /proc/cmdline (for tests).
    #[arg(long, hide = true, default_value = "/proc/cmdline")]
    kernel_cmdline: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate {
            load,
            strict,
            pod_security,
            output,
        } => validate(&load, strict, pod_security.into(), output),
        Command::Plan {
            load,
            node,
            node_labels,
            namespaces,
            node_memory,
            node_cpus,
            pod_security,
            actual,
            revision,
            output,
            timings,
        } => {
            let actual = match actual {
                Some(path) => read_yaml::<ActualState>(&path).context("--actual")?,
                None => ActualState::default(),
            };
            // A snapshot's node (what its agent planned for) is replayed
            // as it was, unless the command line describes another.
            let flags_given = node.is_some()
                || !node_labels.is_empty()
                || !namespaces.is_empty()
                || node_memory.is_some()
                || node_cpus.is_some();
            let mut node = match &actual.node {
                Some(recorded) if !flags_given => recorded.clone(),
                _ => node_info(
                    node,
                    &node_labels,
                    namespaces,
                    node_memory.as_deref(),
                    node_cpus.as_deref(),
                )?,
            };
            if let Some(level) = pod_security {
                node.pod_security = level.into();
            }
            plan(&load, &node, &actual, revision, output, timings)
        }
        Command::Agent {
            dirs,
            once,
            plan_only,
            image_archives,
        } => agent(&dirs, once, plan_only, image_archives),
        Command::Status {
            from_git: Some(repo),
            node,
            output,
            ..
        } => status_from_git(&repo, node.as_deref(), output),
        Command::Status { dirs, output, .. } => status(&dirs, output, true),
        Command::Bundle(c) => update::bundle(c),
        Command::Update(c) => update::update(c),
        Command::Drift { from_git, node } => drift_from_git(&from_git, &node),
        Command::Get {
            watch: true, kind, ..
        } if !kind.starts_with("ev") => {
            anyhow::bail!("--watch is for `berth get events`")
        }
        Command::Get {
            dirs, output, kind, ..
        } if kind.starts_with("deploy") => {
            let paths = agent_paths(&dirs)?;
            let state = berth_agent::state::StateStore::new(&paths.state_dir).load();
            render::print_deployments(&state.deployments, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            dirs,
            output,
            kind,
            watch,
        } if kind.starts_with("ev") => events(&dirs, output, watch),
        Command::Get { dirs, output, .. } => status(&dirs, output, false),
        Command::SystemdContract => systemd_contract(),
        Command::StorageContract { dir } => storage_contract(&dir),
        Command::Logs {
            pod,
            namespace,
            container,
            follow,
        } => logs(&pod, &namespace, container.as_deref(), follow),
        Command::Exec {
            pod,
            namespace,
            container,
            command,
        } => exec::exec(
            &container_unit(&pod, &namespace, container.as_deref())?,
            &command,
        ),
        Command::ExecEnter {
            pid,
            cgroup,
            workdir,
            command,
        } => exec::enter(pid, &cgroup, &workdir, &command),
        Command::Images { dirs } => images(&dirs),
        Command::StorageTeardown { state_dir } => {
            let run = PathBuf::from("/run/berth");
            let problems = berth_storage::shutdown::teardown(
                &[state_dir.as_path(), run.as_path()],
                &state_dir.join("storage"),
            );
            for line in &problems {
                eprintln!("berth: storage teardown: {line}");
            }
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Observe {
            dirs,
            applied,
            output,
        } => observe(&dirs, applied, output),
    }
}

fn observe(dirs: &AgentDirs, applied: bool, output: Output) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let store = berth_agent::state::StateStore::new(&paths.state_dir);
    let path = if applied {
        store.plan_path()
    } else {
        store.observed_path()
    };
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: has the agent run a pass on this node?",
            path.display()
        )
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let output = if output == Output::Text {
        Output::Yaml
    } else {
        output
    };
    render::emit(&value, output)?;
    Ok(ExitCode::SUCCESS)
}

fn agent_paths(dirs: &AgentDirs) -> anyhow::Result<berth_agent::AgentPaths> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default();
    let kernel_cmdline = std::fs::read_to_string(&dirs.kernel_cmdline).unwrap_or_default();
    // STATE_DIRECTORY may list several directories; Berth asks systemd for one.
    let state_dir = PathBuf::from(
        dirs.state_dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("/var/lib/berth"),
    );
    Ok(berth_agent::AgentPaths {
        config: berth_agent::config::ConfigSources {
            esp_file: dirs.esp_config.clone(),
            credentials_dir: dirs.credentials_dir.clone(),
            kernel_cmdline,
            hostname,
        },
        state_dir,
        node_memory_bytes: host_memory().unwrap_or(1 << 30),
        node_cpu_milli: std::thread::available_parallelism()
            .map(|n| n.get() as u64 * 1000)
            .unwrap_or(1000),
        proc_net: PathBuf::from("/proc/net"),
    })
}

/// How long a start or stop may take before the agent reports it as stuck.
const JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn runtime(
    paths: &berth_agent::AgentPaths,
    image_archives: Option<PathBuf>,
    listener: Option<berth_runtime::dbus::JobListener>,
    keepalive: Option<berth_runtime::dbus::Keepalive>,
) -> anyhow::Result<berth_agent::Runtime> {
    let systemd = berth_runtime::dbus::DbusSystemd::connect(JOB_TIMEOUT, listener, keepalive)?;
    let containers = paths.state_dir.join("containers");
    Ok(berth_agent::Runtime {
        systemd: Box::new(systemd),
        images: berth_runtime::images::ImageStore::open(&paths.state_dir.join("images"))?,
        roots: berth_runtime::rootfs::ContainerRoots::new(
            &containers,
            std::sync::Arc::new(berth_runtime::rootfs::KernelRootMounter::node()),
        ),
        users: berth_runtime::rootfs::UserRecords::new(Path::new("/run/userdb")),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        containers_dir: containers.to_string_lossy().into_owned(),
        image_archives,
    })
}

fn agent(
    dirs: &AgentDirs,
    once: bool,
    plan_only: bool,
    image_archives: PathBuf,
) -> anyhow::Result<ExitCode> {
    use berth_agent::Wake;
    // Before any thread: libgit2's timeouts are process-wide globals.
    berth_git::set_network_timeouts(berth_git::CONNECT_TIMEOUT, berth_git::STALL_TIMEOUT);
    berth_git::sync_writes();
    let paths = agent_paths(dirs)?;
    logging::init();
    let log = berth_agent::Log::from_env();
    // A file of a newer schema (written by a newer slot's agent, before a
    // rollback onto this one) stops the agent before anything is read or
    // written over it.
    berth_agent::state::check_schemas(&paths.state_dir)
        .context("the node's state was written by a newer Berth")?;
    let notifier = std::sync::Arc::new(berth_agent::notify::Notifier::from_env());
    let (tx, rx) = std::sync::mpsc::channel();
    let runtime = if plan_only {
        None
    } else {
        let units = tx.clone();
        let listener: berth_runtime::dbus::JobListener = Box::new(move |unit, _result| {
            // Pod containers and slices only: the agent's own unit and
            // anything else named berth-* are not a reason to reconcile.
            if unit.starts_with("berth-") && (unit.contains('_') || unit.ends_with(".slice")) {
                let _ = units.send(Wake::UnitChanged);
            }
        });
        let pinger = std::sync::Arc::clone(&notifier);
        let keepalive: berth_runtime::dbus::Keepalive = Box::new(move || pinger.watchdog());
        Some(
            runtime(
                &paths,
                Some(image_archives),
                Some(listener),
                Some(keepalive),
            )
            .context("the agent manages pods through systemd (use --plan-only to only plan)")?,
        )
    };
    let with_pods = runtime.is_some();
    let mut agent = berth_agent::Agent::new(paths.clone(), log, runtime).with_context(|| {
        format!(
            "cannot create the state directory {}",
            paths.state_dir.display()
        )
    })?;
    agent.set_waker(tx.clone());
    let pinger = std::sync::Arc::clone(&notifier);
    let last = std::sync::Mutex::new(std::time::Instant::now());
    agent.set_git_keepalive(berth_git::Liveness::new(move || {
        // Progress arrives per packet; a ping a second is plenty.
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            *last = std::time::Instant::now();
            pinger.watchdog();
        }
    }));
    if with_pods {
        agent = agent.with_network(berth_agent::network::NetworkPaths {
            netns_dir: PathBuf::from(berth_plan::node::DEFAULT_NETNS_DIR),
            files_dir: PathBuf::from("/run/berth/pods"),
            leases: paths.state_dir.join("network/leases.json"),
            upstream_resolv_conf: PathBuf::from("/etc/resolv.conf"),
        });
        let storage_dir = paths.state_dir.join("storage");
        agent = agent.with_storage(
            storage_dir.clone(),
            Box::new(berth_storage::loopfs::LoopDriver::new(storage_dir)),
        );
        if !once {
            let exe = std::env::current_exe().context("cannot find the berth binary")?;
            agent = agent
                .with_prober(exe, tx.clone())
                .context("cannot start the prober")?;
        }
    }
    if once {
        agent.import_images();
        agent
            .publish()
            .context("cannot start publishing status to Git")?;
        let (outcome, _) = agent.pass(true);
        agent.stop_publishing();
        return Ok(match outcome {
            berth_agent::PassOutcome::Applied { .. } => ExitCode::SUCCESS,
            berth_agent::PassOutcome::Rejected { .. } => ExitCode::from(1),
            berth_agent::PassOutcome::Failed { .. } => ExitCode::from(3),
        });
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let wake = if signal == signal_hook::consts::SIGHUP {
                    Wake::SyncNow
                } else {
                    Wake::Shutdown
                };
                if tx.send(wake).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the signal thread")?;
    agent.run(&notifier, &rx);
    Ok(ExitCode::SUCCESS)
}

fn status(dirs: &AgentDirs, output: Output, with_agent: bool) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let state = berth_agent::state::StateStore::new(&paths.state_dir).load();
    let observed = match berth_runtime::dbus::DbusSystemd::connect(JOB_TIMEOUT, None, None)
        .and_then(|systemd| berth_runtime::observe(&systemd))
    {
        Ok(o) => o,
        // The agent's own record is still worth showing without systemd.
        Err(e) if with_agent => {
            eprintln!("berth: warning: pods not shown: {e}");
            berth_runtime::Observed::default()
        }
        Err(e) => return Err(e.into()),
    };
    let pods = state.pod_statuses(&observed, Path::new("/sys/fs/cgroup"));
    let now_usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let node = state.node.clone().unwrap_or_default();
    if with_agent {
        render::print_status(&state, &pods, &node, now_usec, output)?;
    } else {
        render::print_pods(&pods, &node, now_usec, output)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth get events [-w]`: the node's event history, oldest first; with
/// `-w`, then each event as it is recorded or repeated.
fn events(dirs: &AgentDirs, output: Output, watch: bool) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let store = berth_agent::events::EventStore::new(&paths.state_dir);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let log = store.load();
    let all: Vec<&berth_agent::events::Event> = log.events().collect();
    render::print_events(&all, now(), output, true)?;
    if !watch {
        return Ok(ExitCode::SUCCESS);
    }
    // What was shown, by object, reason and message: its count.
    let key =
        |e: &berth_agent::events::Event| (e.object.clone(), e.reason.clone(), e.message.clone());
    let mut shown: std::collections::HashMap<(String, String, String), u64> =
        log.events().map(|e| (key(e), e.count)).collect();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let log = store.load();
        let fresh: Vec<&berth_agent::events::Event> = log
            .events()
            .filter(|e| shown.get(&key(e)) != Some(&e.count))
            .collect();
        if !fresh.is_empty() {
            render::print_events(&fresh, now(), output, false)?;
            for e in fresh {
                shown.insert(key(e), e.count);
            }
        }
    }
}

fn status_from_git(repo: &Path, node: Option<&str>, output: Output) -> anyhow::Result<ExitCode> {
    use berth_agent::publisher::status_branch;
    use berth_agent::report::{NodeStatusDoc, STATUS_FILE};
    let read = |node: &str| -> anyhow::Result<NodeStatusDoc> {
        let branch = status_branch(node);
        let found =
            berth_git::publish::read_branch_file(repo, &branch, STATUS_FILE)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no branch {branch} (fetch it, or check the node's name)",
                    repo.display()
                )
            })?;
        let rev = found.revision;
        let bytes = found.content.ok_or_else(|| {
            anyhow::anyhow!("{}: {branch} at {rev} has no {STATUS_FILE}", repo.display())
        })?;
        NodeStatusDoc::from_yaml(&String::from_utf8_lossy(&bytes)).map_err(|e| {
            anyhow::anyhow!("{}: {branch}:{STATUS_FILE} at {rev}: {e}", repo.display())
        })
    };
    let now_usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    match node {
        Some(node) => {
            names::dns1123_subdomain(node).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
            render::print_node_status(&read(node)?, now_usec, output)?;
        }
        None => {
            let nodes = berth_git::publish::list_branches(repo, "berth/status/")?;
            if nodes.is_empty() {
                anyhow::bail!(
                    "{}: no berth/status/* branches: no node has reported to this repository yet (or they are not fetched)",
                    repo.display()
                );
            }
            let docs = nodes
                .iter()
                .map(|n| read(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            render::print_fleet(&docs, output)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn drift_from_git(repo: &Path, node: &str) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    names::dns1123_subdomain(node).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
    let branch = berth_agent::publisher::drift_branch(node);
    let file = format!("drift/{node}/DRIFT.md");
    let mut out = std::io::stdout().lock();
    match berth_git::publish::read_branch_file(repo, &branch, &file)? {
        None => {
            writeln!(out, "node {node} reports no drift (no branch {branch})")?;
        }
        Some(found) => {
            let rev = found.revision;
            let text = found.content.ok_or_else(|| {
                anyhow::anyhow!("{}: {branch} at {rev} has no {file}", repo.display())
            })?;
            writeln!(out, "# {branch} at {rev}\n")?;
            out.write_all(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn systemd_contract() -> anyhow::Result<ExitCode> {
    let systemd = berth_runtime::dbus::DbusSystemd::connect(JOB_TIMEOUT, None, None)?;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    for (name, result) in berth_runtime::contract::run_all(&systemd) {
        match result {
            Ok(()) => writeln!(out, "ok {name}")?,
            Err(e) => {
                failed += 1;
                writeln!(out, "FAIL {name}: {e}")?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[allow(clippy::print_stdout)]
fn storage_contract(dir: &Path) -> anyhow::Result<ExitCode> {
    use berth_storage::driver::VolumeDriver as _;
    let mut failed = 0;
    for (name, case) in berth_storage::contract::CASES {
        let driver = berth_storage::loopfs::LoopDriver::new(dir.join(name.replace(' ', "-")));
        let result = case(&driver);
        for (volume, _) in driver.list().unwrap_or_default() {
            let _ = driver.delete(&volume);
        }
        match result {
            Ok(()) => println!("ok {name}"),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `berth images`: what the store holds, and pulls not yet done.
#[allow(clippy::print_stdout)]
fn images(dirs: &AgentDirs) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let store = berth_runtime::images::ImageStore::open(&paths.state_dir.join("images"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:<60} {:<19} {:>10} {:>10}",
        "IMAGE", "DIGEST", "SIZE", "LAST USED"
    );
    let mut list = store.list();
    list.sort_by(|a, b| a.reference.cmp(&b.reference));
    for i in &list {
        println!(
            "{:<60} {:<19} {:>10} {:>10}",
            i.reference,
            i.manifest.get(..19).unwrap_or(&i.manifest),
            format!("{:.1}MB", i.size as f64 / 1e6),
            render::age(now.saturating_sub(i.last_used))
        );
    }
    let pulls = berth_registry::puller::read_pulls(&store);
    let open: Vec<_> = pulls
        .iter()
        .filter(|(_, p)| p.phase != berth_registry::PullPhase::Done)
        .collect();
    if !open.is_empty() {
        println!(
            "\n{:<60} {:<8} {:>21} ERROR",
            "PULLING", "PHASE", "PROGRESS"
        );
        for (reference, p) in open {
            println!(
                "{:<60} {:<8} {:>21} {}",
                reference,
                format!("{:?}", p.phase),
                format!(
                    "{:.1}/{:.1}MB",
                    p.bytes_done as f64 / 1e6,
                    p.bytes_total as f64 / 1e6
                ),
                p.error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The service of a pod's container: the one named, or the only one.
fn container_unit(pod: &str, namespace: &str, container: Option<&str>) -> anyhow::Result<String> {
    let (namespace, name) = pod.split_once('/').unwrap_or((namespace, pod));
    names::dns1123_label(namespace).map_err(|e| anyhow::anyhow!("namespace: {e}"))?;
    names::dns1123_subdomain(name).map_err(|e| anyhow::anyhow!("pod: {e}"))?;
    Ok(match container {
        Some(c) => {
            names::dns1123_label(c).map_err(|e| anyhow::anyhow!("--container: {e}"))?;
            format!("berth-{namespace}_{name}_{c}.service")
        }
        None => {
            use berth_runtime::Systemd as _;
            let systemd = berth_runtime::dbus::DbusSystemd::connect(JOB_TIMEOUT, None, None)?;
            let pattern = format!("berth-{namespace}_{name}_*.service");
            let units: Vec<String> = systemd
                .list_units(&[&pattern])?
                .into_iter()
                .map(|u| u.name)
                .collect();
            match units.as_slice() {
                [one] => one.clone(),
                [] => bail!("pod {namespace}/{name} has no containers on this node"),
                many => bail!(
                    "pod {namespace}/{name} has {} containers; choose one with -c: {}",
                    many.len(),
                    many.iter()
                        .filter_map(|u| u.rsplit('_').next())
                        .map(|c| c.trim_end_matches(".service"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    })
}

fn logs(
    pod: &str,
    namespace: &str,
    container: Option<&str>,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let unit = container_unit(pod, namespace, container)?;
    let mut cmd = std::process::Command::new("journalctl");
    cmd.args(["--no-pager", "-o", "cat", "-u", &unit]);
    if follow {
        cmd.arg("-f");
    }
    let status = cmd
        .status()
        .context("cannot run journalctl (is systemd's journal on this machine?)")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn image_catalog(load: &LoadArgs) -> anyhow::Result<ImageCatalog> {
    match &load.images {
        Some(path) => Ok(ImageCatalog::new(
            read_yaml::<ImageCatalogFile>(path)
                .context("--images")?
                .images,
        )),
        None => Ok(ImageCatalog::default()),
    }
}

fn load_catalog(load: &LoadArgs) -> anyhow::Result<berth_manifest::Catalog> {
    let options = LoadOptions {
        max_file_bytes: load.max_file_size,
    };
    Ok(berth_manifest::load_dir(&load.dir, &options)?)
}

/// `--pod-security`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PodSecurityArg {
    Privileged,
    Baseline,
    Restricted,
}

impl From<PodSecurityArg> for berth_plan::podsecurity::Level {
    fn from(a: PodSecurityArg) -> Self {
        match a {
            PodSecurityArg::Privileged => Self::Privileged,
            PodSecurityArg::Baseline => Self::Baseline,
            PodSecurityArg::Restricted => Self::Restricted,
        }
    }
}

fn validate(
    load: &LoadArgs,
    strict: bool,
    pod_security: berth_plan::podsecurity::Level,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let images = image_catalog(load)?;
    let catalog = load_catalog(load)?;
    let (mut pod_diags, pod_rejected) = berth_plan::validate_pods(&catalog, &images, pod_security);
    pod_diags.extend(berth_agent::storage::claim_diagnostics(&catalog));
    let report = render::ValidationReport::new(&catalog, pod_diags, pod_rejected);
    render::print_validation(&report, output)?;
    let failed = report.errors > 0 || (strict && report.warnings > 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn plan(
    load: &LoadArgs,
    node: &NodeInfo,
    actual: &ActualState,
    revision: Option<String>,
    output: Output,
    timings: bool,
) -> anyhow::Result<ExitCode> {
    // A snapshot's image configs are what its agent planned with.
    let images = match &load.images {
        None if !actual.image_configs.is_empty() => ImageCatalog::new(actual.image_configs.clone()),
        _ => image_catalog(load)?,
    };
    let started = std::time::Instant::now();
    let catalog = load_catalog(load)?;
    let loaded = started.elapsed();
    let revision = revision.unwrap_or_else(|| catalog.content_digest.clone());
    let node_plan = berth_plan::plan_node(&catalog, node, &images, actual, &revision);
    let planned = started.elapsed();
    render::print_plan(&catalog, &node_plan, output)?;
    if timings {
        eprintln!(
            "timings: load {:.1} ms ({} objects, {} files), plan {:.1} ms ({} pods, {} actions)",
            loaded.as_secs_f64() * 1e3,
            catalog.objects.len(),
            catalog.files.len(),
            (planned - loaded).as_secs_f64() * 1e3,
            node_plan.pods.len(),
            node_plan.plan.actions.len()
        );
    }
    let failed = catalog.error_count() > 0 || !node_plan.rejected.is_empty();
    // The process ends next: freeing tens of thousands of objects one by
    // one would take longer than the exit does.
    std::mem::forget(node_plan);
    std::mem::forget(catalog);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn node_info(
    name: Option<String>,
    labels: &str,
    namespaces: Vec<String>,
    memory: Option<&str>,
    cpus: Option<&str>,
) -> anyhow::Result<NodeInfo> {
    let name = match name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_lowercase())
            .unwrap_or_default(),
    };
    if let Err(e) = names::dns1123_subdomain(&name) {
        bail!("--node: {e}");
    }
    let mut extra = BTreeMap::new();
    for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--node-labels: {pair:?} is not key=value")
        };
        names::qualified_name(k).map_err(|e| anyhow::anyhow!("--node-labels: {e}"))?;
        names::label_value(v).map_err(|e| anyhow::anyhow!("--node-labels: {e}"))?;
        extra.insert(k.to_string(), v.to_string());
    }
    for ns in &namespaces {
        names::dns1123_label(ns).map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
    }
    let memory = match memory {
        Some(q) => Quantity::parse(q)
            .and_then(|q| q.units())
            .map_err(|e| anyhow::anyhow!("--node-memory: {e}"))?,
        None => host_memory().context("cannot read this machine's memory; pass --node-memory")?,
    };
    let cpu = match cpus {
        Some(q) => Quantity::parse(q)
            .and_then(|q| q.milli())
            .map_err(|e| anyhow::anyhow!("--node-cpus: {e}"))?,
        None => std::thread::available_parallelism()
            .map(|n| n.get() as u64 * 1000)
            .unwrap_or(1000),
    };
    if memory == 0 || cpu == 0 {
        bail!("--node-memory and --node-cpus must be greater than zero");
    }
    let mut node = NodeInfo::new(&name, extra, memory, cpu);
    node.namespaces = namespaces;
    Ok(node)
}

fn host_memory() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .context("no MemTotal in /proc/meminfo")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed MemTotal")?
        .parse()?;
    Ok(kib * 1024)
}

//! `berth`: the command users run. This binary parses flags, reads files,
//! and prints; every decision lives in the library crates.

mod render;

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
        /// What runs now, as a YAML snapshot of units (default: nothing).
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
    },
    /// Show what the agent last fetched, accepted and rejected.
    Status {
        #[command(flatten)]
        dirs: AgentDirs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
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
            output,
        } => validate(&load, strict, output),
        Command::Plan {
            load,
            node,
            node_labels,
            namespaces,
            node_memory,
            node_cpus,
            actual,
            revision,
            output,
            timings,
        } => {
            let node = node_info(
                node,
                &node_labels,
                namespaces,
                node_memory.as_deref(),
                node_cpus.as_deref(),
            )?;
            let actual = match actual {
                Some(path) => read_yaml::<ActualState>(&path).context("--actual")?,
                None => ActualState::default(),
            };
            plan(&load, &node, &actual, revision, output, timings)
        }
        Command::Agent { dirs, once } => agent(&dirs, once),
        Command::Status { dirs, output } => status(&dirs, output),
    }
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
    })
}

fn agent(dirs: &AgentDirs, once: bool) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let log = berth_agent::Log::from_env();
    let mut agent = berth_agent::Agent::new(paths.clone(), log).with_context(|| {
        format!(
            "cannot create the state directory {}",
            paths.state_dir.display()
        )
    })?;
    if once {
        let (outcome, _) = agent.pass();
        return Ok(match outcome {
            berth_agent::PassOutcome::Applied { .. } => ExitCode::SUCCESS,
            berth_agent::PassOutcome::Rejected { .. } => ExitCode::from(1),
            berth_agent::PassOutcome::Failed { .. } => ExitCode::from(3),
        });
    }
    agent.run(&berth_agent::notify::Notifier::from_env())
}

fn status(dirs: &AgentDirs, output: Output) -> anyhow::Result<ExitCode> {
    let paths = agent_paths(dirs)?;
    let state = berth_agent::state::StateStore::new(&paths.state_dir).load();
    render::print_status(&state, output)?;
    Ok(ExitCode::SUCCESS)
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

fn validate(load: &LoadArgs, strict: bool, output: Output) -> anyhow::Result<ExitCode> {
    let images = image_catalog(load)?;
    let catalog = load_catalog(load)?;
    let (pod_diags, pod_rejected) = berth_plan::validate_pods(&catalog, &images);
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
    let images = image_catalog(load)?;
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

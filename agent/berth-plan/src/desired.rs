//! The desired node model: for each selected pod, its QoS class, its slice,
//! and one service unit per container with every property computed.
//! Pure: values in, values out.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_manifest::k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVarSource, Secret};
use berth_manifest::{Catalog, FieldIssue, FieldPath, Object, ObjectRef, Quantity};
use serde::Serialize;

use crate::expand::expand;
use crate::images::{ImageCatalog, ImageConfig};
use crate::node::{NodeInfo, PodInstance};
use crate::resources::{self, ContainerResources, QosClass};
use crate::units::{
    self, CONTAINER_FIELD, ExecCommand, IMAGE_FIELD, MARKER_FIELD, OWNER_FIELD, POD_FIELD, PodId,
    Properties, PropertyValue, SLICE_DESCRIPTION_PREFIX, SharedProperties, UnitName,
};
use crate::volumes::{PodVolume, SubPathBind};

/// The `PATH` container runtimes set when the image does not.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
/// The kubelet's crash-loop back-off: 10 s doubling up to 5 min.
pub const RESTART_INITIAL_USEC: u64 = 10_000_000;
pub const RESTART_MAX_USEC: u64 = 300_000_000;
pub const RESTART_STEPS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// A slice unit with its properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SliceUnit {
    pub name: UnitName,
    pub properties: SharedProperties,
}

/// One container as a transient service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUnit {
    pub name: UnitName,
    pub container: String,
    pub init: bool,
    pub image: String,
    properties: SharedProperties,
    /// Environment entries that hold secret values, by variable name, with
    /// where they come from; every rendering shows this instead of the value.
    sensitive_env: BTreeMap<String, String>,
    /// Resource properties that may change without a restart, by the
    /// container's `resizePolicy`.
    pub resizable: Resizable,
    /// `subPath` mounts the agent stages before the container starts.
    pub sub_paths: Vec<SubPathBind>,
    /// `imagePullPolicy`, defaulted as the API server does.
    pub pull_policy: PullPolicy,
    /// `runAsNonRoot` with the user left to the image: checked against the
    /// resolved user when the container starts.
    pub verify_non_root: bool,
}

/// When the image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Before every start of the container (the tag is resolved again).
    Always,
    IfNotPresent,
    /// Only the local store; a missing image is `ErrImageNeverPull`.
    Never,
}

impl PullPolicy {
    /// The API server's default: `Always` for `:latest` or no tag, else `IfNotPresent`.
    pub fn resolve(field: Option<&str>, image: &str) -> Self {
        match field {
            Some("Always") => Self::Always,
            Some("Never") => Self::Never,
            Some(_) => Self::IfNotPresent,
            None => {
                let last = image.rsplit('/').next().unwrap_or("");
                let latest = !image.contains('@')
                    && last.split_once(':').is_none_or(|(_, tag)| tag == "latest");
                if latest {
                    Self::Always
                } else {
                    Self::IfNotPresent
                }
            }
        }
    }
}

impl ContainerUnit {
    /// The exact properties to send to systemd, secrets included. Only the
    /// apply stage may call this.
    pub fn properties_for_apply(&self) -> &Properties {
        &self.properties
    }

    /// The properties with secret values replaced by where they come from:
    /// what every plan, log and status shows.
    pub fn properties_redacted(&self) -> SharedProperties {
        if self.sensitive_env.is_empty() {
            return Arc::clone(&self.properties);
        }
        let mut props = (*self.properties).clone();
        if let Some(PropertyValue::List(env)) = props.get_mut("Environment") {
            for entry in env.iter_mut() {
                let name = entry.split('=').next().unwrap_or("").to_string();
                if let Some(origin) = self.sensitive_env.get(&name) {
                    *entry = format!("{name}=<{origin}>");
                }
            }
        }
        Arc::new(props)
    }

    pub fn is_sensitive(&self, env_name: &str) -> bool {
        self.sensitive_env.contains_key(env_name)
    }
}

/// Which resources a running container may change without a restart, by
/// its `resizePolicy` (Kubernetes' in-place resize; `NotRequired` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resizable {
    pub cpu: bool,
    pub memory: bool,
}

impl Resizable {
    pub fn allows(self, property: &str) -> bool {
        match property {
            "CPUWeight" | "CPUQuotaPerSecUSec" | "CPUQuotaPeriodUSec" => self.cpu,
            "MemoryMax" | "MemoryLow" | "MemoryHigh" | "OOMScoreAdjust" => self.memory,
            _ => false,
        }
    }
}

/// A pod, ready to be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPod {
    pub id: PodId,
    /// The object it was declared by (a Pod, or the Deployment of a replica).
    pub source: ObjectRef,
    /// Where the pod spec sits inside its source object.
    pub spec_path: &'static str,
    pub qos: QosClass,
    pub restart_policy: RestartPolicy,
    pub slice: SliceUnit,
    /// In the order they run.
    pub init_containers: Vec<ContainerUnit>,
    pub containers: Vec<ContainerUnit>,
    /// Requests after defaulting: for the node's QoS slices.
    pub cpu_request_milli: u64,
    pub memory_request_bytes: u64,
    /// The pod's labels, for Service selectors.
    pub labels: BTreeMap<String, String>,
    /// Ports its containers declare, for a Service's named `targetPort`.
    pub ports: Vec<DeclaredPort>,
    /// `spec.hostNetwork`: the node's network namespace instead of its own.
    pub host_network: bool,
    /// `spec.volumes`, resolved; made ready by the agent before containers start.
    pub volumes: Vec<PodVolume>,
    /// `spec.imagePullSecrets` that exist and hold a Docker config.
    pub pull_secrets: Vec<PullSecret>,
}

/// A Docker config from an image pull Secret: `.dockerconfigjson` (type
/// `kubernetes.io/dockerconfigjson`) or `.dockercfg` (`kubernetes.io/dockercfg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSecret {
    pub name: String,
    pub key: &'static str,
    pub data: crate::volumes::Sensitive,
}

/// The kubelet's rule: a pull Secret that is missing or of the wrong type
/// is warned about, and the pull goes on without it.
fn pull_secrets(
    instance: &PodInstance<'_>,
    ctx: &Context<'_>,
    spec_path: &FieldPath,
    warnings: &mut Vec<FieldIssue>,
) -> Vec<PullSecret> {
    let mut out = Vec::new();
    for (i, r) in instance
        .spec
        .image_pull_secrets
        .iter()
        .flatten()
        .enumerate()
    {
        let path = spec_path.key("imagePullSecrets").index(i).key("name");
        let ns = instance.id.namespace.as_str();
        let Some(secret) = ctx.secret(ns, &r.name) else {
            warnings.push(FieldIssue::warning(
                path,
                format!(
                    "Secret {ns}/{} does not exist; images are pulled without it",
                    r.name
                ),
            ));
            continue;
        };
        let key = match secret.type_.as_deref() {
            Some("kubernetes.io/dockerconfigjson") => ".dockerconfigjson",
            Some("kubernetes.io/dockercfg") => ".dockercfg",
            other => {
                warnings.push(FieldIssue::warning(path, format!(
                    "Secret {ns}/{} is of type {:?}, not kubernetes.io/dockerconfigjson; images are pulled without it",
                    r.name,
                    other.unwrap_or("Opaque")
                )));
                continue;
            }
        };
        match crate::volumes::secret_entries(ctx, ns, &r.name).and_then(|mut e| e.remove(key)) {
            Some(data) => out.push(PullSecret {
                name: r.name.clone(),
                key,
                data: crate::volumes::Sensitive(data),
            }),
            None => warnings.push(FieldIssue::warning(
                path,
                format!(
                    "Secret {ns}/{} has no {key} key; images are pulled without it",
                    r.name
                ),
            )),
        }
    }
    out
}

/// A container port as the pod spec declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredPort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`, as written (TCP when absent).
    pub protocol: String,
}

impl DesiredPod {
    pub fn units(&self) -> impl Iterator<Item = &ContainerUnit> {
        self.init_containers.iter().chain(self.containers.iter())
    }
}

/// Inputs every pod resolves against.
#[derive(Debug)]
pub struct Context<'a> {
    pub node: &'a NodeInfo,
    pub images: &'a ImageCatalog,
    config_maps: BTreeMap<(&'a str, &'a str), &'a ConfigMap>,
    secrets: BTreeMap<(&'a str, &'a str), &'a Secret>,
}

impl<'a> Context<'a> {
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&'a ConfigMap> {
        self.config_maps.get(&(namespace, name)).copied()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<&'a Secret> {
        self.secrets.get(&(namespace, name)).copied()
    }

    pub fn new(catalog: &'a Catalog, node: &'a NodeInfo, images: &'a ImageCatalog) -> Self {
        let mut config_maps = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        for o in &catalog.objects {
            let ns = o.id.namespace.as_deref().unwrap_or("");
            match &o.object {
                Object::ConfigMap(c) => {
                    config_maps.insert((ns, o.id.name.as_str()), c.as_ref());
                }
                Object::Secret(s) => {
                    secrets.insert((ns, o.id.name.as_str()), s.as_ref());
                }
                _ => {}
            }
        }
        Self {
            node,
            images,
            config_maps,
            secrets,
        }
    }
}

/// A pod that resolved, and what the planner should warn about.
#[derive(Debug)]
pub struct Resolved {
    pub pod: DesiredPod,
    pub warnings: Vec<FieldIssue>,
}

/// Builds one pod's desired units. Errors name fields relative to the
/// object the pod comes from.
pub fn resolve_pod(
    instance: &PodInstance<'_>,
    ctx: &Context<'_>,
) -> Result<Resolved, Vec<FieldIssue>> {
    let spec = instance.spec;
    let spec_path = FieldPath::parse(instance.spec_path);
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let restart_policy = match spec.restart_policy.as_deref() {
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        _ => RestartPolicy::Always,
    };
    let init = spec.init_containers.as_deref().unwrap_or(&[]);
    let all: Vec<(bool, usize, &Container)> = init
        .iter()
        .enumerate()
        .map(|(i, c)| (true, i, c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (false, i, c)),
        )
        .collect();
    let resources: Vec<ContainerResources> =
        all.iter().map(|(_, _, c)| container_resources(c)).collect();
    let qos = resources::qos_class(&resources);

    if spec.enable_service_links == Some(true) {
        warnings.push(FieldIssue::warning(
            spec_path.key("enableServiceLinks"),
            "service environment variables are not injected until Services are programmed on the node",
        ));
    }

    let slice_name = match units::pod_slice(qos, &instance.id) {
        Ok(n) => Some(n),
        Err(e) => {
            errors.push(FieldIssue::error(
                FieldPath::root().key("metadata").key("name"),
                e.to_string(),
            ));
            None
        }
    };

    let pod_res = pod_resources(&resources[..init.len()], &resources[init.len()..]);
    let volumes = crate::volumes::pod_volumes(
        instance,
        ctx,
        pod_res.memory_limit_bytes,
        &mut errors,
        &mut warnings,
    );

    let mut init_units: Vec<ContainerUnit> = Vec::new();
    let mut app_units = Vec::new();
    for ((is_init, index, container), res) in all.iter().zip(&resources) {
        let list = if *is_init {
            "initContainers"
        } else {
            "containers"
        };
        let cpath = spec_path.key(list).index(*index);
        let Some(slice) = &slice_name else { break };
        let after: Vec<String> = if *is_init {
            init_units
                .last()
                .map(|u| vec![u.name.to_string()])
                .unwrap_or_default()
        } else {
            init_units.iter().map(|u| u.name.to_string()).collect()
        };
        let input = ContainerInput {
            instance,
            container,
            is_init: *is_init,
            path: &cpath,
            resources: *res,
            qos,
            restart_policy,
            slice,
            after,
            volumes: &volumes,
        };
        match container_unit(&input, ctx, &mut warnings) {
            Ok(unit) if *is_init => init_units.push(unit),
            Ok(unit) => app_units.push(unit),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some(slice_name) = slice_name else {
        return Err(errors);
    };

    let mut slice_props = Properties::new();
    slice_props.insert(
        "Description",
        PropertyValue::Text(format!("{SLICE_DESCRIPTION_PREFIX}{} ({qos})", instance.id)),
    );
    let shares = resources::milli_to_shares(if qos == QosClass::BestEffort {
        0
    } else {
        pod_res.cpu_request_milli.unwrap_or(0)
    });
    slice_props.insert(
        "CPUWeight",
        PropertyValue::Unsigned(resources::shares_to_weight(shares)),
    );
    if let Some(limit) = pod_res.cpu_limit_milli {
        slice_props.insert(
            "CPUQuotaPerSecUSec",
            PropertyValue::Unsigned(resources::quota_per_sec(resources::milli_to_quota(limit))),
        );
        slice_props.insert(
            "CPUQuotaPeriodUSec",
            PropertyValue::Unsigned(resources::CPU_PERIOD_USEC),
        );
    }
    if let Some(limit) = pod_res.memory_limit_bytes {
        slice_props.insert("MemoryMax", PropertyValue::Unsigned(limit));
    }
    slice_props.insert("TasksMax", PropertyValue::Unsigned(ctx.node.pod_pids_limit));

    let pull_secrets = pull_secrets(instance, ctx, &spec_path, &mut warnings);
    Ok(Resolved {
        pod: DesiredPod {
            id: instance.id.clone(),
            source: instance.source.id.clone(),
            spec_path: instance.spec_path,
            qos,
            restart_policy,
            slice: SliceUnit {
                name: slice_name,
                properties: Arc::new(slice_props),
            },
            init_containers: init_units,
            containers: app_units,
            cpu_request_milli: pod_res.cpu_request_milli.unwrap_or(0),
            memory_request_bytes: pod_res.memory_request_bytes.unwrap_or(0),
            labels: instance.metadata.labels.clone().unwrap_or_default(),
            ports: spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    Some(DeclaredPort {
                        name: p.name.clone(),
                        port: u16::try_from(p.container_port).ok()?,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    })
                })
                .collect(),
            host_network: spec.host_network == Some(true),
            volumes,
            pull_secrets,
        },
        warnings,
    })
}

/// The QoS-level slices for a set of pods: BestEffort gets the minimum
/// weight; Guaranteed and Burstable get the weight of their pods' requests.
pub fn qos_slices(pods: &[DesiredPod]) -> Vec<SliceUnit> {
    let mut slices = Vec::new();
    for qos in [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ] {
        let members: Vec<&DesiredPod> = pods.iter().filter(|p| p.qos == qos).collect();
        if members.is_empty() {
            continue;
        }
        let milli: u64 = members.iter().map(|p| p.cpu_request_milli).sum();
        let weight = match qos {
            QosClass::BestEffort => 1,
            _ => resources::shares_to_weight(resources::milli_to_shares(milli)),
        };
        let mut properties = Properties::new();
        properties.insert(
            "Description",
            PropertyValue::Text(format!("berth {qos} pods")),
        );
        properties.insert("CPUWeight", PropertyValue::Unsigned(weight));
        slices.push(SliceUnit {
            name: units::qos_slice(qos),
            properties: Arc::new(properties),
        });
    }
    slices
}

fn container_resources(c: &Container) -> ContainerResources {
    let get = |section: &Option<
        BTreeMap<String, berth_manifest::k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               name: &str,
               cpu: bool| {
        let q = section.as_ref()?.get(name)?;
        let parsed = Quantity::parse(&q.0).ok()?;
        if cpu {
            parsed.milli().ok()
        } else {
            parsed.units().ok()
        }
    };
    let Some(r) = &c.resources else {
        return ContainerResources::default();
    };
    ContainerResources {
        cpu_request_milli: get(&r.requests, "cpu", true),
        cpu_limit_milli: get(&r.limits, "cpu", true),
        memory_request_bytes: get(&r.requests, "memory", false),
        memory_limit_bytes: get(&r.limits, "memory", false),
    }
    .defaulted()
}

/// The pod's effective resources: the larger of the app containers' sum and
/// the largest init container; a limit only when every container has one.
fn pod_resources(init: &[ContainerResources], app: &[ContainerResources]) -> ContainerResources {
    fn combine(
        init: &[ContainerResources],
        app: &[ContainerResources],
        get: impl Fn(&ContainerResources) -> Option<u64>,
        all_required: bool,
    ) -> Option<u64> {
        if all_required && init.iter().chain(app).any(|c| get(c).is_none()) {
            return None;
        }
        let sum: u64 = app.iter().filter_map(&get).sum();
        let max_init = init.iter().filter_map(&get).max().unwrap_or(0);
        let v = sum.max(max_init);
        (v > 0).then_some(v)
    }
    ContainerResources {
        cpu_request_milli: combine(init, app, |c| c.cpu_request_milli, false),
        cpu_limit_milli: combine(init, app, |c| c.cpu_limit_milli, true),
        memory_request_bytes: combine(init, app, |c| c.memory_request_bytes, false),
        memory_limit_bytes: combine(init, app, |c| c.memory_limit_bytes, true),
    }
}

struct ContainerInput<'a> {
    instance: &'a PodInstance<'a>,
    container: &'a Container,
    is_init: bool,
    path: &'a FieldPath,
    resources: ContainerResources,
    qos: QosClass,
    restart_policy: RestartPolicy,
    slice: &'a UnitName,
    after: Vec<String>,
    volumes: &'a [PodVolume],
}

/// An ordered environment in which a later definition replaces an earlier one in place.
#[derive(Default)]
struct Env {
    entries: Vec<(String, String)>,
    index: BTreeMap<String, usize>,
    sensitive: BTreeMap<String, String>,
}

impl Env {
    fn set(&mut self, name: &str, value: String, sensitive: Option<String>) {
        match self.index.get(name) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(name.to_string(), self.entries.len());
                self.entries.push((name.to_string(), value));
            }
        }
        match sensitive {
            Some(origin) => {
                self.sensitive.insert(name.to_string(), origin);
            }
            None => {
                self.sensitive.remove(name);
            }
        }
    }
    fn get(&self, name: &str) -> Option<String> {
        self.index.get(name).map(|&i| self.entries[i].1.clone())
    }
}

fn container_unit(
    input: &ContainerInput<'_>,
    ctx: &Context<'_>,
    warnings: &mut Vec<FieldIssue>,
) -> Result<ContainerUnit, Vec<FieldIssue>> {
    let c = input.container;
    let path = input.path;
    let id = &input.instance.id;
    let mut errors = Vec::new();
    let image_ref = c.image.clone().unwrap_or_default();
    let image = ctx.images.get(&image_ref);
    let name = match units::container_service(id, &c.name) {
        Ok(n) => n,
        Err(e) => return Err(vec![FieldIssue::error(path.key("name"), e.to_string())]),
    };

    let env = environment(input, image, ctx, &mut errors, warnings);
    let lookup = |n: &str| env.get(n);
    let command: Option<Vec<String>> = c
        .command
        .clone()
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().map(|a| expand(a, lookup)).collect());
    let args: Option<Vec<String>> = c
        .args
        .clone()
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().map(|a| expand(a, lookup)).collect());
    let argv: Option<Vec<String>> = match (command, args, image) {
        (Some(cmd), Some(args), _) => Some(cmd.into_iter().chain(args).collect()),
        (Some(cmd), None, _) => Some(cmd),
        (None, Some(args), Some(img)) => Some(img.entrypoint.iter().cloned().chain(args).collect()),
        (None, None, Some(img)) => Some(
            img.entrypoint
                .iter()
                .chain(img.cmd.iter())
                .cloned()
                .collect(),
        ),
        (None, _, None) => None,
    };
    match &argv {
        Some(v) if v.is_empty() => errors.push(FieldIssue::error(
            path.key("command"),
            format!("nothing to run: the container sets no command and image {image_ref:?} has neither Entrypoint nor Cmd"),
        )),
        Some(v) if v[0].is_empty() => errors.push(FieldIssue::error(path.key("command"), "the program to run is an empty string")),
        None => warnings.push(FieldIssue::warning(
            path.key("command"),
            format!("the command comes from image {image_ref:?}, which this plan does not know (pass --images); it is resolved when the image is present"),
        )),
        _ => {}
    }

    let working_dir = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| image.and_then(|i| i.working_dir.clone()));
    if let Some(dir) = &working_dir
        && !dir.starts_with('/')
    {
        errors.push(FieldIssue::error(
            path.key("workingDir"),
            format!("{dir:?} must be an absolute path"),
        ));
    }

    let pod_sc = input.instance.spec.security_context.as_ref();
    let sc = c.security_context.as_ref();
    let (image_uid, image_gid) = image
        .and_then(|i| i.user.as_deref())
        .map(parse_image_user)
        .unwrap_or((None, None));
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user))
        .or(image_uid);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group))
        .or(image_gid);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let explicit_uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    // The kubelet's rule: a uid written in the manifest is checked now; one
    // left to the image is checked when the container starts, and a root
    // image then shows CreateContainerConfigError on the pod.
    if non_root && explicit_uid == Some(0) {
        errors.push(FieldIssue::error(
            path.key("securityContext").key("runAsNonRoot"),
            "runAsNonRoot is set but runAsUser is 0 (root)",
        ));
    }
    let verify_non_root = non_root && explicit_uid.is_none();
    if let Some(sc) = sc {
        crate::security::check_combination(sc, &path.key("securityContext"), &mut errors);
    }
    let mut isolation = Properties::new();
    let seccomp = crate::security::isolate(
        &crate::security::Input {
            pod: pod_sc,
            pod_path: &FieldPath::parse(input.instance.spec_path),
            container: sc,
            allow_privileged: ctx.node.allow_privileged,
            path,
        },
        &mut isolation,
        &mut errors,
    );
    if image.is_some_and(|i| {
        i.user
            .as_deref()
            .is_some_and(|u| parse_image_user(u).0.is_none() && !u.is_empty())
    }) && uid.is_none()
    {
        warnings.push(FieldIssue::warning(path.key("securityContext").key("runAsUser"), "the image names its user by name; it is resolved from the image's /etc/passwd at start"));
    }

    if !errors.is_empty() {
        return Err(errors);
    }

    let mut p = Properties::new();
    let u = PropertyValue::Unsigned;
    let text = |s: &str| PropertyValue::Text(s.to_string());
    p.insert(
        "Description",
        PropertyValue::Text(format!(
            "berth {}container {} of pod {}",
            if input.is_init { "init " } else { "" },
            c.name,
            id
        )),
    );
    p.insert("Slice", PropertyValue::Text(input.slice.to_string()));
    let mut fields = vec![
        MARKER_FIELD.to_string(),
        format!("{POD_FIELD}={id}"),
        format!("{CONTAINER_FIELD}={}", c.name),
        format!("{IMAGE_FIELD}={image_ref}"),
        format!("{}={seccomp}", crate::security::SECCOMP_FIELD),
    ];
    if let Some(owner) = &input.instance.owner {
        fields.push(format!("{OWNER_FIELD}={owner}"));
    }
    p.insert("LogExtraFields", PropertyValue::List(fields));
    if let Some(argv) = argv {
        p.insert(
            "ExecStart",
            PropertyValue::Exec(vec![ExecCommand {
                path: argv[0].clone(),
                argv,
            }]),
        );
    }
    p.insert(
        "Environment",
        PropertyValue::List(
            env.entries
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
    );
    if let Some(dir) = working_dir {
        p.insert("WorkingDirectory", PropertyValue::Text(dir));
    }
    if let Some(uid) = uid {
        p.insert("User", PropertyValue::Text(uid.to_string()));
    }
    if let Some(gid) = gid {
        p.insert("Group", PropertyValue::Text(gid.to_string()));
    }
    if input.is_init {
        p.insert("Type", text("oneshot"));
        p.insert("RemainAfterExit", PropertyValue::Bool(true));
    } else {
        p.insert("Type", text("exec"));
    }
    let restart = match (input.is_init, input.restart_policy) {
        (_, RestartPolicy::Never) => "no",
        (true, _) | (false, RestartPolicy::OnFailure) => "on-failure",
        (false, RestartPolicy::Always) => "always",
    };
    p.insert("Restart", text(restart));
    if restart != "no" {
        p.insert("RestartUSec", u(RESTART_INITIAL_USEC));
        p.insert("RestartMaxDelayUSec", u(RESTART_MAX_USEC));
        p.insert("RestartSteps", u(RESTART_STEPS));
        // Kubernetes never gives up restarting; neither may systemd's start limit.
        p.insert("StartLimitIntervalUSec", u(0));
    }
    if !input.is_init && input.restart_policy != RestartPolicy::Always {
        // A container that ran to completion stays visible as exited, so it
        // is not mistaken for a missing one and started again.
        p.insert("RemainAfterExit", PropertyValue::Bool(true));
    }
    if !input.after.is_empty() {
        p.insert("After", PropertyValue::List(input.after.clone()));
        p.insert("Requires", PropertyValue::List(input.after.clone()));
    }
    let grace = input
        .instance
        .spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(0) as u64;
    p.insert("TimeoutStopUSec", u(grace * 1_000_000));

    let res = input.resources;
    let shares = resources::milli_to_shares(res.cpu_request_milli.unwrap_or(0));
    p.insert("CPUWeight", u(resources::shares_to_weight(shares)));
    if let Some(limit) = res.cpu_limit_milli {
        p.insert(
            "CPUQuotaPerSecUSec",
            u(resources::quota_per_sec(resources::milli_to_quota(limit))),
        );
        p.insert("CPUQuotaPeriodUSec", u(resources::CPU_PERIOD_USEC));
    }
    if let Some(limit) = res.memory_limit_bytes {
        p.insert("MemoryMax", u(limit));
    }
    if let Some(request) = res.memory_request_bytes {
        p.insert("MemoryLow", u(request));
    }
    if input.qos != QosClass::Guaranteed
        && let Some(high) = resources::memory_high(
            res.memory_request_bytes.unwrap_or(0),
            res.memory_limit_bytes,
            ctx.node.memory_bytes,
        )
    {
        p.insert("MemoryHigh", u(high));
    }
    p.insert(
        "OOMScoreAdjust",
        PropertyValue::Signed(i64::from(resources::oom_score_adj(
            input.qos,
            res.memory_request_bytes.unwrap_or(0),
            ctx.node.memory_bytes,
        ))),
    );

    // The container's own root: an overlay of its image, mounted by the
    // runtime at this path before the service starts.
    let rootfs = format!(
        "{}/{}_{}/rootfs",
        ctx.node.containers_dir.trim_end_matches('/'),
        id.key(),
        c.name
    );
    p.insert("RootDirectory", PropertyValue::Text(rootfs.clone()));
    p.insert("RequiresMountsFor", PropertyValue::List(vec![rootfs]));
    p.insert("MountAPIVFS", PropertyValue::Bool(true));
    // The pod's own network namespace, made and wired by the agent before
    // the container starts.
    if let Some(dir) = &ctx.node.netns_dir
        && input.instance.spec.host_network != Some(true)
    {
        p.insert(
            "NetworkNamespacePath",
            PropertyValue::Text(format!("{}/{}", dir.trim_end_matches('/'), id.key())),
        );
    }
    p.insert("PrivateTmp", PropertyValue::Bool(true));
    p.insert("PrivatePIDs", PropertyValue::Bool(true));
    for (k, v) in isolation.iter() {
        p.insert(k.to_string(), v.clone());
    }
    let (rw, ro, sub_paths) =
        crate::volumes::container_binds(id, c, input.volumes, &ctx.node.volumes);
    if !rw.is_empty() {
        p.insert("BindPaths", PropertyValue::Binds(rw));
    }
    if !ro.is_empty() {
        p.insert("BindReadOnlyPaths", PropertyValue::Binds(ro));
    }
    // A bare program name is looked up in the container's PATH, inside its root.
    if let Some(path) = env.get("PATH") {
        p.insert(
            "ExecSearchPath",
            PropertyValue::List(
                path.split(':')
                    .filter(|d| d.starts_with('/'))
                    .map(str::to_string)
                    .collect(),
            ),
        );
    }
    let version = ctx.node.systemd_version;
    let too_new: Vec<String> = p
        .iter()
        .filter(|(k, _)| units::introduced_in(k).is_some_and(|v| v > version))
        .map(|(k, _)| k.to_string())
        .collect();
    if !too_new.is_empty() {
        p = p
            .iter()
            .filter(|(k, _)| !too_new.iter().any(|t| t == k))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
    }

    let policy_for = |resource: &str| {
        c.resize_policy
            .iter()
            .flatten()
            .find(|r| r.resource_name == resource)
            .map_or("NotRequired", |r| r.restart_policy.as_str())
    };
    let resizable = Resizable {
        cpu: policy_for("cpu") == "NotRequired",
        memory: policy_for("memory") == "NotRequired",
    };
    p.shrink_to_fit();

    let pull_policy = PullPolicy::resolve(c.image_pull_policy.as_deref(), &image_ref);
    Ok(ContainerUnit {
        name,
        container: c.name.clone(),
        init: input.is_init,
        image: image_ref,
        properties: Arc::new(p),
        sensitive_env: env.sensitive,
        resizable,
        sub_paths,
        pull_policy,
        verify_non_root,
    })
}

fn parse_image_user(user: &str) -> (Option<i64>, Option<i64>) {
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    (u.parse().ok(), g.and_then(|g| g.parse().ok()))
}

fn environment(
    input: &ContainerInput<'_>,
    image: Option<&ImageConfig>,
    ctx: &Context<'_>,
    errors: &mut Vec<FieldIssue>,
    warnings: &mut Vec<FieldIssue>,
) -> Env {
    let c = input.container;
    let path = input.path;
    let ns = input.instance.id.namespace.as_str();
    let mut env = Env::default();
    for entry in image.map(|i| i.env.as_slice()).unwrap_or(&[]) {
        if let Some((k, v)) = entry.split_once('=') {
            env.set(k, v.to_string(), None);
        }
    }
    if env.get("PATH").is_none() {
        env.set("PATH", DEFAULT_PATH.to_string(), None);
    }
    env.set("HOSTNAME", input.instance.id.name.clone(), None);

    for (i, from) in c.env_from.iter().flatten().enumerate() {
        let fpath = path.key("envFrom").index(i);
        let prefix = from.prefix.clone().unwrap_or_default();
        // (kind, name, optional, is a secret)
        let (kind, name, optional, secret) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), _) => (
                "ConfigMap",
                r.name.as_str(),
                r.optional == Some(true),
                false,
            ),
            (None, Some(r)) => ("Secret", r.name.as_str(), r.optional == Some(true), true),
            (None, None) => continue,
        };
        let field = if secret { "secretRef" } else { "configMapRef" };
        let found = if secret {
            ctx.secrets
                .get(&(ns, name))
                .map(|s| secret_entries(s, &fpath.key(field), errors))
        } else {
            ctx.config_maps
                .get(&(ns, name))
                .map(|cm| config_map_entries(cm))
        };
        let entries = match found {
            Some(entries) => entries,
            None if optional => Vec::new(),
            None => {
                errors.push(missing_object(kind, ns, name, fpath.key(field).key("name")));
                continue;
            }
        };
        let origin_kind = secret.then_some(name);
        for (key, value) in entries {
            let name = format!("{prefix}{key}");
            if let Err(why) = berth_manifest::names::systemd_env_name(&name) {
                warnings.push(FieldIssue::warning(
                    fpath.clone(),
                    format!("key {key:?} is skipped: {why}"),
                ));
                continue;
            }
            let sensitive = origin_kind.map(|secret| format!("secret {ns}/{secret} key {key}"));
            env.set(&name, value, sensitive);
        }
    }

    for (i, var) in c.env.iter().flatten().enumerate() {
        let epath = path.key("env").index(i);
        if let Err(why) = berth_manifest::names::systemd_env_name(&var.name) {
            errors.push(FieldIssue::error(epath.key("name"), why));
            continue;
        }
        match &var.value_from {
            None => {
                let value = expand(var.value.as_deref().unwrap_or(""), |n| env.get(n));
                env.set(&var.name, value, None);
            }
            Some(source) => {
                if let Some((value, sensitive)) =
                    value_from(input, source, &epath.key("valueFrom"), ctx, errors)
                {
                    env.set(&var.name, value, sensitive);
                }
            }
        }
    }
    for (name, value) in &env.entries {
        // systemd takes any UTF-8 value (control characters included) but,
        // like every C environment, not NUL.
        if value.contains('\0') {
            let at = c
                .env
                .iter()
                .flatten()
                .position(|v| &v.name == name)
                .map_or(path.key("env"), |i| path.key("env").index(i));
            errors.push(FieldIssue::error(at, format!("the value of {name} contains a NUL character, which no process environment can hold")));
        }
    }
    env
}

fn config_map_entries(cm: &ConfigMap) -> Vec<(String, String)> {
    cm.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn secret_entries(
    s: &Secret,
    path: &FieldPath,
    errors: &mut Vec<FieldIssue>,
) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        match String::from_utf8(v.0.clone()) {
            Ok(text) => {
                out.insert(k.clone(), text);
            }
            Err(_) => errors.push(FieldIssue::error(
                path.clone(),
                format!("secret key {k:?} is not UTF-8 text and cannot be an environment variable"),
            )),
        }
    }
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out.into_iter().collect()
}

/// A `configMapKeyRef` or `secretKeyRef`: a key of a named object, which may
/// be optional.
struct KeyRef<'a> {
    kind: &'a str,
    ns: &'a str,
    name: &'a str,
    key: &'a str,
    optional: bool,
}

impl KeyRef<'_> {
    /// `found` is `None` when the object does not exist, `Some(None)` when
    /// it lacks the key. Missing either is an error unless the ref is optional.
    fn resolve(
        &self,
        found: Option<Option<String>>,
        path: &FieldPath,
        errors: &mut Vec<FieldIssue>,
    ) -> Option<String> {
        match found {
            Some(Some(value)) => Some(value),
            _ if self.optional => None,
            None => {
                errors.push(missing_object(
                    self.kind,
                    self.ns,
                    self.name,
                    path.key("name"),
                ));
                None
            }
            Some(None) => {
                errors.push(FieldIssue::error(
                    path.key("key"),
                    format!(
                        "{} {}/{} has no key {:?}",
                        self.kind, self.ns, self.name, self.key
                    ),
                ));
                None
            }
        }
    }
}

fn missing_object(kind: &str, ns: &str, name: &str, path: FieldPath) -> FieldIssue {
    FieldIssue::error(
        path,
        format!("{kind} {ns}/{name} does not exist (set optional: true to allow that)"),
    )
}

fn value_from(
    input: &ContainerInput<'_>,
    source: &EnvVarSource,
    path: &FieldPath,
    ctx: &Context<'_>,
    errors: &mut Vec<FieldIssue>,
) -> Option<(String, Option<String>)> {
    let ns = input.instance.id.namespace.as_str();
    if let Some(r) = &source.config_map_key_ref {
        let found = ctx
            .config_maps
            .get(&(ns, r.name.as_str()))
            .map(|cm| cm.data.as_ref().and_then(|d| d.get(&r.key)).cloned());
        let key = KeyRef {
            kind: "ConfigMap",
            ns,
            name: &r.name,
            key: &r.key,
            optional: r.optional == Some(true),
        };
        return key
            .resolve(found, &path.key("configMapKeyRef"), errors)
            .map(|v| (v, None));
    }
    if let Some(r) = &source.secret_key_ref {
        let rpath = path.key("secretKeyRef");
        let found = ctx.secrets.get(&(ns, r.name.as_str())).map(|s| {
            secret_entries(s, &rpath, errors)
                .into_iter()
                .find(|(k, _)| k == &r.key)
                .map(|(_, v)| v)
        });
        let key = KeyRef {
            kind: "Secret",
            ns,
            name: &r.name,
            key: &r.key,
            optional: r.optional == Some(true),
        };
        let origin = format!("secret {ns}/{} key {}", r.name, r.key);
        return key
            .resolve(found, &rpath, errors)
            .map(|v| (v, Some(origin)));
    }
    if let Some(f) = &source.field_ref {
        let meta = input.instance.metadata;
        let fp = f.field_path.as_str();
        let bracket = |prefix: &str| {
            fp.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        let value = match fp {
            "metadata.name" => Some(input.instance.id.name.clone()),
            "metadata.namespace" => Some(ns.to_string()),
            "spec.nodeName" => Some(ctx.node.name.clone()),
            "spec.serviceAccountName" => Some(
                input
                    .instance
                    .spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            ),
            _ => {
                if let Some(k) = bracket("metadata.labels['") {
                    Some(
                        meta.labels
                            .as_ref()
                            .and_then(|l| l.get(&k))
                            .cloned()
                            .unwrap_or_default(),
                    )
                } else if let Some(k) = bracket("metadata.annotations['") {
                    Some(
                        meta.annotations
                            .as_ref()
                            .and_then(|l| l.get(&k))
                            .cloned()
                            .unwrap_or_default(),
                    )
                } else {
                    errors.push(FieldIssue::error(
                        path.key("fieldRef").key("fieldPath"),
                        format!("{fp:?} is not supported: use metadata.name, metadata.namespace, metadata.labels['…'], metadata.annotations['…'], spec.nodeName or spec.serviceAccountName"),
                    ));
                    None
                }
            }
        };
        return value.map(|v| (v, None));
    }
    if let Some(r) = &source.resource_field_ref {
        let rpath = path.key("resourceFieldRef");
        let target: Option<&Container> = match &r.container_name {
            Some(name) => input
                .instance
                .spec
                .containers
                .iter()
                .chain(input.instance.spec.init_containers.iter().flatten())
                .find(|c| &c.name == name),
            None => Some(input.container),
        };
        let Some(target) = target else {
            errors.push(FieldIssue::error(
                rpath.key("containerName"),
                "no container of this pod has that name",
            ));
            return None;
        };
        let res = container_resources(target);
        let divisor = match r.divisor.as_ref().map(|d| Quantity::parse(&d.0)) {
            None => None,
            Some(Ok(q)) => Some(q),
            Some(Err(e)) => {
                errors.push(FieldIssue::error(rpath.key("divisor"), e.to_string()));
                return None;
            }
        };
        let node = ctx.node;
        let (value, is_cpu) = match r.resource.as_str() {
            "limits.cpu" => (res.cpu_limit_milli.unwrap_or(node.cpu_milli), true),
            "requests.cpu" => (res.cpu_request_milli.unwrap_or(0), true),
            "limits.memory" => (res.memory_limit_bytes.unwrap_or(node.memory_bytes), false),
            "requests.memory" => (res.memory_request_bytes.unwrap_or(0), false),
            other => {
                errors.push(FieldIssue::error(rpath.key("resource"), format!("{other:?} is not supported: use limits.cpu, requests.cpu, limits.memory or requests.memory")));
                return None;
            }
        };
        let out = if is_cpu {
            let d = divisor
                .and_then(|d| d.milli().ok())
                .filter(|d| *d > 0)
                .unwrap_or(1000);
            value.div_ceil(d)
        } else {
            let d = divisor
                .and_then(|d| d.units().ok())
                .filter(|d| *d > 0)
                .unwrap_or(1);
            value.div_ceil(d)
        };
        return Some((out.to_string(), None));
    }
    None
}

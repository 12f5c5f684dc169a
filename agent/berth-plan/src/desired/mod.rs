//! The desired node model: for each selected pod, its QoS class, its slice,
//! and one service unit per container with every property computed.
//! Pure: values in, values out.

mod container;
mod environment;

use container::{ContainerInput, container_unit};

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_manifest::k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};
use berth_manifest::{Catalog, FieldIssue, FieldPath, Object, ObjectRef, Quantity};
use serde::Serialize;

use crate::images::ImageCatalog;
use crate::node::{NodeInfo, PodInstance};
use crate::resources::{self, ContainerResources, QosClass};
use crate::units::{
    self, PodId, Properties, PropertyValue, SLICE_DESCRIPTION_PREFIX, SharedProperties, UnitName,
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

pub(super) fn container_resources(c: &Container) -> ContainerResources {
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

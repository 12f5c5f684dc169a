//! The desired node model: for each selected pod, its QoS class, its slice,
//! and one service unit per container with every property computed.
//! Pure: values in, values out.

mod container;
mod environment;
mod input;
mod model;

use container::container_unit;
use input::ContainerInput;
pub use model::{
    ContainerUnit, DEFAULT_GRACE_SECONDS, DEFAULT_PATH, DeclaredPort, DesiredPod, EnvironmentFile,
    PullPolicy, PullSecret, RESTART_INITIAL_USEC, RESTART_MAX_USEC, RESTART_STEPS, Resizable,
    RestartPolicy, SliceUnit,
};

use std::sync::Arc;

use berth_manifest::model::Container;
use berth_manifest::{FieldIssue, FieldPath};

pub use crate::context::Context;
use crate::resources::{self, ContainerResources, QosClass, container_resources, pod_resources};
use crate::select::PodInstance;
use crate::units::{self, Properties, PropertyValue, SLICE_DESCRIPTION_PREFIX};

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
    let volumes =
        crate::volumes::pod_volumes(instance, ctx, pod_res.memory_limit_bytes, &mut errors);

    let mut init_units: Vec<ContainerUnit> = Vec::with_capacity(init.len());
    let mut app_units = Vec::with_capacity(spec.containers.len());
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
        PropertyValue::text(format!("{SLICE_DESCRIPTION_PREFIX}{} ({qos})", instance.id)),
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
    let storage_limits = |init: bool| -> Vec<(String, Option<u64>)> {
        all.iter()
            .filter(|(is_init, _, _)| *is_init == init)
            .map(|(_, _, c)| (c.name.clone(), c.resources.ephemeral_storage_limit_bytes))
            .collect()
    };
    let ephemeral = crate::ephemeral::EphemeralLimits::of(
        &storage_limits(false),
        &storage_limits(true),
        &volumes,
    );
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
            labels: instance.metadata.labels.clone(),
            ports: declared_ports(spec),
            host_network: spec.host_network == Some(true),
            volumes,
            pull_secrets,
            ephemeral,
        },
        warnings,
    })
}

/// The ports a pod's containers declare, in a vector of their number.
fn declared_ports(spec: &berth_manifest::model::PodSpec) -> Vec<DeclaredPort> {
    let declared = || {
        spec.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
    };
    let mut ports = Vec::with_capacity(declared().count());
    ports.extend(declared().filter_map(|p| {
        Some(DeclaredPort {
            name: p.name.clone(),
            port: u16::try_from(p.container_port).ok()?,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
    }));
    ports
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
            PropertyValue::text(format!("berth {qos} pods")),
        );
        properties.insert("CPUWeight", PropertyValue::Unsigned(weight));
        slices.push(SliceUnit {
            name: units::qos_slice(qos),
            properties: Arc::new(properties),
        });
    }
    slices
}

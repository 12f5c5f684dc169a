//! The node a plan is for, and which objects it runs.

use std::collections::BTreeMap;

use berth_manifest::k8s_openapi::api::core::v1::{NodeSelectorRequirement, PodSpec};
use berth_manifest::{Catalog, LoadedObject, Object, ObjectRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::units::PodId;

/// What the planner knows about the node: its config and capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInfo {
    pub name: String,
    /// Including the well-known labels every Kubernetes node carries.
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: u64,
    pub cpu_milli: u64,
    /// `TasksMax=` of each pod slice, like the kubelet's `podPidsLimit`.
    pub pod_pids_limit: u64,
    /// Only these namespaces run here; empty means all.
    pub namespaces: Vec<String>,
    /// Where container roots are mounted (`<dir>/<ns>_<pod>_<container>/rootfs`).
    pub containers_dir: String,
    /// The node's systemd major version: properties newer than it are left out.
    pub systemd_version: u32,
    /// Where pods' network namespaces are bound (`/run/netns`); `None` runs
    /// every pod in the node's namespace (a node without pod networking).
    pub netns_dir: Option<String>,
    /// Where pod volumes live, and which host paths pods may bind.
    pub volumes: crate::volumes::VolumeDirs,
    /// `securityContext.privileged` is refused unless the node config allows it.
    pub allow_privileged: bool,
    /// What drift is healed, what reported, what ignored.
    #[serde(default)]
    pub drift: crate::drift::Settings,
    /// Node ports a Service may name (`network.nodePortRange`).
    #[serde(default)]
    pub node_ports: crate::services::NodePortRange,
}

pub const DEFAULT_POD_PIDS_LIMIT: u64 = 4096;
/// Berth's appliance: `/var/lib/berth/containers`, systemd 257 (Debian 13).
pub const DEFAULT_CONTAINERS_DIR: &str = "/var/lib/berth/containers";
pub const DEFAULT_SYSTEMD_VERSION: u32 = 257;
/// Where `ip netns` looks too, so `ip netns exec <ns>_<pod>` works on a node.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

impl NodeInfo {
    pub fn new(
        name: &str,
        extra_labels: BTreeMap<String, String>,
        memory_bytes: u64,
        cpu_milli: u64,
    ) -> Self {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), name.to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ]);
        labels.extend(extra_labels);
        Self {
            name: name.to_string(),
            labels,
            memory_bytes,
            cpu_milli,
            pod_pids_limit: DEFAULT_POD_PIDS_LIMIT,
            namespaces: Vec::new(),
            containers_dir: DEFAULT_CONTAINERS_DIR.to_string(),
            systemd_version: DEFAULT_SYSTEMD_VERSION,
            netns_dir: Some(DEFAULT_NETNS_DIR.to_string()),
            volumes: crate::volumes::VolumeDirs::default(),
            allow_privileged: false,
            drift: crate::drift::Settings::default(),
            node_ports: crate::services::DEFAULT_NODE_PORTS,
        }
    }
}

/// One pod to run: a Pod object, or one replica of a Deployment.
#[derive(Debug, Clone)]
pub struct PodInstance<'a> {
    pub id: PodId,
    pub metadata: &'a ObjectMeta,
    pub spec: &'a PodSpec,
    /// The object the pod comes from (the Pod itself or its Deployment).
    pub source: &'a LoadedObject,
    /// Set for Deployment replicas.
    pub owner: Option<ObjectRef>,
    /// Where the pod spec sits inside its source object.
    pub spec_path: &'static str,
}

/// An object this node does not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotHere {
    pub object: ObjectRef,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub pods: Vec<PodInstance<'a>>,
    pub elsewhere: Vec<NotHere>,
}

/// Every pod of the catalog, whichever node it belongs to (for `validate`).
pub fn all_pods(catalog: &Catalog) -> Vec<PodInstance<'_>> {
    let mut pods = Vec::new();
    for object in &catalog.objects {
        pods.extend(instances(object));
    }
    pods
}

fn instances(object: &LoadedObject) -> Vec<PodInstance<'_>> {
    match &object.object {
        Object::Pod(pod) => match &pod.spec {
            Some(spec) => vec![PodInstance {
                id: PodId {
                    namespace: object.id.namespace.clone().unwrap_or_default(),
                    name: object.id.name.clone(),
                },
                metadata: &pod.metadata,
                spec,
                source: object,
                owner: None,
                spec_path: "spec",
            }],
            None => Vec::new(),
        },
        Object::Deployment(d) => {
            let Some(spec) = &d.spec else {
                return Vec::new();
            };
            let Some(pod_spec) = &spec.template.spec else {
                return Vec::new();
            };
            let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
            let metadata = spec.template.metadata.as_ref().unwrap_or(&d.metadata);
            // Stable names, like a StatefulSet's: the pods of a Deployment on
            // one node keep their units, slices and logs across changes.
            (0..replicas)
                .map(|i| PodInstance {
                    id: PodId {
                        namespace: object.id.namespace.clone().unwrap_or_default(),
                        name: format!("{}-{i}", object.id.name),
                    },
                    metadata,
                    spec: pod_spec,
                    source: object,
                    owner: Some(object.id.clone()),
                    spec_path: "spec.template.spec",
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Selects the pods that run on `node`: by namespace, `spec.nodeName`,
/// `nodeSelector` and required node affinity.
pub fn select<'a>(catalog: &'a Catalog, node: &NodeInfo) -> Selection<'a> {
    let mut selection = Selection::default();
    for object in &catalog.objects {
        let Some(spec) = pod_spec_of(object) else {
            continue;
        };
        match placement(object, spec, node) {
            Ok(()) => selection.pods.extend(instances(object)),
            Err(reason) => selection.elsewhere.push(NotHere {
                object: object.id.clone(),
                reason,
            }),
        }
    }
    selection
}

fn pod_spec_of(object: &LoadedObject) -> Option<&PodSpec> {
    match &object.object {
        Object::Pod(p) => p.spec.as_ref(),
        Object::Deployment(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        _ => None,
    }
}

fn placement(object: &LoadedObject, spec: &PodSpec, node: &NodeInfo) -> Result<(), String> {
    if let Some(ns) = &object.id.namespace
        && !node.namespaces.is_empty()
        && !node.namespaces.contains(ns)
    {
        return Err(format!("namespace {ns} is not one this node runs"));
    }
    if let Some(wanted) = &spec.node_name
        && wanted != &node.name
    {
        return Err(format!("spec.nodeName is {wanted}"));
    }
    for (key, value) in spec.node_selector.iter().flatten() {
        if node.labels.get(key) != Some(value) {
            return Err(format!(
                "nodeSelector {key}={value} does not match this node's labels"
            ));
        }
    }
    if let Some(required) = berth_manifest::validate::required_node_affinity(spec) {
        let any_term = required.node_selector_terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|r| requirement_matches(r, &node.labels))
        });
        if !any_term {
            return Err("no required node affinity term matches this node's labels".into());
        }
    }
    Ok(())
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    let present = labels.get(&r.key);
    let as_int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => present.is_some_and(|v| values.contains(v)),
        "NotIn" => present.is_none_or(|v| !values.contains(v)),
        "Exists" => present.is_some(),
        "DoesNotExist" => present.is_none(),
        "Gt" => {
            matches!((present.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((present.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

//! Berth's own types for objects, converted from Kubernetes' wire types
//! once, when an object is loaded and validated. They hold what Berth acts
//! on and nothing else, compactly: a Kubernetes `Service` is 824 bytes
//! before its data and each of its maps allocates a node of about 540
//! bytes even for one entry; these are a fraction of that, and later
//! stages never see the wire types.
//!
//! Converted: Services, ConfigMaps, Secrets, and Pods and Deployments down
//! to their containers (whose parts, such as `env` and `volumeMounts`, are
//! still Kubernetes' own types, as are pod volumes and metadata).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{self as core, ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Key-value pairs sorted by key, looked up by binary search: a map that
/// costs its entries and no more.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entries<V>(Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> Entries<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> From<BTreeMap<String, V>> for Entries<V> {
    fn from(map: BTreeMap<String, V>) -> Self {
        // A BTreeMap iterates in key order: already sorted, no duplicates.
        let mut v: Vec<(String, V)> = map.into_iter().collect();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<V> FromIterator<(String, V)> for Entries<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

/// A ConfigMap's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMapData {
    pub data: Entries<String>,
    /// `binaryData`, decoded.
    pub binary_data: Entries<Vec<u8>>,
}

impl From<ConfigMap> for ConfigMapData {
    fn from(c: ConfigMap) -> Self {
        Self {
            data: c.data.unwrap_or_default().into(),
            binary_data: c
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        }
    }
}

/// A Secret's type and data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    /// `type`, as written (`None`: `Opaque`).
    pub type_: Option<String>,
    /// `data`, decoded from base64.
    pub data: Entries<Vec<u8>>,
    /// `stringData`: written over `data` where both have a key, as the
    /// API server does.
    pub string_data: Entries<String>,
}

impl From<Secret> for SecretData {
    fn from(s: Secret) -> Self {
        Self {
            type_: s.type_,
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            string_data: s.string_data.unwrap_or_default().into(),
        }
    }
}

/// A Service's spec, as far as Berth programs Services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `type` as written (`None`: `ClusterIP`).
    pub type_: Option<String>,
    /// `None` when the Service has no selector (its endpoints are not
    /// Berth's to find).
    pub selector: Option<Entries<String>>,
    pub ports: Vec<ServicePort>,
    /// `clusterIP` as written: an address, `None` (headless) or empty.
    pub cluster_ip: Option<String>,
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    /// `publishNotReadyAddresses`: pods are endpoints whether ready or not.
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    /// As written (`None`: `TCP`).
    pub protocol: Option<String>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub node_port: Option<i32>,
}

impl From<k8s_openapi::api::core::v1::ServicePort> for ServicePort {
    fn from(p: k8s_openapi::api::core::v1::ServicePort) -> Self {
        Self {
            name: p.name,
            protocol: p.protocol,
            port: p.port,
            target_port: p.target_port,
            node_port: p.node_port,
        }
    }
}

impl From<Service> for ServiceSpec {
    fn from(s: Service) -> Self {
        let Some(spec) = s.spec else {
            return Self::default();
        };
        Self {
            type_: spec.type_,
            selector: spec.selector.map(Entries::from),
            ports: convert(spec.ports.unwrap_or_default()),
            cluster_ip: spec.cluster_ip,
            session_affinity: spec.session_affinity,
            affinity_timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn a_pod_keeps_what_berth_acts_on_with_quantities_parsed() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "labels": {"app": "web"}, "uid": "x"},
            "spec": {
                "serviceAccount": "old-spelling",
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "Exists"}]}]
                }}},
                "containers": [{
                    "name": "main",
                    "image": "busybox:1.37",
                    "env": [{"name": "A", "value": "1"},
                            {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "resources": {"requests": {"cpu": "250m", "memory": "64Mi"},
                                  "limits": {"cpu": "1", "memory": "1Gi"}}
                }]
            }
        }))
        .expect("a pod");
        let pod = PodObject::from(pod);
        assert_eq!(
            pod.metadata.labels.get("app").map(String::as_str),
            Some("web")
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("old-spelling"));
        assert_eq!(
            spec.required_node_affinity
                .expect("affinity")
                .node_selector_terms
                .len(),
            1
        );
        let c = &spec.containers[0];
        assert_eq!(
            c.resources,
            Resources {
                cpu_request_milli: Some(250),
                cpu_limit_milli: Some(1000),
                memory_request_bytes: Some(64 << 20),
                memory_limit_bytes: Some(1 << 30),
                ephemeral_storage_limit_bytes: None,
            }
        );
        let env = c.env.as_ref().expect("env");
        assert_eq!(env[0].value.as_deref(), Some("1"));
        assert!(
            env[1]
                .value_from
                .as_ref()
                .is_some_and(|f| f.field_ref.is_some())
        );
    }

    #[test]
    fn entries_find_every_key_and_iterate_in_order() {
        let e: Entries<u8> = [
            ("b".to_string(), 2),
            ("a".to_string(), 1),
            ("c".to_string(), 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(e.get("a"), Some(&1));
        assert_eq!(e.get("c"), Some(&3));
        assert_eq!(e.get("d"), None);
        assert_eq!(
            e.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(e.len(), 3);
        assert!(Entries::<u8>::default().is_empty());
    }
}

/// Each item converted into a vector of exactly their number. (`collect`
/// would reuse the wire vector's allocation, sized for the larger wire
/// type, and keep it.)
fn convert<T, U: From<T>>(wire: Vec<T>) -> Vec<U> {
    let mut out = Vec::with_capacity(wire.len());
    out.extend(wire.into_iter().map(U::from));
    out
}

/// A Pod, as Berth runs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodObject {
    pub metadata: Meta,
    pub spec: Option<PodSpec>,
}

impl From<core::Pod> for PodObject {
    fn from(p: core::Pod) -> Self {
        Self {
            metadata: p.metadata.into(),
            spec: p.spec.map(PodSpec::from),
        }
    }
}

/// A Deployment, as Berth runs it: its replicas of one pod template.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentObject {
    pub metadata: Meta,
    pub spec: Option<DeploymentSpec>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentSpec {
    pub replicas: Option<i32>,
    pub template: PodTemplate,
    /// How a changed template replaces the running pods.
    pub strategy: Strategy,
    /// Seconds a new pod must stay ready before it counts as available.
    pub min_ready_seconds: u32,
    /// Seconds a rollout may go without progress before it is failed
    /// (`ProgressDeadlineExceeded`); Kubernetes' default is 600.
    pub progress_deadline_seconds: u32,
    /// A paused Deployment starts no rollout: a changed template waits.
    pub paused: bool,
    /// A digest of `spec.template` as written (its canonical JSON): the
    /// same template gives the same digest, whatever else changed.
    pub template_digest: String,
    /// The ConfigMaps and Secrets the template reads (`("ConfigMap",
    /// name)`, sorted, once each): their content is part of what a pod of
    /// this template runs.
    pub template_refs: Vec<(&'static str, String)>,
}

/// Kubernetes' default `progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: u32 = 600;

/// `spec.strategy`, defaulted as the API server defaults it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every old pod stops before a new one starts.
    Recreate,
    /// New pods replace old ones a few at a time, within the bounds.
    RollingUpdate {
        max_surge: IntOrPercent,
        max_unavailable: IntOrPercent,
    },
}

impl Default for Strategy {
    /// `RollingUpdate` with 25 % surge and 25 % unavailable.
    fn default() -> Self {
        Self::RollingUpdate {
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Percent(25),
        }
    }
}

/// `maxSurge` and `maxUnavailable`: a count, or a percentage of the
/// desired replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOrPercent {
    Int(u32),
    Percent(u32),
}

impl IntOrPercent {
    /// Parses an already validated value (see `validate::int_or_percent`).
    pub fn from_value(v: &IntOrString) -> Option<Self> {
        match v {
            IntOrString::Int(i) => u32::try_from(*i).ok().map(Self::Int),
            IntOrString::String(s) => s
                .strip_suffix('%')
                .and_then(|n| n.parse().ok())
                .map(Self::Percent),
        }
    }

    /// The value for `replicas`, as Kubernetes scales it: a percentage
    /// rounded up (`maxSurge`) or down (`maxUnavailable`).
    pub fn scaled(self, replicas: u32, round_up: bool) -> u32 {
        match self {
            Self::Int(n) => n,
            Self::Percent(p) => {
                let product = u64::from(p) * u64::from(replicas);
                let v = if round_up {
                    product.div_ceil(100)
                } else {
                    product / 100
                };
                u32::try_from(v).unwrap_or(u32::MAX)
            }
        }
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Self::Int(0) | Self::Percent(0))
    }
}

impl std::fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodTemplate {
    pub metadata: Option<Meta>,
    pub spec: Option<PodSpec>,
}

impl From<k8s_openapi::api::apps::v1::Deployment> for DeploymentObject {
    fn from(d: k8s_openapi::api::apps::v1::Deployment) -> Self {
        Self {
            metadata: d.metadata.into(),
            spec: d.spec.map(|s| {
                let template_digest = {
                    use sha2::Digest as _;
                    // serde_json's maps are sorted: one template, one text.
                    let text = serde_json::to_vec(&s.template).unwrap_or_default();
                    sha2::Sha256::digest(&text)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect()
                };
                let template_refs = serde_json::to_value(&s.template)
                    .map(|v| {
                        let mut refs = Vec::new();
                        template_refs(&v, &mut refs);
                        refs.sort();
                        refs.dedup();
                        refs
                    })
                    .unwrap_or_default();
                let strategy = match s.strategy.as_ref().and_then(|st| st.type_.as_deref()) {
                    Some("Recreate") => Strategy::Recreate,
                    _ => {
                        let rolling = s
                            .strategy
                            .as_ref()
                            .and_then(|st| st.rolling_update.as_ref());
                        let field = |v: Option<&IntOrString>| {
                            v.and_then(IntOrPercent::from_value)
                                .unwrap_or(IntOrPercent::Percent(25))
                        };
                        Strategy::RollingUpdate {
                            max_surge: field(rolling.and_then(|r| r.max_surge.as_ref())),
                            max_unavailable: field(
                                rolling.and_then(|r| r.max_unavailable.as_ref()),
                            ),
                        }
                    }
                };
                DeploymentSpec {
                    replicas: s.replicas,
                    strategy,
                    min_ready_seconds: s.min_ready_seconds.unwrap_or(0).max(0) as u32,
                    progress_deadline_seconds: s
                        .progress_deadline_seconds
                        .map_or(DEFAULT_PROGRESS_DEADLINE_SECONDS, |v| v.max(0) as u32),
                    paused: s.paused.unwrap_or(false),
                    template_digest,
                    template_refs,
                    template: PodTemplate {
                        metadata: s.template.metadata.map(Meta::from),
                        spec: s.template.spec.map(PodSpec::from),
                    },
                }
            }),
        }
    }
}

/// The ConfigMaps and Secrets a pod template names: in `env`, `envFrom`,
/// and volumes (projected ones too).
fn template_refs(v: &serde_json::Value, out: &mut Vec<(&'static str, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let kind = match key.as_str() {
                    "configMapKeyRef" | "configMapRef" | "configMap" => Some(("ConfigMap", "name")),
                    "secretKeyRef" | "secretRef" => Some(("Secret", "name")),
                    // A volume names it `secretName`, a projection `name`.
                    "secret" => Some((
                        "Secret",
                        if child.get("secretName").is_some() {
                            "secretName"
                        } else {
                            "name"
                        },
                    )),
                    _ => None,
                };
                if let Some((kind, field)) = kind
                    && let Some(name) = child.get(field).and_then(|n| n.as_str())
                {
                    out.push((kind, name.to_string()));
                }
                template_refs(child, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| template_refs(i, out)),
        _ => {}
    }
}

/// A pod's spec: the fields Berth acts on, under Kubernetes' names and
/// types (the rest were reported when the object was loaded). Large and
/// rarely set parts are boxed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    pub init_containers: Option<Vec<Container>>,
    pub volumes: Option<Vec<core::Volume>>,
    pub host_network: Option<bool>,
    /// `hostPID` and `hostIPC`: not supported (ignored with a warning), but
    /// Pod Security refuses a pod that asks for them.
    pub host_pid: Option<bool>,
    pub host_ipc: Option<bool>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub node_selector: Option<BTreeMap<String, String>>,
    /// `affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`.
    pub required_node_affinity: Option<core::NodeSelector>,
    pub image_pull_secrets: Option<Vec<core::LocalObjectReference>>,
    pub restart_policy: Option<String>,
    pub security_context: Option<Box<core::PodSecurityContext>>,
    pub service_account_name: Option<String>,
    pub termination_grace_period_seconds: Option<i64>,
    pub enable_service_links: Option<bool>,
    pub resources: Option<core::ResourceRequirements>,
}

impl From<core::PodSpec> for PodSpec {
    fn from(s: core::PodSpec) -> Self {
        Self {
            containers: convert(s.containers),
            init_containers: s.init_containers.map(convert),
            volumes: s.volumes,
            host_network: s.host_network,
            host_pid: s.host_pid,
            host_ipc: s.host_ipc,
            hostname: s.hostname,
            node_name: s.node_name,
            node_selector: s.node_selector,
            required_node_affinity: s
                .affinity
                .and_then(|a| a.node_affinity)
                .and_then(|n| n.required_during_scheduling_ignored_during_execution),
            image_pull_secrets: s.image_pull_secrets,
            restart_policy: s.restart_policy,
            security_context: s.security_context.map(Box::new),
            // `serviceAccount` is the deprecated spelling; the API server
            // copies it into `serviceAccountName` when only it is set.
            service_account_name: s.service_account_name.or(s.service_account),
            termination_grace_period_seconds: s.termination_grace_period_seconds,
            enable_service_links: s.enable_service_links,
            resources: s.resources,
        }
    }
}

/// A container: the fields Berth acts on, under Kubernetes' names and types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: Option<String>,
    pub image_pull_policy: Option<String>,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub env: Option<Vec<EnvVar>>,
    pub env_from: Option<Vec<core::EnvFromSource>>,
    pub ports: Option<Vec<core::ContainerPort>>,
    pub resize_policy: Option<Vec<core::ContainerResizePolicy>>,
    pub resources: Resources,
    /// `Always` on an init container: a sidecar.
    pub restart_policy: Option<String>,
    pub security_context: Option<Box<core::SecurityContext>>,
    pub volume_mounts: Option<Vec<core::VolumeMount>>,
    /// `host` fields of its probes and lifecycle handlers, by their path
    /// inside the container (Pod Security refuses them).
    pub probe_hosts: Vec<(String, String)>,
    pub probes: crate::probe::Probes,
    pub hooks: crate::probe::Hooks,
}

impl From<core::Container> for Container {
    fn from(c: core::Container) -> Self {
        let probe_hosts = probe_hosts(&c);
        let probes = crate::probe::probes_of(&c);
        let hooks = crate::probe::hooks_of(&c);
        Self {
            name: c.name,
            image: c.image,
            image_pull_policy: c.image_pull_policy,
            command: c.command,
            args: c.args,
            working_dir: c.working_dir,
            env: c.env.map(convert),
            env_from: c.env_from,
            ports: c.ports,
            resize_policy: c.resize_policy,
            resources: c
                .resources
                .as_ref()
                .map(Resources::from)
                .unwrap_or_default(),
            restart_policy: c.restart_policy,
            security_context: c.security_context.map(Box::new),
            volume_mounts: c.volume_mounts,
            probe_hosts,
            probes,
            hooks,
        }
    }
}

/// The `host` a container's probes and lifecycle handlers name, by path.
fn probe_hosts(c: &core::Container) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut note = |path: String, host: &Option<String>| {
        if let Some(h) = host.as_ref().filter(|h| !h.is_empty()) {
            out.push((path, h.clone()));
        }
    };
    for (name, probe) in [
        ("livenessProbe", &c.liveness_probe),
        ("readinessProbe", &c.readiness_probe),
        ("startupProbe", &c.startup_probe),
    ] {
        let Some(p) = probe else { continue };
        if let Some(h) = &p.http_get {
            note(format!("{name}.httpGet.host"), &h.host);
        }
        if let Some(t) = &p.tcp_socket {
            note(format!("{name}.tcpSocket.host"), &t.host);
        }
    }
    for (name, handler) in c
        .lifecycle
        .iter()
        .flat_map(|l| [("postStart", &l.post_start), ("preStop", &l.pre_stop)])
    {
        let Some(h) = handler else { continue };
        if let Some(g) = &h.http_get {
            note(format!("lifecycle.{name}.httpGet.host"), &g.host);
        }
        if let Some(t) = &h.tcp_socket {
            note(format!("lifecycle.{name}.tcpSocket.host"), &t.host);
        }
    }
    out
}

/// A container's `resources`, the quantities Berth acts on parsed once:
/// CPU in millicores, memory in bytes, as written (a limit without a
/// request is defaulted by the planner, as Kubernetes does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request_milli: Option<u64>,
    pub cpu_limit_milli: Option<u64>,
    pub memory_request_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// `limits.ephemeral-storage`: what the container's writable layer may
    /// hold before the node evicts its pod.
    pub ephemeral_storage_limit_bytes: Option<u64>,
}

impl From<&core::ResourceRequirements> for Resources {
    fn from(r: &core::ResourceRequirements) -> Self {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity as Wire;
        // Validation refused the object if any of these does not parse.
        let get = |section: &Option<BTreeMap<String, Wire>>, name: &str| {
            let q = crate::Quantity::parse(&section.as_ref()?.get(name)?.0).ok()?;
            if name == "cpu" {
                q.milli().ok()
            } else {
                q.units().ok()
            }
        };
        Self {
            cpu_request_milli: get(&r.requests, "cpu"),
            cpu_limit_milli: get(&r.limits, "cpu"),
            memory_request_bytes: get(&r.requests, "memory"),
            memory_limit_bytes: get(&r.limits, "memory"),
            ephemeral_storage_limit_bytes: get(&r.limits, "ephemeral-storage"),
        }
    }
}

/// One `env` entry (Kubernetes' own is 360 bytes before its data, most of
/// it the rarely used `valueFrom`, boxed here).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<Box<core::EnvVarSource>>,
}

impl From<core::EnvVar> for EnvVar {
    fn from(v: core::EnvVar) -> Self {
        Self {
            name: v.name,
            value: v.value,
            value_from: v.value_from.map(Box::new),
        }
    }
}

/// The metadata Berth reads beyond the name and namespace (which are the
/// object's identity, [`crate::ObjectRef`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Empty when the object has none. Shared: every pod a Deployment makes
    /// holds its template's labels once.
    pub labels: Labels,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An object's labels.
pub type Labels = Arc<Entries<String>>;

impl From<ObjectMeta> for Meta {
    fn from(m: ObjectMeta) -> Self {
        Self {
            labels: Arc::new(m.labels.map(Entries::from).unwrap_or_default()),
            annotations: m.annotations,
        }
    }
}

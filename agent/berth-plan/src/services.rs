//! Services as a node runs them: which are programmed, their ports, the
//! node ports written in Git (in range, each owned by one Service), and the
//! pods each selects with the port every pod serves on. Every problem is a
//! diagnostic on the Service's own field, so `berth validate` and `berth
//! plan` report it with file and line. The agent leases cluster IPs and the
//! node ports left to it, and programs the table from this; it decides
//! nothing of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use berth_manifest::model::{Entries, ServiceSpec};
use berth_manifest::{Catalog, Diagnostic, FieldIssue, FieldPath, LoadedObject, Object};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::desired::DesiredPod;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not given: 3 hours.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

pub use crate::node::{DEFAULT_NODE_PORTS, NodePortRange};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServiceProtocol {
    Tcp,
    Udp,
}

impl ServiceProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceProtocol::Tcp => "tcp",
            ServiceProtocol::Udp => "udp",
        }
    }
}

/// A Service this node programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredService {
    pub namespace: String,
    pub name: String,
    /// `clusterIP: None`: a DNS name for its pods' addresses, no rules.
    pub headless: bool,
    /// `spec.clusterIP` as written, when one is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// `sessionAffinity: ClientIP`, for this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_seconds: Option<u32>,
    /// `publishNotReadyAddresses`: its pods are endpoints (and DNS
    /// answers) whether ready or not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub publish_not_ready: bool,
    /// Every port as written, for DNS (SRV records), programmed or not.
    pub dns_ports: Vec<DnsPort>,
    /// The ports that are programmed.
    pub ports: Vec<DesiredServicePort>,
    /// The pods it selects (none without a selector), as indices into the
    /// pods the plan was made over: a Service of 200 pods costs 800 bytes,
    /// and Services with the same selector share one list.
    #[serde(rename = "selected", serialize_with = "count")]
    pub members: Arc<[u32]>,
}

fn count<S: serde::Serializer>(members: &[u32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(members.len() as u64)
}

impl DesiredService {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsPort {
    pub name: Option<String>,
    /// Lower case, as SRV names have it.
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredServicePort {
    /// Its name, or its number when it has none.
    pub name: String,
    pub protocol: ServiceProtocol,
    pub port: u16,
    pub node_port: Option<NodePort>,
    /// The port the members serve it on.
    pub target: Target,
}

/// Where a Service port's traffic goes in its member pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// The same port in every member.
    Port(u16),
    /// A named port, per member in the order of `members`: `None` for a
    /// member that declares no port of that name (not an endpoint).
    Named {
        name: String,
        #[serde(skip)]
        ports: Arc<[Option<u16>]>,
    },
}

impl Target {
    /// The port member `i` (an index into `members`) serves on.
    pub fn port_of(&self, i: usize) -> Option<u16> {
        match self {
            Target::Port(p) => Some(*p),
            Target::Named { ports, .. } => ports.get(i).copied().flatten(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NodePort {
    /// Written in Git: in range and this Service's alone.
    Fixed(u16),
    /// Left to the node to lease from its range.
    Leased,
}

/// What the Services of a catalog come to on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePlan {
    pub services: Vec<DesiredService>,
    /// Node ports written in Git, by the Service that owns them: a leased
    /// one is never one of these.
    pub fixed_node_ports: BTreeMap<u16, String>,
}

/// A Service's `spec.selector`.
type Selector = Entries<String>;

/// One shared member list, by address and length.
type MembersKey = (*const u32, usize);

/// `Catalog::diagnostic` or `Catalog::diagnostic_at_object`.
type MakeDiagnostic = fn(&Catalog, &LoadedObject, &FieldIssue) -> Diagnostic;

/// Over which pods Services are planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The pods of one node (`berth plan`, the agent). Warnings about
    /// selectors and target ports point at the Service's first line: a node
    /// that runs few of many pods has thousands, and finding each field's
    /// line would parse every Service again.
    Node,
    /// The pods of every node (`berth validate`): every warning at its field.
    Repository,
}

/// The Services of `catalog` over `pods` (this node's, or every node's).
pub fn plan_services(
    catalog: &Catalog,
    pods: &[DesiredPod],
    range: NodePortRange,
    scope: Scope,
) -> (ServicePlan, Vec<Diagnostic>) {
    let (where_, bulk): (&str, MakeDiagnostic) = match scope {
        Scope::Node => ("on this node", Catalog::diagnostic_at_object),
        Scope::Repository => ("in the repository", Catalog::diagnostic),
    };
    let mut out = ServicePlan::default();
    let mut diagnostics = Vec::new();
    // Pods by namespace, label and value: a selector looks up its first
    // label and checks the rest on those pods only.
    let mut by_label: HashMap<(&str, &str, &str), Vec<u32>> = HashMap::new();
    for (i, pod) in pods.iter().enumerate() {
        for (k, v) in pod.labels.iter() {
            by_label
                .entry((pod.id.namespace.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(i as u32);
        }
    }
    let list: Vec<(&LoadedObject, &ServiceSpec)> = catalog
        .objects
        .iter()
        .filter_map(|o| match &o.object {
            Object::Service(s) => Some((o, s.as_ref())),
            _ => None,
        })
        .collect();
    // Node ports written in Git are claimed first, in the catalog's order,
    // so a Service without one never takes a port another one names.
    let mut refused: BTreeSet<(String, usize)> = BTreeSet::new();
    for (o, svc) in &list {
        let id = service_id(o);
        for (i, p) in svc.ports.iter().enumerate() {
            let Some(np) = p.node_port else { continue };
            let path = FieldPath::parse("spec")
                .key("ports")
                .index(i)
                .key("nodePort");
            let issue = match u16::try_from(np).ok().filter(|n| range.contains(*n)) {
                None => Some(format!(
                    "{np} is outside the node port range {}-{}",
                    range.first, range.last
                )),
                Some(n) => match out.fixed_node_ports.get(&n) {
                    Some(other) => Some(format!("{n} is already taken by Service {other}")),
                    None => {
                        out.fixed_node_ports.insert(n, id.clone());
                        None
                    }
                },
            };
            if let Some(message) = issue {
                refused.insert((id.clone(), i));
                diagnostics.push(catalog.diagnostic(o, &FieldIssue::error(path, message)));
            }
        }
    }
    out.services.reserve_exact(list.len());
    let empty = Entries::default();
    let mut selected: HashMap<(String, &Selector), Arc<[u32]>> = HashMap::new();
    let mut named: HashMap<(MembersKey, &str), Arc<[Option<u16>]>> = HashMap::new();
    for (o, svc) in list {
        let namespace = o.id.namespace.clone().unwrap_or_else(|| "default".into());
        let id = service_id(o);
        let spec = svc;
        let spath = FieldPath::parse("spec");
        let warn = |path: FieldPath, message: String| {
            catalog.diagnostic(o, &FieldIssue::warning(path, message))
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !matches!(kind, "ClusterIP" | "NodePort") {
            diagnostics.push(warn(
                spath.key("type"),
                format!(
                    "type {kind} is not supported (ClusterIP and NodePort are): the Service is not programmed"
                ),
            ));
            continue;
        }
        let selector = spec.selector.as_ref().unwrap_or(&empty);
        // Many Services often share a selector (one per port group, per
        // tier): their members are found once.
        let members = selected
            .entry((namespace.clone(), selector))
            .or_insert_with(|| match selector.iter().next() {
                None => Arc::from([]),
                Some((k, v)) => by_label
                    .get(&(namespace.as_str(), k.as_str(), v.as_str()))
                    .map(|candidates| {
                        candidates
                            .iter()
                            .copied()
                            .filter(|i| {
                                let labels = &pods[*i as usize].labels;
                                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                            })
                            .collect()
                    })
                    .unwrap_or_else(|| Arc::from([])),
            })
            .clone();
        if !selector.is_empty() && members.is_empty() {
            diagnostics.push(bulk(
                catalog,
                o,
                &FieldIssue::warning(
                    spath.key("selector"),
                    format!("matches no pod {where_}: the Service has no endpoints"),
                ),
            ));
        }
        let mut ports = Vec::with_capacity(spec.ports.len());
        let mut dns_ports = Vec::with_capacity(spec.ports.len());
        for (i, p) in spec.ports.iter().enumerate() {
            let ppath = spath.key("ports").index(i);
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let written = p.protocol.as_deref().unwrap_or("TCP");
            dns_ports.push(DnsPort {
                name: p.name.clone(),
                protocol: written.to_ascii_lowercase(),
                port,
            });
            let protocol = match written {
                "TCP" => ServiceProtocol::Tcp,
                "UDP" => ServiceProtocol::Udp,
                other => {
                    diagnostics.push(warn(
                        ppath.key("protocol"),
                        format!(
                            "protocol {other} is not supported (TCP and UDP are): the port is not programmed"
                        ),
                    ));
                    continue;
                }
            };
            if refused.contains(&(id.clone(), i)) {
                continue;
            }
            let node_port = (kind == "NodePort").then(|| {
                match p.node_port.and_then(|n| u16::try_from(n).ok()) {
                    Some(n) => NodePort::Fixed(n),
                    None => NodePort::Leased,
                }
            });
            let target = match &p.target_port {
                None => Target::Port(port),
                Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                    Ok(n) => Target::Port(n),
                    Err(_) => continue,
                },
                Some(IntOrString::String(name)) => {
                    // Per member list and name, found once.
                    let key = ((members.as_ptr(), members.len()), name.as_str());
                    let found = named
                        .entry(key)
                        .or_insert_with(|| {
                            members
                                .iter()
                                .map(|i| {
                                    pods[*i as usize]
                                        .ports
                                        .iter()
                                        .find(|d| d.name.as_deref() == Some(name.as_str()))
                                        .map(|d| d.port)
                                })
                                .collect()
                        })
                        .clone();
                    for (i, port) in members.iter().zip(found.iter()) {
                        let pod = &pods[*i as usize];
                        if port.is_none() {
                            diagnostics.push(bulk(
                                catalog,
                                o,
                                &FieldIssue::warning(
                                    ppath.key("targetPort"),
                                    format!(
                                        "no container of pod {} declares a port named {name:?}: the pod is not an endpoint",
                                        pod.id
                                    ),
                                ),
                            ));
                        }
                    }
                    Target::Named {
                        name: name.clone(),
                        ports: found,
                    }
                }
            };
            ports.push(DesiredServicePort {
                name: p.name.clone().unwrap_or_else(|| port.to_string()),
                protocol,
                port,
                node_port,
                target,
            });
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.affinity_timeout_seconds
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        out.services.push(DesiredService {
            namespace,
            name: o.id.name.clone(),
            headless,
            cluster_ip: spec
                .cluster_ip
                .clone()
                .filter(|c| !c.is_empty() && c != "None"),
            affinity_seconds,
            publish_not_ready: spec.publish_not_ready,
            dns_ports,
            ports,
            members,
        });
    }
    (out, diagnostics)
}

fn service_id(o: &LoadedObject) -> String {
    format!(
        "{}/{}",
        o.id.namespace.as_deref().unwrap_or("default"),
        o.id.name
    )
}

impl ServicePlan {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

//! The pod network on this node: the bridge, each pod's namespace, veth and
//! address, the files that tell a pod its DNS server, and Services as one
//! nftables table.
//!
//! Order within a pass: [`PodNetwork::prepare_node`] and
//! [`PodNetwork::wire`] before the plan is applied (a container joins its
//! pod's namespace when it starts), [`PodNetwork::unwire_others`] after it
//! (a removed pod's containers are stopped by then), and
//! [`PodNetwork::program_services`] last, with the pods' readiness.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use berth_net::dns::{self, Zone};
use berth_net::ipam::LeaseBook;
use berth_net::link::PodLink;
use berth_net::nft::{Endpoint, PortRules, Protocol, Ruleset, ServiceRules};
use berth_net::settings::BRIDGE;
use berth_net::{KernelHost, NetworkHost, NetworkSettings, Resolver};
use berth_plan::DesiredPod;
use berth_plan::services::{NodePort, ServicePlan, ServiceProtocol};

/// Threads wiring pods at once.
const WIRING_THREADS: usize = 4;

/// Where the network keeps its state and binds namespaces.
#[derive(Debug, Clone)]
pub struct NetworkPaths {
    /// `/run/netns`.
    pub netns_dir: PathBuf,
    /// `/run/berth/pods`: `<pod key>/resolv.conf`, `hosts`, `hostname`.
    pub files_dir: PathBuf,
    /// `/var/lib/berth/network/leases.json`.
    pub leases: PathBuf,
    /// The node's own resolver list (`/etc/resolv.conf`): where names
    /// outside the cluster domain are forwarded.
    pub upstream_resolv_conf: PathBuf,
}

/// A pod's place on the network after [`PodNetwork::wire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wired {
    Ip(Ipv4Addr),
    Failed(String),
}

#[derive(Debug)]
pub struct PodNetwork {
    paths: NetworkPaths,
    /// The kernel, or a fake in tests.
    host: Box<dyn NetworkHost>,
    settings: Option<NetworkSettings>,
    book: Option<LeaseBook>,
    /// The rules last applied, and the kernel's listing right after.
    applied: Option<Ruleset>,
    listed: Option<String>,
    /// The nftables generation read just before `listed` was: while it
    /// has not moved, nothing has touched any table, ours included.
    listed_generation: Option<u32>,
    ruleset: Option<Ruleset>,
    /// The cluster DNS responder on the bridge address.
    dns: Option<Box<dyn Resolver>>,
    /// Why it is not running (or has nowhere to forward), for status.
    dns_problem: Option<String>,
    /// What the last programming refused or warned about, per Service.
    pub service_problems: Vec<String>,
    /// The node's TCP ports pods are refused on (see [`Self::refuse_pods`]).
    refused_to_pods: Vec<u16>,
}

impl PodNetwork {
    /// The pod network on this node's kernel.
    pub fn new(paths: NetworkPaths) -> Self {
        let host = KernelHost::new(&paths.netns_dir);
        Self::with_host(paths, Box::new(host))
    }

    /// The pod network on any host: [`berth_net::fake::FakeHost`] in tests.
    pub fn with_host(paths: NetworkPaths, host: Box<dyn NetworkHost>) -> Self {
        Self {
            host,
            paths,
            settings: None,
            book: None,
            applied: None,
            listed: None,
            listed_generation: None,
            ruleset: None,
            dns: None,
            dns_problem: None,
            refused_to_pods: Vec::new(),
            service_problems: Vec::new(),
        }
    }

    pub fn netns_dir(&self) -> &Path {
        &self.paths.netns_dir
    }

    /// The bridge with the gateway address, the Service range routed onto
    /// it, forwarding on. Cheap when all is in place: a few netlink reads.
    pub fn prepare_node(&mut self, settings: &NetworkSettings) -> Result<Vec<String>, String> {
        let mut notes = Vec::new();
        if self.settings.as_ref() != Some(settings) {
            let (mut book, problem) =
                LeaseBook::load(&self.paths.leases, settings.pod_cidr, settings.service_cidr);
            if let Some(p) = problem {
                notes.push(p);
                self.rebuild_leases(&mut book);
            }
            self.book = Some(book);
            self.settings = Some(settings.clone());
            self.applied = None;
        }
        let own = self
            .host
            .node_addresses()
            .map_err(|e| format!("reading the node's addresses: {e}"))?;
        if let Some(clash) = settings.clash_with(&own) {
            return Err(format!("{}: {}", clash.field, clash.message));
        }
        let (gateway, pods, services) =
            (settings.gateway(), settings.pod_cidr, settings.service_cidr);
        self.host
            .ensure_bridge(gateway, pods, services)
            .map_err(|e| format!("bridge {BRIDGE}: {e}"))?;
        self.host.enable_forwarding().map_err(|e| e.to_string())?;
        let address = std::net::SocketAddr::from((gateway, 53));
        if self.dns.as_ref().map(|d| d.address()) != Some(address) {
            // The old responder (another gateway) stops when dropped.
            let old = self.dns.take().map(|d| d.zone());
            let resolv =
                std::fs::read_to_string(&self.paths.upstream_resolv_conf).unwrap_or_default();
            let upstreams = dns::upstreams_from(&resolv, gateway);
            let zone = old.map(|z| (*z).clone()).unwrap_or_default();
            // Without DNS pods still run and reach each other by address:
            // a responder that cannot start is reported, not fatal, and
            // tried again on the next pass.
            let problem = match self.host.start_resolver(address, upstreams.clone(), zone) {
                Ok(server) => {
                    self.dns = Some(server);
                    upstreams.is_empty().then(|| {
                        format!(
                            "{}: no nameserver: pods resolve cluster names only",
                            self.paths.upstream_resolv_conf.display()
                        )
                    })
                }
                Err(e) => Some(format!("cluster DNS on {address}: {e}; retrying")),
            };
            if problem.is_some() && problem != self.dns_problem {
                notes.extend(problem.clone());
            }
            self.dns_problem = problem;
        }
        Ok(notes)
    }

    /// After the lease file was lost: each live namespace still says its
    /// address, so running pods keep theirs.
    fn rebuild_leases(&self, book: &mut LeaseBook) {
        for name in self.host.pod_namespaces() {
            if let Ok(Some((ip, _))) = self.host.pod_address(&name) {
                let _ = book.pods.lease_exact(&name, ip);
            }
        }
    }

    /// Leases an address for every pod with its own network and wires it.
    /// A pod that cannot be wired is returned with the reason; its
    /// containers must not start.
    pub fn wire(&mut self, pods: &[DesiredPod]) -> BTreeMap<String, Wired> {
        let mut out = BTreeMap::new();
        let (Some(settings), Some(book)) = (self.settings.clone(), self.book.as_mut()) else {
            return out;
        };
        let before = book.clone();
        let mut wanted = Vec::new();
        for pod in pods.iter().filter(|p| !p.host_network) {
            let key = pod.id.key();
            match book.pods.lease(&key) {
                Ok(ip) => wanted.push((pod, ip)),
                Err(e) => {
                    out.insert(key, Wired::Failed(format!("no pod IP: {e}")));
                }
            }
        }
        // Each pod's namespace, veth and files are its own: wired on a few
        // threads at once (most of a pod's wiring is waiting on the kernel
        // and on the threads that enter its namespace).
        let host = &*self.host;
        let files_dir = &self.paths.files_dir;
        let settings = &settings;
        let wire_one = |(pod, ip): &(&DesiredPod, std::net::Ipv4Addr)| {
            let key = pod.id.key();
            let want = PodLink {
                netns: key.clone(),
                host_if: berth_net::host_if_name(&key),
                ip: *ip,
                prefix: settings.pod_cidr.prefix(),
                gateway: settings.gateway(),
            };
            let wired = host
                .ensure_pod(&want)
                .map_err(|e| format!("wiring the pod network: {e}"))
                .and_then(|_| {
                    write_pod_files(files_dir, pod, *ip, settings)
                        .map_err(|e| format!("writing the pod's resolv.conf and hosts: {e}"))
                });
            (
                key,
                match wired {
                    Ok(()) => Wired::Ip(*ip),
                    Err(e) => Wired::Failed(e),
                },
            )
        };
        out.extend(berth_runtime::parallel::in_parallel(
            &wanted,
            WIRING_THREADS,
            wire_one,
        ));
        if *book != before
            && let Err(e) = book.save(&self.paths.leases)
        {
            for w in out.values_mut() {
                if let Wired::Ip(_) = w {
                    *w = Wired::Failed(format!(
                        "cannot save the address leases to {}: {e}",
                        self.paths.leases.display()
                    ));
                }
            }
        }
        out
    }

    /// Removes the namespaces, veths, files and leases of pods not in
    /// `keep` (by pod key): those Git no longer wants, and leftovers of a
    /// crash. Returns what was removed.
    pub fn unwire_others(&mut self, keep: &BTreeSet<String>) -> Vec<String> {
        let mut removed = Vec::new();
        for name in self.host.pod_namespaces() {
            if keep.contains(&name) {
                continue;
            }
            match self.host.remove_pod(&name, &berth_net::host_if_name(&name)) {
                Ok(()) => removed.push(format!("network namespace {name}")),
                Err(e) => removed.push(format!("network namespace {name} (not removed: {e})")),
            }
            let _ = std::fs::remove_dir_all(self.paths.files_dir.join(&name));
        }
        // Host ends whose pod is gone (a crash between the veth and the
        // namespace).
        let wanted: BTreeSet<String> = keep.iter().map(|k| berth_net::host_if_name(k)).collect();
        if let Ok(names) = self.host.pod_host_links() {
            for n in names.into_iter().filter(|n| !wanted.contains(n)) {
                // Gone either way: deleted now, or with its peer a moment ago.
                if self.host.delete_link(&n).is_ok() {
                    removed.push(format!("veth {n}"));
                }
            }
        }
        if let Some(book) = self.book.as_mut() {
            let gone = book.pods.retain(keep);
            if !gone.is_empty() {
                for (owner, ip) in &gone {
                    removed.push(format!("lease {ip} of {owner}"));
                }
                let _ = book.save(&self.paths.leases);
            }
        }
        removed
    }

    /// Builds the Services table from the catalog and the pods that are
    /// ready (every pod with an address, for a Service that publishes
    /// not-ready addresses), and applies what differs from what the kernel
    /// has: only the elements and chains that changed.
    /// Returns whether the kernel's table had drifted from the last one
    /// applied (edited or deleted by hand).
    pub fn program_services(
        &mut self,
        plan: &ServicePlan,
        pods: &[DesiredPod],
        ready: &BTreeMap<String, Ipv4Addr>,
        addresses: &BTreeMap<String, Ipv4Addr>,
    ) -> Result<Option<String>, String> {
        let (Some(settings), Some(book)) = (self.settings.clone(), self.book.as_mut()) else {
            return Ok(None);
        };
        let before = book.clone();
        let (mut ruleset, zone, problems) = services(plan, pods, ready, addresses, &settings, book);
        ruleset.refused_to_pods = self.refused_to_pods.clone();
        if let Some(server) = &self.dns
            && *server.zone() != zone
        {
            server.set_zone(zone);
        }
        if *book != before {
            book.save(&self.paths.leases).map_err(|e| {
                format!("cannot save leases to {}: {e}", self.paths.leases.display())
            })?;
        }
        self.service_problems = problems;
        self.service_problems.extend(self.dns_problem.clone());
        let listing = self.kernel_table()?;
        let drifted = match (&self.listed, &listing) {
            (Some(want), Some(have)) if want != have => Some("edited".to_string()),
            (Some(_), None) => Some("deleted".to_string()),
            _ => None,
        };
        let in_place = listing.is_some() && drifted.is_none();
        let old = self.applied.as_ref().filter(|_| in_place);
        if old != Some(&ruleset) {
            self.host
                .apply_table(old, &ruleset)
                .map_err(|e| e.to_string())?;
            self.applied = Some(ruleset.clone());
            self.listed_generation = self.host.table_generation();
            self.listed = self.host.table_listing().map_err(|e| e.to_string())?;
        }
        self.ruleset = Some(ruleset);
        Ok(drifted)
    }

    /// Refuses pods on the node's TCP `ports` (the metrics endpoint): at
    /// once when the table is programmed already, else with its first
    /// programming.
    pub fn refuse_pods(&mut self, ports: Vec<u16>) -> Result<(), String> {
        if self.refused_to_pods == ports {
            return Ok(());
        }
        self.refused_to_pods = ports;
        let Some(mut ruleset) = self.ruleset.clone() else {
            return Ok(());
        };
        ruleset.refused_to_pods = self.refused_to_pods.clone();
        self.host
            .apply_table(self.applied.as_ref(), &ruleset)
            .map_err(|e| e.to_string())?;
        self.applied = Some(ruleset.clone());
        self.listed_generation = self.host.table_generation();
        self.listed = self.host.table_listing().map_err(|e| e.to_string())?;
        self.ruleset = Some(ruleset);
        Ok(())
    }

    /// The kernel's listing of the table, or the one kept when the nftables
    /// generation says nothing changed since it was taken.
    fn kernel_table(&mut self) -> Result<Option<String>, String> {
        let generation = self.host.table_generation();
        if generation.is_some() && generation == self.listed_generation {
            return Ok(self.listed.clone());
        }
        let listing = self.host.table_listing().map_err(|e| e.to_string())?;
        if listing.is_some() && listing == self.listed {
            // Someone changed another table: ours is as it was.
            self.listed_generation = generation;
        }
        Ok(listing)
    }

    /// Whether the kernel's table still is the one last applied: the idle
    /// poll's check. One netlink round trip while no nftables transaction
    /// happened; one `nft list` when one did.
    pub fn table_drifted(&mut self) -> bool {
        if self.listed.is_none() {
            return false;
        }
        match self.kernel_table() {
            Ok(have) => have != self.listed,
            Err(_) => false,
        }
    }

    pub fn pod_files(&self, pods: &[DesiredPod]) -> PodFiles {
        pod_files(&self.paths.files_dir, pods)
    }

    /// The Services as last programmed, for status.
    pub fn service_records(&self) -> Vec<crate::state::ServiceRecord> {
        let Some(rules) = &self.ruleset else {
            return Vec::new();
        };
        rules
            .services
            .iter()
            .map(|s| crate::state::ServiceRecord {
                name: format!("{}/{}", s.namespace, s.name),
                cluster_ip: s.cluster_ip.to_string(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        let proto = p.protocol.word().to_uppercase();
                        match p.node_port {
                            Some(np) => format!("{}:{np}/{proto}", p.port),
                            None => format!("{}/{proto}", p.port),
                        }
                    })
                    .collect(),
                endpoints: {
                    let mut e: Vec<String> = s
                        .ports
                        .iter()
                        .flat_map(|p| p.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)))
                        .collect();
                    e.sort();
                    e.dedup();
                    e
                },
            })
            .collect()
    }

    /// The pod's leased address, if it has one.
    pub fn pod_ip(&self, key: &str) -> Option<Ipv4Addr> {
        self.book.as_ref().and_then(|b| b.pods.get(key))
    }

    /// Cluster IPs by `namespace/name`, for status and DNS.
    pub fn cluster_ips(&self) -> BTreeMap<String, Ipv4Addr> {
        self.book
            .as_ref()
            .map(|b| b.services.leases.clone())
            .unwrap_or_default()
    }
}

/// `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` as a pod sees them:
/// the node's bridge address answers DNS, with Kubernetes' search path.
fn write_pod_files(
    dir: &Path,
    pod: &DesiredPod,
    ip: Ipv4Addr,
    settings: &NetworkSettings,
) -> std::io::Result<()> {
    let dir = dir.join(pod.id.key());
    std::fs::create_dir_all(&dir)?;
    let domain = &settings.cluster_domain;
    let ns = &pod.id.namespace;
    let files = [
        (
            "resolv.conf",
            format!(
                "nameserver {}\nsearch {ns}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n",
                settings.gateway()
            ),
        ),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{}\n",
                pod.id.name
            ),
        ),
        ("hostname", format!("{}\n", pod.id.name)),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text)?;
        }
    }
    Ok(())
}

/// Files copied into containers' roots, by pod key: `(path inside the
/// container, file on the node)`.
pub type PodFiles = BTreeMap<String, Vec<(String, PathBuf)>>;

/// The files written into each container's root before it starts.
fn pod_files(files_dir: &Path, pods: &[DesiredPod]) -> PodFiles {
    pods.iter()
        .filter(|p| !p.host_network)
        .map(|p| {
            let dir = files_dir.join(p.id.key());
            (
                p.id.key(),
                ["resolv.conf", "hosts", "hostname"]
                    .iter()
                    .map(|f| (format!("etc/{f}"), dir.join(f)))
                    .collect(),
            )
        })
        .collect()
}

/// The planner's Services as nftables rules and DNS records: leases
/// cluster IPs and the node ports left to the node, and fills endpoints
/// from the pods that are ready (from every pod with an address, `addresses`,
/// for a Service with `publishNotReadyAddresses`). Returns what leasing
/// could not do, named by Service and field; every other problem is the
/// planner's diagnostic.
pub fn services(
    plan: &ServicePlan,
    pods: &[DesiredPod],
    ready: &BTreeMap<String, Ipv4Addr>,
    addresses: &BTreeMap<String, Ipv4Addr>,
    settings: &NetworkSettings,
    book: &mut LeaseBook,
) -> (Ruleset, Zone, Vec<String>) {
    let mut problems = Vec::new();
    let mut zone = Zone {
        domain: settings.cluster_domain.clone(),
        services: BTreeMap::new(),
    };
    let mut rules = Vec::new();
    let mut live = BTreeSet::new();
    let mut live_ports = BTreeSet::new();
    for svc in &plan.services {
        let id = svc.id();
        live.insert(id.clone());
        let ready = if svc.publish_not_ready {
            addresses
        } else {
            ready
        };
        let cluster_ip = if svc.headless {
            None
        } else {
            let leased = match svc.cluster_ip.as_deref() {
                Some(text) => match text.parse::<Ipv4Addr>() {
                    Ok(ip) => book
                        .services
                        .lease_exact(&id, ip)
                        .map(|()| ip)
                        .map_err(|e| e.to_string()),
                    Err(_) => Err(format!("{text:?} is not an IPv4 address")),
                },
                None => book.services.lease(&id).map_err(|e| e.to_string()),
            };
            match leased {
                Ok(ip) => Some(ip),
                Err(e) => {
                    problems.push(format!("Service {id}: spec.clusterIP: {e}"));
                    continue;
                }
            }
        };
        zone.services.insert(
            (svc.namespace.clone(), svc.name.clone()),
            dns::ServiceEntry {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                cluster_ip,
                endpoints: svc
                    .members
                    .iter()
                    .filter_map(|i| ready.get(&pods.get(*i as usize)?.id.key()).copied())
                    .collect(),
                ports: svc
                    .dns_ports
                    .iter()
                    .map(|p| dns::ServicePort {
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                        port: p.port,
                    })
                    .collect(),
            },
        );
        let Some(cluster_ip) = cluster_ip else {
            continue;
        };
        let mut ports = Vec::new();
        for p in &svc.ports {
            let node_port = match p.node_port {
                None => None,
                Some(NodePort::Fixed(np)) => {
                    let owner = format!("{id}/{}", p.name);
                    book.node_ports.leases.insert(owner.clone(), np);
                    live_ports.insert(owner);
                    Some(np)
                }
                Some(NodePort::Leased) => {
                    let owner = format!("{id}/{}", p.name);
                    // Ports Services name in Git are not for the taking.
                    let reserved: BTreeSet<u16> = plan.fixed_node_ports.keys().copied().collect();
                    match book
                        .node_ports
                        .lease(&owner, settings.node_ports, &reserved)
                    {
                        Some(np) => {
                            live_ports.insert(owner);
                            Some(np)
                        }
                        None => {
                            problems.push(format!(
                                "Service {id}: port {}: the node port range is full",
                                p.name
                            ));
                            None
                        }
                    }
                }
            };
            let endpoints = svc
                .members
                .iter()
                .enumerate()
                .filter_map(|(n, i)| {
                    let pod = pods.get(*i as usize)?;
                    Some(Endpoint {
                        ip: *ready.get(&pod.id.key())?,
                        port: p.target.port_of(n)?,
                    })
                })
                .collect();
            ports.push(PortRules {
                name: p.name.clone(),
                protocol: match p.protocol {
                    ServiceProtocol::Tcp => Protocol::Tcp,
                    ServiceProtocol::Udp => Protocol::Udp,
                },
                port: p.port,
                node_port,
                endpoints,
            });
        }
        rules.push(ServiceRules {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            cluster_ip,
            affinity_seconds: svc.affinity_seconds,
            ports,
        });
    }
    book.services.retain(&live);
    book.node_ports.leases.retain(|k, _| live_ports.contains(k));
    (
        Ruleset {
            pod_cidr: settings.pod_cidr,
            services: rules,
            refused_to_pods: Vec::new(),
        },
        zone,
        problems,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    const YAML: &str = "apiVersion: v1
kind: Pod
metadata: {name: web-a, labels: {app: web}}
spec:
  containers:
  - name: c
    image: busybox:1.37
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, labels: {app: web}}
spec:
  containers:
  - {name: c, image: busybox:1.37}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: metrics, port: 9090, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: clash}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: one, port: 81, nodePort: 30080}
  - {name: two, port: 82, nodePort: 40000}
---
apiVersion: v1
kind: Service
metadata: {name: lonely}
spec:
  selector: {app: nothing}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: heads}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: outside}
spec:
  clusterIP: 192.168.1.1
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: dynamic}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 83}]
";

    /// The plan of `yaml` on a large node that knows busybox.
    fn plan_of(yaml: String) -> berth_plan::NodePlan {
        let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
            path: "s.yaml".into(),
            text: yaml,
        }]);
        let node = berth_plan::NodeInfo::new("n", BTreeMap::new(), 64 << 30, 64_000);
        let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
            reference: "busybox:1.37".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        }]);
        berth_plan::plan_node(&catalog, &node, &images, &Default::default(), "r")
    }

    fn fixture() -> (berth_plan::NodePlan, Vec<DesiredPod>) {
        let plan = plan_of(YAML.into());
        let pods = plan.pods.clone();
        (plan, pods)
    }

    #[test]
    fn only_ready_pods_are_endpoints_and_dns_answers_unless_not_ready_ones_are_published() {
        let yaml = format!(
            "{YAML}---
apiVersion: v1
kind: Service
metadata: {{name: all}}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {{app: web}}
  ports: [{{name: http, port: 80}}]
"
        );
        let plan = plan_of(yaml);
        let settings = NetworkSettings::default();
        let mut book = LeaseBook::new(settings.pod_cidr, settings.service_cidr);
        let (a, b) = (Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3));
        // web-b has an address but is not ready.
        let ready: BTreeMap<String, Ipv4Addr> = [("default_web-a".to_string(), a)].into();
        let addresses: BTreeMap<String, Ipv4Addr> = [
            ("default_web-a".to_string(), a),
            ("default_web-b".to_string(), b),
        ]
        .into();
        let (rules, zone, _) = services(
            &plan.services,
            &plan.pods,
            &ready,
            &addresses,
            &settings,
            &mut book,
        );
        let endpoints = |name: &str| {
            zone.services
                .get(&("default".to_string(), name.to_string()))
                .expect(name)
                .endpoints
                .clone()
        };
        assert_eq!(
            endpoints("heads"),
            [a],
            "a headless Service answers ready pods only"
        );
        assert_eq!(
            endpoints("all"),
            [a, b],
            "publishNotReadyAddresses answers every pod"
        );
        let web = rules
            .services
            .iter()
            .find(|s| s.name == "web")
            .expect("web");
        assert_eq!(
            web.ports[1].endpoints,
            [Endpoint { ip: a, port: 9090 }],
            "the not-ready pod is no endpoint"
        );
    }

    #[test]
    fn services_get_addresses_ports_and_endpoints_and_every_problem_is_named() {
        let (plan, pods) = fixture();
        assert_eq!(pods.len(), 2);
        let settings = NetworkSettings::default();
        let mut book = LeaseBook::new(settings.pod_cidr, settings.service_cidr);
        let ready: BTreeMap<String, Ipv4Addr> = [
            ("default_web-a".to_string(), Ipv4Addr::new(10, 88, 0, 2)),
            ("default_web-b".to_string(), Ipv4Addr::new(10, 88, 0, 3)),
        ]
        .into();
        let (rules, zone, problems) = services(
            &plan.services,
            &plan.pods,
            &ready,
            &ready,
            &settings,
            &mut book,
        );
        // The planner names what is wrong in Git; leasing, what the node cannot do.
        let joined = plan
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .chain(problems)
            .collect::<Vec<_>>()
            .join("\n");
        for expected in [
            "Service/default/clash: spec.ports[0].nodePort: 30080 is already taken by Service default/web",
            "Service/default/clash: spec.ports[1].nodePort: 40000 is outside the node port range 30000-32767",
            "Service/default/web: spec.ports[0].targetPort: no container of pod default/web-b declares a port named \"http\": the pod is not an endpoint",
            "Service/default/lonely: spec.selector: matches no pod on this node: the Service has no endpoints",
            "Service default/outside: spec.clusterIP: 192.168.1.1 is outside 10.96.0.0/12",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
        let web = rules
            .services
            .iter()
            .find(|s| s.name == "web")
            .expect("web");
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(
            web.ports[0].endpoints,
            [Endpoint {
                ip: Ipv4Addr::new(10, 88, 0, 2),
                port: 8080
            }]
        );
        // No targetPort: the port itself, on every ready member; UDP kept.
        assert_eq!(web.ports[1].protocol, Protocol::Udp);
        assert_eq!(web.ports[1].endpoints.len(), 2);
        assert!(web.ports[1].endpoints.iter().all(|e| e.port == 9090));
        // The clashing port is left out; the Service's other ports stay.
        let clash = rules
            .services
            .iter()
            .find(|s| s.name == "clash")
            .expect("clash");
        assert!(clash.ports.is_empty(), "{clash:?}");
        // A dynamic node port is in range and never one another Service named.
        let dynamic = rules
            .services
            .iter()
            .find(|s| s.name == "dynamic")
            .expect("dynamic");
        let np = dynamic.ports[0].node_port.expect("leased");
        assert!((30000..=32767).contains(&np) && np != 30080, "{np}");
        // Headless: no rules, a DNS name with the pods' addresses.
        assert!(rules.services.iter().all(|s| s.name != "heads"));
        let heads = &zone.services[&("default".to_string(), "heads".to_string())];
        assert_eq!(heads.cluster_ip, None);
        assert_eq!(heads.endpoints.len(), 2);
        // Leases are stable across passes, and released with their Service.
        let ip = web.cluster_ip;
        let (again, _, _) = services(
            &plan.services,
            &plan.pods,
            &ready,
            &ready,
            &settings,
            &mut book,
        );
        assert_eq!(
            again
                .services
                .iter()
                .find(|s| s.name == "web")
                .expect("web")
                .cluster_ip,
            ip
        );
        services(
            &berth_plan::services::ServicePlan::default(),
            &[],
            &BTreeMap::new(),
            &BTreeMap::new(),
            &settings,
            &mut book,
        );
        assert!(book.services.leases.is_empty());
        assert!(book.node_ports.leases.is_empty());
    }

    /// A pod network on an in-memory node, with its files in a scratch
    /// directory.
    fn on_fake(name: &str) -> (PodNetwork, berth_net::fake::FakeHost, PathBuf) {
        let dir = std::env::temp_dir().join(format!("berth-fakenet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        std::fs::write(dir.join("resolv.conf"), "nameserver 192.168.122.1\n").expect("resolv.conf");
        let paths = NetworkPaths {
            netns_dir: dir.join("netns"),
            files_dir: dir.join("pods"),
            leases: dir.join("state/leases.json"),
            upstream_resolv_conf: dir.join("resolv.conf"),
        };
        let host = berth_net::fake::FakeHost::new();
        (
            PodNetwork::with_host(paths, Box::new(host.clone())),
            host,
            dir,
        )
    }

    fn small() -> NetworkSettings {
        NetworkSettings::parse(Some("10.99.0.0/28"), Some("10.98.0.0/24"), None, None)
            .expect("settings")
    }

    fn ips(wired: &BTreeMap<String, Wired>) -> BTreeMap<String, Ipv4Addr> {
        wired
            .iter()
            .filter_map(|(k, w)| match w {
                Wired::Ip(ip) => Some((k.clone(), *ip)),
                Wired::Failed(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_pass_wires_pods_programs_services_and_dns_and_notices_hand_edits() {
        let (mut net, host, dir) = on_fake("pass");
        let (plan, pods) = fixture();
        let settings = NetworkSettings::default();
        assert_eq!(
            net.prepare_node(&settings).expect("node"),
            Vec::<String>::new()
        );
        let gateway = settings.gateway();
        assert_eq!(
            host.bridge(),
            Some((gateway, settings.pod_cidr.prefix(), settings.service_cidr))
        );
        assert!(host.forwarding());
        let dns_at = std::net::SocketAddr::from((gateway, 53));
        assert_eq!(host.resolvers(), [dns_at]);

        let wired = net.wire(&pods);
        let ready = ips(&wired);
        assert_eq!(ready.len(), 2, "{wired:?}");
        assert_eq!(host.pod_namespaces().len(), 2);
        assert_eq!(
            net.pod_ip("default_web-a"),
            ready.get("default_web-a").copied()
        );
        assert!(dir.join("pods/default_web-a/resolv.conf").is_file());

        assert_eq!(
            net.program_services(&plan.services, &pods, &ready, &ready),
            Ok(None)
        );
        let table = host.table().expect("a table applied");
        let web = table
            .services
            .iter()
            .find(|s| s.name == "web")
            .expect("web");
        assert_eq!(web.ports[0].endpoints.len(), 1, "{web:?}");
        let zone = host.zone_at(dns_at).expect("the responder's zone");
        let entry = &zone.services[&("default".to_string(), "web".to_string())];
        assert_eq!(entry.cluster_ip, Some(web.cluster_ip));

        // Nothing changed: nothing applied, and another program's table
        // (the generation moves, ours is as it was) is not drift.
        let work = host.changes();
        assert_eq!(
            net.program_services(&plan.services, &pods, &ready, &ready),
            Ok(None)
        );
        host.touch_other_table();
        assert!(!net.table_drifted());
        assert_eq!(
            net.program_services(&plan.services, &pods, &ready, &ready),
            Ok(None)
        );
        assert_eq!(host.changes(), work, "an unchanged table was applied again");

        // A pod that stops being ready leaves the endpoints, in one apply.
        let mut fewer = ready.clone();
        fewer.remove("default_web-a");
        assert_eq!(
            net.program_services(&plan.services, &pods, &fewer, &fewer),
            Ok(None)
        );
        let table = host.table().expect("table");
        let web = table
            .services
            .iter()
            .find(|s| s.name == "web")
            .expect("web");
        assert!(web.ports[0].endpoints.is_empty(), "{web:?}");
        assert_eq!(host.changes(), work + 1);

        // Edited or deleted by hand: noticed, reported, put back.
        host.edit_table_by_hand();
        assert!(net.table_drifted());
        assert_eq!(
            net.program_services(&plan.services, &pods, &fewer, &fewer),
            Ok(Some("edited".to_string()))
        );
        assert!(!net.table_drifted());
        host.delete_table_by_hand();
        assert_eq!(
            net.program_services(&plan.services, &pods, &fewer, &fewer),
            Ok(Some("deleted".to_string()))
        );
        assert_eq!(host.table(), Some(table));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_pool_that_runs_out_names_the_pod_and_leases_come_back_after_a_restart_or_a_lost_file() {
        let (mut net, host, dir) = on_fake("pool");
        net.prepare_node(&small()).expect("node");
        let all = berth_plan_pods(14);
        let wired = net.wire(&all);
        let failed: Vec<&Wired> = wired
            .values()
            .filter(|w| matches!(w, Wired::Failed(_)))
            .collect();
        assert_eq!(
            failed,
            [&Wired::Failed(
                "no pod IP: the pool 10.99.0.0/28 has no free address: 13 of 13 are leased; widen the prefix in the node config".into()
            )]
        );
        // Fewer replicas: their leases come back, and the pod left out
        // gets one.
        let keep: BTreeSet<String> = all[..12].iter().map(|p| p.id.key()).collect();
        let removed = net.unwire_others(&keep);
        assert!(
            removed.iter().any(|r| r.starts_with("lease ")),
            "{removed:?}"
        );
        assert_eq!(host.pod_namespaces().len(), 12);
        let first = net.wire(&all[..13]);
        assert_eq!(ips(&first).len(), 13, "{first:?}");

        // The agent restarts: the same addresses, nothing remade.
        let paths = net.paths.clone();
        drop(net);
        let work = host.changes();
        let mut net = PodNetwork::with_host(paths.clone(), Box::new(host.clone()));
        net.prepare_node(&small()).expect("node");
        assert_eq!(net.wire(&all[..13]), first);
        assert_eq!(host.changes(), work, "a restart remade wiring");

        // The lease file is lost: addresses are read back from the pods'
        // namespaces, so running pods keep theirs.
        std::fs::write(&paths.leases, b"{ half a file").expect("corrupt");
        drop(net);
        let mut net = PodNetwork::with_host(paths, Box::new(host.clone()));
        let notes = net.prepare_node(&small()).expect("node");
        assert!(
            notes.iter().any(|n| n.contains("not a lease book")),
            "{notes:?}"
        );
        assert_eq!(net.wire(&all[..13]), first);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn broken_wiring_is_remade_and_crash_leftovers_are_collected() {
        let (mut net, host, dir) = on_fake("leftovers");
        net.prepare_node(&small()).expect("node");
        let three = berth_plan_pods(3);
        let first = net.wire(&three);
        let key = three[0].id.key();
        host.break_pod(&key);
        let work = host.changes();
        assert_eq!(net.wire(&three), first, "remade with the same address");
        assert_eq!(host.changes(), work + 1, "only the broken pod was remade");

        host.add_stray_namespace("default_ghost");
        let stray = berth_net::host_if_name("default_gone");
        host.add_stray_link(&stray);
        let keep: BTreeSet<String> = three.iter().map(|p| p.id.key()).collect();
        let removed = net.unwire_others(&keep);
        assert!(
            removed.contains(&"network namespace default_ghost".to_string()),
            "{removed:?}"
        );
        assert!(removed.contains(&format!("veth {stray}")), "{removed:?}");
        assert_eq!(host.pod_namespaces(), keep.into_iter().collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_taken_dns_port_is_reported_once_and_pods_are_wired_anyway() {
        let (mut net, host, dir) = on_fake("dns");
        let settings = small();
        // Someone else's resolver holds port 53 on every address.
        let blocker = host
            .start_resolver(
                std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53)),
                Vec::new(),
                Zone::default(),
            )
            .expect("the other resolver");
        let notes = net
            .prepare_node(&settings)
            .expect("the node network without DNS");
        assert_eq!(
            notes,
            ["cluster DNS on 10.99.0.1:53: Address already in use; retrying"]
        );
        assert_eq!(ips(&net.wire(&berth_plan_pods(2))).len(), 2);
        assert!(net.prepare_node(&settings).expect("again").is_empty());
        drop(blocker);
        assert!(net.prepare_node(&settings).expect("again").is_empty());
        assert!(
            host.resolvers()
                .contains(&std::net::SocketAddr::from((settings.gateway(), 53)))
        );
        net.program_services(
            &ServicePlan::default(),
            &[],
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .expect("programmed");
        assert!(
            net.service_problems.is_empty(),
            "{:?}",
            net.service_problems
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn berth_plan_pods(replicas: u32) -> Vec<DesiredPod> {
        let yaml = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - {{name: c, image: busybox:1.37}}\n"
        );
        plan_of(yaml).pods
    }

    #[test]
    fn pod_files_point_pods_at_the_bridge_for_dns() {
        let (_, pods) = fixture();
        let dir = std::env::temp_dir().join(format!("berth-podfiles-{}", std::process::id()));
        let settings = NetworkSettings::default();
        write_pod_files(&dir, &pods[0], Ipv4Addr::new(10, 88, 0, 2), &settings).expect("written");
        let key = pods[0].id.key();
        let resolv =
            std::fs::read_to_string(dir.join(&key).join("resolv.conf")).expect("resolv.conf");
        assert_eq!(
            resolv,
            "nameserver 10.88.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        let hosts = std::fs::read_to_string(dir.join(&key).join("hosts")).expect("hosts");
        assert!(hosts.contains("10.88.0.2\tweb-a"), "{hosts}");
        let files = pod_files(&dir, &pods);
        assert_eq!(files[&key][0].0, "etc/resolv.conf");
        let _ = std::fs::remove_dir_all(dir);
    }
}

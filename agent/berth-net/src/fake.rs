//! The node's network in memory: [`FakeHost`] does what
//! [`KernelHost`](crate::host::KernelHost) does, to a model of links,
//! namespaces, the Services table and responders, and lets a test do to it
//! what a person or a crash does to a node (delete a veth, flush the table,
//! leave a stray namespace). The [`contract`](crate::contract) cases pass
//! on both.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::cidr::Cidr;
use crate::dns::Zone;
use crate::host::{HostError, NetworkHost, Resolver};
use crate::link::PodLink;
use crate::nft::{self, Ruleset};

/// What is inside a pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSide {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

#[derive(Debug, Default)]
struct State {
    /// The node's own links: name, address, prefix.
    node_links: Vec<(String, Ipv4Addr, u8)>,
    /// Gateway, pod prefix, the routed Service range.
    bridge: Option<(Ipv4Addr, u8, Cidr)>,
    forwarding: bool,
    /// Namespace → its `eth0`, if wired.
    namespaces: BTreeMap<String, Option<PodSide>>,
    /// Host ends of veths → the namespace of their peer.
    veths: BTreeMap<String, String>,
    table: Option<Ruleset>,
    /// A listing that differs from the table's: someone edited it.
    edited: Option<String>,
    generation: u32,
    /// Responders listening, with the records each answers from.
    resolvers: BTreeMap<SocketAddr, Arc<RwLock<Arc<Zone>>>>,
    /// Calls that changed something, for tests that count work.
    changes: u64,
}

/// An in-memory node network. Clones share the same node.
#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<State>>,
}

impl FakeHost {
    /// A node whose only link is `eth0` with 192.168.122.10/24.
    pub fn new() -> Self {
        Self::with_node_links(vec![("eth0".into(), Ipv4Addr::new(192, 168, 122, 10), 24)])
    }

    pub fn with_node_links(links: Vec<(String, Ipv4Addr, u8)>) -> Self {
        let host = Self::default();
        host.lock().node_links = links;
        host
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The pod's `eth0` goes (as `ip link del` inside the namespace would).
    pub fn break_pod(&self, netns: &str) {
        let mut s = self.lock();
        if let Some(side) = s.namespaces.get_mut(netns) {
            *side = None;
        }
        s.veths.retain(|_, ns| ns != netns);
    }

    /// A namespace nobody wired (left by a crash).
    pub fn add_stray_namespace(&self, name: &str) {
        self.lock().namespaces.insert(name.to_string(), None);
    }

    /// A host veth whose pod is gone (left by a crash).
    pub fn add_stray_link(&self, name: &str) {
        self.lock()
            .veths
            .insert(name.to_string(), String::from("<gone>"));
    }

    /// Someone deletes the Services table by hand.
    pub fn delete_table_by_hand(&self) {
        let mut s = self.lock();
        s.table = None;
        s.edited = None;
        s.generation += 1;
    }

    /// Someone adds a rule to the Services table by hand.
    pub fn edit_table_by_hand(&self) {
        let mut s = self.lock();
        if let Some(table) = &s.table {
            let text = format!("{}# a rule added by hand\n", nft::render(table));
            s.edited = Some(text);
            s.generation += 1;
        }
    }

    /// Another program changes another table: the generation moves, ours
    /// stays.
    pub fn touch_other_table(&self) {
        self.lock().generation += 1;
    }

    /// The Services table as applied, if there is one.
    pub fn table(&self) -> Option<Ruleset> {
        self.lock().table.clone()
    }

    pub fn forwarding(&self) -> bool {
        self.lock().forwarding
    }

    pub fn bridge(&self) -> Option<(Ipv4Addr, u8, Cidr)> {
        self.lock().bridge
    }

    /// The addresses responders are listening on.
    pub fn resolvers(&self) -> Vec<SocketAddr> {
        self.lock().resolvers.keys().copied().collect()
    }

    /// The records the responder on `address` answers from.
    pub fn zone_at(&self, address: SocketAddr) -> Option<Arc<Zone>> {
        let s = self.lock();
        let zone = s.resolvers.get(&address)?;
        zone.read().ok().map(|z| z.clone())
    }

    /// How many calls changed the node so far.
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }
}

impl NetworkHost for FakeHost {
    fn node_addresses(&self) -> Result<Vec<(String, Ipv4Addr, u8)>, HostError> {
        Ok(self.lock().node_links.clone())
    }

    fn ensure_bridge(
        &self,
        gateway: Ipv4Addr,
        pods: Cidr,
        services: Cidr,
    ) -> Result<(), HostError> {
        let mut s = self.lock();
        let want = Some((gateway, pods.prefix(), services));
        if s.bridge != want {
            s.bridge = want;
            s.changes += 1;
        }
        Ok(())
    }

    fn enable_forwarding(&self) -> Result<(), HostError> {
        self.lock().forwarding = true;
        Ok(())
    }

    fn pod_namespaces(&self) -> Vec<String> {
        self.lock().namespaces.keys().cloned().collect()
    }

    fn pod_address(&self, netns: &str) -> Result<Option<(Ipv4Addr, u8)>, HostError> {
        match self.lock().namespaces.get(netns) {
            None => Err(HostError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{netns} is not a network namespace"),
            ))),
            Some(side) => Ok(side.as_ref().map(|p| (p.ip, p.prefix))),
        }
    }

    fn ensure_pod(&self, want: &PodLink) -> Result<bool, HostError> {
        let mut s = self.lock();
        if s.bridge.is_none() {
            return Err(HostError::Io(std::io::Error::other(format!(
                "no bridge {}",
                crate::settings::BRIDGE
            ))));
        }
        let side = PodSide {
            ip: want.ip,
            prefix: want.prefix,
            gateway: want.gateway,
        };
        let pod_ok = s.namespaces.get(&want.netns) == Some(&Some(side.clone()));
        let host_ok = s.veths.get(&want.host_if) == Some(&want.netns);
        if pod_ok && host_ok {
            return Ok(false);
        }
        s.veths.insert(want.host_if.clone(), want.netns.clone());
        s.namespaces.insert(want.netns.clone(), Some(side));
        s.changes += 1;
        Ok(true)
    }

    fn remove_pod(&self, netns: &str, host_if: &str) -> Result<(), HostError> {
        let mut s = self.lock();
        let had = s.veths.remove(host_if).is_some() | s.namespaces.remove(netns).is_some();
        if had {
            s.changes += 1;
        }
        Ok(())
    }

    fn pod_host_links(&self) -> Result<Vec<String>, HostError> {
        Ok(self
            .lock()
            .veths
            .keys()
            .filter(|n| n.starts_with(crate::HOST_IF_PREFIX))
            .cloned()
            .collect())
    }

    fn delete_link(&self, name: &str) -> Result<bool, HostError> {
        let mut s = self.lock();
        // A veth takes its peer with it.
        let Some(netns) = s.veths.remove(name) else {
            return Ok(false);
        };
        if let Some(side) = s.namespaces.get_mut(&netns) {
            *side = None;
        }
        s.changes += 1;
        Ok(true)
    }

    fn apply_table(&self, _old: Option<&Ruleset>, new: &Ruleset) -> Result<(), HostError> {
        let mut s = self.lock();
        s.table = Some(new.clone());
        s.edited = None;
        s.generation += 1;
        s.changes += 1;
        Ok(())
    }

    fn table_listing(&self) -> Result<Option<String>, HostError> {
        let s = self.lock();
        Ok(s.edited
            .clone()
            .or_else(|| s.table.as_ref().map(nft::render)))
    }

    fn table_generation(&self) -> Option<u32> {
        Some(self.lock().generation)
    }

    fn remove_table(&self) -> Result<(), HostError> {
        let mut s = self.lock();
        if s.table.take().is_some() {
            s.edited = None;
            s.generation += 1;
            s.changes += 1;
        }
        Ok(())
    }

    fn start_resolver(
        &self,
        address: SocketAddr,
        _upstreams: Vec<SocketAddr>,
        zone: Zone,
    ) -> Result<Box<dyn Resolver>, HostError> {
        let mut s = self.lock();
        let ip = match address.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => {
                return Err(HostError::Io(std::io::ErrorKind::AddrNotAvailable.into()));
            }
        };
        let ours = ip.is_loopback()
            || ip.is_unspecified()
            || s.bridge.is_some_and(|(gw, _, _)| gw == ip)
            || s.node_links.iter().any(|(_, a, _)| *a == ip);
        if !ours {
            return Err(HostError::Io(std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                "Cannot assign requested address",
            )));
        }
        // A wildcard holds the port on every address, as a socket does.
        let taken = s.resolvers.keys().any(|a| {
            a.port() == address.port()
                && (*a == address || a.ip().is_unspecified() || ip.is_unspecified())
        });
        if taken {
            return Err(HostError::Io(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "Address already in use",
            )));
        }
        let zone = Arc::new(RwLock::new(Arc::new(zone)));
        s.resolvers.insert(address, zone.clone());
        Ok(Box::new(FakeResolver {
            host: self.clone(),
            address,
            zone,
        }))
    }
}

#[derive(Debug)]
struct FakeResolver {
    host: FakeHost,
    address: SocketAddr,
    zone: Arc<RwLock<Arc<Zone>>>,
}

impl Resolver for FakeResolver {
    fn address(&self) -> SocketAddr {
        self.address
    }
    fn zone(&self) -> Arc<Zone> {
        self.zone.read().map(|z| z.clone()).unwrap_or_default()
    }
    fn set_zone(&self, zone: Zone) {
        if let Ok(mut z) = self.zone.write() {
            *z = Arc::new(zone);
        }
    }
}

impl Drop for FakeResolver {
    fn drop(&mut self) {
        self.host.lock().resolvers.remove(&self.address);
    }
}

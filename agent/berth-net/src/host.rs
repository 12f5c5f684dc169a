//! What the pod network asks of the node, as one trait: the bridge, each
//! pod's namespace and veth, the Services table and the cluster DNS
//! responder. [`KernelHost`] does it with netlink, network namespaces,
//! `nft` and sockets; [`FakeHost`](crate::fake::FakeHost) keeps the same
//! state in memory, so the agent's network pass runs without root. The
//! cases in [`contract`](crate::contract) hold both to the same behaviour.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use crate::cidr::Cidr;
use crate::dns::{DnsServer, Zone};
use crate::link::{self, LinkError, PodLink};
use crate::netns::NetnsDir;
use crate::nft::{self, NftError, Ruleset};
use crate::settings::BRIDGE;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The kernel lacks something the pod network needs (a module, a
    /// switch), said in full.
    #[error("{0}")]
    Missing(String),
}

/// The cluster DNS responder, running.
pub trait Resolver: Send + Sync + fmt::Debug {
    fn address(&self) -> SocketAddr;
    /// The records it answers from now.
    fn zone(&self) -> Arc<Zone>;
    fn set_zone(&self, zone: Zone);
}

impl Resolver for DnsServer {
    fn address(&self) -> SocketAddr {
        self.address
    }
    fn zone(&self) -> Arc<Zone> {
        DnsServer::zone(self)
    }
    fn set_zone(&self, zone: Zone) {
        DnsServer::set_zone(self, zone);
    }
}

/// The node's side of the pod network. Every call acts on the node's own
/// network namespace (the calling thread's).
pub trait NetworkHost: Send + Sync + fmt::Debug {
    /// IPv4 addresses of the node's links other than `lo`, the bridge and
    /// pods' veths: what the pod and Service ranges must not overlap.
    fn node_addresses(&self) -> Result<Vec<(String, Ipv4Addr, u8)>, HostError>;
    /// The bridge, up, with `gateway` on it (prefix of `pods`), and the
    /// Service range routed onto it. Idempotent.
    fn ensure_bridge(&self, gateway: Ipv4Addr, pods: Cidr, services: Cidr)
    -> Result<(), HostError>;
    /// IPv4 forwarding, and bridged traffic through the `ip` hooks.
    fn enable_forwarding(&self) -> Result<(), HostError>;
    /// The pod namespaces that exist, sorted.
    fn pod_namespaces(&self) -> Vec<String>;
    /// The address on the pod's `eth0`, seen from inside its namespace.
    fn pod_address(&self, netns: &str) -> Result<Option<(Ipv4Addr, u8)>, HostError>;
    /// Wires a pod (namespace, veth pair on the bridge, address, default
    /// route), remaking anything half-made. Returns whether anything
    /// changed. Fails when there is no bridge.
    fn ensure_pod(&self, want: &PodLink) -> Result<bool, HostError>;
    /// Removes a pod's veth and namespace; what is already gone is fine.
    fn remove_pod(&self, netns: &str, host_if: &str) -> Result<(), HostError>;
    /// Host ends of pods' veths (names starting with
    /// [`HOST_IF_PREFIX`](crate::HOST_IF_PREFIX)).
    fn pod_host_links(&self) -> Result<Vec<String>, HostError>;
    /// Deletes a link; `false` when there was none.
    fn delete_link(&self, name: &str) -> Result<bool, HostError>;
    /// Makes the Services table `new`: as an update of `old` when given
    /// (what was last applied, still in place), else whole. Either way the
    /// table afterwards is the same.
    fn apply_table(&self, old: Option<&Ruleset>, new: &Ruleset) -> Result<(), HostError>;
    /// The table as the node has it now (for noticing edits), or `None`
    /// when it is not there.
    fn table_listing(&self) -> Result<Option<String>, HostError>;
    /// A number that moves with every change to the node's rulesets, by
    /// anyone; `None` when it cannot be read.
    fn table_generation(&self) -> Option<u32>;
    /// Removes the table; no table is fine.
    fn remove_table(&self) -> Result<(), HostError>;
    /// Starts the DNS responder on `address`. Fails when the address is
    /// taken or not the node's.
    fn start_resolver(
        &self,
        address: SocketAddr,
        upstreams: Vec<SocketAddr>,
        zone: Zone,
    ) -> Result<Box<dyn Resolver>, HostError>;
}

/// The real node: rtnetlink, named network namespaces under a directory,
/// the `nft` tool and UDP/TCP sockets.
#[derive(Debug)]
pub struct KernelHost {
    netns: NetnsDir,
}

impl KernelHost {
    pub fn new(netns_dir: impl AsRef<Path>) -> Self {
        Self {
            netns: NetnsDir::new(netns_dir.as_ref()),
        }
    }
}

impl NetworkHost for KernelHost {
    fn node_addresses(&self) -> Result<Vec<(String, Ipv4Addr, u8)>, HostError> {
        Ok(link::with_netlink(|h| async move {
            use futures_lite::StreamExt;
            let mut found = Vec::new();
            let mut links = h.link().get().execute();
            while let Some(l) = links.next().await {
                let l = l.map_err(|e| LinkError::Netlink {
                    what: "listing links".into(),
                    source: e,
                })?;
                if let Some(name) = link::link_name(&l)
                    && name != "lo"
                    && name != BRIDGE
                    && !name.starts_with(crate::HOST_IF_PREFIX)
                {
                    found.push((name.to_string(), l.header.index));
                }
            }
            let mut out = Vec::new();
            for (name, index) in found {
                for (ip, prefix) in link::addresses(&h, index).await? {
                    out.push((name.clone(), ip, prefix));
                }
            }
            Ok(out)
        })?)
    }

    fn ensure_bridge(
        &self,
        gateway: Ipv4Addr,
        pods: Cidr,
        services: Cidr,
    ) -> Result<(), HostError> {
        Ok(link::with_netlink(|h| async move {
            let index = link::ensure_bridge(&h, BRIDGE, gateway, pods).await?;
            link::ensure_link_route(&h, services, index).await
        })?)
    }

    fn enable_forwarding(&self) -> Result<(), HostError> {
        crate::enable_forwarding().map_err(HostError::Missing)
    }

    fn pod_namespaces(&self) -> Vec<String> {
        self.netns.list()
    }

    fn pod_address(&self, netns: &str) -> Result<Option<(Ipv4Addr, u8)>, HostError> {
        Ok(link::pod_address(&self.netns, netns)?)
    }

    fn ensure_pod(&self, want: &PodLink) -> Result<bool, HostError> {
        Ok(link::ensure_pod(&self.netns, BRIDGE, want)?)
    }

    fn remove_pod(&self, netns: &str, host_if: &str) -> Result<(), HostError> {
        Ok(link::remove_pod(&self.netns, netns, host_if)?)
    }

    fn pod_host_links(&self) -> Result<Vec<String>, HostError> {
        Ok(link::with_netlink(|h| async move {
            link::links_named(&h, crate::HOST_IF_PREFIX).await
        })?)
    }

    fn delete_link(&self, name: &str) -> Result<bool, HostError> {
        let name = name.to_string();
        Ok(link::with_netlink(|h| async move {
            link::delete_link(&h, &name).await
        })?)
    }

    fn apply_table(&self, old: Option<&Ruleset>, new: &Ruleset) -> Result<(), HostError> {
        let whole = || nft::render(new);
        let text = match old {
            Some(old) if old == new => return Ok(()),
            // Only what changed, in one small transaction.
            Some(old) => nft::render_update(old, new).unwrap_or_else(whole),
            None => whole(),
        };
        // An update that the kernel refuses (a chain someone removed
        // between the check and now) falls back to the whole table.
        if nft::apply(&text).is_err() {
            nft::apply(&whole())?;
        }
        Ok(())
    }

    fn table_listing(&self) -> Result<Option<String>, HostError> {
        Ok(nft::listing()?)
    }

    fn table_generation(&self) -> Option<u32> {
        nft::generation().ok()
    }

    fn remove_table(&self) -> Result<(), HostError> {
        if nft::listing()?.is_none() {
            return Ok(());
        }
        Ok(nft::remove()?)
    }

    fn start_resolver(
        &self,
        address: SocketAddr,
        upstreams: Vec<SocketAddr>,
        zone: Zone,
    ) -> Result<Box<dyn Resolver>, HostError> {
        Ok(Box::new(DnsServer::start(address, upstreams, zone)?))
    }
}

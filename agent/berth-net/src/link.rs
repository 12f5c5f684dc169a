//! Links, addresses and routes over rtnetlink: the node's bridge and one
//! veth pair per pod.
//!
//! Every call opens its own netlink connection on the calling thread and
//! drives it with `async_io::block_on`, so there is no async runtime to
//! keep alive and a call made from a thread inside a pod's namespace
//! talks to that namespace.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures_lite::StreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::cidr::Cidr;
use crate::netns::NetnsDir;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
}

type Result<T> = std::result::Result<T, LinkError>;

fn ctx(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// Runs `work` with a fresh netlink connection in the calling thread's
/// network namespace.
pub fn with_netlink<T, F, Fut>(work: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let (connection, handle, _) =
        rtnetlink::new_connection_with_socket::<rtnetlink::sys::SmolSocket>()?;
    async_io::block_on(futures_lite::future::or(work(handle), async move {
        connection.await;
        Err(LinkError::Io(std::io::Error::other(
            "the netlink connection closed",
        )))
    }))
}

fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
        _ => 0,
    }
}

/// Moves the calling thread (only it) into a new, empty network namespace
/// with `lo` up: for tests and benchmarks that must not touch the host's
/// links. Needs root.
pub fn isolate_thread() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    with_netlink(|h| async move {
        let lo = link_by_name(&h, "lo")
            .await?
            .ok_or_else(|| LinkError::Io(std::io::Error::other("no lo in a new namespace")))?;
        set_up(&h, lo.header.index, "lo").await
    })
}

/// The link called `name`, if there is one.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.next().await {
        None => Ok(None),
        Some(Ok(link)) => Ok(Some(link)),
        Some(Err(e)) if errno(&e) == nix::libc::ENODEV => Ok(None),
        Some(Err(e)) => Err(ctx(format!("reading link {name}"))(e)),
    }
}

pub fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

pub fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Names of every link whose name starts with `prefix`.
pub async fn links_named(handle: &Handle, prefix: &str) -> Result<Vec<String>> {
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(link) = links.next().await {
        let link = link.map_err(ctx("listing links"))?;
        if let Some(n) = link_name(&link).filter(|n| n.starts_with(prefix)) {
            names.push(n.to_string());
        }
    }
    Ok(names)
}

/// IPv4 addresses on the link with `index`, with their prefix lengths.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut found = Vec::new();
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(ctx("listing addresses"))?;
        if msg.header.index != index {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                found.push((*ip, msg.header.prefix_len));
            }
        }
    }
    Ok(found)
}

async fn ensure_address(handle: &Handle, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    let present = addresses(handle, index).await?;
    if present.contains(&(ip, prefix)) {
        return Ok(());
    }
    handle
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .replace()
        .execute()
        .await
        .map_err(ctx(format!("adding {ip}/{prefix}")))
}

async fn set_up(handle: &Handle, index: u32, what: &str) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(ctx(format!("setting {what} up")))
}

/// The node's bridge with the gateway address on it, up.
pub async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    pods: Cidr,
) -> Result<u32> {
    let link = match link_by_name(handle, name).await? {
        Some(l) => l,
        None => {
            handle
                .link()
                .add(
                    LinkBridge::new(name)
                        .address(stable_mac(name).to_vec())
                        .build(),
                )
                .execute()
                .await
                .map_err(ctx(format!("creating bridge {name}")))?;
            link_by_name(handle, name).await?.ok_or_else(|| {
                LinkError::Io(std::io::Error::other(format!("bridge {name} vanished")))
            })?
        }
    };
    let index = link.header.index;
    ensure_address(handle, index, gateway, pods.prefix()).await?;
    if !is_up(&link) {
        set_up(handle, index, name).await?;
    }
    Ok(index)
}

/// A locally administered unicast MAC derived from `seed`. A bridge left
/// to itself takes the lowest MAC of its ports, which changes as pods come
/// and go and leaves every pod with a stale gateway entry.
pub fn stable_mac(seed: &str) -> [u8; 6] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(seed.as_bytes());
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// The route for `dest` through the link `index` (the Service range on
/// the bridge, so the node itself reaches cluster IPs without a default
/// route).
pub async fn ensure_link_route(handle: &Handle, dest: Cidr, index: u32) -> Result<()> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest.network(), dest.prefix())
        .output_interface(index)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    handle
        .route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(ctx(format!("routing {dest}")))
}

pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == nix::libc::ENODEV => Ok(false),
        Err(e) => Err(ctx(format!("deleting link {name}"))(e)),
    }
}

/// How a pod is wired: its namespace name, the host end of its veth, its
/// address and the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub netns: String,
    pub host_if: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The name of the pod's interface inside its namespace.
pub const POD_IF: &str = "eth0";

/// Is the pod side as it should be: `eth0` up with the address, `lo` up, a
/// default route through the gateway.
async fn pod_side_ready(handle: &Handle, want: &PodLink) -> Result<bool> {
    let Some(eth) = link_by_name(handle, POD_IF).await? else {
        return Ok(false);
    };
    let lo_up = link_by_name(handle, "lo").await?.is_some_and(|l| is_up(&l));
    if !is_up(&eth) || !lo_up {
        return Ok(false);
    }
    if !addresses(handle, eth.header.index)
        .await?
        .contains(&(want.ip, want.prefix))
    {
        return Ok(false);
    }
    Ok(default_gateway(handle).await? == Some(want.gateway))
}

async fn default_gateway(handle: &Handle) -> Result<Option<Ipv4Addr>> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.next().await {
        let r: RouteMessage = r.map_err(ctx("listing routes"))?;
        if r.header.address_family != AddressFamily::Inet || r.header.destination_prefix_length != 0
        {
            continue;
        }
        for attr in &r.attributes {
            if let RouteAttribute::Gateway(RouteAddress::Inet(gw)) = attr {
                return Ok(Some(*gw));
            }
        }
    }
    Ok(None)
}

async fn configure_pod_side(handle: &Handle, want: &PodLink) -> Result<()> {
    let lo = link_by_name(handle, "lo")
        .await?
        .ok_or_else(|| LinkError::Io(std::io::Error::other("no lo in the pod namespace")))?;
    set_up(handle, lo.header.index, "lo").await?;
    let eth = link_by_name(handle, POD_IF).await?.ok_or_else(|| {
        LinkError::Io(std::io::Error::other(
            "eth0 did not arrive in the pod namespace",
        ))
    })?;
    let index = eth.header.index;
    ensure_address(handle, index, want.ip, want.prefix).await?;
    set_up(handle, index, POD_IF).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(want.gateway)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(ctx(format!("default route via {}", want.gateway)))
}

/// Wires a pod: its namespace, the veth pair (host end on the bridge,
/// `eth0` inside), its address and default route. Anything half-made (by a
/// crash, or by hand) is torn down and made again. Returns whether
/// anything changed.
pub fn ensure_pod(netns: &NetnsDir, bridge: &str, want: &PodLink) -> Result<bool> {
    let created = netns.ensure(&want.netns)?;
    let inside = want.clone();
    let pod_ok = !created
        && netns.run_in(&want.netns, move || {
            with_netlink(|h| async move { pod_side_ready(&h, &inside).await })
        })??;
    let bridge_name = bridge.to_string();
    let host_if = want.host_if.clone();
    let (host_ok, bridge_index) = with_netlink(|h| async move {
        let bridge = link_by_name(&h, &bridge_name).await?.ok_or_else(|| {
            LinkError::Io(std::io::Error::other(format!("no bridge {bridge_name}")))
        })?;
        let ok = match link_by_name(&h, &host_if).await? {
            Some(l) => is_up(&l) && controller(&l) == Some(bridge.header.index),
            None => false,
        };
        Ok((ok, bridge.header.index))
    })?;
    if pod_ok && host_ok {
        return Ok(false);
    }
    // Start over: the host end takes its peer with it; a stray eth0 left
    // inside (its peer elsewhere) goes too.
    let host_if = want.host_if.clone();
    with_netlink(|h| async move { delete_link(&h, &host_if).await.map(|_| ()) })?;
    netns.run_in(&want.netns, || {
        with_netlink(|h| async move { delete_link(&h, POD_IF).await.map(|_| ()) })
    })??;
    let ns_file = std::fs::File::open(netns.path(&want.netns))?;
    let fd = ns_file.as_raw_fd();
    let host_if = want.host_if.clone();
    let netns_name = want.netns.clone();
    with_netlink(|h| async move {
        // A MAC derived from the pod: a remade pair keeps it, so the
        // neighbours' ARP caches stay right.
        let peer = LinkUnspec::new_with_name(POD_IF)
            .setns_by_fd(fd)
            .address(stable_mac(&netns_name).to_vec())
            .build();
        let veth = rtnetlink::LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_if.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link()
            .add(veth)
            .execute()
            .await
            .map_err(ctx(format!("creating veth {host_if}")))?;
        let link = link_by_name(&h, &host_if).await?.ok_or_else(|| {
            LinkError::Io(std::io::Error::other(format!("veth {host_if} vanished")))
        })?;
        h.link()
            .set(
                LinkUnspec::new_with_index(link.header.index)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(ctx(format!("attaching {host_if} to the bridge")))?;
        // Hairpin: a pod's Service traffic DNATed back to the pod itself is
        // bridged out of the port it came in by.
        h.link()
            .set_port(
                LinkBridgePort::new(link.header.index)
                    .append_info_data(InfoBridgePort::HairpinMode(true))
                    .build(),
            )
            .execute()
            .await
            .map_err(ctx(format!("hairpin mode on {host_if}")))
    })?;
    drop(ns_file);
    let inside = want.clone();
    netns.run_in(&want.netns, move || {
        with_netlink(|h| async move { configure_pod_side(&h, &inside).await })
    })??;
    Ok(true)
}

/// Unwires a pod: the veth pair and the namespace name.
pub fn remove_pod(netns: &NetnsDir, netns_name: &str, host_if: &str) -> Result<()> {
    let host_if = host_if.to_string();
    with_netlink(|h| async move { delete_link(&h, &host_if).await.map(|_| ()) })?;
    netns.remove(netns_name)?;
    Ok(())
}

/// The pod's address as seen from inside its namespace (for rebuilding
/// leases when the lease file was lost).
pub fn pod_address(netns: &NetnsDir, name: &str) -> Result<Option<(Ipv4Addr, u8)>> {
    netns.run_in(name, || {
        with_netlink(|h| async move {
            let Some(eth) = link_by_name(&h, POD_IF).await? else {
                return Ok(None);
            };
            Ok(addresses(&h, eth.header.index).await?.into_iter().next())
        })
    })?
}

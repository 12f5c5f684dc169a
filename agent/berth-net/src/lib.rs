//! Pod networking with the kernel's own primitives.
//!
//! - [`cidr`]: IPv4 prefixes.
//! - [`ipam`]: pod addresses, cluster IPs and node ports, leased and kept
//!   on disk across restarts and reboots.
//! - [`netns`]: named network namespaces made without forking.
//! - [`link`]: the bridge, veth pairs, addresses and routes over rtnetlink.
//! - [`dns`]: the cluster DNS responder.
//! - [`nft`]: Services as one nftables table replaced atomically.
//! - [`host`]: all of the above as one [`NetworkHost`] trait, done by the
//!   kernel ([`host::KernelHost`]) or in memory ([`fake::FakeHost`]), held
//!   to the same behaviour by the cases in [`contract`].

pub mod cidr;
pub mod contract;
pub mod dns;
pub mod fake;
pub mod host;
pub mod ipam;
pub mod link;
pub mod netns;
pub mod nft;
pub mod settings;

pub use cidr::Cidr;
pub use host::{HostError, KernelHost, NetworkHost, Resolver};
pub use settings::NetworkSettings;

/// A short stable hash of a text, for names and starting points.
pub fn short_hash(text: &str) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(text.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// The host end of a pod's veth: `bv` and 12 hex digits of the pod key's
/// hash (interface names are at most 15 bytes).
pub fn host_if_name(pod_key: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(pod_key.as_bytes());
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{HOST_IF_PREFIX}{hex}")
}

/// Every host-side veth Berth makes starts with this.
pub const HOST_IF_PREFIX: &str = "bv";

/// The kernel switches a node needs for pod traffic, in the calling
/// thread's network namespace: forwarding, and bridged IPv4 passing the
/// `ip` hooks so a Service reply from a pod on the same bridge is un-NATed
/// (the `br_netfilter` module; the image loads it at boot).
pub fn enable_forwarding() -> Result<(), String> {
    let set = |path: &str| std::fs::write(path, b"1").map_err(|e| format!("{path}: {e}"));
    set("/proc/sys/net/ipv4/ip_forward")?;
    let bridged = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !std::path::Path::new(bridged).exists() {
        return Err(format!(
            "{bridged} is missing: the br_netfilter module is not loaded, so a pod cannot reach a Service whose endpoint is on the same bridge"
        ));
    }
    set(bridged)?;
    size_conntrack()
}

/// The connection-tracking table a node needs, as kube-proxy sizes it: at
/// least 32768 entries per CPU and 131072 in all.
pub fn conntrack_target(cpus: usize) -> u64 {
    (32_768 * cpus as u64).max(131_072)
}

/// Raises the kernel's connection-tracking limit (and its hash table, to a
/// quarter of it) to [`conntrack_target`], never lowers it. The kernel
/// sizes it from memory (8192 entries in a 1 GiB guest), and every
/// Service connection and every network probe is an entry for as long as
/// TCP's TIME_WAIT (120 s): 50 pods probed twice a second fill 8192 in
/// 80 s, and then new connections are dropped (probes time out, liveness
/// kills follow). The limit is global: from a namespace other than the
/// node's it cannot be written, and a limit already high enough is left.
/// Before the module is loaded there is nothing to size.
pub fn size_conntrack() -> Result<(), String> {
    let max = "/proc/sys/net/netfilter/nf_conntrack_max";
    let buckets = "/sys/module/nf_conntrack/parameters/hashsize";
    if !std::path::Path::new(max).exists() {
        // Not loaded yet (the image loads it at boot; elsewhere the first
        // NAT rule will, with the kernel's own size).
        return Ok(());
    }
    let read = |path: &str| -> Result<u64, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        text.trim()
            .parse()
            .map_err(|e| format!("{path}: {text:?}: {e}"))
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = conntrack_target(cpus);
    if read(max)? < want {
        std::fs::write(max, want.to_string()).map_err(|e| format!("{max}: {e}"))?;
    }
    if std::path::Path::new(buckets).exists() && read(buckets)? < want / 4 {
        std::fs::write(buckets, (want / 4).to_string()).map_err(|e| format!("{buckets}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_conntrack_table_is_sized_as_kube_proxy_sizes_it() {
        assert_eq!(super::conntrack_target(1), 131_072);
        assert_eq!(super::conntrack_target(4), 131_072);
        assert_eq!(super::conntrack_target(8), 262_144);
    }
}

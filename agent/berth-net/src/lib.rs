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
    set(bridged)
}

//! Pod networking with the kernel's own primitives.
//!
//! - [`cidr`]: IPv4 prefixes.
//! - [`ipam`]: pod addresses, cluster IPs and node ports, leased and kept
//!   on disk across restarts and reboots.
//! - [`netns`]: named network namespaces made without forking.
//! - [`link`]: the bridge, veth pairs, addresses and routes over rtnetlink.

pub mod cidr;
pub mod ipam;
pub mod link;
pub mod netns;

pub use cidr::Cidr;

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

//! Address leases: pod IPs, Service cluster IPs and node ports, kept in one
//! file under `/var/lib/berth` so a pod keeps its address across agent
//! restarts and reboots.
//!
//! Unlike CNI's `host-local` plugin, which keeps one file per address and
//! leaks those whose DEL never came (a reboot, a crash), the lease book is
//! reconciled against the pods Git wants on every pass: a lease whose pod
//! is gone is released, whatever happened to the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Addresses handed out from one prefix, by owner key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub cidr: Cidr,
    /// Offsets below this are never leased (the network address, the
    /// gateway, the DNS address).
    pub first: u64,
    pub leases: BTreeMap<String, Ipv4Addr>,
    /// Where the next search starts: a released address is not handed out
    /// again until the pool wraps, so a stale peer does not reach a new pod.
    #[serde(default)]
    pub cursor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "the pool {cidr} has no free address: {used} of {usable} are leased; widen the prefix in the node config"
    )]
    Exhausted {
        cidr: Cidr,
        used: usize,
        usable: u64,
    },
    #[error("{ip} is outside {cidr}")]
    OutOfRange { ip: Ipv4Addr, cidr: Cidr },
    #[error("{ip} is already leased to {owner}")]
    Taken { ip: Ipv4Addr, owner: String },
}

impl Pool {
    pub fn new(cidr: Cidr, first: u64) -> Self {
        Self {
            cidr,
            first,
            leases: BTreeMap::new(),
            cursor: first,
        }
    }

    /// The last usable offset: the broadcast address is left out.
    fn last(&self) -> u64 {
        self.cidr.size().saturating_sub(2)
    }

    pub fn usable(&self) -> u64 {
        (self.last() + 1).saturating_sub(self.first)
    }

    pub fn get(&self, owner: &str) -> Option<Ipv4Addr> {
        self.leases.get(owner).copied()
    }

    /// The owner's lease, or a new one.
    pub fn lease(&mut self, owner: &str) -> Result<Ipv4Addr, LeaseError> {
        if let Some(ip) = self.get(owner) {
            return Ok(ip);
        }
        let used: BTreeSet<Ipv4Addr> = self.leases.values().copied().collect();
        let usable = self.usable();
        let start = self.cursor.clamp(self.first, self.last().max(self.first));
        for i in 0..usable {
            let offset = self.first + (start - self.first + i) % usable;
            let Some(ip) = self.cidr.nth(offset) else {
                continue;
            };
            if !used.contains(&ip) {
                self.leases.insert(owner.to_string(), ip);
                self.cursor = offset + 1;
                return Ok(ip);
            }
        }
        Err(LeaseError::Exhausted {
            cidr: self.cidr,
            used: self.leases.len(),
            usable,
        })
    }

    /// Leases a specific address (a Service's `clusterIP` from Git).
    pub fn lease_exact(&mut self, owner: &str, ip: Ipv4Addr) -> Result<(), LeaseError> {
        let offset = self
            .cidr
            .offset(ip)
            .filter(|o| (self.first..=self.last()).contains(o));
        if offset.is_none() {
            return Err(LeaseError::OutOfRange {
                ip,
                cidr: self.cidr,
            });
        }
        if let Some((other, _)) = self
            .leases
            .iter()
            .find(|(o, a)| **a == ip && o.as_str() != owner)
        {
            return Err(LeaseError::Taken {
                ip,
                owner: other.clone(),
            });
        }
        self.leases.insert(owner.to_string(), ip);
        Ok(())
    }

    pub fn release(&mut self, owner: &str) -> Option<Ipv4Addr> {
        self.leases.remove(owner)
    }

    /// Releases every lease whose owner is not in `live`; returns them.
    pub fn retain(&mut self, live: &BTreeSet<String>) -> Vec<(String, Ipv4Addr)> {
        let gone: Vec<(String, Ipv4Addr)> = self
            .leases
            .iter()
            .filter(|(o, _)| !live.contains(*o))
            .map(|(o, a)| (o.clone(), *a))
            .collect();
        for (o, _) in &gone {
            self.leases.remove(o);
        }
        gone
    }

    /// Keeps the leases when the prefix is unchanged; otherwise starts over
    /// (every pod is re-addressed on the new prefix).
    fn adopt(saved: Option<Pool>, cidr: Cidr, first: u64) -> Pool {
        match saved {
            Some(p) if p.cidr == cidr && p.first == first => p,
            _ => Pool::new(cidr, first),
        }
    }
}

/// Node ports leased to Service ports, by `namespace/name/port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPool {
    pub leases: BTreeMap<String, u16>,
}

impl PortPool {
    /// The owner's port in `range`, or a new one that is neither leased
    /// nor in `reserved` (ports other owners name explicitly).
    pub fn lease(
        &mut self,
        owner: &str,
        range: (u16, u16),
        reserved: &BTreeSet<u16>,
    ) -> Option<u16> {
        if let Some(p) = self
            .leases
            .get(owner)
            .filter(|p| (range.0..=range.1).contains(p) && !reserved.contains(p))
        {
            return Some(*p);
        }
        let mut used: BTreeSet<u16> = self
            .leases
            .iter()
            .filter(|(o, _)| o.as_str() != owner)
            .map(|(_, p)| *p)
            .collect();
        used.extend(reserved);
        // Start from a hash of the owner so ports do not shift when another
        // Service is added before this one.
        let span = u32::from(range.1 - range.0) + 1;
        let start = crate::short_hash(owner) % span;
        let port = (0..span)
            .map(|i| range.0 + ((start + i) % span) as u16)
            .find(|p| !used.contains(p))?;
        self.leases.insert(owner.to_string(), port);
        Some(port)
    }
}

/// The schema of the lease book (see [`berth_schema`]).
pub const LEASES_SCHEMA: u32 = 1;

/// Everything leased on this node, as saved on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseBook {
    pub pods: Pool,
    pub services: Pool,
    #[serde(default)]
    pub node_ports: PortPool,
}

/// Offsets reserved at the start of the pod prefix: the network address and
/// the node's bridge address (the gateway and the DNS responder).
pub const POD_RESERVED: u64 = 2;
/// The network address and the first address (where Kubernetes puts the
/// API server's Service; kept free so manifests that name it stay valid).
pub const SERVICE_RESERVED: u64 = 2;

impl LeaseBook {
    pub fn new(pod_cidr: Cidr, service_cidr: Cidr) -> Self {
        Self {
            pods: Pool::new(pod_cidr, POD_RESERVED),
            services: Pool::new(service_cidr, SERVICE_RESERVED),
            node_ports: PortPool::default(),
        }
    }

    /// Reads the book at `path`. A missing file is an empty book; a
    /// corrupt one is moved aside (and named in the error) so the node can
    /// go on, and the caller rebuilds what it can from the live pods.
    pub fn load(path: &Path, pod_cidr: Cidr, service_cidr: Cidr) -> (Self, Option<String>) {
        let fresh = Self::new(pod_cidr, service_cidr);
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (fresh, None),
            Err(e) => return (fresh, Some(format!("{}: {e}", path.display()))),
        };
        match berth_schema::decode::<LeaseBook>(&text, path, LEASES_SCHEMA, |_, _| Ok(())) {
            // Left as it is: a newer agent's leases are not this one's to move.
            Err(e @ berth_schema::SchemaError::Newer { .. }) => (fresh, Some(e.to_string())),
            Ok((saved, _)) => (
                Self {
                    pods: Pool::adopt(Some(saved.pods), pod_cidr, POD_RESERVED),
                    services: Pool::adopt(Some(saved.services), service_cidr, SERVICE_RESERVED),
                    node_ports: saved.node_ports,
                },
                None,
            ),
            Err(e) => {
                let aside = aside_path(path);
                let moved = std::fs::rename(path, &aside);
                let what = match moved {
                    Ok(()) => format!("moved to {}", aside.display()),
                    Err(m) => format!("could not move it aside: {m}"),
                };
                (
                    fresh,
                    Some(format!(
                        "{}: not a lease book ({e}); {what}; leases are rebuilt from the running pods",
                        path.display()
                    )),
                )
            }
        }
    }

    /// Writes the book atomically: a crash leaves the old or the new file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        berth_schema::save(path, self, LEASES_SCHEMA)
    }
}

fn aside_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".corrupt");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid")
    }

    #[test]
    fn leases_are_stable_and_released_addresses_are_not_reused_at_once() {
        let mut pool = Pool::new(cidr("10.88.0.0/29"), POD_RESERVED);
        // /29: offsets 2..=6 usable (0 network, 1 gateway, 7 broadcast).
        assert_eq!(pool.usable(), 5);
        let a = pool.lease("a").expect("free");
        assert_eq!(a, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(pool.lease("a").expect("same"), a);
        let b = pool.lease("b").expect("free");
        pool.release("a");
        let c = pool.lease("c").expect("free");
        assert_ne!(c, a, "a released address waits for the pool to wrap");
        assert!(c > b);
    }

    #[test]
    fn an_exhausted_pool_says_so_and_retain_frees_the_dead() {
        let mut pool = Pool::new(cidr("10.88.0.0/30"), POD_RESERVED);
        // /30: only offset 2.
        pool.lease("a").expect("free");
        let err = pool.lease("b").expect_err("full");
        assert_eq!(
            err.to_string(),
            "the pool 10.88.0.0/30 has no free address: 1 of 1 are leased; widen the prefix in the node config"
        );
        let live: BTreeSet<String> = ["b".to_string()].into();
        assert_eq!(
            pool.retain(&live),
            vec![("a".to_string(), Ipv4Addr::new(10, 88, 0, 2))]
        );
        assert_eq!(pool.lease("b").expect("freed"), Ipv4Addr::new(10, 88, 0, 2));
    }

    #[test]
    fn exact_leases_check_range_and_owner() {
        let mut pool = Pool::new(cidr("10.96.0.0/24"), SERVICE_RESERVED);
        pool.lease_exact("x", Ipv4Addr::new(10, 96, 0, 10))
            .expect("free");
        assert!(matches!(
            pool.lease_exact("y", Ipv4Addr::new(10, 96, 0, 10)),
            Err(LeaseError::Taken { .. })
        ));
        assert!(matches!(
            pool.lease_exact("y", Ipv4Addr::new(10, 97, 0, 10)),
            Err(LeaseError::OutOfRange { .. })
        ));
        assert!(matches!(
            pool.lease_exact("y", Ipv4Addr::new(10, 96, 0, 1)),
            Err(LeaseError::OutOfRange { .. })
        ));
        // A dynamic lease skips the taken address.
        let mut p2 = pool.clone();
        p2.cursor = 10;
        assert_eq!(p2.lease("z").expect("free"), Ipv4Addr::new(10, 96, 0, 11));
    }

    #[test]
    fn node_ports_are_unique_and_stable() {
        let mut ports = PortPool::default();
        let range = (30000, 30002);
        let none = BTreeSet::new();
        let a = ports.lease("a", range, &none).expect("free");
        let b = ports.lease("b", range, &none).expect("free");
        assert_eq!(ports.lease("a", range, &none), Some(a));
        assert_ne!(a, b);
        let left = (30000..=30002)
            .find(|p| *p != a && *p != b)
            .expect("one left");
        // A port someone names explicitly is not handed out.
        let reserved: BTreeSet<u16> = [left].into();
        assert_eq!(ports.lease("c", range, &reserved), None);
        assert_eq!(ports.lease("c", range, &none), Some(left));
        // A dynamic owner gives its port up when another names it.
        ports.leases.remove("c");
        let named: BTreeSet<u16> = [a].into();
        assert_eq!(ports.lease("a", range, &named), Some(left));
    }

    #[test]
    fn the_book_survives_a_round_trip_and_a_corrupt_file_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("berth-ipam-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("leases.json");
        let (mut book, err) = LeaseBook::load(&path, cidr("10.88.0.0/16"), cidr("10.96.0.0/12"));
        assert!(err.is_none());
        let ip = book.pods.lease("default_web").expect("free");
        book.save(&path).expect("saved");
        let (again, err) = LeaseBook::load(&path, cidr("10.88.0.0/16"), cidr("10.96.0.0/12"));
        assert!(err.is_none());
        assert_eq!(again.pods.get("default_web"), Some(ip));
        // A new pod prefix re-addresses every pod.
        let (moved, _) = LeaseBook::load(&path, cidr("10.89.0.0/16"), cidr("10.96.0.0/12"));
        assert!(moved.pods.leases.is_empty());
        std::fs::write(&path, b"{not json").expect("written");
        let (fresh, err) = LeaseBook::load(&path, cidr("10.88.0.0/16"), cidr("10.96.0.0/12"));
        assert!(fresh.pods.leases.is_empty());
        let err = err.expect("reported");
        assert!(err.contains("leases.json: not a lease book"), "{err}");
        assert!(dir.join("leases.json.corrupt").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The node's network settings, with Kubernetes' usual defaults.

use std::net::Ipv4Addr;

use crate::cidr::Cidr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Pod addresses; the first host address is the node's bridge (the pods'
    /// gateway and DNS server).
    pub pod_cidr: Cidr,
    /// Cluster IPs of Services.
    pub service_cidr: Cidr,
    pub cluster_domain: String,
    /// Inclusive.
    pub node_ports: (u16, u16),
}

pub const DEFAULT_POD_CIDR: &str = "10.88.0.0/16";
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NODE_PORTS: (u16, u16) = (30000, 32767);
/// The node's bridge.
pub const BRIDGE: &str = "berth0";

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            pod_cidr: Cidr::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or(FALLBACK),
            service_cidr: Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or(FALLBACK),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

const FALLBACK: Cidr = Cidr::ZERO;

/// A setting that was refused: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub field: &'static str,
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        field,
        message: message.into(),
    }
}

impl NetworkSettings {
    /// Parses and checks the settings given as text; `None` keeps the default.
    pub fn parse(
        pod_cidr: Option<&str>,
        service_cidr: Option<&str>,
        cluster_domain: Option<&str>,
        node_ports: Option<&str>,
    ) -> Result<Self, SettingError> {
        let mut s = Self::default();
        if let Some(t) = pod_cidr {
            s.pod_cidr = t
                .parse()
                .map_err(|e| refuse("network.podCIDR", format!("{e}")))?;
        }
        if let Some(t) = service_cidr {
            s.service_cidr = t
                .parse()
                .map_err(|e| refuse("network.serviceCIDR", format!("{e}")))?;
        }
        if s.pod_cidr.prefix() > 28 {
            return Err(refuse(
                "network.podCIDR",
                format!("{} holds too few pods: use a /28 or wider", s.pod_cidr),
            ));
        }
        if s.service_cidr.prefix() > 28 {
            return Err(refuse(
                "network.serviceCIDR",
                format!(
                    "{} holds too few Services: use a /28 or wider",
                    s.service_cidr
                ),
            ));
        }
        if s.pod_cidr.overlaps(&s.service_cidr) {
            return Err(refuse(
                "network.serviceCIDR",
                format!("{} overlaps the pod range {}", s.service_cidr, s.pod_cidr),
            ));
        }
        for (field, c) in [
            ("network.podCIDR", s.pod_cidr),
            ("network.serviceCIDR", s.service_cidr),
        ] {
            let special = ["127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8"];
            if let Some(bad) = special
                .iter()
                .filter_map(|t| t.parse::<Cidr>().ok())
                .find(|r| r.overlaps(&c))
            {
                return Err(refuse(
                    field,
                    format!("{c} overlaps the reserved range {bad}"),
                ));
            }
        }
        if let Some(d) = cluster_domain {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(refuse(
                    "network.clusterDomain",
                    format!("{d:?} is not a DNS domain such as cluster.local"),
                ));
            }
            s.cluster_domain = d.to_string();
        }
        if let Some(t) = node_ports {
            let range = t
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                })
                .filter(|(a, b)| *a >= 1024 && a <= b);
            s.node_ports = range.ok_or_else(|| {
                refuse(
                    "network.nodePortRange",
                    format!("{t:?} is not a port range such as 30000-32767 (from 1024 up)"),
                )
            })?;
        }
        Ok(s)
    }

    /// The node's address on the bridge: gateway and DNS server of the pods.
    pub fn gateway(&self) -> Ipv4Addr {
        self.pod_cidr.nth(1).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Checks the ranges against addresses the node already has on other
    /// links: a pod range over the node's own network would cut it off.
    pub fn clash_with(&self, node_addresses: &[(String, Ipv4Addr, u8)]) -> Option<SettingError> {
        node_addresses.iter().find_map(|(link, ip, prefix)| {
            let net = Cidr::new(*ip, *prefix)?;
            for (field, c) in [
                ("network.podCIDR", self.pod_cidr),
                ("network.serviceCIDR", self.service_cidr),
            ] {
                if net.overlaps(&c) {
                    return Some(refuse(
                        field,
                        format!("{c} overlaps {ip}/{prefix} on {link}, the node's own network"),
                    ));
                }
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals_name_the_field() {
        let d = NetworkSettings::parse(None, None, None, None).expect("defaults");
        assert_eq!(d.pod_cidr.to_string(), DEFAULT_POD_CIDR);
        assert_eq!(d.service_cidr.to_string(), DEFAULT_SERVICE_CIDR);
        assert_eq!(d.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        let err = |r: Result<NetworkSettings, SettingError>| r.expect_err("refused");
        let e = err(NetworkSettings::parse(
            Some("10.96.0.0/16"),
            None,
            None,
            None,
        ));
        assert_eq!(e.field, "network.serviceCIDR");
        assert_eq!(
            e.message,
            "10.96.0.0/12 overlaps the pod range 10.96.0.0/16"
        );
        let e = err(NetworkSettings::parse(
            Some("10.88.0.1/16"),
            None,
            None,
            None,
        ));
        assert_eq!(e.field, "network.podCIDR");
        assert!(e.message.contains("host bits"), "{}", e.message);
        let e = err(NetworkSettings::parse(
            Some("10.88.0.0/30"),
            None,
            None,
            None,
        ));
        assert!(e.message.contains("too few pods"));
        let e = err(NetworkSettings::parse(
            Some("127.0.0.0/16"),
            None,
            None,
            None,
        ));
        assert!(e.message.contains("reserved range 127.0.0.0/8"));
        let e = err(NetworkSettings::parse(
            None,
            None,
            Some("Cluster.Local"),
            None,
        ));
        assert_eq!(e.field, "network.clusterDomain");
        for bad in ["30000", "32767-30000", "80-90", "x-y"] {
            let e = err(NetworkSettings::parse(None, None, None, Some(bad)));
            assert_eq!(e.field, "network.nodePortRange", "{bad}");
        }
        let ok = NetworkSettings::parse(
            Some("172.20.0.0/24"),
            Some("172.21.0.0/24"),
            Some("example.internal"),
            Some("31000-31010"),
        )
        .expect("valid");
        assert_eq!(ok.node_ports, (31000, 31010));
    }

    #[test]
    fn a_pod_range_over_the_nodes_own_network_is_named() {
        let s = NetworkSettings::default();
        let clash = s
            .clash_with(&[("enp0s2".into(), Ipv4Addr::new(10, 88, 3, 15), 24)])
            .expect("clash");
        assert_eq!(clash.field, "network.podCIDR");
        assert_eq!(
            clash.message,
            "10.88.0.0/16 overlaps 10.88.3.15/24 on enp0s2, the node's own network"
        );
        assert!(
            s.clash_with(&[("enp0s2".into(), Ipv4Addr::new(10, 0, 2, 15), 24)])
                .is_none()
        );
    }
}

//! IPv4 prefixes: parsing, containment, overlap and host addresses.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 prefix such as `10.88.0.0/16`, always stored with the host bits
/// cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 prefix like 10.88.0.0/16")]
    Syntax(String),
    #[error("{text:?} has host bits set; the prefix is {network}/{prefix}")]
    HostBits {
        text: String,
        network: Ipv4Addr,
        prefix: u8,
    },
}

impl Cidr {
    /// `0.0.0.0/0`.
    pub const ZERO: Cidr = Cidr {
        network: Ipv4Addr::UNSPECIFIED,
        prefix: 0,
    };

    pub fn new(address: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            network: Ipv4Addr::from(u32::from(address) & mask(prefix)),
            prefix,
        })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Every address of the prefix, network and broadcast included.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The address `n` places after the network address, if it is inside.
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + n as u32))
    }

    /// Offset of `ip` from the network address.
    pub fn offset(&self, ip: Ipv4Addr) -> Option<u64> {
        self.contains(ip)
            .then(|| u64::from(u32::from(ip) - u32::from(self.network)))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(text.to_string());
        let (addr, prefix) = text.split_once('/').ok_or_else(syntax)?;
        let address: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        let cidr = Cidr::new(address, prefix).ok_or_else(syntax)?;
        if cidr.network != address {
            return Err(CidrError::HostBits {
                text: text.to_string(),
                network: cidr.network,
                prefix,
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_what_is_not_a_clean_prefix() {
        let c: Cidr = "10.88.0.0/16".parse().expect("valid");
        assert_eq!(c.size(), 65536);
        assert!(c.contains(Ipv4Addr::new(10, 88, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 1)));
        assert_eq!(c.nth(2), Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(c.nth(65536), None);
        assert_eq!(c.offset(Ipv4Addr::new(10, 88, 1, 0)), Some(256));
        for bad in [
            "10.88.0.0",
            "10.88.0.0/33",
            "10.88.0/16",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "10.88.0.1/16".parse::<Cidr>(),
            Err(CidrError::HostBits {
                text: "10.88.0.1/16".into(),
                network: Ipv4Addr::new(10, 88, 0, 0),
                prefix: 16
            })
        );
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn overlap_is_symmetric_and_exact_at_the_edges() {
        let a: Cidr = "10.96.0.0/12".parse().expect("valid");
        let b: Cidr = "10.100.0.0/16".parse().expect("valid");
        let c: Cidr = "10.112.0.0/16".parse().expect("valid");
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }
}

//! Berth's own types for objects, converted from Kubernetes' wire types
//! once, when an object is loaded and validated. They hold what Berth acts
//! on and nothing else, compactly: a Kubernetes `Service` is 824 bytes
//! before its data and each of its maps allocates a node of about 540
//! bytes even for one entry; these are a fraction of that, and later
//! stages never see the wire types.
//!
//! Converted so far: Services, ConfigMaps and Secrets. Pods and Deployments
//! still reach the planner as Kubernetes types.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Key-value pairs sorted by key, looked up by binary search: a map that
/// costs its entries and no more.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entries<V>(Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> Entries<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> From<BTreeMap<String, V>> for Entries<V> {
    fn from(map: BTreeMap<String, V>) -> Self {
        // A BTreeMap iterates in key order: already sorted, no duplicates.
        let mut v: Vec<(String, V)> = map.into_iter().collect();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<V> FromIterator<(String, V)> for Entries<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

/// A ConfigMap's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMapData {
    pub data: Entries<String>,
    /// `binaryData`, decoded.
    pub binary_data: Entries<Vec<u8>>,
}

impl From<ConfigMap> for ConfigMapData {
    fn from(c: ConfigMap) -> Self {
        Self {
            data: c.data.unwrap_or_default().into(),
            binary_data: c
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        }
    }
}

/// A Secret's type and data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    /// `type`, as written (`None`: `Opaque`).
    pub type_: Option<String>,
    /// `data`, decoded from base64.
    pub data: Entries<Vec<u8>>,
    /// `stringData`: written over `data` where both have a key, as the
    /// API server does.
    pub string_data: Entries<String>,
}

impl From<Secret> for SecretData {
    fn from(s: Secret) -> Self {
        Self {
            type_: s.type_,
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            string_data: s.string_data.unwrap_or_default().into(),
        }
    }
}

/// A Service's spec, as far as Berth programs Services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `type` as written (`None`: `ClusterIP`).
    pub type_: Option<String>,
    /// `None` when the Service has no selector (its endpoints are not
    /// Berth's to find).
    pub selector: Option<Entries<String>>,
    pub ports: Vec<ServicePort>,
    /// `clusterIP` as written: an address, `None` (headless) or empty.
    pub cluster_ip: Option<String>,
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    /// As written (`None`: `TCP`).
    pub protocol: Option<String>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub node_port: Option<i32>,
}

impl From<Service> for ServiceSpec {
    fn from(s: Service) -> Self {
        let Some(spec) = s.spec else {
            return Self::default();
        };
        Self {
            type_: spec.type_,
            selector: spec.selector.map(Entries::from),
            ports: spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    protocol: p.protocol,
                    port: p.port,
                    target_port: p.target_port,
                    node_port: p.node_port,
                })
                .collect(),
            cluster_ip: spec.cluster_ip,
            session_affinity: spec.session_affinity,
            affinity_timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_find_every_key_and_iterate_in_order() {
        let e: Entries<u8> = [
            ("b".to_string(), 2),
            ("a".to_string(), 1),
            ("c".to_string(), 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(e.get("a"), Some(&1));
        assert_eq!(e.get("c"), Some(&3));
        assert_eq!(e.get("d"), None);
        assert_eq!(
            e.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(e.len(), 3);
        assert!(Entries::<u8>::default().is_empty());
    }
}

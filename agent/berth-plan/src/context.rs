//! What resolving a pod looks things up in: the catalog's ConfigMaps and
//! Secrets by namespace and name, the node, and the image configs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_manifest::model::{ConfigMapData as ConfigMap, SecretData as Secret};
use berth_manifest::{Catalog, Object};

use crate::images::ImageCatalog;
use crate::node::NodeInfo;
use crate::units::{Properties, Property};

/// At most this many distinct shared property sets are kept; a repository
/// with more kinds of containers than that shares the first ones only.
const SHARED_SETS: usize = 64;

/// Inputs every pod resolves against.
#[derive(Debug)]
pub struct Context<'a> {
    pub node: &'a NodeInfo,
    pub images: &'a ImageCatalog,
    pub(crate) config_maps: HashMap<(&'a str, &'a str), &'a ConfigMap>,
    pub(crate) secrets: HashMap<(&'a str, &'a str), &'a Secret>,
    /// Property sets many units have in common, each held once.
    shared: Mutex<Vec<Arc<[Property]>>>,
}

impl<'a> Context<'a> {
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&'a ConfigMap> {
        self.config_maps.get(&(namespace, name)).copied()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<&'a Secret> {
        self.secrets.get(&(namespace, name)).copied()
    }

    /// `props` as a shared set: the one already held when an earlier unit
    /// had the same.
    pub(crate) fn shared_properties(&self, props: Properties) -> Arc<[Property]> {
        // A panic elsewhere cannot leave the list half-changed: use it as is.
        let mut sets = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let same =
            |set: &Arc<[Property]>| set.iter().map(|(k, v)| (k.as_ref(), v)).eq(props.iter());
        if let Some(set) = sets.iter().find(|s| same(s)) {
            return Arc::clone(set);
        }
        let set = props.share();
        if sets.len() < SHARED_SETS {
            sets.push(Arc::clone(&set));
        }
        set
    }

    pub fn new(catalog: &'a Catalog, node: &'a NodeInfo, images: &'a ImageCatalog) -> Self {
        let mut config_maps = HashMap::new();
        let mut secrets = HashMap::new();
        for o in &catalog.objects {
            let ns = o.id.namespace.as_deref().unwrap_or("");
            match &o.object {
                Object::ConfigMap(c) => {
                    config_maps.insert((ns, o.id.name.as_str()), c.as_ref());
                }
                Object::Secret(s) => {
                    secrets.insert((ns, o.id.name.as_str()), s.as_ref());
                }
                _ => {}
            }
        }
        Self {
            node,
            images,
            config_maps,
            secrets,
            shared: Mutex::default(),
        }
    }
}

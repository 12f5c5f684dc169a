//! What resolving a pod looks things up in: the catalog's ConfigMaps and
//! Secrets by namespace and name, the node, and the image configs.

use std::collections::HashMap;

use berth_manifest::model::{ConfigMapData as ConfigMap, SecretData as Secret};
use berth_manifest::{Catalog, Object};

use crate::images::ImageCatalog;
use crate::node::NodeInfo;

/// Inputs every pod resolves against.
#[derive(Debug)]
pub struct Context<'a> {
    pub node: &'a NodeInfo,
    pub images: &'a ImageCatalog,
    pub(crate) config_maps: HashMap<(&'a str, &'a str), &'a ConfigMap>,
    pub(crate) secrets: HashMap<(&'a str, &'a str), &'a Secret>,
}

impl<'a> Context<'a> {
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&'a ConfigMap> {
        self.config_maps.get(&(namespace, name)).copied()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<&'a Secret> {
        self.secrets.get(&(namespace, name)).copied()
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
        }
    }
}

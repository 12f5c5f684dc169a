//! Which objects this node runs: each Pod, and each replica of a
//! Deployment, placed by `nodeName`, `nodeSelector` and required node
//! affinity against the node's labels.

use std::collections::BTreeMap;

use berth_manifest::k8s_openapi::api::core::v1::NodeSelectorRequirement;
use berth_manifest::model::{Meta, PodSpec};
use berth_manifest::{Catalog, LoadedObject, Object, ObjectRef};
use serde::Serialize;

use crate::node::NodeInfo;
use crate::units::PodId;

/// One pod to run: a Pod object, or one replica of a Deployment.
#[derive(Debug, Clone)]
pub struct PodInstance<'a> {
    pub id: PodId,
    pub metadata: &'a Meta,
    pub spec: &'a PodSpec,
    /// The object the pod comes from (the Pod itself or its Deployment).
    pub source: &'a LoadedObject,
    /// Set for Deployment replicas.
    pub owner: Option<ObjectRef>,
    /// Where the pod spec sits inside its source object.
    pub spec_path: &'static str,
}

/// An object this node does not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotHere {
    pub object: ObjectRef,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub pods: Vec<PodInstance<'a>>,
    pub elsewhere: Vec<NotHere>,
}

/// Every pod of the catalog, whichever node it belongs to (for `validate`).
pub fn all_pods(catalog: &Catalog) -> Vec<PodInstance<'_>> {
    let mut pods = Vec::new();
    for object in &catalog.objects {
        pods.extend(instances(object, catalog));
    }
    pods
}

/// The replica of Deployment `object` named `name`, whatever its template
/// hash: an old pod a rollout keeps, as the revision that made it has it.
pub fn replica_named<'a>(object: &'a LoadedObject, name: &str) -> Option<PodInstance<'a>> {
    let Object::Deployment(d) = &object.object else {
        return None;
    };
    let spec = d.spec.as_ref()?;
    let pod_spec = spec.template.spec.as_ref()?;
    Some(PodInstance {
        id: PodId {
            namespace: object.id.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        },
        metadata: spec.template.metadata.as_ref().unwrap_or(&d.metadata),
        spec: pod_spec,
        source: object,
        owner: Some(object.id.clone()),
        spec_path: "spec.template.spec",
    })
}

fn instances<'a>(object: &'a LoadedObject, catalog: &Catalog) -> Vec<PodInstance<'a>> {
    match &object.object {
        Object::Pod(pod) => match &pod.spec {
            Some(spec) => vec![PodInstance {
                id: PodId {
                    namespace: object.id.namespace.clone().unwrap_or_default(),
                    name: object.id.name.clone(),
                },
                metadata: &pod.metadata,
                spec,
                source: object,
                owner: None,
                spec_path: "spec",
            }],
            None => Vec::new(),
        },
        Object::Deployment(d) => {
            let Some(spec) = &d.spec else {
                return Vec::new();
            };
            let Some(pod_spec) = &spec.template.spec else {
                return Vec::new();
            };
            let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
            let metadata = spec.template.metadata.as_ref().unwrap_or(&d.metadata);
            // `<name>-<template hash>-<index>`: a changed template makes
            // pods under new names, which run beside the old ones while the
            // rollout replaces them (see `crate::rollout`).
            let namespace = object.id.namespace.as_deref().unwrap_or("");
            let hash = crate::rollout::template_hash(spec, namespace, catalog);
            (0..replicas)
                .map(|i| PodInstance {
                    id: PodId {
                        namespace: object.id.namespace.clone().unwrap_or_default(),
                        name: crate::rollout::replica_name(&object.id.name, &hash, i as u32),
                    },
                    metadata,
                    spec: pod_spec,
                    source: object,
                    owner: Some(object.id.clone()),
                    spec_path: "spec.template.spec",
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Selects the pods that run on `node`: by namespace, `spec.nodeName`,
/// `nodeSelector` and required node affinity.
pub fn select<'a>(catalog: &'a Catalog, node: &NodeInfo) -> Selection<'a> {
    let mut selection = Selection::default();
    for object in &catalog.objects {
        let Some(spec) = pod_spec_of(object) else {
            continue;
        };
        match placement(object, spec, node) {
            Ok(()) => selection.pods.extend(instances(object, catalog)),
            Err(reason) => selection.elsewhere.push(NotHere {
                object: object.id.clone(),
                reason,
            }),
        }
    }
    selection
}

fn pod_spec_of(object: &LoadedObject) -> Option<&PodSpec> {
    match &object.object {
        Object::Pod(p) => p.spec.as_ref(),
        Object::Deployment(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        _ => None,
    }
}

fn placement(object: &LoadedObject, spec: &PodSpec, node: &NodeInfo) -> Result<(), String> {
    if let Some(ns) = &object.id.namespace
        && !node.namespaces.is_empty()
        && !node.namespaces.contains(ns)
    {
        return Err(format!("namespace {ns} is not one this node runs"));
    }
    if let Some(wanted) = &spec.node_name
        && wanted != &node.name
    {
        return Err(format!("spec.nodeName is {wanted}"));
    }
    for (key, value) in spec.node_selector.iter().flatten() {
        if node.labels.get(key) != Some(value) {
            return Err(format!(
                "nodeSelector {key}={value} does not match this node's labels"
            ));
        }
    }
    if let Some(required) = &spec.required_node_affinity {
        let any_term = required.node_selector_terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|r| requirement_matches(r, &node.labels))
        });
        if !any_term {
            return Err("no required node affinity term matches this node's labels".into());
        }
    }
    Ok(())
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    let present = labels.get(&r.key);
    let as_int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => present.is_some_and(|v| values.contains(v)),
        "NotIn" => present.is_none_or(|v| !values.contains(v)),
        "Exists" => present.is_some(),
        "DoesNotExist" => present.is_none(),
        "Gt" => {
            matches!((present.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((present.and_then(|v| as_int(v)), values.first().and_then(|v| as_int(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

//! Which known Kubernetes fields Berth acts on.
//!
//! Typos are caught earlier (the typed decode rejects unknown fields); what
//! reaches this walk is a real Kubernetes field. Every present field outside
//! the supported set is reported by name, so nothing is silently dropped.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::diag::{FieldIssue, FieldPath, PathSegment};
use crate::objects::BuiltinKind;

/// Fields a Kubernetes API server sets; in Git they are leftovers of
/// `kubectl get -o yaml`.
const SERVER_SET_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

const METADATA: &[&str] = &["name", "namespace", "labels.*", "annotations.*"];

/// Container fields, relative to one container.
const CONTAINER: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "workingDir",
    "env[].name",
    "env[].value",
    "env[].valueFrom.configMapKeyRef",
    "env[].valueFrom.secretKeyRef",
    "env[].valueFrom.fieldRef",
    "env[].valueFrom.resourceFieldRef",
    "envFrom[].prefix",
    "envFrom[].configMapRef",
    "envFrom[].secretRef",
    "resources.requests.cpu",
    "resources.requests.memory",
    "resources.limits.cpu",
    "resources.limits.memory",
    "resources.limits.ephemeral-storage",
    "resizePolicy",
    "ports",
    "securityContext.runAsUser",
    "securityContext.runAsGroup",
    "securityContext.runAsNonRoot",
    "securityContext.privileged",
    "securityContext.allowPrivilegeEscalation",
    "securityContext.readOnlyRootFilesystem",
    "securityContext.capabilities.add",
    "securityContext.capabilities.drop",
    "securityContext.seccompProfile.type",
    "volumeMounts[].name",
    "volumeMounts[].mountPath",
    "volumeMounts[].readOnly",
    "volumeMounts[].subPath",
    // Checked and defaulted by `probe`.
    "startupProbe",
    "livenessProbe",
    "readinessProbe",
    "lifecycle.postStart",
    "lifecycle.preStop",
];

/// Pod spec fields, relative to the pod spec.
const POD_SPEC: &[&str] = &[
    "restartPolicy",
    "nodeName",
    "nodeSelector.*",
    "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
    // No node has taints, so tolerations cannot change where a pod runs.
    "tolerations",
    "securityContext.runAsUser",
    "securityContext.runAsGroup",
    "securityContext.runAsNonRoot",
    "securityContext.seccompProfile.type",
    "imagePullSecrets[].name",
    "terminationGracePeriodSeconds",
    "serviceAccountName",
    "serviceAccount",
    // There is no API server, hence no token to mount: false and true mean the same.
    "automountServiceAccountToken",
    "enableServiceLinks",
    "hostNetwork",
    // Each volume's source is checked by `volumes::pod_volumes`, which
    // refuses the types a node cannot provide.
    "volumes",
];

/// Service spec fields the node programs. Single-stack IPv4 on one node:
/// the IP family fields and the traffic policies (every endpoint is local)
/// change nothing, so they are accepted as written.
const SERVICE_SPEC: &[&str] = &[
    "type",
    "selector.*",
    "ports[].name",
    "ports[].protocol",
    "ports[].port",
    "ports[].targetPort",
    "ports[].nodePort",
    "publishNotReadyAddresses",
    "clusterIP",
    "clusterIPs",
    "sessionAffinity",
    "sessionAffinityConfig.clientIP.timeoutSeconds",
    "ipFamilies",
    "ipFamilyPolicy",
    "externalTrafficPolicy",
    "internalTrafficPolicy",
];

/// PersistentVolume spec fields: local volumes on this node. Other volume
/// sources are refused by `validate::persistent_volume`.
const PV_SPEC: &[&str] = &[
    "capacity.storage",
    "accessModes",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "local.path",
    "hostPath.path",
    "hostPath.type",
    "claimRef.namespace",
    "claimRef.name",
    "volumeMode",
    // Local volumes name their node; on one node it can only be this one.
    "nodeAffinity",
];

const PVC_SPEC: &[&str] = &[
    "accessModes",
    "resources.requests.storage",
    "storageClassName",
    "volumeName",
    "volumeMode",
];

/// A tree of supported paths. A leaf supports everything below it.
#[derive(Debug, Default)]
struct Tree {
    children: BTreeMap<String, Tree>,
    leaf: bool,
}

impl Tree {
    fn insert(&mut self, prefix: &str, pattern: &str) {
        let full = if prefix.is_empty() {
            pattern.to_string()
        } else {
            format!("{prefix}.{pattern}")
        };
        let mut node = self;
        for part in full.split('.') {
            let (key, arrays) = match part.find("[]") {
                Some(i) => (&part[..i], part[i..].matches("[]").count()),
                None => (part, 0),
            };
            node = node.children.entry(key.to_string()).or_default();
            for _ in 0..arrays {
                node = node.children.entry("[]".to_string()).or_default();
            }
        }
        node.leaf = true;
    }
}

fn pod_spec_tree(tree: &mut Tree, prefix: &str) {
    for p in POD_SPEC {
        tree.insert(prefix, p);
    }
    for list in ["containers[]", "initContainers[]"] {
        for c in CONTAINER {
            tree.insert(prefix, &format!("{list}.{c}"));
        }
    }
}

fn tree_for(kind: BuiltinKind) -> Tree {
    let mut tree = Tree::default();
    for key in ["apiVersion", "kind"] {
        tree.insert("", key);
    }
    for m in METADATA {
        tree.insert("metadata", m);
    }
    match kind {
        BuiltinKind::Pod => pod_spec_tree(&mut tree, "spec"),
        BuiltinKind::Deployment => {
            for p in [
                "replicas",
                "selector",
                "revisionHistoryLimit",
                "strategy.type",
                "strategy.rollingUpdate.maxSurge",
                "strategy.rollingUpdate.maxUnavailable",
                "minReadySeconds",
                "progressDeadlineSeconds",
                "paused",
            ] {
                tree.insert("spec", p);
            }
            for m in ["labels.*", "annotations.*"] {
                tree.insert("spec.template.metadata", m);
            }
            pod_spec_tree(&mut tree, "spec.template.spec");
        }
        BuiltinKind::ConfigMap => {
            for p in ["data", "binaryData", "immutable"] {
                tree.insert("", p);
            }
        }
        BuiltinKind::Secret => {
            for p in ["data", "stringData", "type", "immutable"] {
                tree.insert("", p);
            }
        }
        BuiltinKind::Namespace => {}
        BuiltinKind::Service => {
            for p in SERVICE_SPEC {
                tree.insert("spec", p);
            }
        }
        BuiltinKind::PersistentVolume => {
            for p in PV_SPEC {
                tree.insert("spec", p);
            }
        }
        BuiltinKind::PersistentVolumeClaim => {
            for p in PVC_SPEC {
                tree.insert("spec", p);
            }
        }
        BuiltinKind::StorageClass => {
            for p in [
                "provisioner",
                "parameters",
                "reclaimPolicy",
                "volumeBindingMode",
                "allowVolumeExpansion",
                // One node: every topology is this node's.
                "allowedTopologies",
            ] {
                tree.insert("", p);
            }
        }
        BuiltinKind::CustomResourceDefinition => tree.insert("", "spec"),
    }
    tree
}

/// Reports every present field of `value` that Berth does not act on.
pub fn unsupported_fields(kind: BuiltinKind, value: &serde_json::Value) -> Vec<FieldIssue> {
    static TREES: OnceLock<Vec<Tree>> = OnceLock::new();
    let trees = TREES.get_or_init(|| BuiltinKind::ALL.iter().map(|k| tree_for(*k)).collect());
    let index = BuiltinKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0);
    let mut issues = Vec::new();
    walk(&trees[index], value, &mut Vec::new(), &mut issues);
    issues
}

/// A step of the path being walked, borrowed from the document.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `path` is where `value` sits; it is extended and restored in place, and
/// turned into a [`FieldPath`] only for a field that is reported.
fn walk<'a>(
    tree: &Tree,
    value: &'a serde_json::Value,
    path: &mut Vec<Step<'a>>,
    issues: &mut Vec<FieldIssue>,
) {
    if tree.leaf {
        return;
    }
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                if child.is_null() {
                    continue;
                }
                path.push(Step::Key(key));
                match tree
                    .children
                    .get(key.as_str())
                    .or_else(|| tree.children.get("*"))
                {
                    Some(sub) => walk(sub, child, path, issues),
                    None => issues.push(unsupported(&field_path(path))),
                }
                path.pop();
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(sub) = tree.children.get("[]") {
                for (i, item) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    walk(sub, item, path, issues);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn field_path(steps: &[Step<'_>]) -> FieldPath {
    FieldPath(
        steps
            .iter()
            .map(|s| match s {
                Step::Key(k) => PathSegment::Key((*k).to_string()),
                Step::Index(i) => PathSegment::Index(*i),
            })
            .collect(),
    )
}

fn unsupported(path: &FieldPath) -> FieldIssue {
    let text = path.to_string();
    let message = if text == "status" {
        "status is observed on the node and written to the status branch, never read from Git; this field is ignored".to_string()
    } else if let Some(field) = text
        .strip_prefix("metadata.")
        .filter(|f| SERVER_SET_METADATA.contains(f))
    {
        format!("{field} is set by a Kubernetes API server; Berth ignores it")
    } else {
        "Berth does not support this Kubernetes field yet; it is ignored".to_string()
    };
    FieldIssue::warning(path.clone(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_pod_fields_pass_and_others_are_named() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "labels": {"x": "y"}, "uid": "123", "creationTimestamp": null},
            "spec": {
                "containers": [{
                    "name": "c", "image": "busybox",
                    "resources": {"limits": {"cpu": "1", "ephemeral-storage": "1Gi"}, "requests": {"ephemeral-storage": "1Gi"}},
                    "livenessProbe": {"exec": {"command": ["true"]}}
                }],
                "hostNetwork": true,
                "dnsPolicy": "None"
            },
            "status": {"phase": "Running"}
        });
        let found: Vec<String> = unsupported_fields(BuiltinKind::Pod, &pod)
            .iter()
            .map(|i| i.path.to_string())
            .collect();
        assert_eq!(
            found,
            [
                "metadata.uid",
                "spec.containers[0].resources.requests.ephemeral-storage",
                "spec.dnsPolicy",
                "status"
            ]
        );
    }

    #[test]
    fn service_fields_the_node_does_not_program_are_named() {
        let svc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {
                "type": "NodePort", "selector": {"app": "web"}, "clusterIP": "10.96.0.10",
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "appProtocol": "http"}],
                "externalIPs": ["192.0.2.1"]
            }
        });
        let found: Vec<String> = unsupported_fields(BuiltinKind::Service, &svc)
            .iter()
            .map(|i| i.path.to_string())
            .collect();
        assert_eq!(found, ["spec.externalIPs", "spec.ports[0].appProtocol"]);
    }
}

//! Per-object checks that Kubernetes' API server would make, plus the ones
//! Berth needs because names become unit names and paths.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, NodeSelectorTerm, PersistentVolume, PersistentVolumeClaim, PodSpec,
    Secret, Service,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::diag::{FieldIssue, FieldPath};
use crate::model::IntOrPercent;
use crate::names;
use crate::quantity::Quantity;

pub type Issues = Vec<FieldIssue>;

fn err(issues: &mut Issues, path: FieldPath, message: impl Into<String>) {
    issues.push(FieldIssue::error(path, message));
}

pub use crate::diag::one_of;

/// Labels and annotations; the name is checked by the caller, whose rule depends on the kind.
pub fn metadata(meta: &ObjectMeta, issues: &mut Issues) {
    let path = FieldPath::root().key("metadata");
    if meta.generate_name.is_some() {
        err(
            issues,
            path.key("generateName"),
            "Berth needs stable names: set metadata.name instead of generateName",
        );
    }
    if let Some(labels) = &meta.labels {
        labels_map(labels, &path.key("labels"), issues);
    }
    if let Some(annotations) = &meta.annotations {
        for key in annotations.keys() {
            if let Err(e) = names::qualified_name(key) {
                err(issues, path.key("annotations").key(key.clone()), e);
            }
        }
    }
}

fn labels_map(labels: &BTreeMap<String, String>, path: &FieldPath, issues: &mut Issues) {
    for (key, value) in labels {
        let p = path.key(key.clone());
        if let Err(e) = names::qualified_name(key) {
            err(issues, p.clone(), e);
        }
        if let Err(e) = names::label_value(value) {
            err(issues, p, e);
        }
    }
}

pub fn quantity(text: &str, path: &FieldPath, issues: &mut Issues) -> Option<Quantity> {
    match Quantity::parse(text) {
        Ok(q) => Some(q),
        Err(e) => {
            err(issues, path.clone(), e.to_string());
            None
        }
    }
}

pub fn pod_spec(spec: &PodSpec, path: &FieldPath, issues: &mut Issues) {
    crate::volumes::pod_volumes(spec, path, issues);
    if spec.containers.is_empty() {
        err(
            issues,
            path.key("containers"),
            "a pod needs at least one container",
        );
    }
    let mut seen = BTreeSet::new();
    let lists = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", &spec.containers),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let cpath = path.key(list).index(i);
            if !seen.insert(c.name.clone()) {
                err(
                    issues,
                    cpath.key("name"),
                    format!(
                        "duplicate container name {:?}: names are unique across containers and initContainers",
                        c.name
                    ),
                );
            }
            container(c, &cpath, issues);
            let plain_init =
                list == "initContainers" && c.restart_policy.as_deref() != Some("Always");
            crate::probe::validate(c, &cpath, plain_init, issues);
            if list == "initContainers" && c.restart_policy.is_some() {
                issues.push(FieldIssue::warning(
                    cpath.key("restartPolicy"),
                    "sidecar init containers (restartPolicy on an init container) are not supported yet; it runs as an ordinary init container",
                ));
            }
        }
    }
    if let Some(policy) = &spec.restart_policy {
        one_of(
            policy,
            &["Always", "OnFailure", "Never"],
            path.key("restartPolicy"),
            issues,
        );
    }
    if let Some(node) = &spec.node_name
        && let Err(e) = names::dns1123_subdomain(node)
    {
        err(issues, path.key("nodeName"), e);
    }
    if let Some(selector) = &spec.node_selector {
        labels_map(selector, &path.key("nodeSelector"), issues);
    }
    if let Some(grace) = spec.termination_grace_period_seconds
        && grace < 0
    {
        err(
            issues,
            path.key("terminationGracePeriodSeconds"),
            "must be greater than or equal to 0",
        );
    }
    if let Some(sc) = &spec.security_context {
        ids(
            sc.run_as_user,
            sc.run_as_group,
            &path.key("securityContext"),
            issues,
        );
    }
    if let Some(required) = required_node_affinity(spec) {
        let tpath = path
            .key("affinity")
            .key("nodeAffinity")
            .key("requiredDuringSchedulingIgnoredDuringExecution")
            .key("nodeSelectorTerms");
        if required.node_selector_terms.is_empty() {
            err(
                issues,
                tpath.clone(),
                "must have at least one node selector term",
            );
        }
        for (i, term) in required.node_selector_terms.iter().enumerate() {
            node_selector_term(term, &tpath.index(i), issues);
        }
    }
}

fn node_selector_term(term: &NodeSelectorTerm, path: &FieldPath, issues: &mut Issues) {
    if term.match_fields.as_ref().is_some_and(|f| !f.is_empty()) {
        issues.push(FieldIssue::warning(
            path.key("matchFields"),
            "matchFields is not supported yet; the term is evaluated without it",
        ));
    }
    for (i, req) in term.match_expressions.iter().flatten().enumerate() {
        let rpath = path.key("matchExpressions").index(i);
        let n = req.values.as_ref().map_or(0, Vec::len);
        match req.operator.as_str() {
            "In" | "NotIn" if n == 0 => err(
                issues,
                rpath.key("values"),
                "must be specified for In and NotIn",
            ),
            "Exists" | "DoesNotExist" if n > 0 => err(
                issues,
                rpath.key("values"),
                "must be empty for Exists and DoesNotExist",
            ),
            "Gt" | "Lt" => {
                let ok = n == 1
                    && req
                        .values
                        .as_ref()
                        .is_some_and(|v| v[0].parse::<i64>().is_ok());
                if !ok {
                    err(
                        issues,
                        rpath.key("values"),
                        "must be a single integer for Gt and Lt",
                    );
                }
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => err(
                issues,
                rpath.key("operator"),
                format!(
                    "unsupported operator {other:?}: must be In, NotIn, Exists, DoesNotExist, Gt or Lt"
                ),
            ),
        }
    }
}

fn ids(user: Option<i64>, group: Option<i64>, path: &FieldPath, issues: &mut Issues) {
    for (name, id) in [("runAsUser", user), ("runAsGroup", group)] {
        if let Some(id) = id
            && !(0..=i64::from(i32::MAX)).contains(&id)
        {
            err(
                issues,
                path.key(name),
                format!("{id} must be between 0 and 2147483647"),
            );
        }
    }
}

fn container(c: &Container, path: &FieldPath, issues: &mut Issues) {
    if let Err(e) = names::dns1123_label(&c.name) {
        err(issues, path.key("name"), e);
    }
    match c.image.as_deref() {
        None | Some("") => err(
            issues,
            path.key("image"),
            "required: every container needs an image",
        ),
        Some(image) if image.trim() != image || image.contains(char::is_whitespace) => err(
            issues,
            path.key("image"),
            format!("{image:?} must not contain whitespace"),
        ),
        Some(_) => {}
    }
    if let Some(policy) = &c.image_pull_policy {
        one_of(
            policy,
            &["Always", "IfNotPresent", "Never"],
            path.key("imagePullPolicy"),
            issues,
        );
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let epath = path.key("env").index(i);
        if let Err(msg) = names::env_var_name(&e.name) {
            err(issues, epath.key("name"), msg);
        }
        if let Some(from) = &e.value_from {
            if e.value.as_deref().is_some_and(|v| !v.is_empty()) {
                err(
                    issues,
                    epath.key("valueFrom"),
                    "may not be specified when value is not empty",
                );
            }
            let sources = [
                from.config_map_key_ref.is_some(),
                from.secret_key_ref.is_some(),
                from.field_ref.is_some(),
                from.resource_field_ref.is_some(),
                from.file_key_ref.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                err(
                    issues,
                    epath.key("valueFrom"),
                    "must set exactly one of configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef",
                );
            }
            if from.file_key_ref.is_some() {
                err(
                    issues,
                    epath.key("valueFrom").key("fileKeyRef"),
                    "fileKeyRef is not supported",
                );
            }
            if let Some(r) = &from.config_map_key_ref {
                reference_name(
                    &r.name,
                    &epath.key("valueFrom").key("configMapKeyRef").key("name"),
                    issues,
                );
            }
            if let Some(r) = &from.secret_key_ref {
                reference_name(
                    &r.name,
                    &epath.key("valueFrom").key("secretKeyRef").key("name"),
                    issues,
                );
            }
        }
    }
    for (i, e) in c.env_from.iter().flatten().enumerate() {
        let epath = path.key("envFrom").index(i);
        match (&e.config_map_ref, &e.secret_ref) {
            (Some(r), None) => {
                reference_name(&r.name, &epath.key("configMapRef").key("name"), issues)
            }
            (None, Some(r)) => reference_name(&r.name, &epath.key("secretRef").key("name"), issues),
            _ => err(
                issues,
                epath,
                "must set exactly one of configMapRef and secretRef",
            ),
        }
    }
    if let Some(res) = &c.resources {
        let rpath = path.key("resources");
        let mut parsed: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (section, map) in [("requests", &res.requests), ("limits", &res.limits)] {
            for (name, q) in map.iter().flatten() {
                let qpath = rpath.key(section).key(name.clone());
                let Some(value) = quantity(&q.0, &qpath, issues) else {
                    continue;
                };
                let (resource, converted) = match name.as_str() {
                    "cpu" => ("cpu", value.milli()),
                    "memory" => ("memory", value.units()),
                    "ephemeral-storage" => ("ephemeral-storage", value.units()),
                    _ => continue,
                };
                match converted {
                    Ok(v) => {
                        parsed.insert((section, resource), v);
                    }
                    Err(e) => err(issues, qpath, e.to_string()),
                }
            }
        }
        for resource in ["cpu", "memory", "ephemeral-storage"] {
            if let (Some(req), Some(lim)) = (
                parsed.get(&("requests", resource)),
                parsed.get(&("limits", resource)),
            ) && req > lim
            {
                err(
                    issues,
                    rpath.key("requests").key(resource),
                    format!("must be less than or equal to the {resource} limit"),
                );
            }
        }
        if res.claims.as_ref().is_some_and(|c| !c.is_empty()) {
            issues.push(FieldIssue::warning(
                rpath.key("claims"),
                "dynamic resource claims are not supported; ignored",
            ));
        }
    }
    for (i, policy) in c.resize_policy.iter().flatten().enumerate() {
        let ppath = path.key("resizePolicy").index(i);
        one_of(
            &policy.resource_name,
            &["cpu", "memory"],
            ppath.key("resourceName"),
            issues,
        );
        one_of(
            &policy.restart_policy,
            &["NotRequired", "RestartContainer"],
            ppath.key("restartPolicy"),
            issues,
        );
    }
    let mut port_names = BTreeSet::new();
    for (i, port) in c.ports.iter().flatten().enumerate() {
        let ppath = path.key("ports").index(i);
        if !(1..=65535).contains(&port.container_port) {
            err(
                issues,
                ppath.key("containerPort"),
                format!("{} must be between 1 and 65535", port.container_port),
            );
        }
        if let Some(proto) = &port.protocol {
            one_of(
                proto,
                &["TCP", "UDP", "SCTP"],
                ppath.key("protocol"),
                issues,
            );
        }
        if let Some(name) = &port.name {
            port_name(name, &ppath.key("name"), issues);
            if !port_names.insert(name.clone()) {
                err(
                    issues,
                    ppath.key("name"),
                    format!("duplicate port name {name:?}"),
                );
            }
        }
    }
    if let Some(sc) = &c.security_context {
        ids(
            sc.run_as_user,
            sc.run_as_group,
            &path.key("securityContext"),
            issues,
        );
    }
}

/// An IANA service name: at most 15 characters, lowercase, at least one letter.
pub fn port_name(name: &str, path: &FieldPath, issues: &mut Issues) {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        err(
            issues,
            path.clone(),
            format!(
                "{name:?} is not a valid port name: at most 15 lowercase letters, digits and single '-', with at least one letter"
            ),
        );
    }
}

fn reference_name(name: &str, path: &FieldPath, issues: &mut Issues) {
    if let Err(e) = names::dns1123_subdomain(name) {
        err(issues, path.clone(), e);
    }
}

pub fn deployment(d: &Deployment, issues: &mut Issues) {
    let Some(spec) = &d.spec else {
        err(issues, FieldPath::root().key("spec"), "required");
        return;
    };
    let spath = FieldPath::root().key("spec");
    if let Some(r) = spec.replicas
        && r < 0
    {
        err(
            issues,
            spath.key("replicas"),
            "must be greater than or equal to 0",
        );
    }
    deployment_strategy(spec, &spath, issues);
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let tpath = spath.key("template");
    labels_map(&labels, &tpath.key("metadata").key("labels"), issues);
    if selector_is_empty(&spec.selector) {
        err(
            issues,
            spath.key("selector"),
            "must select at least one label: an empty selector would match every pod",
        );
    } else {
        match selector_matches(&spec.selector, &labels) {
            Ok(true) => {}
            Ok(false) => err(
                issues,
                spath.key("selector"),
                "does not match the template's labels (spec.template.metadata.labels)",
            ),
            Err(e) => err(issues, spath.key("selector"), e),
        }
    }
    match &spec.template.spec {
        Some(pod) => {
            pod_spec(pod, &tpath.key("spec"), issues);
            if let Some(policy) = pod.restart_policy.as_deref().filter(|p| *p != "Always") {
                err(
                    issues,
                    tpath.key("spec").key("restartPolicy"),
                    format!("unsupported value {policy:?}: a Deployment's pods must use Always"),
                );
            }
        }
        None => err(issues, tpath.key("spec"), "required"),
    }
}

/// `strategy`, `minReadySeconds` and `progressDeadlineSeconds`, checked
/// as the API server checks them.
fn deployment_strategy(
    spec: &k8s_openapi::api::apps::v1::DeploymentSpec,
    spath: &FieldPath,
    issues: &mut Issues,
) {
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    if min_ready < 0 {
        err(
            issues,
            spath.key("minReadySeconds"),
            "must be greater than or equal to 0",
        );
    }
    if let Some(deadline) = spec.progress_deadline_seconds {
        if deadline < 0 {
            err(
                issues,
                spath.key("progressDeadlineSeconds"),
                "must be greater than or equal to 0",
            );
        } else if deadline <= min_ready {
            err(
                issues,
                spath.key("progressDeadlineSeconds"),
                "must be greater than minReadySeconds",
            );
        }
    }
    let Some(strategy) = &spec.strategy else {
        return;
    };
    let path = spath.key("strategy");
    let rolling = strategy.rolling_update.as_ref();
    match strategy.type_.as_deref() {
        None | Some("RollingUpdate") => {}
        Some("Recreate") => {
            if rolling.is_some() {
                err(
                    issues,
                    path.key("rollingUpdate"),
                    "may not be specified when strategy `type` is 'Recreate'",
                );
            }
            return;
        }
        Some(other) => {
            err(
                issues,
                path.key("type"),
                format!(
                    "unsupported value {other:?}: supported values: \"Recreate\", \"RollingUpdate\""
                ),
            );
            return;
        }
    }
    let Some(rolling) = rolling else { return };
    let rpath = path.key("rollingUpdate");
    let surge = rolling
        .max_surge
        .as_ref()
        .and_then(|v| int_or_percent(v, &rpath.key("maxSurge"), issues));
    let unavailable = rolling
        .max_unavailable
        .as_ref()
        .and_then(|v| int_or_percent(v, &rpath.key("maxUnavailable"), issues));
    if let Some(IntOrPercent::Percent(p)) = unavailable
        && p > 100
    {
        err(
            issues,
            rpath.key("maxUnavailable"),
            "must not be greater than 100%",
        );
    }
    // Defaults are 25 %: only values written as zero can both be zero.
    if surge.is_some_and(IntOrPercent::is_zero) && unavailable.is_some_and(IntOrPercent::is_zero) {
        err(
            issues,
            rpath.key("maxUnavailable"),
            "may not be 0 when `maxSurge` is 0: the rollout could neither start a new pod nor stop an old one",
        );
    }
}

/// A count (at least 0) or a percentage written `N%`.
pub fn int_or_percent(
    v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    path: &FieldPath,
    issues: &mut Issues,
) -> Option<IntOrPercent> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let parsed = match v {
        IntOrString::Int(i) if *i < 0 => {
            err(issues, path.clone(), "must be greater than or equal to 0");
            return None;
        }
        IntOrString::String(s)
            if !(s.len() > 1
                && s.ends_with('%')
                && s[..s.len() - 1].bytes().all(|b| b.is_ascii_digit())) =>
        {
            err(
                issues,
                path.clone(),
                format!("{s:?} must be an integer or a percentage (e.g. '5%')"),
            );
            return None;
        }
        v => IntOrPercent::from_value(v),
    };
    if parsed.is_none() {
        err(issues, path.clone(), "is out of range");
    }
    parsed
}

fn selector_is_empty(s: &LabelSelector) -> bool {
    s.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// Whether a label selector selects a set of labels (`matchLabels` and `matchExpressions`).
pub fn selector_matches(
    s: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    for (k, v) in s.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for req in s.match_expressions.iter().flatten() {
        let values = req.values.as_deref().unwrap_or(&[]);
        let present = labels.get(&req.key);
        let ok = match req.operator.as_str() {
            "In" => present.is_some_and(|v| values.contains(v)),
            "NotIn" => present.is_none_or(|v| !values.contains(v)),
            "Exists" => present.is_some(),
            "DoesNotExist" => present.is_none(),
            other => {
                return Err(format!(
                    "unsupported operator {other:?}: must be In, NotIn, Exists or DoesNotExist"
                ));
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

pub fn config_map(cm: &ConfigMap, issues: &mut Issues) {
    let data: Vec<&String> = cm.data.iter().flatten().map(|(k, _)| k).collect();
    let binary: Vec<&String> = cm.binary_data.iter().flatten().map(|(k, _)| k).collect();
    data_keys(&[("data", &data), ("binaryData", &binary)], true, issues);
}

pub fn secret(s: &Secret, issues: &mut Issues) {
    let data: Vec<&String> = s.data.iter().flatten().map(|(k, _)| k).collect();
    let string_data: Vec<&String> = s.string_data.iter().flatten().map(|(k, _)| k).collect();
    // stringData may repeat a data key on purpose: it wins, as in Kubernetes.
    data_keys(
        &[("data", &data), ("stringData", &string_data)],
        false,
        issues,
    );
}

/// Keys of a ConfigMap or Secret, which become file names once mounted.
fn data_keys(sections: &[(&str, &Vec<&String>)], unique_across: bool, issues: &mut Issues) {
    let mut seen = BTreeSet::new();
    for (section, keys) in sections {
        for key in keys.iter() {
            let p = FieldPath::root().key(*section).key((*key).clone());
            if let Err(e) = names::config_key(key) {
                err(issues, p.clone(), e);
            }
            if !seen.insert(*key) && unique_across {
                err(
                    issues,
                    p,
                    format!("key {key:?} appears in more than one of data and binaryData"),
                );
            }
        }
    }
}

/// The pod's required node affinity, if it has one.
pub fn required_node_affinity(spec: &PodSpec) -> Option<&k8s_openapi::api::core::v1::NodeSelector> {
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
}

pub fn service(s: &Service, issues: &mut Issues) {
    let Some(spec) = &s.spec else { return };
    let spath = FieldPath::root().key("spec");
    if let Some(t) = &spec.type_ {
        one_of(
            t,
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
            spath.key("type"),
            issues,
        );
    }
    if let Some(sel) = &spec.selector {
        labels_map(sel, &spath.key("selector"), issues);
    }
    let multiple = spec.ports.as_ref().is_some_and(|p| p.len() > 1);
    let mut seen = BTreeSet::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let ppath = spath.key("ports").index(i);
        if !(1..=65535).contains(&port.port) {
            err(
                issues,
                ppath.key("port"),
                format!("{} must be between 1 and 65535", port.port),
            );
        }
        match &port.name {
            Some(name) => {
                if let Err(e) = names::dns1123_label(name) {
                    err(issues, ppath.key("name"), e);
                }
                if !seen.insert(name.clone()) {
                    err(
                        issues,
                        ppath.key("name"),
                        format!("duplicate port name {name:?}"),
                    );
                }
            }
            None if multiple => err(
                issues,
                ppath.key("name"),
                "required when a Service has more than one port",
            ),
            None => {}
        }
        if let Some(np) = port.node_port
            && !(1..=65535).contains(&np)
        {
            err(
                issues,
                ppath.key("nodePort"),
                format!("{np} must be between 1 and 65535"),
            );
        }
        if let Some(proto) = &port.protocol {
            one_of(
                proto,
                &["TCP", "UDP", "SCTP"],
                ppath.key("protocol"),
                issues,
            );
        }
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) =
            &port.target_port
        {
            port_name(name, &ppath.key("targetPort"), issues);
        }
    }
}

const ACCESS_MODES: [&str; 4] = [
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// The provisioner built into every Berth node.
pub const LOCAL_PROVISIONER: &str = "berth.dev/local";

/// Fields of a PersistentVolume spec that are not a volume source.
const PV_NOT_SOURCES: &[&str] = &[
    "capacity",
    "accessModes",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "claimRef",
    "volumeMode",
    "nodeAffinity",
    "mountOptions",
    "volumeAttributesClassName",
];

fn storage_size(
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
    path: &FieldPath,
    issues: &mut Issues,
) {
    match map.and_then(|m| m.get("storage")) {
        None => err(issues, path.key("storage"), "required"),
        Some(q) => {
            if let Some(parsed) = quantity(&q.0, &path.key("storage"), issues)
                && let Err(e) = parsed.units()
            {
                err(issues, path.key("storage"), e.to_string());
            }
        }
    }
}

fn volume_mode(mode: Option<&str>, path: FieldPath, issues: &mut Issues) {
    if let Some(m) = mode
        && m != "Filesystem"
    {
        err(
            issues,
            path,
            format!("unsupported value {m:?}: Berth nodes provide Filesystem volumes only"),
        );
    }
}

pub fn persistent_volume(pv: &PersistentVolume, issues: &mut Issues) {
    let Some(spec) = &pv.spec else {
        err(issues, FieldPath::root().key("spec"), "required");
        return;
    };
    let spath = FieldPath::root().key("spec");
    storage_size(spec.capacity.as_ref(), &spath.key("capacity"), issues);
    if spec.access_modes.as_ref().is_none_or(Vec::is_empty) {
        err(
            issues,
            spath.key("accessModes"),
            "required: at least one access mode",
        );
    }
    access_modes(
        spec.access_modes.as_deref(),
        &spath.key("accessModes"),
        issues,
    );
    if let Some(policy) = &spec.persistent_volume_reclaim_policy {
        one_of(
            policy,
            &["Retain", "Delete"],
            spath.key("persistentVolumeReclaimPolicy"),
            issues,
        );
    }
    volume_mode(spec.volume_mode.as_deref(), spath.key("volumeMode"), issues);
    let sources = crate::volumes::set_fields(spec, PV_NOT_SOURCES);
    for s in &sources {
        if s != "local" && s != "hostPath" {
            err(
                issues,
                spath.key(s.clone()),
                format!(
                    "volume source {s} is not available on a Berth node; use local or hostPath"
                ),
            );
        }
    }
    match sources.len() {
        0 => err(
            issues,
            spath.key("local"),
            "required: a PersistentVolume on a Berth node is a local directory (spec.local.path or spec.hostPath.path)",
        ),
        1 => {}
        _ => err(
            issues,
            spath.clone(),
            format!(
                "may not specify more than one volume source; found {}",
                sources.join(", ")
            ),
        ),
    }
    for (field, path) in [
        ("local", spec.local.as_ref().map(|l| l.path.as_str())),
        ("hostPath", spec.host_path.as_ref().map(|h| h.path.as_str())),
    ] {
        if let Some(p) = path
            && let Err(e) = crate::volumes::absolute_path(p)
        {
            err(issues, spath.key(field).key("path"), e);
        }
    }
}

pub fn persistent_volume_claim(pvc: &PersistentVolumeClaim, issues: &mut Issues) {
    let Some(spec) = &pvc.spec else {
        err(issues, FieldPath::root().key("spec"), "required");
        return;
    };
    let spath = FieldPath::root().key("spec");
    storage_size(
        spec.resources.as_ref().and_then(|r| r.requests.as_ref()),
        &spath.key("resources").key("requests"),
        issues,
    );
    if spec.access_modes.as_ref().is_none_or(Vec::is_empty) {
        err(
            issues,
            spath.key("accessModes"),
            "required: at least one access mode",
        );
    }
    access_modes(
        spec.access_modes.as_deref(),
        &spath.key("accessModes"),
        issues,
    );
    volume_mode(spec.volume_mode.as_deref(), spath.key("volumeMode"), issues);
}

pub fn storage_class(sc: &StorageClass, issues: &mut Issues) {
    let root = FieldPath::root();
    if sc.provisioner.is_empty() {
        err(issues, root.key("provisioner"), "required");
    } else if sc.provisioner != LOCAL_PROVISIONER
        && sc.provisioner != "kubernetes.io/no-provisioner"
    {
        issues.push(FieldIssue::warning(
            root.key("provisioner"),
            format!(
                "no provisioner {:?} runs on a Berth node (the built-in one is {LOCAL_PROVISIONER}); claims of this class bind to matching PersistentVolumes only",
                sc.provisioner
            ),
        ));
    }
    if let Some(policy) = &sc.reclaim_policy {
        one_of(
            policy,
            &["Delete", "Retain"],
            root.key("reclaimPolicy"),
            issues,
        );
    }
    if let Some(mode) = &sc.volume_binding_mode {
        one_of(
            mode,
            &["Immediate", "WaitForFirstConsumer"],
            root.key("volumeBindingMode"),
            issues,
        );
    }
    if sc.provisioner == LOCAL_PROVISIONER {
        for (key, value) in sc.parameters.iter().flatten() {
            let path = root.key("parameters").key(key.clone());
            match key.as_str() {
                "fsType" | "csi.storage.k8s.io/fstype" if value == "ext4" => {}
                "fsType" | "csi.storage.k8s.io/fstype" => err(
                    issues,
                    path,
                    format!(
                        "unsupported value {value:?}: the local provisioner makes ext4 filesystems"
                    ),
                ),
                _ => err(
                    issues,
                    path,
                    format!(
                        "the local provisioner has no parameter {key:?}; it takes fsType: ext4 only"
                    ),
                ),
            }
        }
    }
}

fn access_modes(modes: Option<&[String]>, path: &FieldPath, issues: &mut Issues) {
    for (i, m) in modes.unwrap_or(&[]).iter().enumerate() {
        if !ACCESS_MODES.contains(&m.as_str()) {
            err(
                issues,
                path.index(i),
                format!(
                    "unsupported value {m:?}: must be one of {}",
                    ACCESS_MODES.join(", ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumerated_fields_are_reported_as_kubernetes_does() {
        let mut issues = Vec::new();
        one_of(
            "Sometimes",
            &["Always", "OnFailure", "Never"],
            FieldPath::parse("spec.restartPolicy"),
            &mut issues,
        );
        one_of(
            "Never",
            &["Always", "OnFailure", "Never"],
            FieldPath::parse("spec.restartPolicy"),
            &mut issues,
        );
        one_of(
            "x",
            &["cpu", "memory"],
            FieldPath::parse("resourceName"),
            &mut issues,
        );
        let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "unsupported value \"Sometimes\": must be Always, OnFailure or Never",
                "unsupported value \"x\": must be cpu or memory"
            ]
        );
    }
}

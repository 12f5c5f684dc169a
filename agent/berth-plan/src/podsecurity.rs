//! Kubernetes' Pod Security Standards, enforced as the pod security
//! admission controller enforces them (its checks at "latest"): a pod that
//! breaks a check of its level is refused, with the level, the check and
//! the field, and the node's other pods run.
//!
//! The level is the node's (`security.podSecurity`, `baseline` unless set),
//! or a stricter one its namespace asks with the label
//! `pod-security.kubernetes.io/enforce`; never a looser one.
//!
//! One difference, on the safe side: Berth runs no pod in a user namespace
//! (`hostUsers: false` is not supported), so the exemptions Kubernetes makes
//! for such pods (`runAsNonRoot`, `runAsUser`, `procMount` at baseline)
//! never apply.

use std::collections::BTreeMap;
use std::fmt;

use berth_manifest::FieldPath;
use berth_manifest::model::{Container, Meta, PodSpec};
use berth_manifest::{Catalog, Diagnostic, FieldIssue, Object};
use serde::{Deserialize, Serialize};

/// The label a namespace asks for a level with.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
/// The label that pins the checks to a Kubernetes version.
pub const ENFORCE_VERSION_LABEL: &str = "pod-security.kubernetes.io/enforce-version";

/// A Pod Security Standard, from the most open to the strictest.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Privileged,
    #[default]
    Baseline,
    Restricted,
}

impl Level {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "privileged" => Some(Self::Privileged),
            "baseline" => Some(Self::Baseline),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The level a namespace's labels ask for: `None` when they ask nothing.
/// A value that is not a level is read as `restricted`, as Kubernetes does
/// (a typo must not open a namespace); `problem` says what was wrong.
pub fn namespace_level(
    labels: Option<&BTreeMap<String, String>>,
) -> (Option<Level>, Option<String>) {
    let Some(value) = labels.and_then(|l| l.get(ENFORCE_LABEL)) else {
        return (None, None);
    };
    match Level::parse(value) {
        Some(level) => (Some(level), None),
        None => (
            Some(Level::Restricted),
            Some(format!(
                "{value:?} is not a Pod Security level (privileged, baseline, restricted); the namespace is held to restricted"
            )),
        ),
    }
}

/// The levels the catalog's namespaces ask for, and a warning on each
/// label that names no level.
pub fn namespace_levels(catalog: &Catalog) -> (BTreeMap<&str, Level>, Vec<Diagnostic>) {
    let mut levels = BTreeMap::new();
    let mut problems = Vec::new();
    for o in &catalog.objects {
        let Object::Namespace(ns) = &o.object else {
            continue;
        };
        let (level, problem) = namespace_level(ns.metadata.labels.as_ref());
        if let Some(level) = level {
            levels.insert(o.id.name.as_str(), level);
        }
        if let Some(message) = problem {
            let path = FieldPath::root()
                .key("metadata")
                .key("labels")
                .key(ENFORCE_LABEL);
            problems.push(catalog.diagnostic(o, &FieldIssue::warning(path, message)));
        }
    }
    (levels, problems)
}

/// The level a pod is held to: the node's, or its namespace's when stricter.
pub fn effective(node: Level, namespace: Option<Level>) -> Level {
    namespace.map_or(node, |n| n.max(node))
}

/// One check a pod breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Kubernetes' name for the check (`privileged`, `capabilities_baseline`, ...).
    pub check: &'static str,
    /// The field, from the object's root.
    pub path: FieldPath,
    /// What is wrong with it.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}: {})", self.check, self.path, self.detail)
    }
}

/// Capabilities `baseline` lets a container add: the container runtimes' defaults.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Sysctls `baseline` allows: namespaced, and isolated from other pods.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// SELinux types `baseline` allows.
const SELINUX_TYPES: &[&str] = &[
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// Inline volume sources `restricted` allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

/// Every check of `level` that the pod (`meta` and `spec`, at `spec_path`
/// inside its object) breaks, in the order of the pod's fields.
pub fn check(meta: &Meta, spec: &PodSpec, spec_path: &str, level: Level) -> Vec<Violation> {
    if level == Level::Privileged {
        return Vec::new();
    }
    let restricted = level == Level::Restricted;
    let sp = FieldPath::parse(spec_path);
    let mut out = Vec::new();
    let mut add = |check: &'static str, path: FieldPath, detail: String| {
        out.push(Violation {
            check,
            path,
            detail,
        });
    };

    // hostNamespaces
    for (field, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if on == Some(true) {
            add("hostNamespaces", sp.key(field), "must not be true".into());
        }
    }

    // The pod-level security context.
    let psc = spec.security_context.as_deref();
    let ppath = sp.key("securityContext");
    if let Some(psc) = psc {
        if let Some(o) = &psc.se_linux_options {
            selinux(o, &ppath.key("seLinuxOptions"), &mut add);
        }
        if let Some(p) = &psc.app_armor_profile {
            apparmor(
                &p.type_,
                &ppath.key("appArmorProfile").key("type"),
                &mut add,
            );
        }
        if let Some(p) = &psc.seccomp_profile {
            seccomp(&p.type_, restricted, &ppath, &mut add);
        }
        for (i, s) in psc.sysctls.iter().flatten().enumerate() {
            if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
                add(
                    "sysctls",
                    ppath.key("sysctls").index(i).key("name"),
                    format!("{:?} is not one of the safe sysctls", s.name),
                );
            }
        }
        if psc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            add(
                "windowsHostProcess",
                ppath.key("windowsOptions").key("hostProcess"),
                "must not be true".into(),
            );
        }
        if restricted && psc.run_as_user == Some(0) {
            add("runAsUser", ppath.key("runAsUser"), "must not be 0".into());
        }
        if restricted && psc.run_as_non_root == Some(false) {
            add(
                "runAsNonRoot",
                ppath.key("runAsNonRoot"),
                "must not be false".into(),
            );
        }
    }

    // AppArmor by the deprecated annotations.
    for (key, value) in meta.annotations.iter().flatten() {
        if key.starts_with(APPARMOR_ANNOTATION)
            && !(value.is_empty() || value == "runtime/default" || value.starts_with("localhost/"))
        {
            add(
                "appArmorProfile",
                FieldPath::root()
                    .key("metadata")
                    .key("annotations")
                    .key(key.clone()),
                format!("{value:?} must be runtime/default or localhost/<profile>"),
            );
        }
    }

    // Volumes.
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let vpath = sp.key("volumes").index(i);
        if restricted {
            let sources = berth_manifest::volumes::set_fields(v, &["name"]);
            for kind in sources
                .iter()
                .filter(|k| !RESTRICTED_VOLUMES.contains(&k.as_str()))
            {
                add(
                    "restrictedVolumes",
                    vpath.key(kind.clone()),
                    format!(
                        "volume type {kind} is not allowed; use one of {}",
                        RESTRICTED_VOLUMES.join(", ")
                    ),
                );
            }
        } else if v.host_path.is_some() {
            add(
                "hostPathVolumes",
                vpath.key("hostPath"),
                "hostPath volumes are not allowed".into(),
            );
        }
    }

    // Each container, init containers first, as the pod lists them.
    let pod_non_root = psc.and_then(|s| s.run_as_non_root);
    let pod_seccomp = psc
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    let lists = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", spec.containers.as_slice()),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            let cpath = sp.key(list).index(i);
            container(c, &cpath, restricted, pod_non_root, pod_seccomp, &mut add);
        }
    }
    // As Kubernetes reports these two: a value written wrong is the
    // problem; containers that only inherit the pod's are not named besides.
    for (check, unset) in [
        ("seccompProfile_restricted", SECCOMP_UNSET),
        ("runAsNonRoot", NON_ROOT_UNSET),
    ] {
        if out.iter().any(|v| v.check == check && v.detail != unset) {
            out.retain(|v| v.detail != unset);
        }
    }
    out
}

/// What a container that sets no seccomp profile, in a pod that sets no
/// valid one, is told at `restricted`.
const SECCOMP_UNSET: &str =
    "must be RuntimeDefault or Localhost (here or in the pod's securityContext)";

/// What a container that does not set `runAsNonRoot`, in a pod that does
/// not set it true, is told at `restricted`.
const NON_ROOT_UNSET: &str = "must be true (here or in the pod's securityContext)";

/// A seccomp profile written at `scpath`: only RuntimeDefault and Localhost.
fn seccomp(
    type_: &str,
    restricted: bool,
    scpath: &FieldPath,
    add: &mut impl FnMut(&'static str, FieldPath, String),
) {
    if !matches!(type_, "RuntimeDefault" | "Localhost") {
        add(
            if restricted {
                "seccompProfile_restricted"
            } else {
                "seccompProfile_baseline"
            },
            scpath.key("seccompProfile").key("type"),
            format!("{type_:?} is not allowed (RuntimeDefault or Localhost)"),
        );
    }
}

fn selinux(
    o: &k8s_openapi::api::core::v1::SELinuxOptions,
    path: &FieldPath,
    add: &mut impl FnMut(&'static str, FieldPath, String),
) {
    let type_ = o.type_.as_deref().unwrap_or("");
    if !SELINUX_TYPES.contains(&type_) {
        add(
            "seLinuxOptions",
            path.key("type"),
            format!("{type_:?} is not one of {}", SELINUX_TYPES[1..].join(", ")),
        );
    }
    for (field, value) in [("user", &o.user), ("role", &o.role)] {
        if value.as_deref().is_some_and(|v| !v.is_empty()) {
            add("seLinuxOptions", path.key(field), "must not be set".into());
        }
    }
}

fn apparmor(type_: &str, path: &FieldPath, add: &mut impl FnMut(&'static str, FieldPath, String)) {
    if !matches!(type_, "RuntimeDefault" | "Localhost") {
        add(
            "appArmorProfile",
            path.clone(),
            format!("{type_:?} must be RuntimeDefault or Localhost"),
        );
    }
}

fn container(
    c: &Container,
    cpath: &FieldPath,
    restricted: bool,
    pod_non_root: Option<bool>,
    pod_seccomp: Option<&str>,
    add: &mut impl FnMut(&'static str, FieldPath, String),
) {
    let sc = c.security_context.as_deref();
    let scpath = cpath.key("securityContext");
    if sc.and_then(|s| s.privileged) == Some(true) {
        add(
            "privileged",
            scpath.key("privileged"),
            "must not be true".into(),
        );
    }
    for (i, p) in c.ports.iter().flatten().enumerate() {
        if p.host_port.is_some_and(|h| h != 0) {
            add(
                "hostPorts",
                cpath.key("ports").index(i).key("hostPort"),
                "must not be set".into(),
            );
        }
    }
    for (field, host) in &c.probe_hosts {
        add(
            "hostProbesAndHostLifecycle",
            FieldPath(
                cpath
                    .0
                    .iter()
                    .cloned()
                    .chain(FieldPath::parse(field).0)
                    .collect(),
            ),
            format!("{host:?} must not be set"),
        );
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let added = caps.and_then(|c| c.add.as_deref()).unwrap_or(&[]);
    let cap_path = scpath.key("capabilities");
    if restricted {
        for (i, name) in added.iter().enumerate() {
            if name != "NET_BIND_SERVICE" {
                add(
                    "capabilities_restricted",
                    cap_path.key("add").index(i),
                    format!("{name:?} may not be added (only NET_BIND_SERVICE)"),
                );
            }
        }
        let drops_all = caps
            .and_then(|c| c.drop.as_deref())
            .is_some_and(|d| d.iter().any(|n| n == "ALL"));
        if !drops_all {
            add(
                "capabilities_restricted",
                cap_path.key("drop"),
                "must include ALL".into(),
            );
        }
    } else {
        for (i, name) in added.iter().enumerate() {
            if !BASELINE_CAPABILITIES.contains(&name.as_str()) {
                add(
                    "capabilities_baseline",
                    cap_path.key("add").index(i),
                    format!("{name:?} is not one of the default capabilities"),
                );
            }
        }
    }
    let Some(sc) = sc else {
        if restricted {
            missing_restricted(None, cpath, pod_non_root, pod_seccomp, add);
        }
        return;
    };
    if let Some(o) = &sc.se_linux_options {
        selinux(o, &scpath.key("seLinuxOptions"), add);
    }
    if let Some(p) = &sc.app_armor_profile {
        apparmor(&p.type_, &scpath.key("appArmorProfile").key("type"), add);
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        add(
            if restricted {
                "procMount_restricted"
            } else {
                "procMount"
            },
            scpath.key("procMount"),
            "must be Default".into(),
        );
    }
    if let Some(p) = &sc.seccomp_profile {
        seccomp(&p.type_, restricted, &scpath, add);
    }
    if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
        add(
            "windowsHostProcess",
            scpath.key("windowsOptions").key("hostProcess"),
            "must not be true".into(),
        );
    }
    if restricted {
        if sc.run_as_user == Some(0) {
            add("runAsUser", scpath.key("runAsUser"), "must not be 0".into());
        }
        missing_restricted(Some(sc), cpath, pod_non_root, pod_seccomp, add);
    }
}

/// What `restricted` requires to be written: no privilege escalation,
/// non-root, a seccomp profile (each on the container or, for the last two,
/// the pod).
fn missing_restricted(
    sc: Option<&k8s_openapi::api::core::v1::SecurityContext>,
    cpath: &FieldPath,
    pod_non_root: Option<bool>,
    pod_seccomp: Option<&str>,
    add: &mut impl FnMut(&'static str, FieldPath, String),
) {
    let scpath = cpath.key("securityContext");
    if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        add(
            "allowPrivilegeEscalation",
            scpath.key("allowPrivilegeEscalation"),
            "must be false".into(),
        );
    }
    match sc.and_then(|s| s.run_as_non_root) {
        Some(true) => {}
        Some(false) => add(
            "runAsNonRoot",
            scpath.key("runAsNonRoot"),
            "must not be false".into(),
        ),
        None if pod_non_root == Some(true) => {}
        None => add(
            "runAsNonRoot",
            scpath.key("runAsNonRoot"),
            NON_ROOT_UNSET.into(),
        ),
    }
    let own = sc
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    if own.is_none() && !matches!(pod_seccomp, Some("RuntimeDefault" | "Localhost")) {
        add(
            "seccompProfile_restricted",
            scpath.key("seccompProfile").key("type"),
            SECCOMP_UNSET.into(),
        );
    }
}

/// A refused pod's reason, as plans, logs and status show it.
pub fn reason(level: Level, origin: &str, violations: &[Violation]) -> String {
    format!(
        "violates Pod Security level \"{level}\" ({origin}): {}",
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A pod `restricted` allows: every case below breaks it one way.
    fn compliant() -> Value {
        json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "c",
                "image": "busybox:1.37",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        })
    }

    fn checks(meta: &Meta, spec: &Value, level: Level) -> Vec<String> {
        let wire: k8s_openapi::api::core::v1::PodSpec =
            serde_json::from_value(spec.clone()).expect("a pod spec");
        let spec = PodSpec::from(wire);
        check(meta, &spec, "spec", level)
            .iter()
            .map(|v| format!("{} {}", v.check, v.path))
            .collect()
    }

    fn set(v: &mut Value, path: &str, value: Value) {
        let mut at = v;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            at = match part.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => {
                    if at.get(*part).is_none() {
                        at[*part] = json!({});
                    }
                    &mut at[*part]
                }
            };
        }
        at[parts[parts.len() - 1]] = value;
    }

    #[test]
    fn every_check_at_every_level() {
        // (what the case changes, the check and field at baseline (None: allowed),
        //  the check and field at restricted)
        type Case = (
            &'static str,
            Value,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "hostNetwork",
                json!(true),
                Some("hostNamespaces spec.hostNetwork"),
                Some("hostNamespaces spec.hostNetwork"),
            ),
            (
                "hostPID",
                json!(true),
                Some("hostNamespaces spec.hostPID"),
                Some("hostNamespaces spec.hostPID"),
            ),
            (
                "hostIPC",
                json!(true),
                Some("hostNamespaces spec.hostIPC"),
                Some("hostNamespaces spec.hostIPC"),
            ),
            ("hostNetwork", json!(false), None, None),
            (
                "containers.0.securityContext.privileged",
                json!(true),
                Some("privileged spec.containers[0].securityContext.privileged"),
                Some("privileged spec.containers[0].securityContext.privileged"),
            ),
            (
                "containers.0.securityContext.capabilities.add",
                json!(["SYS_ADMIN"]),
                Some(
                    "capabilities_baseline spec.containers[0].securityContext.capabilities.add[0]",
                ),
                Some(
                    "capabilities_restricted spec.containers[0].securityContext.capabilities.add[0]",
                ),
            ),
            (
                "containers.0.securityContext.capabilities.add",
                json!(["NET_RAW"]),
                Some(
                    "capabilities_baseline spec.containers[0].securityContext.capabilities.add[0]",
                ),
                Some(
                    "capabilities_restricted spec.containers[0].securityContext.capabilities.add[0]",
                ),
            ),
            (
                "containers.0.securityContext.capabilities.add",
                json!(["CHOWN"]),
                None,
                Some(
                    "capabilities_restricted spec.containers[0].securityContext.capabilities.add[0]",
                ),
            ),
            (
                "containers.0.securityContext.capabilities.add",
                json!(["NET_BIND_SERVICE"]),
                None,
                None,
            ),
            (
                "containers.0.securityContext.capabilities.drop",
                json!(["NET_RAW"]),
                None,
                Some(
                    "capabilities_restricted spec.containers[0].securityContext.capabilities.drop",
                ),
            ),
            (
                "volumes",
                json!([{"name": "h", "hostPath": {"path": "/srv"}}]),
                Some("hostPathVolumes spec.volumes[0].hostPath"),
                Some("restrictedVolumes spec.volumes[0].hostPath"),
            ),
            (
                "volumes",
                json!([{"name": "e", "emptyDir": {}}, {"name": "c", "configMap": {"name": "x"}}]),
                None,
                None,
            ),
            (
                "containers.0.ports",
                json!([{"containerPort": 80, "hostPort": 8080}]),
                Some("hostPorts spec.containers[0].ports[0].hostPort"),
                Some("hostPorts spec.containers[0].ports[0].hostPort"),
            ),
            (
                "containers.0.ports",
                json!([{"containerPort": 80, "hostPort": 0}]),
                None,
                None,
            ),
            (
                "containers.0.securityContext.appArmorProfile",
                json!({"type": "Unconfined"}),
                Some("appArmorProfile spec.containers[0].securityContext.appArmorProfile.type"),
                Some("appArmorProfile spec.containers[0].securityContext.appArmorProfile.type"),
            ),
            (
                "securityContext.appArmorProfile",
                json!({"type": "Unconfined"}),
                Some("appArmorProfile spec.securityContext.appArmorProfile.type"),
                Some("appArmorProfile spec.securityContext.appArmorProfile.type"),
            ),
            (
                "containers.0.securityContext.appArmorProfile",
                json!({"type": "RuntimeDefault"}),
                None,
                None,
            ),
            (
                "containers.0.securityContext.seLinuxOptions",
                json!({"type": "spc_t"}),
                Some("seLinuxOptions spec.containers[0].securityContext.seLinuxOptions.type"),
                Some("seLinuxOptions spec.containers[0].securityContext.seLinuxOptions.type"),
            ),
            (
                "securityContext.seLinuxOptions",
                json!({"user": "system_u"}),
                Some("seLinuxOptions spec.securityContext.seLinuxOptions.user"),
                Some("seLinuxOptions spec.securityContext.seLinuxOptions.user"),
            ),
            (
                "securityContext.seLinuxOptions",
                json!({"role": "sysadm_r"}),
                Some("seLinuxOptions spec.securityContext.seLinuxOptions.role"),
                Some("seLinuxOptions spec.securityContext.seLinuxOptions.role"),
            ),
            (
                "containers.0.securityContext.seLinuxOptions",
                json!({"type": "container_t", "level": "s0:c1"}),
                None,
                None,
            ),
            (
                "containers.0.securityContext.procMount",
                json!("Unmasked"),
                Some("procMount spec.containers[0].securityContext.procMount"),
                Some("procMount_restricted spec.containers[0].securityContext.procMount"),
            ),
            (
                "containers.0.securityContext.procMount",
                json!("Default"),
                None,
                None,
            ),
            (
                "securityContext.seccompProfile",
                json!({"type": "Unconfined"}),
                Some("seccompProfile_baseline spec.securityContext.seccompProfile.type"),
                Some("seccompProfile_restricted spec.securityContext.seccompProfile.type"),
            ),
            (
                "containers.0.securityContext.seccompProfile",
                json!({"type": "Unconfined"}),
                Some(
                    "seccompProfile_baseline spec.containers[0].securityContext.seccompProfile.type",
                ),
                Some(
                    "seccompProfile_restricted spec.containers[0].securityContext.seccompProfile.type",
                ),
            ),
            (
                "securityContext.seccompProfile",
                Value::Null,
                None,
                Some(
                    "seccompProfile_restricted spec.containers[0].securityContext.seccompProfile.type",
                ),
            ),
            (
                "securityContext.sysctls",
                json!([{"name": "kernel.msgmax", "value": "1"}]),
                Some("sysctls spec.securityContext.sysctls[0].name"),
                Some("sysctls spec.securityContext.sysctls[0].name"),
            ),
            (
                "securityContext.sysctls",
                json!([{"name": "net.ipv4.tcp_syncookies", "value": "1"}]),
                None,
                None,
            ),
            (
                "containers.0.livenessProbe",
                json!({"httpGet": {"port": 80, "host": "10.0.0.1"}}),
                Some("hostProbesAndHostLifecycle spec.containers[0].livenessProbe.httpGet.host"),
                Some("hostProbesAndHostLifecycle spec.containers[0].livenessProbe.httpGet.host"),
            ),
            (
                "containers.0.lifecycle",
                json!({"preStop": {"tcpSocket": {"port": 80, "host": "node"}}}),
                Some(
                    "hostProbesAndHostLifecycle spec.containers[0].lifecycle.preStop.tcpSocket.host",
                ),
                Some(
                    "hostProbesAndHostLifecycle spec.containers[0].lifecycle.preStop.tcpSocket.host",
                ),
            ),
            (
                "containers.0.securityContext.windowsOptions",
                json!({"hostProcess": true}),
                Some(
                    "windowsHostProcess spec.containers[0].securityContext.windowsOptions.hostProcess",
                ),
                Some(
                    "windowsHostProcess spec.containers[0].securityContext.windowsOptions.hostProcess",
                ),
            ),
            (
                "containers.0.securityContext.allowPrivilegeEscalation",
                Value::Null,
                None,
                Some(
                    "allowPrivilegeEscalation spec.containers[0].securityContext.allowPrivilegeEscalation",
                ),
            ),
            (
                "containers.0.securityContext.allowPrivilegeEscalation",
                json!(true),
                None,
                Some(
                    "allowPrivilegeEscalation spec.containers[0].securityContext.allowPrivilegeEscalation",
                ),
            ),
            (
                "securityContext.runAsNonRoot",
                Value::Null,
                None,
                Some("runAsNonRoot spec.containers[0].securityContext.runAsNonRoot"),
            ),
            (
                "containers.0.securityContext.runAsNonRoot",
                json!(false),
                None,
                Some("runAsNonRoot spec.containers[0].securityContext.runAsNonRoot"),
            ),
            (
                "securityContext.runAsNonRoot",
                json!(false),
                None,
                Some("runAsNonRoot spec.securityContext.runAsNonRoot"),
            ),
            (
                "containers.0.securityContext.runAsUser",
                json!(0),
                None,
                Some("runAsUser spec.containers[0].securityContext.runAsUser"),
            ),
            (
                "securityContext.runAsUser",
                json!(0),
                None,
                Some("runAsUser spec.securityContext.runAsUser"),
            ),
            (
                "containers.0.securityContext.runAsUser",
                json!(1000),
                None,
                None,
            ),
        ];
        let meta = Meta::default();
        assert!(checks(&meta, &compliant(), Level::Restricted).is_empty());
        for (field, value, baseline, restricted) in cases {
            let mut spec = compliant();
            set(&mut spec, field, value.clone());
            let at = |level| checks(&meta, &spec, level);
            assert_eq!(
                at(Level::Privileged),
                Vec::<String>::new(),
                "{field}={value} at privileged"
            );
            assert_eq!(
                at(Level::Baseline),
                baseline.into_iter().map(String::from).collect::<Vec<_>>(),
                "{field}={value} at baseline"
            );
            assert_eq!(
                at(Level::Restricted),
                restricted.into_iter().map(String::from).collect::<Vec<_>>(),
                "{field}={value} at restricted"
            );
        }
    }

    #[test]
    fn apparmor_annotations_and_init_containers_are_checked_too() {
        let mut meta = Meta {
            annotations: Some(BTreeMap::from([(
                format!("{APPARMOR_ANNOTATION}c"),
                "unconfined".to_string(),
            )])),
            ..Meta::default()
        };
        let mut spec = compliant();
        set(
            &mut spec,
            "initContainers",
            json!([{"name": "i", "image": "busybox:1.37", "securityContext": {"privileged": true}}]),
        );
        assert_eq!(
            checks(&meta, &spec, Level::Baseline),
            [
                "appArmorProfile metadata.annotations[\"container.apparmor.security.beta.kubernetes.io/c\"]",
                "privileged spec.initContainers[0].securityContext.privileged"
            ]
        );
        meta.annotations = Some(BTreeMap::from([(
            format!("{APPARMOR_ANNOTATION}c"),
            "localhost/mine".to_string(),
        )]));
        assert_eq!(
            checks(&meta, &compliant(), Level::Baseline),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_namespace_may_ask_for_stricter_never_looser() {
        let labels = |v: &str| BTreeMap::from([(ENFORCE_LABEL.to_string(), v.to_string())]);
        assert_eq!(namespace_level(None), (None, None));
        assert_eq!(
            namespace_level(Some(&labels("baseline"))).0,
            Some(Level::Baseline)
        );
        let (level, problem) = namespace_level(Some(&labels("strict")));
        assert_eq!(level, Some(Level::Restricted));
        assert!(
            problem
                .expect("a problem")
                .contains("\"strict\" is not a Pod Security level")
        );
        assert_eq!(
            effective(Level::Baseline, Some(Level::Restricted)),
            Level::Restricted
        );
        assert_eq!(
            effective(Level::Baseline, Some(Level::Privileged)),
            Level::Baseline
        );
        assert_eq!(
            effective(Level::Privileged, Some(Level::Baseline)),
            Level::Baseline
        );
        assert_eq!(effective(Level::Restricted, None), Level::Restricted);
    }
}

//! A container's probes and lifecycle hooks: Kubernetes' fields checked as
//! its API server checks them, then read into one model with the API
//! server's defaults applied and named ports resolved against the
//! container's own ports (the kubelet resolves them there too).

use k8s_openapi::api::core::v1::{self as core, Container, HTTPGetAction, LifecycleHandler};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::diag::{FieldIssue, FieldPath};

/// The API server's defaults for fields left out (or 0).
pub const DEFAULT_PERIOD_SECONDS: u32 = 10;
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 1;
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

/// Which probe: each has its own rules in the kubelet.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [Self::Startup, Self::Liveness, Self::Readiness];

    /// The field's name in a container.
    pub fn field(self) -> &'static str {
        match self {
            Self::Startup => "startupProbe",
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
        }
    }

    /// As the kubelet names it in messages: `Liveness probe failed: ...`.
    pub fn title(self) -> &'static str {
        match self {
            Self::Startup => "Startup",
            Self::Liveness => "Liveness",
            Self::Readiness => "Readiness",
        }
    }
}

/// How a probe or hook reaches the container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// A command inside the container.
    Exec { command: Vec<String> },
    /// An HTTP GET to the pod's address (or `host`).
    HttpGet(HttpGet),
    /// A TCP connection to the pod's address (or `host`).
    TcpSocket { host: Option<String>, port: u16 },
    /// `grpc.health.v1.Health/Check`.
    Grpc { port: u16, service: Option<String> },
    /// A pause (lifecycle hooks only).
    Sleep { seconds: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HttpGet {
    pub https: bool,
    pub host: Option<String>,
    pub port: u16,
    /// Always starts with `/`.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// One probe with the API server's defaults in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub action: Action,
    pub initial_delay_seconds: u32,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    /// The probe-level override of the pod's grace period, for the kill a
    /// failed liveness or startup probe causes.
    pub termination_grace_period_seconds: Option<u64>,
}

/// A container's probes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Probes {
    // Boxed: most containers have none, and a `Probe` is about 120 bytes
    // (10,000 containers carried 9 MB of empty probe room when inline).
    pub startup: Option<Box<Probe>>,
    pub liveness: Option<Box<Probe>>,
    pub readiness: Option<Box<Probe>>,
}

impl Probes {
    pub fn get(&self, kind: ProbeKind) -> Option<&Probe> {
        match kind {
            ProbeKind::Startup => self.startup.as_deref(),
            ProbeKind::Liveness => self.liveness.as_deref(),
            ProbeKind::Readiness => self.readiness.as_deref(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }

    /// Which probes it has.
    pub fn kinds(&self) -> Vec<ProbeKind> {
        ProbeKind::ALL
            .into_iter()
            .filter(|k| self.get(*k).is_some())
            .collect()
    }
}

/// A container's lifecycle hooks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Hooks {
    pub post_start: Option<Box<Action>>,
    pub pre_stop: Option<Box<Action>>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.post_start.is_none() && self.pre_stop.is_none()
    }
}

/// The number of a container port by its name.
fn named_port(c: &Container, name: &str) -> Option<u16> {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn port_of(c: &Container, port: &IntOrString) -> u16 {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => s.parse().ok().or_else(|| named_port(c, s)).unwrap_or(0),
    }
}

fn http_get(c: &Container, h: &HTTPGetAction) -> HttpGet {
    let path = h.path.clone().unwrap_or_default();
    HttpGet {
        https: h.scheme.as_deref() == Some("HTTPS"),
        host: h.host.clone().filter(|h| !h.is_empty()),
        port: port_of(c, &h.port),
        path: if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        },
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    }
}

fn nonzero(value: Option<i32>, default: u32) -> u32 {
    match value {
        Some(v) if v > 0 => v as u32,
        _ => default,
    }
}

fn probe(c: &Container, p: &core::Probe) -> Option<Probe> {
    let action = if let Some(e) = &p.exec {
        Action::Exec {
            command: e.command.clone().unwrap_or_default(),
        }
    } else if let Some(h) = &p.http_get {
        Action::HttpGet(http_get(c, h))
    } else if let Some(t) = &p.tcp_socket {
        Action::TcpSocket {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port: port_of(c, &t.port),
        }
    } else if let Some(g) = &p.grpc {
        Action::Grpc {
            port: u16::try_from(g.port).unwrap_or(0),
            service: g.service.clone().filter(|s| !s.is_empty()),
        }
    } else {
        return None;
    };
    Some(Probe {
        action,
        initial_delay_seconds: p.initial_delay_seconds.unwrap_or(0).max(0) as u32,
        period_seconds: nonzero(p.period_seconds, DEFAULT_PERIOD_SECONDS),
        timeout_seconds: nonzero(p.timeout_seconds, DEFAULT_TIMEOUT_SECONDS),
        success_threshold: nonzero(p.success_threshold, DEFAULT_SUCCESS_THRESHOLD),
        failure_threshold: nonzero(p.failure_threshold, DEFAULT_FAILURE_THRESHOLD),
        termination_grace_period_seconds: p
            .termination_grace_period_seconds
            .map(|s| s.max(1) as u64),
    })
}

/// The container's probes, as validated (see [`validate`]).
pub fn probes_of(c: &Container) -> Probes {
    let get = |p: &Option<core::Probe>| p.as_ref().and_then(|p| probe(c, p)).map(Box::new);
    Probes {
        startup: get(&c.startup_probe),
        liveness: get(&c.liveness_probe),
        readiness: get(&c.readiness_probe),
    }
}

fn hook(c: &Container, h: &LifecycleHandler) -> Option<Action> {
    if let Some(e) = &h.exec {
        Some(Action::Exec {
            command: e.command.clone().unwrap_or_default(),
        })
    } else if let Some(g) = &h.http_get {
        Some(Action::HttpGet(http_get(c, g)))
    } else {
        h.sleep.as_ref().map(|s| Action::Sleep {
            seconds: s.seconds.max(0) as u64,
        })
    }
}

/// The container's lifecycle hooks, as validated.
pub fn hooks_of(c: &Container) -> Hooks {
    let Some(l) = &c.lifecycle else {
        return Hooks::default();
    };
    Hooks {
        post_start: l.post_start.as_ref().and_then(|h| hook(c, h)).map(Box::new),
        pre_stop: l.pre_stop.as_ref().and_then(|h| hook(c, h)).map(Box::new),
    }
}

fn err(issues: &mut Vec<FieldIssue>, path: FieldPath, message: impl Into<String>) {
    issues.push(FieldIssue::error(path, message));
}

/// A port by number or by the name of one of the container's ports.
fn check_port(c: &Container, port: &IntOrString, path: FieldPath, issues: &mut Vec<FieldIssue>) {
    match port {
        IntOrString::Int(n) if !(1..=65535).contains(n) => {
            err(issues, path, format!("{n} must be between 1 and 65535"))
        }
        IntOrString::Int(_) => {}
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<i64>() {
                if !(1..=65535).contains(&n) {
                    err(issues, path, format!("{n} must be between 1 and 65535"));
                }
                return;
            }
            crate::validate::port_name(name, &path, issues);
            if named_port(c, name).is_none() {
                let known: Vec<&str> = c
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| p.name.as_deref())
                    .collect();
                err(
                    issues,
                    path,
                    if known.is_empty() {
                        format!("port {name:?} is not a port of this container (it names none)")
                    } else {
                        format!(
                            "port {name:?} is not a port of this container (its named ports: {})",
                            known.join(", ")
                        )
                    },
                );
            }
        }
    }
}

fn check_http_get(c: &Container, h: &HTTPGetAction, path: FieldPath, issues: &mut Vec<FieldIssue>) {
    check_port(c, &h.port, path.key("port"), issues);
    if let Some(scheme) = &h.scheme {
        crate::validate::one_of(scheme, &["HTTP", "HTTPS"], path.key("scheme"), issues);
    }
    for (i, header) in h.http_headers.iter().flatten().enumerate() {
        let valid = !header.name.is_empty()
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid {
            err(
                issues,
                path.key("httpHeaders").index(i).key("name"),
                format!("{:?} is not a valid HTTP header name", header.name),
            );
        }
        if header.value.contains(['\r', '\n']) {
            err(
                issues,
                path.key("httpHeaders").index(i).key("value"),
                "a header value may not contain a line break",
            );
        }
    }
}

/// Exactly one of the handlers `set` (name, present): none or two are errors.
fn one_handler(
    set: &[(&str, bool)],
    choices: &str,
    path: &FieldPath,
    issues: &mut Vec<FieldIssue>,
) {
    let found: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    match found.as_slice() {
        [] => err(
            issues,
            path.clone(),
            format!("must specify a handler: {choices}"),
        ),
        [_] => {}
        more => err(
            issues,
            path.key(more[1]),
            format!(
                "may not specify more than 1 handler type (found {})",
                more.join(" and ")
            ),
        ),
    }
}

fn check_exec(command: Option<&Vec<String>>, path: FieldPath, issues: &mut Vec<FieldIssue>) {
    if command.is_none_or(|c| c.is_empty()) {
        err(issues, path.key("command"), "required: the command to run");
    }
}

fn check_probe(
    c: &Container,
    kind: ProbeKind,
    p: &core::Probe,
    path: FieldPath,
    issues: &mut Vec<FieldIssue>,
) {
    one_handler(
        &[
            ("exec", p.exec.is_some()),
            ("httpGet", p.http_get.is_some()),
            ("tcpSocket", p.tcp_socket.is_some()),
            ("grpc", p.grpc.is_some()),
        ],
        "exec, httpGet, tcpSocket or grpc",
        &path,
        issues,
    );
    if let Some(e) = &p.exec {
        check_exec(e.command.as_ref(), path.key("exec"), issues);
    }
    if let Some(h) = &p.http_get {
        check_http_get(c, h, path.key("httpGet"), issues);
    }
    if let Some(t) = &p.tcp_socket {
        check_port(c, &t.port, path.key("tcpSocket").key("port"), issues);
    }
    if let Some(g) = &p.grpc
        && !(1..=65535).contains(&g.port)
    {
        err(
            issues,
            path.key("grpc").key("port"),
            format!("{} must be between 1 and 65535", g.port),
        );
    }
    for (field, value) in [
        ("initialDelaySeconds", p.initial_delay_seconds),
        ("periodSeconds", p.period_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("successThreshold", p.success_threshold),
        ("failureThreshold", p.failure_threshold),
    ] {
        if let Some(v) = value.filter(|v| *v < 0) {
            err(
                issues,
                path.key(field),
                format!("{v} must be greater than or equal to 0"),
            );
        }
    }
    if kind != ProbeKind::Readiness
        && let Some(s) = p.success_threshold.filter(|s| *s > 1)
    {
        err(
            issues,
            path.key("successThreshold"),
            format!(
                "{s}: must be 1 for a {} (it counts one success)",
                kind.field()
            ),
        );
    }
    match (kind, p.termination_grace_period_seconds) {
        (ProbeKind::Readiness, Some(_)) => err(
            issues,
            path.key("terminationGracePeriodSeconds"),
            "must not be set for readinessProbes (a readiness failure never kills)",
        ),
        (_, Some(s)) if s <= 0 => err(
            issues,
            path.key("terminationGracePeriodSeconds"),
            format!("{s} must be greater than 0"),
        ),
        _ => {}
    }
}

fn check_hook(c: &Container, h: &LifecycleHandler, path: FieldPath, issues: &mut Vec<FieldIssue>) {
    if h.tcp_socket.is_some() {
        err(
            issues,
            path.key("tcpSocket"),
            "is not supported as a lifecycle handler (as in Kubernetes): use exec, httpGet or sleep",
        );
    }
    // A tcpSocket hook is its own error (above), not also "no handler".
    if h.tcp_socket.is_none() || h.exec.is_some() || h.http_get.is_some() || h.sleep.is_some() {
        one_handler(
            &[
                ("exec", h.exec.is_some()),
                ("httpGet", h.http_get.is_some()),
                ("sleep", h.sleep.is_some()),
            ],
            "exec, httpGet or sleep",
            &path,
            issues,
        );
    }
    if let Some(e) = &h.exec {
        check_exec(e.command.as_ref(), path.key("exec"), issues);
    }
    if let Some(g) = &h.http_get {
        check_http_get(c, g, path.key("httpGet"), issues);
    }
    if let Some(s) = &h.sleep
        && !(0..=i64::from(u32::MAX)).contains(&s.seconds)
    {
        err(
            issues,
            path.key("sleep").key("seconds"),
            format!("{} must be between 0 and the pod's grace period", s.seconds),
        );
    }
}

/// Checks a container's probes and hooks. `plain_init`: an init container
/// that is not a sidecar, which may have neither (as in Kubernetes).
pub fn validate(c: &Container, path: &FieldPath, plain_init: bool, issues: &mut Vec<FieldIssue>) {
    let probes = [
        (ProbeKind::Startup, &c.startup_probe),
        (ProbeKind::Liveness, &c.liveness_probe),
        (ProbeKind::Readiness, &c.readiness_probe),
    ];
    for (kind, p) in probes {
        let Some(p) = p else { continue };
        let ppath = path.key(kind.field());
        if plain_init {
            err(
                issues,
                ppath,
                "may not be set for init containers without restartPolicy: Always",
            );
            continue;
        }
        check_probe(c, kind, p, ppath, issues);
    }
    if let Some(l) = &c.lifecycle {
        if plain_init && (l.post_start.is_some() || l.pre_stop.is_some()) {
            err(
                issues,
                path.key("lifecycle"),
                "may not be set for init containers without restartPolicy: Always",
            );
            return;
        }
        if let Some(h) = &l.post_start {
            let hpath = path.key("lifecycle").key("postStart");
            check_hook(c, h, hpath.clone(), issues);
            for (field, set) in [
                ("httpGet", h.http_get.is_some()),
                ("sleep", h.sleep.is_some()),
            ] {
                if set {
                    err(
                        issues,
                        hpath.key(field),
                        format!(
                            "a postStart {field} handler is not supported by Berth yet; use exec (a hook is never ignored)"
                        ),
                    );
                }
            }
        }
        if let Some(h) = &l.pre_stop {
            check_hook(c, h, path.key("lifecycle").key("preStop"), issues);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    fn container(extra: serde_json::Value) -> Container {
        let mut c = serde_json::json!({
            "name": "c", "image": "busybox",
            "ports": [{"name": "http", "containerPort": 8080}]
        });
        if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        serde_json::from_value(c).expect("a container")
    }

    fn problems(extra: serde_json::Value, plain_init: bool) -> Vec<String> {
        let mut issues = Vec::new();
        validate(
            &container(extra),
            &FieldPath::parse("spec.containers[0]"),
            plain_init,
            &mut issues,
        );
        issues
            .iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect()
    }

    #[test]
    fn bad_probe_specs_are_errors_naming_the_field() {
        let table: &[(serde_json::Value, &str)] = &[
            (
                serde_json::json!({"livenessProbe": {"periodSeconds": 5}}),
                "spec.containers[0].livenessProbe: must specify a handler: exec, httpGet, tcpSocket or grpc",
            ),
            (
                serde_json::json!({"readinessProbe": {"exec": {"command": ["true"]}, "tcpSocket": {"port": 80}}}),
                "spec.containers[0].readinessProbe.tcpSocket: may not specify more than 1 handler type (found exec and tcpSocket)",
            ),
            (
                serde_json::json!({"readinessProbe": {"httpGet": {"port": "admin"}}}),
                "spec.containers[0].readinessProbe.httpGet.port: port \"admin\" is not a port of this container (its named ports: http)",
            ),
            (
                serde_json::json!({"livenessProbe": {"tcpSocket": {"port": 8080}, "successThreshold": 2}}),
                "spec.containers[0].livenessProbe.successThreshold: 2: must be 1 for a livenessProbe (it counts one success)",
            ),
            (
                serde_json::json!({"startupProbe": {"tcpSocket": {"port": 8080}, "successThreshold": 3}}),
                "spec.containers[0].startupProbe.successThreshold: 3: must be 1 for a startupProbe (it counts one success)",
            ),
            (
                serde_json::json!({"readinessProbe": {"tcpSocket": {"port": 0}}}),
                "spec.containers[0].readinessProbe.tcpSocket.port: 0 must be between 1 and 65535",
            ),
            (
                serde_json::json!({"readinessProbe": {"exec": {"command": []}}}),
                "spec.containers[0].readinessProbe.exec.command: required: the command to run",
            ),
            (
                serde_json::json!({"readinessProbe": {"httpGet": {"port": 80, "scheme": "FTP"}}}),
                "spec.containers[0].readinessProbe.httpGet.scheme: unsupported value \"FTP\": must be HTTP or HTTPS",
            ),
            (
                serde_json::json!({"readinessProbe": {"httpGet": {"port": 80, "httpHeaders": [{"name": "a b", "value": "x"}]}}}),
                "spec.containers[0].readinessProbe.httpGet.httpHeaders[0].name: \"a b\" is not a valid HTTP header name",
            ),
            (
                serde_json::json!({"readinessProbe": {"tcpSocket": {"port": 80}, "terminationGracePeriodSeconds": 5}}),
                "spec.containers[0].readinessProbe.terminationGracePeriodSeconds: must not be set for readinessProbes (a readiness failure never kills)",
            ),
            (
                serde_json::json!({"livenessProbe": {"tcpSocket": {"port": 80}, "failureThreshold": -1}}),
                "spec.containers[0].livenessProbe.failureThreshold: -1 must be greater than or equal to 0",
            ),
            (
                serde_json::json!({"livenessProbe": {"grpc": {"port": 0}}}),
                "spec.containers[0].livenessProbe.grpc.port: 0 must be between 1 and 65535",
            ),
            (
                serde_json::json!({"lifecycle": {"preStop": {"tcpSocket": {"port": 80}}}}),
                "spec.containers[0].lifecycle.preStop.tcpSocket: is not supported as a lifecycle handler (as in Kubernetes): use exec, httpGet or sleep",
            ),
            (
                serde_json::json!({"lifecycle": {"postStart": {"sleep": {"seconds": 1}}}}),
                "spec.containers[0].lifecycle.postStart.sleep: a postStart sleep handler is not supported by Berth yet; use exec (a hook is never ignored)",
            ),
            (
                serde_json::json!({"lifecycle": {"postStart": {}}}),
                "spec.containers[0].lifecycle.postStart: must specify a handler: exec, httpGet or sleep",
            ),
        ];
        for (extra, want) in table {
            assert_eq!(problems(extra.clone(), false), [*want], "{extra}");
        }
        assert_eq!(
            problems(
                serde_json::json!({"readinessProbe": {"tcpSocket": {"port": 80}}}),
                true
            ),
            [
                "spec.containers[0].readinessProbe: may not be set for init containers without restartPolicy: Always"
            ]
        );
    }

    #[test]
    fn defaults_are_the_api_servers_and_named_ports_resolve() {
        let c = container(serde_json::json!({
            "readinessProbe": {"httpGet": {"port": "http", "path": "healthz", "httpHeaders": [{"name": "X-A", "value": "1"}]}, "periodSeconds": 0},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 5, "terminationGracePeriodSeconds": 3},
            "lifecycle": {"preStop": {"sleep": {"seconds": 2}}}
        }));
        let probes = probes_of(&c);
        let ready = probes.readiness.expect("readiness");
        assert_eq!(
            ready.action,
            Action::HttpGet(HttpGet {
                https: false,
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("X-A".into(), "1".into())],
            })
        );
        assert_eq!(
            (
                ready.period_seconds,
                ready.timeout_seconds,
                ready.success_threshold,
                ready.failure_threshold
            ),
            (10, 1, 1, 3)
        );
        let live = probes.liveness.expect("liveness");
        assert_eq!(live.initial_delay_seconds, 5);
        assert_eq!(live.termination_grace_period_seconds, Some(3));
        assert!(probes.startup.is_none());
        assert_eq!(
            hooks_of(&c).pre_stop,
            Some(Box::new(Action::Sleep { seconds: 2 }))
        );
        assert!(
            problems(
                serde_json::json!({"readinessProbe": {"httpGet": {"port": "http"}}}),
                false
            )
            .is_empty()
        );
    }
}

//! A container's isolation as systemd properties: what `securityContext`
//! asks, on top of defaults as strict as Kubernetes' "restricted" Pod
//! Security Standard allows without breaking ordinary images.
//!
//! | field | default | systemd |
//! |---|---|---|
//! | `capabilities` | the container runtimes' 14 | `CapabilityBoundingSet=` |
//! | `allowPrivilegeEscalation` | false | `NoNewPrivileges=` |
//! | `seccompProfile` | `RuntimeDefault` | `SystemCallFilter=~...`, `RestrictNamespaces=yes` |
//! | `readOnlyRootFilesystem` | false | `ReadOnlyPaths=/` |
//! | `privileged` | false (only at Pod Security level `privileged`, see [`crate::podsecurity`]) | none of the above, the host's `/dev` |
//!
//! Always, unless privileged: a minimal `/dev` (`PrivateDevices=`), and
//! `/proc/sys`, `/sys`, kernel modules, the kernel log and the cgroup tree
//! out of reach (`ProtectKernel*=`, `ProtectControlGroups=`).

use std::sync::LazyLock;

use berth_manifest::diag::{FieldIssue, FieldPath};
use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};

use crate::units::{Properties, PropertyValue};

/// Linux capabilities by number, as `capabilities(7)` names them.
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What containerd and CRI-O give a container that asks for nothing.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Capabilities systemd itself removes from the bounding set when the
/// protections below are on; removed here too, so what is read back equals
/// what was planned.
const IMPLIED_DROPS: &[&str] = &["MKNOD", "SYS_RAWIO", "SYS_MODULE", "SYSLOG"];

/// The `RuntimeDefault` filter: system calls a container has no business
/// making, refused with `EPERM` (as Docker's default profile does). The
/// groups are systemd's (`systemd-analyze syscall-filter`).
pub const RUNTIME_DEFAULT_DENY: &[&str] = &[
    "@clock",
    "@cpu-emulation",
    "@debug",
    "@module",
    "@mount",
    "@obsolete",
    "@raw-io",
    "@reboot",
    "@swap",
    "acct",
    "add_key",
    "bpf",
    "fanotify_init",
    "kcmp",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "move_pages",
    "name_to_handle_at",
    "open_by_handle_at",
    "quotactl",
    "request_key",
    "set_mempolicy",
    "setns",
    "unshare",
    "userfaultfd",
];

/// Properties systemd reads back in another form than they were sent
/// (`SystemCallFilter=` comes back with its groups expanded); they are not
/// compared. The profile they come from is in `LogExtraFields`, which is.
pub const WRITE_ONLY: &[&str] = &["SystemCallFilter", "SystemCallArchitectures"];

/// The journal field that records a container's seccomp profile.
pub const SECCOMP_FIELD: &str = "BERTH_SECCOMP";

/// `NET_ADMIN` or `CAP_NET_ADMIN` → its number.
pub fn capability(name: &str) -> Option<u64> {
    let bare = name.strip_prefix("CAP_").unwrap_or(name);
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|i| i as u64)
}

fn mask(names: &[&str]) -> u64 {
    names
        .iter()
        .filter_map(|n| capability(n))
        .fold(0, |m, bit| m | (1 << bit))
}

const ALL_CAPS: u64 = (1 << CAPABILITIES.len()) - 1;

#[derive(Debug)]
pub struct Input<'a> {
    pub pod: Option<&'a PodSecurityContext>,
    /// Where the pod spec sits (`spec`, `spec.template.spec`).
    pub pod_path: &'a FieldPath,
    pub container: Option<&'a SecurityContext>,
    /// Where the container sits in its source (`spec.containers[0]`).
    pub path: &'a FieldPath,
}

/// Adds the isolation properties, or says why the container may not run.
/// Returns the seccomp profile's name for the journal field. Whether the
/// pod may ask for this much is Pod Security's decision, taken before.
pub fn isolate(
    input: &Input<'_>,
    p: &mut Properties,
    errors: &mut Vec<FieldIssue>,
) -> &'static str {
    let sc = input.container;
    let scpath = input.path.key("securityContext");
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    if privileged {
        // The host's /dev, every capability, no filter: what Kubernetes gives.
        p.insert("CapabilityBoundingSet", PropertyValue::Unsigned(ALL_CAPS));
        return "Unconfined";
    }
    let mut caps = mask(DEFAULT_CAPABILITIES);
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        for (i, name) in c.drop.iter().flatten().enumerate() {
            match name.as_str() {
                "ALL" => caps = 0,
                n => match capability(n) {
                    Some(bit) => caps &= !(1 << bit),
                    None => errors.push(unknown_cap(
                        &scpath.key("capabilities").key("drop").index(i),
                        n,
                    )),
                },
            }
        }
        for (i, name) in c.add.iter().flatten().enumerate() {
            match name.as_str() {
                "ALL" => caps = ALL_CAPS,
                n => match capability(n) {
                    Some(bit) => caps |= 1 << bit,
                    None => errors.push(unknown_cap(
                        &scpath.key("capabilities").key("add").index(i),
                        n,
                    )),
                },
            }
        }
    }
    caps &= !mask(IMPLIED_DROPS);
    p.insert("CapabilityBoundingSet", PropertyValue::Unsigned(caps));
    let escalation = sc
        .and_then(|s| s.allow_privilege_escalation)
        .unwrap_or(false);
    p.insert("NoNewPrivileges", PropertyValue::Bool(!escalation));
    for key in [
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
    ] {
        p.insert(key, PropertyValue::Bool(true));
    }
    if sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false)
    {
        p.insert("ReadOnlyPaths", PropertyValue::list(vec!["/".into()]));
    }
    let (profile, profile_path) = match sc.and_then(|s| s.seccomp_profile.as_ref()) {
        Some(s) => (Some(s), scpath.key("seccompProfile")),
        None => (
            input.pod.and_then(|s| s.seccomp_profile.as_ref()),
            input.pod_path.key("securityContext").key("seccompProfile"),
        ),
    };
    match profile.map(|s| s.type_.as_str()) {
        None | Some("RuntimeDefault") => {
            // The same lists for every container: held once.
            static FILTER: LazyLock<PropertyValue> = LazyLock::new(|| {
                PropertyValue::list(
                    std::iter::once("~")
                        .chain(RUNTIME_DEFAULT_DENY.iter().copied())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                )
            });
            static NATIVE: LazyLock<PropertyValue> =
                LazyLock::new(|| PropertyValue::list(["native".to_string()]));
            p.insert("SystemCallFilter", FILTER.clone());
            p.insert("SystemCallArchitectures", NATIVE.clone());
            p.insert("SystemCallErrorNumber", PropertyValue::Signed(1));
            // No new namespaces of any kind (clone, unshare and setns flags).
            p.insert("RestrictNamespaces", PropertyValue::Unsigned(0));
            "RuntimeDefault"
        }
        Some("Unconfined") => "Unconfined",
        Some("Localhost") => {
            errors.push(FieldIssue::error(
                profile_path.key("type"),
                "Localhost seccomp profiles are not supported; use RuntimeDefault or Unconfined",
            ));
            "Localhost"
        }
        Some(other) => {
            errors.push(FieldIssue::error(
                profile_path.key("type"),
                format!("{other:?} is not a seccomp profile type (RuntimeDefault, Unconfined, Localhost)"),
            ));
            "RuntimeDefault"
        }
    }
}

fn unknown_cap(path: &FieldPath, name: &str) -> FieldIssue {
    FieldIssue::error(
        path.clone(),
        format!("{name:?} is not a Linux capability (NET_ADMIN, SYS_TIME, ..., or ALL)"),
    )
}

/// Whether the agent's `privileged` check passes for a manifest, for
/// `berth validate` without a node: Kubernetes' own rule that a privileged
/// container cannot forbid privilege escalation.
pub fn check_combination(sc: &SecurityContext, path: &FieldPath, errors: &mut Vec<FieldIssue>) {
    let escalation = sc.allow_privilege_escalation;
    let adds_sys_admin = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .is_some_and(|a| a.iter().any(|n| capability(n) == capability("SYS_ADMIN")));
    if escalation == Some(false) && (sc.privileged == Some(true) || adds_sys_admin) {
        errors.push(FieldIssue::error(
            path.key("allowPrivilegeEscalation"),
            "cannot be false when the container is privileged or adds SYS_ADMIN",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile};

    fn run(sc: Option<SecurityContext>) -> (Properties, Vec<FieldIssue>, &'static str) {
        let mut p = Properties::new();
        let mut errors = Vec::new();
        let path = FieldPath::root().key("spec").key("containers").index(0);
        let profile = isolate(
            &Input {
                pod: None,
                pod_path: &FieldPath::root().key("spec"),
                container: sc.as_ref(),
                path: &path,
            },
            &mut p,
            &mut errors,
        );
        (p, errors, profile)
    }

    fn caps(p: &Properties) -> Vec<&'static str> {
        let Some(PropertyValue::Unsigned(m)) = p.get("CapabilityBoundingSet") else {
            return vec![];
        };
        CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(i, _)| m & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    }

    #[test]
    fn defaults_are_the_runtime_capabilities_no_new_privileges_and_a_filter() {
        let (p, errors, profile) = run(None);
        assert!(errors.is_empty());
        assert_eq!(profile, "RuntimeDefault");
        let got = caps(&p);
        assert_eq!(got.len(), 13, "{got:?}");
        assert!(!got.contains(&"MKNOD") && got.contains(&"NET_BIND_SERVICE"));
        assert_eq!(p.get("NoNewPrivileges"), Some(&PropertyValue::Bool(true)));
        assert_eq!(p.get("PrivateDevices"), Some(&PropertyValue::Bool(true)));
        assert!(
            matches!(p.get("SystemCallFilter"), Some(PropertyValue::List(l)) if l[0] == "~" && l.contains(&"@mount".to_string()))
        );
        assert_eq!(
            p.get("RestrictNamespaces"),
            Some(&PropertyValue::Unsigned(0))
        );
        assert!(p.get("ReadOnlyPaths").is_none());
    }

    #[test]
    fn security_context_fields_change_what_they_name() {
        let sc = SecurityContext {
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()]),
            }),
            allow_privilege_escalation: Some(true),
            read_only_root_filesystem: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        };
        let (p, errors, profile) = run(Some(sc));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(caps(&p), ["NET_ADMIN", "SYS_TIME"]);
        assert_eq!(p.get("NoNewPrivileges"), Some(&PropertyValue::Bool(false)));
        assert_eq!(
            p.get("ReadOnlyPaths"),
            Some(&PropertyValue::list(vec!["/".into()]))
        );
        assert_eq!(profile, "Unconfined");
        assert!(p.get("SystemCallFilter").is_none());
    }

    #[test]
    fn privileged_gets_everything_and_bad_names_are_refused() {
        let privileged = SecurityContext {
            privileged: Some(true),
            ..Default::default()
        };
        let (p, errors, _) = run(Some(privileged));
        assert!(errors.is_empty());
        assert_eq!(caps(&p).len(), CAPABILITIES.len());
        assert!(p.get("NoNewPrivileges").is_none() && p.get("PrivateDevices").is_none());
        let bad = SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMINN".into()]),
                drop: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some("x.json".into()),
            }),
            ..Default::default()
        };
        let (_, errors, _) = run(Some(bad));
        let text: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        assert!(
            text[0].contains("capabilities.add[0]") && text[0].contains("NET_ADMINN"),
            "{text:?}"
        );
        assert!(
            text[1].contains("seccompProfile.type") && text[1].contains("Localhost"),
            "{text:?}"
        );
        let mut errors = Vec::new();
        check_combination(
            &SecurityContext {
                privileged: Some(true),
                allow_privilege_escalation: Some(false),
                ..Default::default()
            },
            &FieldPath::root(),
            &mut errors,
        );
        assert_eq!(errors.len(), 1);
    }
}

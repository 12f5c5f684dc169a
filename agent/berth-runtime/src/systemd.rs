//! The part of systemd's manager API Berth uses, as a trait with two
//! implementations: [`crate::dbus::DbusSystemd`] talks to PID 1, and
//! [`crate::fake::FakeSystemd`] keeps units in memory with the same
//! semantics for the loop's unit tests. The cases in [`crate::contract`]
//! run against both.

use berth_plan::{ActiveState, Properties};

/// `ListUnitsByPatterns` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSummary {
    pub name: String,
    pub load_state: String,
    pub active_state: ActiveState,
    pub sub_state: String,
}

/// A unit as Berth reads it back: the properties it may have set, and the
/// runtime facts status reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitDetails {
    pub name: String,
    pub active_state: ActiveState,
    pub sub_state: String,
    /// Only the properties named in [`READ_BACK`], in Berth's value types.
    pub properties: Properties,
    pub runtime: UnitRuntime,
}

impl UnitDetails {
    /// The main process of a unit that is active, and its working
    /// directory (`WorkingDirectory`, else `/`): where `berth exec`, an
    /// exec probe or a hook enters the container. `None` when it is not
    /// running.
    pub fn running_process(&self) -> Option<(u32, String)> {
        if self.active_state != ActiveState::Active || self.runtime.main_pid == 0 {
            return None;
        }
        let workdir = match self.properties.get("WorkingDirectory") {
            Some(berth_plan::PropertyValue::Text(d)) if d.starts_with('/') => d.to_string(),
            _ => "/".to_string(),
        };
        Some((self.runtime.main_pid, workdir))
    }
}

/// What changes while a unit runs; never compared against the plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitRuntime {
    /// `NRestarts`: automatic restarts since the unit was started.
    pub restarts: u32,
    /// `ExecMainStatus`: exit status or signal number of the last main process.
    pub exit_status: i32,
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped core (`CLD_*`), 0 none yet.
    pub exit_code: i32,
    pub main_pid: u32,
    /// Microseconds since the epoch the unit last became active; 0 if never.
    pub active_enter_usec: u64,
    /// `ControlGroup`, e.g. `/berth.slice/berth-burstable.slice/...`.
    pub control_group: String,
    /// `Result`: `success`, `exit-code`, `signal`, `oom-kill`, `resources`, ...
    pub result: String,
}

/// Who a `KillUnit` signal goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillWhom {
    Main,
    All,
}

impl KillWhom {
    pub fn as_str(self) -> &'static str {
        match self {
            KillWhom::Main => "main",
            KillWhom::All => "all",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to systemd over D-Bus: {0}")]
    Connect(String),
    #[error("unit {unit}: systemd refused {method}: {message}")]
    Refused {
        unit: String,
        method: &'static str,
        message: String,
    },
    #[error("unit {unit}: {method} job ended with result {result:?}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    JobFailed {
        unit: String,
        method: &'static str,
        result: String,
        detail: Option<String>,
    },
    #[error("unit {unit}: {method} job did not finish within {seconds} s")]
    JobTimeout {
        unit: String,
        method: &'static str,
        seconds: u64,
    },
    #[error("unit {unit}: property {property} cannot be sent to systemd: {message}")]
    Property {
        unit: String,
        property: String,
        message: String,
    },
    #[error("D-Bus call {method} failed: {message}")]
    Bus {
        method: &'static str,
        message: String,
    },
}

/// systemd's manager, as far as Berth drives it. Methods that queue a job
/// (start, stop) return once the job has finished, with its result.
pub trait Systemd: Send + Sync {
    /// The manager's major version (257 for Debian 13), for gating properties.
    fn version(&self) -> Result<u32, SystemdError>;
    /// Whether the system is going down (`SystemState` is `stopping`): units
    /// stop on their own then, and nothing is to be started or cleaned up.
    fn shutting_down(&self) -> bool {
        false
    }
    /// Loaded units whose names match one of the shell-style patterns.
    fn list_units(&self, patterns: &[&str]) -> Result<Vec<UnitSummary>, SystemdError>;
    /// The unit's properties and runtime facts; `None` if it is not loaded.
    fn unit(&self, name: &str) -> Result<Option<UnitDetails>, SystemdError>;
    /// The details of every loaded unit whose name matches one of
    /// `patterns`: what `list_units` and then `unit` on each give, where a
    /// unit gone in between is left out. The manager over D-Bus reads them
    /// in parallel, without a `GetUnit` round trip each.
    fn units_matching(&self, patterns: &[&str]) -> Result<Vec<UnitDetails>, SystemdError> {
        let mut out = Vec::new();
        for summary in self.list_units(patterns)? {
            if summary.load_state != "loaded" {
                continue;
            }
            out.extend(self.unit(&summary.name)?);
        }
        Ok(out)
    }
    /// `StartTransientUnit` in mode `fail`, waiting for the job.
    fn start_transient(&self, name: &str, properties: &Properties) -> Result<(), SystemdError>;
    /// Starts several transient units at once and waits for all of them.
    /// One result per unit, in order.
    fn start_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        units
            .iter()
            .map(|(n, p)| self.start_transient(n, p))
            .collect()
    }
    /// `StopUnit` in mode `replace`, waiting for the job. Stopping a unit
    /// that is not loaded is not an error.
    fn stop(&self, name: &str) -> Result<(), SystemdError>;
    /// Stops several units at once and waits for all of them: pods stop in
    /// parallel, so one that waits out its grace period does not hold up the
    /// rest. One result per name, in order.
    fn stop_all(&self, names: &[&str]) -> Vec<Result<(), SystemdError>> {
        names.iter().map(|n| self.stop(n)).collect()
    }
    fn kill(&self, name: &str, whom: KillWhom, signal: i32) -> Result<(), SystemdError>;
    /// Forgets a failed unit, so a transient one of the same name can start.
    fn reset_failed(&self, name: &str) -> Result<(), SystemdError>;
    /// `SetUnitProperties` with `runtime=true`: the change lives as long as the unit.
    fn set_properties(&self, name: &str, properties: &Properties) -> Result<(), SystemdError>;
    /// `set_properties` on several units at once; one result per unit, in
    /// order.
    fn set_properties_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        units
            .iter()
            .map(|(n, p)| self.set_properties(n, p))
            .collect()
    }
    /// Starts `reboot.target` in mode `replace-irreversibly`, as `systemctl
    /// reboot` does: every unit (each pod with its grace period) stops
    /// first. Returns once the job is queued; the system is going down.
    fn reboot(&self) -> Result<(), SystemdError>;
}

/// A shared handle works like the manager itself (tests keep one to look inside).
impl<T: Systemd + ?Sized> Systemd for std::sync::Arc<T> {
    fn version(&self) -> Result<u32, SystemdError> {
        (**self).version()
    }
    fn shutting_down(&self) -> bool {
        (**self).shutting_down()
    }
    fn list_units(&self, patterns: &[&str]) -> Result<Vec<UnitSummary>, SystemdError> {
        (**self).list_units(patterns)
    }
    fn unit(&self, name: &str) -> Result<Option<UnitDetails>, SystemdError> {
        (**self).unit(name)
    }
    fn units_matching(&self, patterns: &[&str]) -> Result<Vec<UnitDetails>, SystemdError> {
        (**self).units_matching(patterns)
    }
    fn start_transient(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        (**self).start_transient(name, properties)
    }
    fn stop(&self, name: &str) -> Result<(), SystemdError> {
        (**self).stop(name)
    }
    fn stop_all(&self, names: &[&str]) -> Vec<Result<(), SystemdError>> {
        (**self).stop_all(names)
    }
    fn start_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        (**self).start_all(units)
    }
    fn kill(&self, name: &str, whom: KillWhom, signal: i32) -> Result<(), SystemdError> {
        (**self).kill(name, whom, signal)
    }
    fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        (**self).reset_failed(name)
    }
    fn set_properties(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        (**self).set_properties(name, properties)
    }
    fn set_properties_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        (**self).set_properties_all(units)
    }
    fn reboot(&self) -> Result<(), SystemdError> {
        (**self).reboot()
    }
}

/// The properties Berth reads back to compare with the plan. Anything else
/// a unit carries is not Berth's business.
pub const READ_BACK: &[&str] = &[
    "After",
    "BindPaths",
    "BindReadOnlyPaths",
    "CapabilityBoundingSet",
    "CPUQuotaPerSecUSec",
    "CPUQuotaPeriodUSec",
    "CPUWeight",
    "Description",
    "Environment",
    "EnvironmentFiles",
    "ExecSearchPath",
    "ExecStart",
    "ExecStartPost",
    "Group",
    "LogExtraFields",
    "MemoryHigh",
    "MemoryLow",
    "MemoryMax",
    "MountAPIVFS",
    "NetworkNamespacePath",
    "NoNewPrivileges",
    "OOMScoreAdjust",
    "Options",
    "PrivateDevices",
    "PrivatePIDs",
    "PrivateTmp",
    "ProtectControlGroups",
    "ProtectKernelLogs",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "ReadOnlyPaths",
    "RemainAfterExit",
    "Requires",
    "RequiresMountsFor",
    "Restart",
    "RestartMaxDelayUSec",
    "RestartSteps",
    "RestartUSec",
    "RestrictNamespaces",
    "RootDirectory",
    "Slice",
    "StartLimitIntervalUSec",
    "SystemCallErrorNumber",
    "TasksMax",
    "TimeoutStopUSec",
    "Type",
    "User",
    "What",
    "WorkingDirectory",
];

/// The D-Bus signature a property is sent with, where the value's own type
/// does not say it: systemd refuses a `t` where it expects a `u`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    U32,
    I32,
    /// `aay`: `LogExtraFields` entries are byte strings.
    ByteStrings,
    /// A boolean setting whose D-Bus type is a string (`PrivatePIDs` is `s`:
    /// it may grow more values than yes and no).
    YesNo,
    /// `(bas)`: a list whose first item is `~` is a deny list, as in unit files.
    SyscallFilter,
    /// `a(sasas)` under the property's `Ex` name, flagged `no-env-expand`
    /// (a unit file's `:` prefix): systemd would otherwise expand `$VAR`,
    /// `${VAR}` and `$$` in the command line after Berth's own `$(VAR)`
    /// expansion, which Kubernetes does not do.
    ExecNoExpand,
    /// `a(sb)`: files of environment (none optional), from a list of paths.
    EnvironmentFiles,
    /// Whatever the value's variant maps to (`t`, `x`, `b`, `s`, `as`, `a(sasb)`).
    Natural,
}

pub fn wire_type(property: &str) -> Wire {
    match property {
        "RestartSteps" => Wire::U32,
        "OOMScoreAdjust" => Wire::I32,
        "LogExtraFields" => Wire::ByteStrings,
        "PrivatePIDs" => Wire::YesNo,
        "SystemCallFilter" => Wire::SyscallFilter,
        "SystemCallErrorNumber" => Wire::I32,
        "ExecStart" | "ExecStartPost" => Wire::ExecNoExpand,
        "EnvironmentFiles" => Wire::EnvironmentFiles,
        _ => Wire::Natural,
    }
}

/// The name a property is sent under.
pub fn wire_name(property: &str) -> &str {
    match property {
        "ExecStart" => "ExecStartEx",
        "ExecStartPost" => "ExecStartPostEx",
        _ => property,
    }
}

pub use berth_plan::units::introduced_in;

/// Shell-style matching with `*` and `?`, as `ListUnitsByPatterns` does.
pub use berth_manifest::names::wildcard_match as glob_match;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_list_units_by_patterns() {
        assert!(glob_match("berth-*.service", "berth-a_b_c.service"));
        assert!(glob_match("berth*", "berth.slice"));
        assert!(!glob_match("berth-*.service", "berth-a.slice"));
        assert!(!glob_match("berth-*", "sshd.service"));
        assert!(glob_match("a?c", "abc"));
    }
}

#[cfg(test)]
mod read_back_tests {
    use super::*;

    /// Every property the planner sets is read back, or a converged node
    /// would see it "unset" on every pass and restart its containers.
    #[test]
    fn every_planned_property_is_read_back() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  securityContext: {runAsUser: 1000, runAsGroup: 1000}\n  volumes: [{name: a, emptyDir: {}}, {name: b, emptyDir: {}}]\n  initContainers:\n  - {name: init, image: busybox:1.37, command: [\"true\"]}\n  containers:\n  - name: c\n    image: busybox:1.37\n    command: [sleep, \"1\"]\n    workingDir: /tmp\n    volumeMounts: [{name: a, mountPath: /a}, {name: b, mountPath: /b, readOnly: true}]\n    env: [{name: A, value: b}]\n    resources:\n      requests: {cpu: 100m, memory: 16Mi}\n      limits: {cpu: 200m, memory: 32Mi}\n";
        let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
            path: "p.yaml".into(),
            text: pod.into(),
        }]);
        let node = berth_plan::NodeInfo::new("n", Default::default(), 1 << 30, 2000);
        let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
            reference: "busybox:1.37".into(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        }]);
        let plan = berth_plan::plan_node(&catalog, &node, &images, &Default::default(), "r");
        assert_eq!(plan.pods.len(), 1, "{:?}", plan.diagnostics);
        let pod = &plan.pods[0];
        let mut keys: Vec<&str> = pod.slice.properties.iter().map(|(k, _)| k).collect();
        for u in pod.units() {
            keys.extend(u.properties_for_apply().iter().map(|(k, _)| k));
        }
        for key in ["NetworkNamespacePath", "BindPaths", "BindReadOnlyPaths"] {
            assert!(keys.contains(&key), "{key} not planned");
        }
        let missing: Vec<&&str> = keys
            .iter()
            .filter(|k| !READ_BACK.contains(k) && !berth_plan::security::WRITE_ONLY.contains(k))
            .collect();
        assert!(
            missing.is_empty(),
            "planned but never read back: {missing:?}"
        );
    }
}

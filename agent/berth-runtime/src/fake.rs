//! An in-memory systemd with the semantics Berth relies on, for the loop's
//! unit tests: transient units that refuse duplicates, start jobs that fail
//! for a missing binary (`Type=exec`), slices created implicitly and
//! stopped with their children, failed units kept until `ResetFailedUnit`,
//! automatic restarts counted in `NRestarts`, properties refused when the
//! manager is too old for them, and units an admin made that Berth must not
//! touch. [`crate::contract`] runs the same cases against it and against
//! PID 1 in QEMU.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use berth_plan::{ActiveState, Properties, PropertyValue};

use crate::systemd::{
    KillWhom, READ_BACK, Systemd, SystemdError, UnitDetails, UnitRuntime, UnitSummary, glob_match,
    introduced_in,
};

#[derive(Debug, Clone)]
struct FakeUnit {
    properties: Properties,
    active: ActiveState,
    sub: String,
    runtime: UnitRuntime,
    /// Transient units vanish when they stop; an admin's unit file stays.
    transient: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    units: BTreeMap<String, FakeUnit>,
    missing_binaries: BTreeSet<String>,
    refused: BTreeSet<String>,
    next_pid: u32,
    clock_usec: u64,
    /// Every call that changes something, in order: `start NAME`, `stop NAME`, ...
    calls: Vec<String>,
    /// When set, changing calls beyond this many fail as if the bus went
    /// away: what an agent killed in the middle of an apply leaves behind.
    cut_after: Option<usize>,
    /// How many times the unit list was read.
    lists: usize,
    /// Units whose stop job takes this long (a process using its grace
    /// period); their stop is recorded again as `stopped NAME` when done.
    slow_stops: BTreeMap<String, std::time::Duration>,
    /// A reboot was asked: the system is going down, every unit stopped.
    rebooting: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct FakeSystemd {
    version: u32,
    state: Mutex<FakeState>,
}

fn text(props: &Properties, key: &str) -> Option<String> {
    match props.get(key) {
        Some(PropertyValue::Text(t)) => Some(t.to_string()),
        _ => None,
    }
}

/// The cgroup path systemd gives a unit in `slice`: every `-`-separated
/// prefix of the slice name is a parent slice.
pub fn cgroup_path(slice: &str, unit: &str) -> String {
    let mut path = String::new();
    let stem = slice.trim_end_matches(".slice");
    let bytes = stem.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'-' {
            path.push('/');
            path.push_str(&stem[..i]);
            path.push_str(".slice");
        }
    }
    if !stem.is_empty() && stem != "-" {
        path.push('/');
        path.push_str(stem);
        path.push_str(".slice");
    }
    path.push('/');
    path.push_str(unit);
    path
}

impl FakeSystemd {
    pub fn new(version: u32) -> Self {
        Self {
            version,
            state: Mutex::new(FakeState {
                next_pid: 1000,
                clock_usec: 1_700_000_000_000_000,
                ..FakeState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock has failed already.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A unit an admin made from a unit file: Berth must never change it.
    pub fn add_admin_unit(&self, name: &str, description: &str) {
        let mut s = self.lock();
        s.next_pid += 1;
        let pid = s.next_pid;
        s.units.insert(
            name.to_string(),
            FakeUnit {
                properties: [("Description", PropertyValue::Text(description.into()))]
                    .into_iter()
                    .collect(),
                active: ActiveState::Active,
                sub: "running".into(),
                runtime: UnitRuntime {
                    main_pid: pid,
                    ..UnitRuntime::default()
                },
                transient: false,
            },
        );
    }

    /// Starting a unit whose `ExecStart` names this program fails as
    /// systemd does when the binary is missing (status 203/EXEC).
    pub fn remove_binary(&self, path: &str) {
        self.lock().missing_binaries.insert(path.to_string());
    }

    /// Refuses a property as an older or stricter systemd would.
    pub fn refuse_property(&self, property: &str) {
        self.lock().refused.insert(property.to_string());
    }

    /// The main process exits by itself with `status`; the unit's
    /// `Restart=` decides what follows, as in systemd.
    pub fn exit_main(&self, name: &str, status: i32) {
        Self::main_died(&mut self.lock(), name, 1, status);
    }

    /// Stopping `name` takes `how_long` from now on, as a process that
    /// uses its grace period: the stop job waits, other calls go on.
    pub fn slow_stop(&self, name: &str, how_long: std::time::Duration) {
        self.lock().slow_stops.insert(name.to_string(), how_long);
    }

    /// Names of all loaded units.
    pub fn unit_names(&self) -> Vec<String> {
        self.lock().units.keys().cloned().collect()
    }

    /// How many times `list_units` was called: each observe calls it.
    pub fn list_count(&self) -> usize {
        self.lock().lists
    }

    /// Lets `n` more changing calls through, then fails every one.
    pub fn cut_after(&self, n: usize) {
        let mut s = self.lock();
        s.cut_after = Some(s.calls.len() + n);
    }

    /// Undoes [`Self::cut_after`].
    pub fn reconnect(&self) {
        self.lock().cut_after = None;
    }

    fn record(s: &mut FakeState, call: String) -> Result<(), SystemdError> {
        if s.cut_after.is_some_and(|limit| s.calls.len() >= limit) {
            return Err(SystemdError::Bus {
                method: "call",
                message: "the connection was closed".into(),
            });
        }
        s.calls.push(call);
        Ok(())
    }

    /// Calls that changed something, in order, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().calls)
    }

    fn main_died(s: &mut FakeState, name: &str, code: i32, status: i32) {
        s.next_pid += 1;
        let pid = s.next_pid;
        let Some(unit) = s.units.get_mut(name) else {
            return;
        };
        if unit.active != ActiveState::Active || unit.runtime.main_pid == 0 {
            return;
        }
        let restart = text(&unit.properties, "Restart").unwrap_or_else(|| "no".into());
        let clean = code == 1 && status == 0;
        unit.runtime.exit_code = code;
        unit.runtime.exit_status = status;
        let restarts = match restart.as_str() {
            "always" => true,
            "on-failure" => !clean,
            _ => false,
        };
        if restarts {
            unit.runtime.restarts += 1;
            unit.runtime.main_pid = pid;
            return;
        }
        unit.runtime.main_pid = 0;
        let remain = matches!(
            unit.properties.get("RemainAfterExit"),
            Some(PropertyValue::Bool(true))
        );
        if clean {
            unit.runtime.result = "success".into();
            if remain {
                unit.sub = "exited".into();
            } else {
                unit.active = ActiveState::Inactive;
                unit.sub = "dead".into();
                if unit.transient {
                    s.units.remove(name);
                }
            }
        } else {
            unit.runtime.result = if code == 1 { "exit-code" } else { "signal" }.into();
            unit.active = ActiveState::Failed;
            unit.sub = "failed".into();
        }
    }

    fn check_properties(
        &self,
        s: &FakeState,
        name: &str,
        method: &'static str,
        properties: &Properties,
    ) -> Result<(), SystemdError> {
        for (key, _) in properties.iter() {
            let too_new = introduced_in(key).is_some_and(|v| v > self.version);
            let known = READ_BACK.contains(&key) || berth_plan::security::WRITE_ONLY.contains(&key);
            if !known || s.refused.contains(key) || too_new {
                return Err(SystemdError::Refused {
                    unit: name.to_string(),
                    method,
                    message: format!("Cannot set property {key}, or unknown property."),
                });
            }
        }
        Ok(())
    }

    fn ensure_slice(s: &mut FakeState, slice: &str) {
        if slice.is_empty() || s.units.contains_key(slice) {
            return;
        }
        let stem = slice.trim_end_matches(".slice");
        if let Some(i) = stem.rfind('-') {
            Self::ensure_slice(s, &format!("{}.slice", &stem[..i]));
        }
        s.units.insert(
            slice.to_string(),
            FakeUnit {
                properties: [("Description", PropertyValue::text(format!("Slice {slice}")))]
                    .into_iter()
                    .collect(),
                active: ActiveState::Active,
                sub: "active".into(),
                runtime: UnitRuntime::default(),
                transient: true,
            },
        );
    }

    fn parent_slice(name: &str) -> Option<String> {
        let stem = name.strip_suffix(".slice")?;
        stem.rfind('-').map(|i| format!("{}.slice", &stem[..i]))
    }

    /// Units that live in `slice`, directly or in a child slice.
    fn members(s: &FakeState, slice: &str) -> Vec<String> {
        let stem = slice.trim_end_matches(".slice");
        s.units
            .iter()
            .filter(|(n, u)| {
                text(&u.properties, "Slice").as_deref() == Some(slice)
                    || (n.ends_with(".slice")
                        && n.as_str() != slice
                        && n.starts_with(&format!("{stem}-")))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn stop_locked(s: &mut FakeState, name: &str) {
        if name.ends_with(".slice") {
            for member in Self::members(s, name) {
                Self::stop_locked(s, &member);
            }
        }
        let Some(unit) = s.units.get_mut(name) else {
            return;
        };
        if unit.transient {
            s.units.remove(name);
        } else {
            unit.active = ActiveState::Inactive;
            unit.sub = "dead".into();
            unit.runtime.main_pid = 0;
        }
    }
}

impl Systemd for FakeSystemd {
    fn version(&self) -> Result<u32, SystemdError> {
        Ok(self.version)
    }

    fn shutting_down(&self) -> bool {
        self.lock().rebooting
    }

    fn reboot(&self) -> Result<(), SystemdError> {
        let mut s = self.lock();
        Self::record(&mut s, "reboot".into())?;
        s.rebooting = true;
        let names: Vec<String> = s.units.keys().cloned().collect();
        for name in names {
            Self::stop_locked(&mut s, &name);
        }
        Ok(())
    }

    fn list_units(&self, patterns: &[&str]) -> Result<Vec<UnitSummary>, SystemdError> {
        let mut s = self.lock();
        s.lists += 1;
        Ok(s.units
            .iter()
            .filter(|(n, _)| patterns.is_empty() || patterns.iter().any(|p| glob_match(p, n)))
            .map(|(n, u)| UnitSummary {
                name: n.clone(),
                load_state: "loaded".into(),
                active_state: u.active,
                sub_state: u.sub.clone(),
            })
            .collect())
    }

    fn unit(&self, name: &str) -> Result<Option<UnitDetails>, SystemdError> {
        let s = self.lock();
        Ok(s.units.get(name).map(|u| {
            let mut runtime = u.runtime.clone();
            runtime.control_group = if name.ends_with(".slice") {
                let parent = Self::parent_slice(name).unwrap_or_default();
                cgroup_path(&parent, name)
            } else {
                cgroup_path(
                    &text(&u.properties, "Slice").unwrap_or_else(|| "system.slice".into()),
                    name,
                )
            };
            UnitDetails {
                name: name.to_string(),
                active_state: u.active,
                sub_state: u.sub.clone(),
                // Only what the D-Bus side reads back, as PID 1 would give it.
                properties: u
                    .properties
                    .iter()
                    .filter(|(k, _)| READ_BACK.contains(k))
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                runtime,
            }
        }))
    }

    fn start_transient(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        let mut s = self.lock();
        Self::record(&mut s, format!("start {name}"))?;
        self.check_properties(&s, name, "StartTransientUnit", properties)?;
        if s.units.contains_key(name) {
            return Err(SystemdError::Refused {
                unit: name.to_string(),
                method: "StartTransientUnit",
                message: format!("Unit {name} was already loaded or has a fragment file."),
            });
        }
        if let Some(parent) = Self::parent_slice(name) {
            Self::ensure_slice(&mut s, &parent);
        }
        if let Some(slice) = text(properties, "Slice") {
            Self::ensure_slice(&mut s, &slice);
        }
        s.next_pid += 1;
        s.clock_usec += 1_000_000;
        let pid = s.next_pid;
        let program = match properties.get("ExecStart") {
            Some(PropertyValue::Exec(cmds)) => cmds.first().map(|c| c.path.clone()),
            _ => None,
        };
        let service_type = text(properties, "Type").unwrap_or_else(|| "simple".into());
        let missing = program
            .as_ref()
            .is_some_and(|p| s.missing_binaries.contains(p));
        let is_service = name.ends_with(".service");
        let mut unit = FakeUnit {
            properties: properties.clone(),
            active: ActiveState::Active,
            sub: if is_service {
                "running"
            } else if name.ends_with(".mount") {
                "mounted"
            } else {
                "active"
            }
            .into(),
            runtime: UnitRuntime {
                main_pid: if is_service { pid } else { 0 },
                active_enter_usec: s.clock_usec,
                ..UnitRuntime::default()
            },
            transient: true,
        };
        if is_service && missing {
            unit.active = ActiveState::Failed;
            unit.sub = "failed".into();
            unit.runtime.main_pid = 0;
            unit.runtime.exit_code = 1;
            unit.runtime.exit_status = 203;
            unit.runtime.result = "exit-code".into();
            let fails_job = service_type != "simple";
            s.units.insert(name.to_string(), unit);
            return if fails_job {
                Err(SystemdError::JobFailed {
                    unit: name.to_string(),
                    method: "start",
                    result: "failed".into(),
                    detail: Some("exit-code, exit status 203".into()),
                })
            } else {
                Ok(())
            };
        }
        if is_service && service_type == "oneshot" {
            unit.runtime.main_pid = 0;
            unit.runtime.exit_code = 1;
            unit.runtime.result = "success".into();
            if matches!(
                properties.get("RemainAfterExit"),
                Some(PropertyValue::Bool(true))
            ) {
                unit.sub = "exited".into();
            } else {
                return Ok(());
            }
        }
        s.units.insert(name.to_string(), unit);
        Ok(())
    }

    fn stop(&self, name: &str) -> Result<(), SystemdError> {
        let slow = {
            let mut s = self.lock();
            Self::record(&mut s, format!("stop {name}"))?;
            s.slow_stops.get(name).copied()
        };
        // The job runs without holding the manager: other calls go on.
        if let Some(how_long) = slow {
            std::thread::sleep(how_long);
        }
        let mut s = self.lock();
        Self::stop_locked(&mut s, name);
        if slow.is_some() {
            s.calls.push(format!("stopped {name}"));
        }
        Ok(())
    }

    fn kill(&self, name: &str, whom: KillWhom, signal: i32) -> Result<(), SystemdError> {
        let mut s = self.lock();
        Self::record(&mut s, format!("kill {name} {} {signal}", whom.as_str()))?;
        let running = s
            .units
            .get(name)
            .is_some_and(|u| u.active == ActiveState::Active && u.runtime.main_pid != 0);
        if !running {
            return Err(SystemdError::Refused {
                unit: name.to_string(),
                method: "KillUnit",
                message: "No main process to kill".into(),
            });
        }
        Self::main_died(&mut s, name, 2, signal);
        Ok(())
    }

    fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        let mut s = self.lock();
        Self::record(&mut s, format!("reset-failed {name}"))?;
        if s.units
            .get(name)
            .is_some_and(|u| u.active == ActiveState::Failed && u.transient)
        {
            s.units.remove(name);
        } else if let Some(u) = s.units.get_mut(name)
            && u.active == ActiveState::Failed
        {
            u.active = ActiveState::Inactive;
            u.sub = "dead".into();
        }
        Ok(())
    }

    fn set_properties(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        let mut s = self.lock();
        Self::record(&mut s, format!("set-properties {name}"))?;
        self.check_properties(&s, name, "SetUnitProperties", properties)?;
        // A loaded unit takes only its resource-control (cgroup) settings and
        // its description at run time; what a process is started with
        // (oom_score_adj, environment, command) is refused, as PID 1 does.
        if let Some(key) = properties
            .iter()
            .map(|(k, _)| k)
            .find(|k| !RUNTIME_SETTABLE.contains(k))
        {
            return Err(SystemdError::Refused {
                unit: name.to_string(),
                method: "SetUnitProperties",
                message: format!("Cannot set property {key}, or unknown property."),
            });
        }
        let Some(unit) = s.units.get_mut(name) else {
            return Err(SystemdError::Refused {
                unit: name.to_string(),
                method: "SetUnitProperties",
                message: format!("Unit {name} not loaded."),
            });
        };
        for (k, v) in properties.iter() {
            unit.properties.insert(k.to_string(), v.clone());
        }
        Ok(())
    }
}

/// What `SetUnitProperties` changes on a loaded unit: resource control
/// (systemd's cgroup context) and the description.
pub const RUNTIME_SETTABLE: &[&str] = &[
    "Description",
    "CPUWeight",
    "CPUQuotaPerSecUSec",
    "CPUQuotaPeriodUSec",
    "MemoryMax",
    "MemoryLow",
    "MemoryHigh",
    "TasksMax",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_follow_the_slice_hierarchy() {
        assert_eq!(
            cgroup_path("berth-burstable-apps_web\\x2d0.slice", "x.service"),
            "/berth.slice/berth-burstable.slice/berth-burstable-apps_web\\x2d0.slice/x.service"
        );
        assert_eq!(
            cgroup_path("system.slice", "a.service"),
            "/system.slice/a.service"
        );
    }
}

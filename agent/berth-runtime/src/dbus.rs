//! [`Systemd`] over the system bus with zbus' blocking API.
//!
//! One connection per agent. At connect it calls `Subscribe` and opens the
//! `JobRemoved` stream before anything is started (systemd only signals
//! subscribers), and a thread files every finished job on a [`JobBoard`];
//! a start or stop then waits for its own job path there, so a job that
//! finishes before the call returns is not missed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use berth_plan::units::{BindMount, ExecCommand, MS_REC};
use berth_plan::{ActiveState, Properties, PropertyValue};
use zbus::blocking::{Connection, Proxy};
use zbus::zvariant::{Array, OwnedObjectPath, OwnedValue, Value};

use crate::parallel::in_parallel;
use crate::systemd::{
    KillWhom, READ_BACK, Systemd, SystemdError, UnitDetails, UnitRuntime, UnitSummary, Wire,
    wire_name, wire_type,
};

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// Called for every finished job with the unit's name and the job's result.
pub type JobListener = Box<dyn Fn(&str, &str) + Send + Sync>;
/// Called about once a second while a call waits for a job (the watchdog).
pub type Keepalive = Box<dyn Fn() + Send + Sync>;

/// Finished jobs by object path, bounded: jobs nobody waits for (systemd's
/// own restarts) are forgotten oldest first.
#[derive(Debug, Default)]
struct JobBoard {
    done: Mutex<(HashMap<String, String>, VecDeque<String>)>,
    changed: Condvar,
}

const JOB_BOARD_CAPACITY: usize = 4096;
/// Threads calling systemd at once for calls that do not depend on each
/// other (reading units, setting properties).
const CALLERS: usize = 4;

impl JobBoard {
    fn record(&self, job: String, result: String) {
        let Ok(mut guard) = self.done.lock() else {
            return;
        };
        let (map, order) = &mut *guard;
        if order.len() >= JOB_BOARD_CAPACITY
            && let Some(old) = order.pop_front()
        {
            map.remove(&old);
        }
        order.push_back(job.clone());
        map.insert(job, result);
        self.changed.notify_all();
    }

    fn wait(&self, job: &str, timeout: Duration, keepalive: Option<&Keepalive>) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.done.lock().ok()?;
        loop {
            if let Some(result) = guard.0.remove(job) {
                guard.1.retain(|j| j != job);
                return Some(result);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if let Some(k) = keepalive {
                k();
            }
            let step = (deadline - now).min(Duration::from_secs(1));
            guard = self.changed.wait_timeout(guard, step).ok()?.0;
        }
    }
}

pub struct DbusSystemd {
    conn: Connection,
    manager: Proxy<'static>,
    jobs: Arc<JobBoard>,
    version: u32,
    job_timeout: Duration,
    keepalive: Option<Keepalive>,
}

impl std::fmt::Debug for DbusSystemd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbusSystemd")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn bus(method: &'static str) -> impl Fn(zbus::Error) -> SystemdError {
    move |e| SystemdError::Bus {
        method,
        message: e.to_string(),
    }
}

fn method_error(e: &zbus::Error) -> Option<(String, String)> {
    match e {
        zbus::Error::MethodError(name, message, _) => Some((
            name.to_string(),
            message.clone().unwrap_or_else(|| name.to_string()),
        )),
        _ => None,
    }
}

fn refused(unit: &str, method: &'static str) -> impl Fn(zbus::Error) -> SystemdError {
    move |e| SystemdError::Refused {
        unit: unit.to_string(),
        method,
        message: method_error(&e).map_or_else(|| e.to_string(), |(_, m)| m),
    }
}

impl DbusSystemd {
    /// Every unit whose name matches one of `patterns`, in any state, as
    /// `ListUnitsByPatterns` lists it.
    fn listed(&self, patterns: &[&str]) -> Result<Vec<ListedUnit>, SystemdError> {
        let states: Vec<&str> = Vec::new();
        self.manager
            .call("ListUnitsByPatterns", &(states, patterns))
            .map_err(bus("ListUnitsByPatterns"))
    }

    /// Connects to the system bus, subscribes, and starts the job listener.
    /// `job_timeout` bounds how long a start or stop waits for its job.
    pub fn connect(
        job_timeout: Duration,
        listener: Option<JobListener>,
        keepalive: Option<Keepalive>,
    ) -> Result<Self, SystemdError> {
        let connect = |e: zbus::Error| SystemdError::Connect(e.to_string());
        let conn = Connection::system().map_err(connect)?;
        // Uncached: zbus would otherwise keep every manager property from
        // its first read and update only those systemd signals changes of,
        // and `SystemState` is not one of them (a shutdown would go unseen).
        let manager: Proxy<'static> = zbus::blocking::proxy::Builder::new(&conn)
            .destination(DEST)
            .and_then(|b| b.path(PATH))
            .and_then(|b| b.interface(MANAGER))
            .map_err(connect)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .map_err(connect)?;
        let signals = manager.receive_signal("JobRemoved").map_err(connect)?;
        manager
            .call_method("Subscribe", &())
            .map_err(bus("Subscribe"))?;
        let jobs = Arc::new(JobBoard::default());
        let board = Arc::clone(&jobs);
        std::thread::Builder::new()
            .name("systemd-jobs".into())
            .spawn(move || {
                for message in signals {
                    let body = message.body();
                    let Ok((_, job, unit, result)) =
                        body.deserialize::<(u32, OwnedObjectPath, String, String)>()
                    else {
                        continue;
                    };
                    if let Some(l) = &listener {
                        l(&unit, &result);
                    }
                    board.record(job.to_string(), result);
                }
            })
            .map_err(|e| SystemdError::Connect(format!("cannot start the job listener: {e}")))?;
        let version: String = manager
            .get_property("Version")
            .map_err(bus("Get Version"))?;
        let major = version
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        Ok(Self {
            conn,
            manager,
            jobs,
            version: major,
            job_timeout,
            keepalive,
        })
    }

    fn wait_job(
        &self,
        unit: &str,
        method: &'static str,
        job: OwnedObjectPath,
    ) -> Result<(), SystemdError> {
        match self
            .jobs
            .wait(job.as_str(), self.job_timeout, self.keepalive.as_ref())
        {
            Some(result) if result == "done" => Ok(()),
            Some(result) => Err(SystemdError::JobFailed {
                unit: unit.to_string(),
                method,
                detail: self.failure_detail(unit),
                result,
            }),
            None => Err(SystemdError::JobTimeout {
                unit: unit.to_string(),
                method,
                seconds: self.job_timeout.as_secs(),
            }),
        }
    }

    /// Why a start failed, in systemd's words: its `Result` and exit status.
    fn failure_detail(&self, unit: &str) -> Option<String> {
        let details = self.unit(unit).ok()??;
        let r = &details.runtime;
        Some(match r.exit_code {
            1 => format!("{}, exit status {}", r.result, r.exit_status),
            2 | 3 => format!("{}, signal {}", r.result, r.exit_status),
            _ => r.result.clone(),
        })
    }

    /// `StartTransientUnit` in mode `fail`: the job, not yet finished.
    fn queue_start(
        &self,
        name: &str,
        properties: &Properties,
    ) -> Result<OwnedObjectPath, SystemdError> {
        let props = wire_properties(name, properties)?;
        let aux: Vec<(String, Vec<(String, Value<'static>)>)> = Vec::new();
        self.manager
            .call("StartTransientUnit", &(name, "fail", props, aux))
            .map_err(refused(name, "StartTransientUnit"))
    }

    /// `StopUnit` in mode `replace`: the job, or `None` for a unit that is
    /// not loaded (nothing to stop).
    fn queue_stop(&self, name: &str) -> Result<Option<OwnedObjectPath>, SystemdError> {
        match self
            .manager
            .call::<_, _, OwnedObjectPath>("StopUnit", &(name, "replace"))
        {
            Ok(job) => Ok(Some(job)),
            Err(e) if method_error(&e).is_some_and(|(n, _)| n == NO_SUCH_UNIT) => Ok(None),
            Err(e) => Err(refused(name, "StopUnit")(e)),
        }
    }

    fn unit_path(&self, name: &str) -> Result<Option<OwnedObjectPath>, SystemdError> {
        match self
            .manager
            .call::<_, _, OwnedObjectPath>("GetUnit", &(name,))
        {
            Ok(p) => Ok(Some(p)),
            Err(e) if method_error(&e).is_some_and(|(n, _)| n == NO_SUCH_UNIT) => Ok(None),
            Err(e) => Err(bus("GetUnit")(e)),
        }
    }

    fn get_all(
        &self,
        path: &OwnedObjectPath,
        interface: &str,
    ) -> Result<HashMap<String, OwnedValue>, SystemdError> {
        let props: Proxy<'_> = zbus::blocking::proxy::Builder::new(&self.conn)
            .destination(DEST)
            .and_then(|b| b.path(path.as_str()))
            .and_then(|b| b.interface("org.freedesktop.DBus.Properties"))
            .map_err(bus("GetAll"))?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .map_err(bus("GetAll"))?;
        props
            .call::<_, _, HashMap<String, OwnedValue>>("GetAll", &(interface,))
            .map_err(bus("GetAll"))
    }

    /// A loaded unit's details read at its object path; `None` once it is
    /// no longer loaded (a transient unit that stopped in between).
    fn details_at(
        &self,
        name: &str,
        path: &OwnedObjectPath,
    ) -> Result<Option<UnitDetails>, SystemdError> {
        let mut all = self.get_all(path, "org.freedesktop.systemd1.Unit")?;
        // Read by its path, a unit gone since the listing is loaded afresh
        // as `not-found`: it is not there any more.
        let loaded = all
            .get("LoadState")
            .and_then(|v| from_wire(v))
            .is_some_and(|v| matches!(v, PropertyValue::Text(t) if &*t == "loaded"));
        if !loaded {
            return Ok(None);
        }
        if let Some(iface) = type_interface(name) {
            all.extend(self.get_all(path, iface)?);
        }
        let text = |k: &str| {
            all.get(k)
                .and_then(|v| from_wire(v))
                .and_then(|v| match v {
                    PropertyValue::Text(t) => Some(t.to_string()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let number = |k: &str| match all.get(k).and_then(|v| from_wire(v)) {
            Some(PropertyValue::Unsigned(x)) => i128::from(x),
            Some(PropertyValue::Signed(x)) => i128::from(x),
            _ => 0,
        };
        let runtime = UnitRuntime {
            restarts: u32::try_from(number("NRestarts")).unwrap_or(0),
            exit_status: i32::try_from(number("ExecMainStatus")).unwrap_or(0),
            exit_code: i32::try_from(number("ExecMainCode")).unwrap_or(0),
            main_pid: u32::try_from(number("MainPID")).unwrap_or(0),
            active_enter_usec: u64::try_from(number("ActiveEnterTimestamp")).unwrap_or(0),
            control_group: text("ControlGroup"),
            result: text("Result"),
        };
        let mut properties = Properties::new();
        for key in READ_BACK {
            if let Some(v) = all.get(*key).and_then(|v| from_wire(v)) {
                properties.insert(*key, v);
            }
        }
        Ok(Some(UnitDetails {
            name: name.to_string(),
            active_state: parse_active_state(&text("ActiveState")),
            sub_state: text("SubState"),
            properties,
            runtime,
        }))
    }
}

fn type_interface(name: &str) -> Option<&'static str> {
    let suffix = name.rsplit('.').next()?;
    Some(match suffix {
        "service" => "org.freedesktop.systemd1.Service",
        "slice" => "org.freedesktop.systemd1.Slice",
        "mount" => "org.freedesktop.systemd1.Mount",
        "scope" => "org.freedesktop.systemd1.Scope",
        _ => return None,
    })
}

pub fn parse_active_state(s: &str) -> ActiveState {
    match s {
        "active" => ActiveState::Active,
        "activating" => ActiveState::Activating,
        "deactivating" => ActiveState::Deactivating,
        "reloading" => ActiveState::Reloading,
        "failed" => ActiveState::Failed,
        _ => ActiveState::Inactive,
    }
}

/// A property value in the D-Bus type systemd expects for it.
pub fn to_wire(name: &str, value: &PropertyValue) -> Result<Value<'static>, String> {
    use PropertyValue as P;
    Ok(match (wire_type(name), value) {
        (Wire::U32, P::Unsigned(x)) => {
            Value::U32(u32::try_from(*x).map_err(|_| format!("{x} does not fit in 32 bits"))?)
        }
        (Wire::I32, P::Signed(x)) => {
            Value::I32(i32::try_from(*x).map_err(|_| format!("{x} does not fit in 32 bits"))?)
        }
        (Wire::ByteStrings, P::List(items)) => Value::from(
            items
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect::<Vec<Vec<u8>>>(),
        ),
        (Wire::YesNo, P::Bool(b)) => Value::from(if *b { "yes" } else { "no" }),
        (Wire::SyscallFilter, P::List(items)) => {
            let deny = items.first().is_some_and(|f| f == "~");
            let names: Vec<String> = items.iter().skip(usize::from(deny)).cloned().collect();
            Value::Structure((!deny, names).into())
        }
        (Wire::Natural, P::Bool(b)) => Value::Bool(*b),
        (Wire::Natural, P::Unsigned(x)) => Value::U64(*x),
        (Wire::Natural, P::Signed(x)) => Value::I64(*x),
        (Wire::Natural, P::Text(s)) => Value::from(s.to_string()),
        (Wire::Natural, P::List(items)) => Value::from(items.to_vec()),
        (Wire::Natural, P::Binds(binds)) => Value::from(
            binds
                .iter()
                .map(|b| {
                    (
                        b.source.clone(),
                        b.destination.clone(),
                        false,
                        if b.recursive { MS_REC } else { 0 },
                    )
                })
                .collect::<Vec<(String, String, bool, u64)>>(),
        ),
        (Wire::EnvironmentFiles, P::List(paths)) => Value::from(
            paths
                .iter()
                .map(|p| (p.clone(), false))
                .collect::<Vec<(String, bool)>>(),
        ),
        (Wire::ExecNoExpand, P::Exec(commands)) => Value::from(
            commands
                .iter()
                .map(|c| {
                    (
                        c.path.clone(),
                        c.argv.clone(),
                        vec!["no-env-expand".to_string()],
                    )
                })
                .collect::<Vec<(String, Vec<String>, Vec<String>)>>(),
        ),
        (Wire::Natural, P::Exec(commands)) => Value::from(
            commands
                .iter()
                .map(|c| (c.path.clone(), c.argv.clone(), false))
                .collect::<Vec<(String, Vec<String>, bool)>>(),
        ),
        (wire, v) => return Err(format!("a {v:?} cannot be sent as {wire:?}")),
    })
}

/// A value systemd returned, in Berth's types; `None` for shapes Berth
/// never sets.
pub fn from_wire(value: &Value<'_>) -> Option<PropertyValue> {
    use PropertyValue as P;
    Some(match value {
        Value::Bool(b) => P::Bool(*b),
        Value::U8(x) => P::Unsigned(u64::from(*x)),
        Value::U16(x) => P::Unsigned(u64::from(*x)),
        Value::U32(x) => P::Unsigned(u64::from(*x)),
        Value::U64(x) => P::Unsigned(*x),
        Value::I16(x) => P::Signed(i64::from(*x)),
        Value::I32(x) => P::Signed(i64::from(*x)),
        Value::I64(x) => P::Signed(*x),
        Value::Str(s) => P::text(s.as_str()),
        Value::ObjectPath(p) => P::text(p.as_str()),
        Value::Value(inner) => return from_wire(inner),
        Value::Array(a) => return array_from_wire(a),
        _ => return None,
    })
}

fn array_from_wire(array: &Array<'_>) -> Option<PropertyValue> {
    let mut strings = Vec::new();
    let mut commands = Vec::new();
    let mut binds = Vec::new();
    for item in array.iter() {
        match item {
            Value::Str(s) => strings.push(s.to_string()),
            Value::Array(bytes) => {
                let raw: Vec<u8> = bytes
                    .iter()
                    .filter_map(|b| match b {
                        Value::U8(b) => Some(*b),
                        _ => None,
                    })
                    .collect();
                strings.push(String::from_utf8_lossy(&raw).into_owned());
            }
            // `EnvironmentFiles`: (path, optional).
            Value::Structure(s) if matches!(s.fields(), [Value::Str(_), Value::Bool(_)]) => {
                if let [Value::Str(path), _] = s.fields() {
                    strings.push(path.to_string());
                }
            }
            Value::Structure(s)
                if matches!(
                    s.fields(),
                    [Value::Str(_), Value::Str(_), Value::Bool(_), Value::U64(_)]
                ) =>
            {
                if let [
                    Value::Str(source),
                    Value::Str(destination),
                    _,
                    Value::U64(flags),
                ] = s.fields()
                {
                    binds.push(BindMount {
                        source: source.to_string(),
                        destination: destination.to_string(),
                        recursive: flags & MS_REC != 0,
                    });
                }
            }
            Value::Structure(s) => {
                let fields = s.fields();
                let (Some(Value::Str(path)), Some(Value::Array(argv))) =
                    (fields.first(), fields.get(1))
                else {
                    return None;
                };
                commands.push(ExecCommand {
                    path: path.to_string(),
                    argv: argv
                        .iter()
                        .filter_map(|a| match a {
                            Value::Str(s) => Some(s.to_string()),
                            _ => None,
                        })
                        .collect(),
                });
            }
            _ => return None,
        }
    }
    Some(if !binds.is_empty() {
        PropertyValue::Binds(binds.into())
    } else if commands.is_empty() {
        PropertyValue::List(strings.into())
    } else {
        PropertyValue::Exec(commands.into())
    })
}

fn wire_properties(
    unit: &str,
    properties: &Properties,
) -> Result<Vec<(String, Value<'static>)>, SystemdError> {
    properties
        .iter()
        .map(|(k, v)| {
            to_wire(k, v)
                .map(|w| (wire_name(k).to_string(), w))
                .map_err(|message| SystemdError::Property {
                    unit: unit.to_string(),
                    property: k.to_string(),
                    message,
                })
        })
        .collect()
}

type ListedUnit = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

impl Systemd for DbusSystemd {
    fn version(&self) -> Result<u32, SystemdError> {
        Ok(self.version)
    }

    fn shutting_down(&self) -> bool {
        self.manager
            .get_property::<String>("SystemState")
            .is_ok_and(|s| s == "stopping")
    }

    fn list_units(&self, patterns: &[&str]) -> Result<Vec<UnitSummary>, SystemdError> {
        Ok(self
            .listed(patterns)?
            .into_iter()
            .map(|r| UnitSummary {
                name: r.0,
                load_state: r.2,
                active_state: parse_active_state(&r.3),
                sub_state: r.4,
            })
            .collect())
    }

    fn unit(&self, name: &str) -> Result<Option<UnitDetails>, SystemdError> {
        let Some(path) = self.unit_path(name)? else {
            return Ok(None);
        };
        self.details_at(name, &path)
    }

    fn units_matching(&self, patterns: &[&str]) -> Result<Vec<UnitDetails>, SystemdError> {
        let loaded: Vec<(String, OwnedObjectPath)> = self
            .listed(patterns)?
            .into_iter()
            .filter(|r| r.2 == "loaded")
            .map(|r| (r.0, r.6))
            .collect();
        let mut out = Vec::with_capacity(loaded.len());
        for details in in_parallel(&loaded, CALLERS, |(name, path)| self.details_at(name, path)) {
            out.extend(details?);
        }
        Ok(out)
    }

    fn start_transient(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        let job = self.queue_start(name, properties)?;
        self.wait_job(name, "start", job)
    }

    fn stop(&self, name: &str) -> Result<(), SystemdError> {
        match self.queue_stop(name)? {
            Some(job) => self.wait_job(name, "stop", job),
            None => Ok(()),
        }
    }

    fn start_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        // Queue every start, then wait for the jobs: systemd runs them
        // together and orders them by their dependencies. A unit ordered
        // after another of the batch is queued after it (systemd orders only
        // against jobs already queued); unrelated units are queued from a
        // few threads at once, so this side's work overlaps PID 1's.
        // Every index is in exactly one group: back in the units' order.
        let groups = dependency_groups(units);
        let mut jobs: Vec<(usize, Result<OwnedObjectPath, SystemdError>)> =
            in_parallel(&groups, CALLERS, |group| {
                group
                    .iter()
                    .map(|&i| (i, self.queue_start(units[i].0, units[i].1)))
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect();
        jobs.sort_unstable_by_key(|(i, _)| *i);
        jobs.into_iter()
            .map(|(i, job)| job.and_then(|j| self.wait_job(units[i].0, "start", j)))
            .collect()
    }

    fn stop_all(&self, names: &[&str]) -> Vec<Result<(), SystemdError>> {
        // Queue every stop job first, then wait: systemd runs them together.
        let jobs: Vec<_> = names.iter().map(|name| self.queue_stop(name)).collect();
        names
            .iter()
            .zip(jobs)
            .map(|(name, job)| match job? {
                Some(job) => self.wait_job(name, "stop", job),
                None => Ok(()),
            })
            .collect()
    }

    fn kill(&self, name: &str, whom: KillWhom, signal: i32) -> Result<(), SystemdError> {
        self.manager
            .call_method("KillUnit", &(name, whom.as_str(), signal))
            .map(|_| ())
            .map_err(refused(name, "KillUnit"))
    }

    fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        match self.manager.call_method("ResetFailedUnit", &(name,)) {
            Ok(_) => Ok(()),
            Err(e) if method_error(&e).is_some_and(|(n, _)| n == NO_SUCH_UNIT) => Ok(()),
            Err(e) => Err(refused(name, "ResetFailedUnit")(e)),
        }
    }

    fn reboot(&self) -> Result<(), SystemdError> {
        self.manager
            .call::<_, _, OwnedObjectPath>("StartUnit", &("reboot.target", "replace-irreversibly"))
            .map(|_| ())
            .map_err(refused("reboot.target", "StartUnit"))
    }

    fn set_properties(&self, name: &str, properties: &Properties) -> Result<(), SystemdError> {
        let props = wire_properties(name, properties)?;
        self.manager
            .call_method("SetUnitProperties", &(name, true, props))
            .map(|_| ())
            .map_err(refused(name, "SetUnitProperties"))
    }

    fn set_properties_all(&self, units: &[(&str, &Properties)]) -> Vec<Result<(), SystemdError>> {
        // PID 1 answers one call at a time, but the round trips through the
        // bus and the encoding on this side overlap with its work.
        in_parallel(units, CALLERS, |(name, properties)| {
            self.set_properties(name, properties)
        })
    }
}

/// `units` split into groups that may be queued independently: a unit
/// whose `After=` or `Requires=` names another of the batch is in that
/// one's group. Each group keeps the batch's order (the plan puts a unit
/// after those it is ordered after).
fn dependency_groups(units: &[(&str, &Properties)]) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = units
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (*n, i))
        .collect();
    // Each unit's group is the smallest index it is tied to.
    let mut root: Vec<usize> = (0..units.len()).collect();
    fn find(root: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while root[r] != r {
            r = root[r];
        }
        root[i] = r;
        r
    }
    for (i, (_, props)) in units.iter().enumerate() {
        for key in ["After", "Requires"] {
            let Some(PropertyValue::List(names)) = props.get(key) else {
                continue;
            };
            for j in names.iter().filter_map(|n| index.get(n.as_str())) {
                let (a, b) = (find(&mut root, i), find(&mut root, *j));
                root[a.max(b)] = a.min(b);
            }
        }
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    for i in 0..units.len() {
        let r = find(&mut root, i);
        let g = *group_of.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_ordered_after_another_of_the_batch_are_queued_with_it() {
        let plain = Properties::new();
        let mut after_init = Properties::new();
        after_init.insert("After", PropertyValue::list(["p_init.service".to_string()]));
        let mut after_x = Properties::new();
        after_x.insert("Requires", PropertyValue::list(["x.service".to_string()]));
        let units: Vec<(&str, &Properties)> = vec![
            ("a.service", &plain),
            ("p_init.service", &plain),
            ("b.service", &plain),
            ("p_main.service", &after_init),
            ("p_side.service", &after_init),
            // Ordered after a unit not in the batch: on its own.
            ("q.service", &after_x),
        ];
        assert_eq!(
            dependency_groups(&units),
            vec![vec![0], vec![1, 3, 4], vec![2], vec![5]]
        );
        assert_eq!(dependency_groups(&[]), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn values_survive_the_trip_to_the_wire_and_back() {
        let cases = [
            ("MemoryMax", PropertyValue::Unsigned(67_108_864)),
            ("OOMScoreAdjust", PropertyValue::Signed(-997)),
            ("RestartSteps", PropertyValue::Unsigned(5)),
            ("Type", PropertyValue::text("exec")),
            ("RemainAfterExit", PropertyValue::Bool(true)),
            (
                "Environment",
                PropertyValue::list(vec!["A=1".into(), "B=2".into()]),
            ),
            (
                "LogExtraFields",
                PropertyValue::list(vec!["BERTH_MANAGED=1".into()]),
            ),
            (
                "ExecStart",
                PropertyValue::exec(vec![ExecCommand {
                    path: "sh".into(),
                    argv: vec!["sh".into(), "-c".into(), "sleep 1".into()],
                }]),
            ),
        ];
        for (name, value) in cases {
            let wire = to_wire(name, &value).expect("encodes");
            assert_eq!(from_wire(&wire), Some(value), "{name}");
        }
        assert_eq!(
            to_wire("RestartSteps", &PropertyValue::Unsigned(5))
                .expect("u32")
                .value_signature()
                .to_string(),
            "u"
        );
        assert_eq!(
            to_wire("LogExtraFields", &PropertyValue::list(vec!["X=1".into()]))
                .expect("aay")
                .value_signature()
                .to_string(),
            "aay"
        );
        assert!(to_wire("RestartSteps", &PropertyValue::Unsigned(1 << 40)).is_err());
        // The command line goes as ExecStartEx, with systemd's own `$`
        // expansion off: `${i}` and `$$` reach the program as written.
        let exec = PropertyValue::exec(vec![ExecCommand {
            path: "sh".into(),
            argv: vec!["sh".into(), "-c".into(), "echo ${i} $$".into()],
        }]);
        assert_eq!(wire_name("ExecStart"), "ExecStartEx");
        let wire = to_wire("ExecStart", &exec).expect("encodes");
        assert_eq!(wire.value_signature().to_string(), "a(sasas)");
        let Value::Array(commands) = &wire else {
            panic!("{wire:?}")
        };
        let Some(Value::Structure(command)) = commands.first() else {
            panic!("{wire:?}")
        };
        assert_eq!(
            command.fields().get(2),
            Some(&Value::from(vec!["no-env-expand".to_string()]))
        );
        assert_eq!(from_wire(&wire), Some(exec));
        let files = PropertyValue::list(vec!["/var/lib/berth/containers/k/environment-0a".into()]);
        let wire = to_wire("EnvironmentFiles", &files).expect("encodes");
        assert_eq!(wire.value_signature().to_string(), "a(sb)");
        assert_eq!(from_wire(&wire), Some(files));
        assert_eq!(
            from_wire(&to_wire("PrivatePIDs", &PropertyValue::Bool(true)).expect("s")),
            Some(PropertyValue::text("yes"))
        );
    }
}

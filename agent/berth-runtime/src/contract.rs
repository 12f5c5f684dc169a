//! The behaviours Berth relies on from systemd, as cases that run against
//! any [`Systemd`]: `cargo test` runs them on [`crate::fake::FakeSystemd`],
//! and the QEMU tier runs them on PID 1 (`berth debug systemd-contract`),
//! so the fake cannot drift from the real manager unnoticed.
//!
//! Every unit a case makes is named `berth-contract-*` and removed again.

use std::time::{Duration, Instant};

use berth_plan::plan::diff;
use berth_plan::units::{BindMount, ExecCommand};
use berth_plan::{ActiveState, Properties, PropertyValue};

use crate::systemd::{KillWhom, Systemd, SystemdError};

/// A program every test system has, and one no system has.
pub const PRESENT: &str = "/bin/sleep";
pub const MISSING: &str = "/nonexistent/berth-contract";

const SLICE: &str = "berth-contract.slice";

fn service(program: &str, restart: &str) -> Properties {
    let mut p: Properties = [
        ("Description", PropertyValue::text("systemd contract case")),
        ("Slice", PropertyValue::Text(SLICE.into())),
        ("Type", PropertyValue::text("exec")),
        ("Restart", PropertyValue::Text(restart.into())),
        ("RestartUSec", PropertyValue::Unsigned(100_000)),
        ("StartLimitIntervalUSec", PropertyValue::Unsigned(0)),
        ("TimeoutStopUSec", PropertyValue::Unsigned(5_000_000)),
        ("MemoryMax", PropertyValue::Unsigned(64 << 20)),
        ("CPUWeight", PropertyValue::Unsigned(59)),
        ("OOMScoreAdjust", PropertyValue::Signed(500)),
        ("RestartSteps", PropertyValue::Unsigned(3)),
        ("RestartMaxDelayUSec", PropertyValue::Unsigned(1_000_000)),
        (
            "Environment",
            PropertyValue::list(vec!["A=1".into(), "B=two words".into()]),
        ),
        (
            "LogExtraFields",
            // Not Berth's marker: an agent running beside the cases must
            // leave their units alone.
            PropertyValue::list(vec!["CONTRACT=1".into(), "CONTRACT_CASE=t/p".into()]),
        ),
        (
            "ExecStart",
            PropertyValue::exec(vec![ExecCommand {
                path: program.into(),
                argv: vec![program.into(), "1000".into()],
            }]),
        ),
        // Binds of directories onto themselves: every system has them, and
        // the unit's view of the node stays the same.
        (
            "BindPaths",
            PropertyValue::binds(vec![BindMount {
                source: "/tmp".into(),
                destination: "/tmp".into(),
                recursive: true,
            }]),
        ),
        (
            "BindReadOnlyPaths",
            PropertyValue::binds(vec![BindMount {
                source: "/usr".into(),
                destination: "/usr".into(),
                recursive: true,
            }]),
        ),
    ]
    .into_iter()
    .collect();
    p.shrink_to_fit();
    p
}

fn check(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.into()) }
}

fn sys<T>(r: Result<T, SystemdError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// Waits (for the real manager's asynchronous restarts) until `done` holds.
fn eventually(
    systemd: &dyn Systemd,
    unit: &str,
    what: &str,
    done: impl Fn(&crate::UnitDetails) -> bool,
) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(u) = sys(systemd.unit(unit))?
            && done(&u)
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("{unit}: {what} did not happen within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cleanup(systemd: &dyn Systemd, units: &[&str]) {
    for u in units {
        let _ = systemd.stop(u);
        let _ = systemd.reset_failed(u);
    }
}

fn properties_read_back_as_sent(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-readback.service";
    let sent = service(PRESENT, "always");
    sys(systemd.start_transient(name, &sent))?;
    let unit = sys(systemd.unit(name))?.ok_or("the started unit is not loaded")?;
    let differs = diff(&sent, &unit.properties);
    cleanup(systemd, &[name]);
    check(
        differs.is_empty(),
        format!("read back differently: {differs:?}"),
    )?;
    check(
        unit.active_state == ActiveState::Active,
        "not active after start",
    )?;
    check(
        unit.runtime
            .control_group
            .ends_with(&format!("/{SLICE}/{name}")),
        format!("control group {}", unit.runtime.control_group),
    )
}

fn a_missing_binary_fails_the_start_and_stays_until_reset(
    systemd: &dyn Systemd,
) -> Result<(), String> {
    let name = "berth-contract-missing.service";
    let result = systemd.start_transient(name, &service(MISSING, "no"));
    let failed = matches!(result, Err(SystemdError::JobFailed { .. }));
    let unit = sys(systemd.unit(name))?;
    let state = unit
        .as_ref()
        .map(|u| (u.active_state, u.runtime.exit_status));
    sys(systemd.reset_failed(name))?;
    let gone = sys(systemd.unit(name))?.is_none();
    check(failed, format!("start returned {result:?}"))?;
    check(
        state == Some((ActiveState::Failed, 203)),
        format!("state after the failed start: {state:?}"),
    )?;
    check(gone, "still loaded after reset-failed")
}

fn a_second_start_of_a_loaded_unit_is_refused(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-twice.service";
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    let again = systemd.start_transient(name, &service(PRESENT, "always"));
    cleanup(systemd, &[name]);
    check(
        matches!(again, Err(SystemdError::Refused { .. })),
        format!("second start returned {again:?}"),
    )
}

fn properties_change_on_a_running_unit(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-resize.service";
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    let before = sys(systemd.unit(name))?.map(|u| u.runtime.main_pid);
    let change: Properties = [("MemoryMax", PropertyValue::Unsigned(96 << 20))]
        .into_iter()
        .collect();
    let set = systemd.set_properties(name, &change);
    let after = sys(systemd.unit(name))?;
    cleanup(systemd, &[name]);
    sys(set)?;
    let after = after.ok_or("unit vanished")?;
    check(
        after.properties.get("MemoryMax") == Some(&PropertyValue::Unsigned(96 << 20)),
        format!("MemoryMax now {:?}", after.properties.get("MemoryMax")),
    )?;
    check(
        before == Some(after.runtime.main_pid),
        "the process was restarted",
    )
}

/// oom_score_adj is given to a process when it starts: PID 1 refuses to
/// change it on a loaded unit, so a resize must leave it for the restart.
fn a_running_unit_refuses_a_new_oom_score(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-oom.service";
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    let change: Properties = [("OOMScoreAdjust", PropertyValue::Signed(900))]
        .into_iter()
        .collect();
    let set = systemd.set_properties(name, &change);
    let after = sys(systemd.unit(name))?;
    cleanup(systemd, &[name]);
    check(
        matches!(set, Err(SystemdError::Refused { .. })),
        format!("SetUnitProperties OOMScoreAdjust returned {set:?}"),
    )?;
    let after = after.ok_or("unit vanished")?;
    check(
        after.properties.get("OOMScoreAdjust") == Some(&PropertyValue::Signed(500)),
        format!(
            "OOMScoreAdjust now {:?}",
            after.properties.get("OOMScoreAdjust")
        ),
    )
}

fn a_killed_main_process_is_restarted_and_counted(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-kill.service";
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    let killed = systemd.kill(name, KillWhom::Main, 9);
    let restarted = eventually(systemd, name, "a restart", |u| {
        u.runtime.restarts == 1 && u.active_state == ActiveState::Active
    });
    cleanup(systemd, &[name]);
    sys(killed)?;
    restarted
}

fn stopping_removes_a_transient_unit_and_unknown_units_stop_quietly(
    systemd: &dyn Systemd,
) -> Result<(), String> {
    let name = "berth-contract-stop.service";
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    sys(systemd.stop(name))?;
    let gone = sys(systemd.unit(name))?.is_none();
    let unknown = systemd.stop("berth-contract-never-existed.service");
    let both = systemd.stop_all(&["berth-contract-never-existed.service", name]);
    check(gone, "still loaded after stop")?;
    sys(unknown)?;
    check(
        both.iter().all(Result::is_ok),
        format!("stop_all: {both:?}"),
    )
}

fn stopping_a_slice_stops_what_runs_in_it(systemd: &dyn Systemd) -> Result<(), String> {
    let name = "berth-contract-member.service";
    let slice_props: Properties = [("Description", PropertyValue::text("systemd contract slice"))]
        .into_iter()
        .collect();
    sys(systemd
        .start_transient(SLICE, &slice_props)
        .or_else(|e| match e {
            // Made implicitly by an earlier case's service.
            SystemdError::Refused { .. } => Ok(()),
            other => Err(other),
        }))?;
    sys(systemd.start_transient(name, &service(PRESENT, "always")))?;
    let listed = sys(systemd.list_units(&["berth-contract*"]))?;
    sys(systemd.stop(SLICE))?;
    let member_gone = sys(systemd.unit(name))?.is_none();
    check(
        listed.iter().any(|u| u.name == name) && listed.iter().any(|u| u.name == SLICE),
        format!(
            "list_units found {:?}",
            listed.iter().map(|u| &u.name).collect::<Vec<_>>()
        ),
    )?;
    check(member_gone, "the member outlived its slice")
}

fn units_started_together_report_each_result(systemd: &dyn Systemd) -> Result<(), String> {
    let good = "berth-contract-together-a.service";
    let bad = "berth-contract-together-b.service";
    let good_props = service(PRESENT, "always");
    let bad_props = service(MISSING, "no");
    let results = systemd.start_all(&[(good, &good_props), (bad, &bad_props)]);
    let good_active =
        sys(systemd.unit(good))?.is_some_and(|u| u.active_state == ActiveState::Active);
    cleanup(systemd, &[good, bad]);
    check(
        results.len() == 2
            && results[0].is_ok()
            && matches!(results[1], Err(SystemdError::JobFailed { .. })),
        format!("start_all returned {results:?}"),
    )?;
    check(good_active, "the good unit is not active")
}

type Case = fn(&dyn Systemd) -> Result<(), String>;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("properties_read_back_as_sent", properties_read_back_as_sent),
    (
        "a_missing_binary_fails_the_start_and_stays_until_reset",
        a_missing_binary_fails_the_start_and_stays_until_reset,
    ),
    (
        "a_second_start_of_a_loaded_unit_is_refused",
        a_second_start_of_a_loaded_unit_is_refused,
    ),
    (
        "properties_change_on_a_running_unit",
        properties_change_on_a_running_unit,
    ),
    (
        "a_running_unit_refuses_a_new_oom_score",
        a_running_unit_refuses_a_new_oom_score,
    ),
    (
        "a_killed_main_process_is_restarted_and_counted",
        a_killed_main_process_is_restarted_and_counted,
    ),
    (
        "stopping_removes_a_transient_unit_and_unknown_units_stop_quietly",
        stopping_removes_a_transient_unit_and_unknown_units_stop_quietly,
    ),
    (
        "stopping_a_slice_stops_what_runs_in_it",
        stopping_a_slice_stops_what_runs_in_it,
    ),
    (
        "units_started_together_report_each_result",
        units_started_together_report_each_result,
    ),
];

/// Runs every case; one result per case, in order.
pub fn run_all(systemd: &dyn Systemd) -> Vec<(&'static str, Result<(), String>)> {
    let results = CASES.iter().map(|(n, case)| (*n, case(systemd))).collect();
    cleanup(systemd, &[SLICE]);
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSystemd;

    #[test]
    fn the_fake_keeps_the_contract() {
        let fake = FakeSystemd::new(257);
        fake.remove_binary(MISSING);
        let failures: Vec<String> = run_all(&fake)
            .into_iter()
            .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e}")))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
        let left: Vec<String> = fake
            .unit_names()
            .into_iter()
            .filter(|n| n.starts_with("berth-contract"))
            .collect();
        assert!(left.is_empty(), "cases left units: {left:?}");
    }
}

//! Benchmark, not a check: where the appliance's boot time goes, from QEMU
//! starting to the agent being ready. Boots the test image on a fresh
//! machine several times (`BERTH_BENCH_BOOTS`, 3 by default), each time
//! followed by a reboot of the same machine (firmware variables and disk
//! kept), and prints, per boot and as medians of each kind:
//!
//! - QEMU start → `berth: agent started` on the console, and → the pushed
//!   revision accepted, as the host sees it;
//! - firmware, boot loader, kernel (with the initrd) and userspace, as
//!   systemd reads them (the firmware and loader from systemd-boot's EFI
//!   variables);
//! - when, in the guest's monotonic clock, the agent's process was started
//!   and when it told systemd it was ready, and how long after userspace
//!   began (the part the image's units decide);
//! - the critical chain to `berth-agent.service` and the slowest units (or
//!   the output of the guest command line in `BERTH_BENCH_BOOT_SHOW`).
//!
//! `make bench-boot` runs it; the QEMU tier of `make test` skips it.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::cell::RefCell;
use std::time::Duration;

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, must, retry_on_tcg_flake, test_image};

const BOOT: Duration = Duration::from_secs(300);

/// What the first boot shows in detail; `BERTH_BENCH_BOOT_SHOW` replaces it
/// with another guest command line.
const DETAILS: &str = "systemd-analyze critical-chain berth-agent.service --no-pager; systemd-analyze blame --no-pager | head -n 25; journalctl -b -o short-monotonic --no-pager -u berth-agent.service -u dbus.service | head -n 12";

/// `1min 2.345s`, `12.991s`, `850ms` → seconds.
fn span_secs(text: &str) -> Option<f64> {
    let mut total = 0.0;
    for part in text.split_whitespace() {
        let (number, unit) = part.split_at(part.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = number.parse().ok()?;
        total += match unit {
            "min" => n * 60.0,
            "s" => n,
            "ms" => n / 1e3,
            "us" | "µs" => n / 1e6,
            _ => return None,
        };
    }
    Some(total)
}

/// The `(firmware)`, `(loader)`, `(kernel)` and `(userspace)` figures of
/// `systemd-analyze time`: "Startup finished in 2.1s (firmware) + ...".
fn phases(analyze: &str) -> Vec<(String, f64)> {
    let line = analyze
        .lines()
        .find(|l| l.starts_with("Startup finished in"))
        .unwrap_or_else(|| panic!("systemd-analyze time: {analyze}"));
    let body = line.trim_start_matches("Startup finished in").trim();
    let body = body.split(" = ").next().unwrap();
    body.split(" + ")
        .filter_map(|part| {
            let open = part.find('(')?;
            let name = part[open + 1..part.find(')')?].to_string();
            Some((name, span_secs(part[..open].trim())?))
        })
        .collect()
}

fn monotonic_secs(vm: &Vm, property: &str) -> f64 {
    let out = vm.sh(&format!(
        "systemctl show -p {property} --value berth-agent.service"
    ));
    out.trim().parse::<f64>().unwrap() / 1e6
}

/// The `n` longest pauses between consecutive kernel log lines up to
/// systemd's start (the kernel and the initrd), with the line after each.
fn longest_gaps(dmesg: &str, n: usize) -> Vec<(f64, String)> {
    let stamped: Vec<(f64, &str)> = dmesg
        .lines()
        .take_while(|l| !l.contains("running in system mode"))
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let close = rest.find(']')?;
            Some((rest[..close].trim().parse().ok()?, l))
        })
        .collect();
    let mut gaps: Vec<(f64, String)> = stamped
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[1].1.to_string()))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    gaps.truncate(n);
    gaps
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
#[ignore = "benchmark: make bench-boot"]
fn bench_boot_to_agent_ready() {
    let boots: usize = std::env::var("BERTH_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let image = must(test_image());
    let git = must(GitHost::fresh("bench-boot", "desired.git"));
    let revision = must(git.push(&[("README", "nothing to run\n")], "empty"));
    let accepted = format!("revision {} accepted", &revision[..12]);
    let mut options = VmOptions::new("bench-boot");
    options.esp_config = Some("node:\n  name: bench\ngit:\n  branch: main\n".into());
    options
        .credentials
        .push(("berth.repo".into(), format!("git://{GIT_HOST}/desired.git")));

    let firsts = RefCell::new(Vec::new());
    let reboots = RefCell::new(Vec::new());
    for round in 1..=boots {
        // A round that hits QEMU's TCG bug is run again, whole.
        retry_on_tcg_flake("bench-boot", || {
            let (mut vm, ready) = must(Vm::boot_until(
                &image,
                &git,
                &options,
                "berth: agent started",
                BOOT,
            ));
            let fetched = must(vm.wait_for(&accepted, BOOT));
            let first = measure(&vm, ready, Some(fetched));
            print_row(
                &format!("round {round}, first boot (empty firmware variables)"),
                &first,
            );
            if round == 1 {
                let show =
                    std::env::var("BERTH_BENCH_BOOT_SHOW").unwrap_or_else(|_| DETAILS.into());
                println!("{}", vm.sh(&show));
                println!("the kernel log's longest silences before systemd started:");
                for (gap, line) in longest_gaps(&vm.sh("dmesg"), 15) {
                    println!("  {gap:>5.2} s before {line}");
                }
            }
            // The same machine again: the firmware has its boot entries, the
            // data partition has grown, the agent has its state (a node's
            // every later boot, an update's reboot).
            let (vm, ready) =
                must(vm.reboot_until(&git, &options, 2, "berth: agent started", BOOT));
            let again = measure(&vm, ready, None);
            print_row(&format!("round {round}, reboot"), &again);
            must(vm.poweroff(Duration::from_secs(120)));
            firsts.borrow_mut().push(first);
            reboots.borrow_mut().push(again);
        });
    }
    let (firsts, reboots) = (firsts.into_inner(), reboots.into_inner());
    print_medians(&format!("medians of {boots} first boots"), &firsts);
    print_medians(&format!("medians of {boots} reboots"), &reboots);
}

/// The figures of one boot that has reached "agent started": the host's
/// times, systemd's phases and the agent unit's timestamps.
fn measure(vm: &Vm, ready: Duration, fetched: Option<Duration>) -> Vec<(String, f64)> {
    // systemd-analyze answers once the boot is finished.
    let (rc, analyze) = must(vm.exec(
        "systemctl is-system-running --wait >/dev/null; systemd-analyze time",
        Duration::from_secs(300),
    ));
    assert_eq!(rc, 0, "systemd-analyze time: {analyze}");
    let mut row = vec![(
        "host: QEMU start → agent ready".to_string(),
        ready.as_secs_f64(),
    )];
    if let Some(fetched) = fetched {
        row.push((
            "host: QEMU start → revision accepted".to_string(),
            fetched.as_secs_f64(),
        ));
    }
    row.extend(phases(&analyze));
    row.push((
        "guest: agent exec'd".into(),
        monotonic_secs(vm, "ExecMainStartTimestampMonotonic"),
    ));
    let ready_at = monotonic_secs(vm, "ActiveEnterTimestampMonotonic");
    row.push(("guest: agent ready".into(), ready_at));
    // The kernel figure ends where userspace begins, on the same clock.
    if let Some((_, kernel)) = row.iter().find(|(n, _)| n == "kernel") {
        let after = ready_at - kernel;
        row.push(("guest: userspace start → agent ready".into(), after));
    }
    row
}

fn print_row(title: &str, row: &[(String, f64)]) {
    println!("{title}:");
    for (name, secs) in row {
        println!("  {name:<38} {secs:>7.2} s");
    }
}

fn print_medians(title: &str, rows: &[Vec<(String, f64)>]) {
    println!("{title}:");
    for (name, _) in &rows[0] {
        let values: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
            .collect();
        println!("  {name:<38} {:>7.2} s", median(values));
    }
}

#[test]
fn the_longest_kernel_log_silences_are_found() {
    let log = "[    0.100000] a\n[    0.200000] b\n[    2.200000] c\n[    2.300000] systemd[1]: running in system mode\n[   9.0] later";
    let gaps = longest_gaps(log, 1);
    assert_eq!(gaps.len(), 1);
    assert!((gaps[0].0 - 2.0).abs() < 1e-9);
    assert!(gaps[0].1.ends_with("] c"));
}

#[test]
fn spans_and_phases_parse() {
    assert_eq!(span_secs("1min 2.5s"), Some(62.5));
    assert_eq!(span_secs("850ms"), Some(0.85));
    assert_eq!(span_secs("12x"), None);
    let p = phases(
        "Startup finished in 2.1s (firmware) + 1.017s (loader) + 12.991s (kernel) + 26.648s (userspace) = 42.756s\nmulti-user.target reached after 26.5s in userspace.",
    );
    assert_eq!(
        p,
        vec![
            ("firmware".to_string(), 2.1),
            ("loader".to_string(), 1.017),
            ("kernel".to_string(), 12.991),
            ("userspace".to_string(), 26.648)
        ]
    );
}

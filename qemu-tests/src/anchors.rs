//! The side-by-side benchmark (`make bench-anchors`, `tests/bench_anchors.rs`):
//! what the guest prints about its processes, parsed; what each tool adds
//! per container, computed; and the one table that puts Berth and Podman
//! side by side, rendered and written into `docs/benchmarks.md`.
//!
//! The guest's process listing (`guest/processes.sh`) is one line per
//! user-space process: `proc <pid> <comm> <rss KiB> <pss KiB> <workload>`,
//! where `workload` is 1 for the containers' own processes (their command
//! line carries the bench's marker) and 0 for everything else.

use std::fmt::Write as _;

/// One process of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub workload: bool,
}

/// Parses a listing; any line that does not start with `proc ` is not
/// part of it (the channel's own output), a malformed `proc` line is an
/// error naming the line.
pub fn parse_processes(text: &str) -> Result<Vec<Process>, String> {
    text.lines()
        .filter(|l| l.starts_with("proc "))
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || format!("not a process line: {line:?}");
            if f.len() != 6 {
                return Err(bad());
            }
            Ok(Process {
                pid: f[1].parse().map_err(|_| bad())?,
                comm: f[2].to_string(),
                rss_kib: f[3].parse().map_err(|_| bad())?,
                pss_kib: f[4].parse().map_err(|_| bad())?,
                workload: match f[5] {
                    "1" => true,
                    "0" => false,
                    _ => return Err(bad()),
                },
            })
        })
        .collect()
}

/// What a tool added beside the containers' own processes, per container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Added {
    pub processes: f64,
    pub rss_mib: f64,
    pub pss_mib: f64,
    /// Containers' own processes found (a check that they all run).
    pub workload: usize,
}

/// What `after` has beside the containers' own processes that `before`
/// did not, divided by `containers`: processes that are new (by PID), and
/// the resident and proportional memory of those plus what the processes
/// found in both grew by (the agent, PID 1). A process that left between
/// the two (an on-demand helper of systemd's going idle) is not counted
/// either way: it would otherwise subtract noise from a tool's cost.
pub fn added(before: &[Process], after: &[Process], containers: u32) -> Added {
    let earlier: std::collections::HashMap<u32, &Process> =
        before.iter().map(|p| (p.pid, p)).collect();
    let (mut n, mut rss, mut pss) = (0i64, 0i64, 0i64);
    for p in after.iter().filter(|p| !p.workload) {
        match earlier.get(&p.pid).filter(|e| e.comm == p.comm) {
            Some(e) => {
                rss += p.rss_kib as i64 - e.rss_kib as i64;
                pss += p.pss_kib as i64 - e.pss_kib as i64;
            }
            None => {
                n += 1;
                rss += p.rss_kib as i64;
                pss += p.pss_kib as i64;
            }
        }
    }
    let per = f64::from(containers.max(1));
    Added {
        processes: n as f64 / per,
        rss_mib: rss as f64 / 1024.0 / per,
        pss_mib: pss as f64 / 1024.0 / per,
        workload: after.iter().filter(|p| p.workload).count(),
    }
}

/// The names of the processes [`added`] counts as new, for the record.
pub fn new_processes(before: &[Process], after: &[Process]) -> Vec<String> {
    after
        .iter()
        .filter(|p| !p.workload && !before.iter().any(|b| b.pid == p.pid && b.comm == p.comm))
        .map(|p| p.comm.clone())
        .collect()
}

/// Sum of `utime + stime` clock ticks of the processes a CPU line lists:
/// `cpu <ticks>` as the guest prints it.
pub fn parse_ticks(text: &str) -> Result<u64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .ok_or_else(|| format!("no cpu line in {text:?}"))?
        .trim()
        .parse()
        .map_err(|_| format!("not a tick count in {text:?}"))
}

/// The two tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Berth,
    Podman,
}

/// One tool's figures for one pod count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub tool: Tool,
    pub pods: u32,
    /// Commit fetched (Berth) or `podman kube play` begun, to every
    /// container active or running.
    pub start_s: f64,
    pub added: Added,
    /// The supervisor's CPU in percent of one CPU while idle (the agent;
    /// the `conmon` processes).
    pub idle_cpu_percent: f64,
    /// Removal commit fetched, or `podman kube down` begun, to everything gone.
    pub remove_s: f64,
}

/// Where the run happened, for the heading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub date: String,
    pub host: String,
    pub qemu: String,
    pub podman: String,
    /// The idle window the supervisors' CPU was measured over.
    pub idle_seconds: u64,
}

fn ratio(berth: f64, podman: f64) -> String {
    if podman.abs() < 1e-9 {
        if berth.abs() < 1e-9 {
            "=".into()
        } else {
            "-".into()
        }
    } else {
        format!("{:.2}", berth / podman)
    }
}

/// The markdown table: one row per figure and pod count, Berth, Podman and
/// Berth / Podman. Pod counts only one tool ran are left out.
pub fn render(setting: &Setting, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {} on {} with {}; {} in the same guest, one after the other (`make bench-anchors`).\n",
        setting.date, setting.host, setting.qemu, setting.podman
    );
    out.push_str("| figure | pods | Berth | Podman | Berth / Podman |\n|---|---|---|---|---|\n");
    let mut counts: Vec<u32> = runs.iter().map(|r| r.pods).collect();
    counts.sort_unstable();
    counts.dedup();
    type Figure = (String, fn(&Run) -> f64, fn(f64) -> String);
    let figures: [Figure; 6] = [
        (
            "start: commit fetched / `kube play` → all containers active".into(),
            |r| r.start_s,
            |v| format!("{v:.2} s"),
        ),
        (
            "processes added per container".into(),
            |r| r.added.processes,
            |v| format!("{v:.2}"),
        ),
        (
            "resident memory added per container (RSS)".into(),
            |r| r.added.rss_mib,
            |v| format!("{v:.2} MiB"),
        ),
        (
            "proportional memory added per container (PSS)".into(),
            |r| r.added.pss_mib,
            |v| format!("{v:.2} MiB"),
        ),
        (
            format!(
                "supervisor CPU while idle for {} s (agent / conmons)",
                setting.idle_seconds
            ),
            |r| r.idle_cpu_percent,
            |v| format!("{v:.2} %"),
        ),
        (
            "remove everything".into(),
            |r| r.remove_s,
            |v| format!("{v:.2} s"),
        ),
    ];
    for (name, get, show) in figures {
        for n in &counts {
            let find = |tool| runs.iter().find(|r| r.tool == tool && r.pods == *n);
            let (Some(b), Some(p)) = (find(Tool::Berth), find(Tool::Podman)) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {name} | {n} | {} | {} | {} |",
                show(get(b)),
                show(get(p)),
                ratio(get(b), get(p))
            );
        }
    }
    out
}

/// Where the bench writes in `docs/benchmarks.md`.
pub const BEGIN: &str = "<!-- bench-anchors: begin (written by make bench-anchors) -->";
pub const END: &str = "<!-- bench-anchors: end -->";

/// `doc` with the text between the markers replaced by `table`; a
/// document without them gets them, with a heading, at its end.
pub fn replace_section(doc: &str, table: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{}{}", &doc[..b], table, &doc[e..]),
        _ => format!(
            "{}\n## Berth against Podman, side by side (`make bench-anchors`)\n\n{BEGIN}\n{table}{END}\n",
            doc.trim_end_matches('\n').to_string() + "\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "__BERTH_SYNC__\nproc 1 systemd 12000 8000 0\nproc 244 berth 25000 20000 0\nproc 301 sh 900 300 1\nproc 302 sleep 800 200 1\n";

    #[test]
    fn a_listing_parses_and_skips_other_lines() {
        let ps = parse_processes(LISTING).expect("parsed");
        assert_eq!(ps.len(), 4);
        assert_eq!(
            ps[1],
            Process {
                pid: 244,
                comm: "berth".into(),
                rss_kib: 25000,
                pss_kib: 20000,
                workload: false
            }
        );
        assert!(ps[3].workload);
    }

    #[test]
    fn a_malformed_line_is_an_error_that_quotes_it() {
        for bad in [
            "proc 1 systemd 12000 8000",
            "proc x systemd 1 1 0",
            "proc 1 s 1 1 2",
        ] {
            let err = parse_processes(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn added_counts_only_what_is_not_the_containers_own() {
        let before =
            parse_processes("proc 1 systemd 12000 8000 0\nproc 244 berth 20000 16000 0\n").unwrap();
        // Two containers: their four processes are the workload; two
        // conmons of 2048 KiB and the agent's growth are the tool's.
        let after = parse_processes(
            "proc 1 systemd 12000 8000 0\nproc 244 berth 21024 16512 0\nproc 400 conmon 2048 512 0\nproc 401 conmon 2048 512 0\nproc 402 sh 900 300 1\nproc 403 sleep 800 200 1\nproc 404 sh 900 300 1\nproc 405 sleep 800 200 1\n",
        )
        .unwrap();
        let a = added(&before, &after, 2);
        assert_eq!(a.processes, 1.0);
        // A helper that left in between subtracts nothing; one that is
        // new counts, whatever its name.
        let mut with_helper = before.clone();
        with_helper.push(Process {
            pid: 90,
            comm: "systemd-userwork".into(),
            rss_kib: 4096,
            pss_kib: 1024,
            workload: false,
        });
        assert_eq!(added(&with_helper, &after, 2), a);
        // A PID reused by another program is a new process.
        let mut reused = after.clone();
        reused[1].comm = "other".into();
        assert_eq!(added(&before, &reused, 2).processes, 1.5);
        assert_eq!(new_processes(&before, &after), ["conmon", "conmon"]);
        assert!(
            (a.rss_mib - (1024.0 + 4096.0) / 1024.0 / 2.0).abs() < 1e-9,
            "{a:?}"
        );
        assert!(
            (a.pss_mib - (512.0 + 1024.0) / 1024.0 / 2.0).abs() < 1e-9,
            "{a:?}"
        );
        assert_eq!(a.workload, 4);
        // Nothing added: zero, not a division by zero for no containers.
        let none = added(&before, &before, 0);
        assert_eq!((none.processes, none.rss_mib), (0.0, 0.0));
    }

    #[test]
    fn ticks_parse_from_the_cpu_line() {
        assert_eq!(parse_ticks("x\ncpu 1234\n"), Ok(1234));
        assert!(parse_ticks("nothing").is_err());
        assert!(parse_ticks("cpu lots").is_err());
    }

    fn run(tool: Tool, pods: u32, start: f64) -> Run {
        Run {
            tool,
            pods,
            start_s: start,
            added: Added {
                processes: if tool == Tool::Berth { 0.0 } else { 2.0 },
                rss_mib: 0.05,
                pss_mib: 0.01,
                workload: pods as usize,
            },
            idle_cpu_percent: 1.0,
            remove_s: 2.0,
        }
    }

    #[test]
    fn the_table_puts_both_tools_and_their_ratio_on_one_row() {
        let setting = Setting {
            date: "2026-12-07".into(),
            host: "2 cores".into(),
            qemu: "QEMU 10.0.2".into(),
            podman: "podman 5.4.2".into(),
            idle_seconds: 10,
        };
        let runs = [
            run(Tool::Berth, 10, 2.0),
            run(Tool::Podman, 10, 20.0),
            run(Tool::Berth, 50, 8.0),
        ];
        let table = render(&setting, &runs);
        assert!(
            table.contains("2026-12-07")
                && table.contains("QEMU 10.0.2")
                && table.contains("podman 5.4.2")
        );
        assert!(
            table.contains("| start: commit fetched / `kube play` → all containers active | 10 | 2.00 s | 20.00 s | 0.10 |"),
            "{table}"
        );
        // Zero against two processes: a ratio of 0.00.
        assert!(
            table.contains("| processes added per container | 10 | 0.00 | 2.00 | 0.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| supervisor CPU while idle for 10 s (agent / conmons) | 10 |"),
            "{table}"
        );
        // 50 pods ran only under Berth: no row for them.
        assert!(!table.contains("| 50 |"), "{table}");
    }

    #[test]
    fn the_section_is_replaced_between_its_markers_or_appended() {
        let doc = "# Benchmarks\n\nintro\n";
        let first = replace_section(doc, "table one\n");
        assert!(first.starts_with("# Benchmarks\n\nintro\n"));
        assert!(
            first.contains(&format!("{BEGIN}\ntable one\n{END}\n")),
            "{first}"
        );
        let with_tail = format!("{first}\n## Later section\n");
        let second = replace_section(&with_tail, "table two\n");
        assert!(!second.contains("table one"));
        assert!(
            second.contains(&format!("{BEGIN}\ntable two\n{END}")),
            "{second}"
        );
        assert!(second.ends_with("## Later section\n"), "{second}");
        assert_eq!(second.matches(BEGIN).count(), 1);
    }
}

//! Storage figures for `docs/benchmarks.md` (run as root, `make bench-storage`):
//! the time to provision and stage a claim with the built-in provisioner,
//! and sequential write throughput through a provisioned volume compared
//! in the same run with the data partition it lives on.
//!
//! `storagebench [DIR] [MiB]`: DIR on the partition to measure
//! (default /var/tmp), MiB written per run (default 512).
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_storage::driver::VolumeDriver;
use berth_storage::loopfs::LoopDriver;

const RUNS: usize = 3;

/// Writes `mib` MiB in 1 MiB blocks and syncs; MB/s.
fn write_rate(path: &Path, mib: usize) -> f64 {
    let block = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path).unwrap();
    (mib as f64 * 1.048_576) / secs
}

fn main() {
    let mut args = std::env::args().skip(1);
    let base = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    let mib: usize = args.next().map_or(512, |m| m.parse().expect("MiB"));
    let dir = base.join(format!("berth-storagebench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let driver = LoopDriver::new(dir.join("storage"));

    let mut provision = Vec::new();
    let mut stage = Vec::new();
    for i in 0..RUNS {
        let name = format!("pvc_bench_p{i}_0");
        let t = Instant::now();
        driver.create(&name, 1 << 30).expect("create");
        provision.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        driver.stage(&name).expect("stage");
        stage.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let volume = driver.stage("pvc_bench_p0_0").unwrap();
    let mut raw = Vec::new();
    let mut through = Vec::new();
    for _ in 0..RUNS {
        raw.push(write_rate(&dir.join("raw.bin"), mib));
        through.push(write_rate(&volume.join("vol.bin"), mib));
    }
    for i in 0..RUNS {
        driver.delete(&format!("pvc_bench_p{i}_0")).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let range = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        (min, max)
    };
    let (p0, p1) = range(&provision);
    let (s0, s1) = range(&stage);
    let (r0, r1) = range(&raw);
    let (t0, t1) = range(&through);
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    println!("provision a 1 GiB claim (image allocated in full, mkfs.ext4): {p0:.0}–{p1:.0} ms");
    println!("stage it (loop device with direct I/O, mount): {s0:.0}–{s1:.0} ms");
    println!("sequential write, {mib} MiB + fsync, {RUNS} runs each, interleaved:");
    println!("  data partition directly: {r0:.0}–{r1:.0} MB/s");
    println!("  through the claim's volume: {t0:.0}–{t1:.0} MB/s");
    println!(
        "  volume / partition (medians): {:.0} %",
        median(&through) / median(&raw) * 100.0
    );
}

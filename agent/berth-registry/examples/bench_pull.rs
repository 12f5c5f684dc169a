//! `make bench-images`: pull-and-unpack of a 50 MB and a 500 MB image from a
//! `docker-registry` on loopback, by Berth's puller and, in the same run, by
//! `skopeo copy` to an OCI directory followed by `umoci unpack` (the
//! baseline). Prints seconds and MB/s for each, best of `BENCH_RUNS` (3).

#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_images::{ImageStore, disk_usage};
use berth_registry::fixtures::{self, TestRegistry};
use berth_registry::{Client, HostConfig, Progress, RegistryConfig};

/// An image of `mb` megabytes in `layers` gzip layers, plus busybox.
fn push(reg: &TestRegistry, name: &str, mb: usize, layers: usize) -> u64 {
    let busybox = fixtures::busybox_layer(&[]).unwrap();
    // umoci wants the uncompressed layers' digests (`rootfs.diff_ids`).
    let mut diff_ids = vec![fixtures::digest(&busybox)];
    let mut blobs = vec![fixtures::gzip(&busybox)];
    for i in 0..layers {
        let files = fixtures::noise(mb * 1_000_000 / layers, (mb * 31 + i) as u64);
        let path = format!("data/blob{i}");
        let tar = berth_images::archive::layer(&[(&path, &files, 0o644)]).unwrap();
        diff_ids.push(fixtures::digest(&tar));
        blobs.push(fixtures::gzip(&tar));
    }
    let total: u64 = blobs.iter().map(|b| b.len() as u64).sum();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sleep", "1000"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    reg.push_image(name, "1", &blobs, true, &config).unwrap();
    total
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn best(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = Path::new("/var/tmp/berth-bench-images");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let reg = TestRegistry::start(&dir.join("registry"), None).expect("registry");
    let baseline = Command::new("skopeo").arg("--version").output().is_ok()
        && Command::new("umoci").arg("--version").output().is_ok();
    if !baseline {
        println!("skopeo or umoci missing (apt-get install skopeo umoci): baseline skipped");
    }
    println!("| image | compressed | Berth pull + unpack | skopeo copy + umoci unpack |");
    println!("|---|---|---|---|");
    for (name, mb, layers) in [("fifty", 50, 2), ("five-hundred", 500, 5)] {
        let size = push(&reg, name, mb, layers);
        let reference = format!("{}/{name}:1", reg.host());
        let berth = best(runs, || {
            let store_dir = dir.join(format!("store-{name}"));
            let _ = std::fs::remove_dir_all(&store_dir);
            let store = ImageStore::open(&store_dir).unwrap();
            let mut config = RegistryConfig::default();
            config.hosts.insert(
                reg.host(),
                HostConfig {
                    mirrors: vec![],
                    insecure: true,
                },
            );
            let client = Client::new(config);
            let start = Instant::now();
            client
                .pull(&store, &reference, &[], &Progress::default())
                .expect("pull");
            start.elapsed()
        });
        let skopeo = baseline.then(|| {
            best(runs, || {
                let oci = dir.join(format!("oci-{name}"));
                let bundle = dir.join(format!("bundle-{name}"));
                let _ = std::fs::remove_dir_all(&oci);
                let _ = std::fs::remove_dir_all(&bundle);
                let start = Instant::now();
                run(Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:1", oci.display())));
                run(Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:1", oci.display()))
                    .arg(&bundle));
                start.elapsed()
            })
        });
        let mbs = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
        println!(
            "| {mb} MB ({layers} layers + busybox) | {:.1} MB | {:.2} s ({:.0} MB/s) | {} |",
            size as f64 / 1e6,
            berth.as_secs_f64(),
            mbs(berth),
            skopeo.map_or("-".into(), |d| format!(
                "{:.2} s ({:.0} MB/s)",
                d.as_secs_f64(),
                mbs(d)
            ))
        );
    }
    // Ten containers of one image: the image's root once, and ten empty
    // writable layers (what ContainerRoots::prepare makes before a start).
    let store = ImageStore::open(&dir.join("store-fifty")).unwrap();
    let reference = format!("{}/fifty:1", reg.host());
    let root = store.rootfs(&reference).unwrap();
    let roots = berth_runtime::rootfs::ContainerRoots::new(
        &dir.join("containers"),
        berth_runtime::rootfs::FakeRootMounter::new(),
    );
    for i in 0..10 {
        roots
            .prepare(&format!("default_pod-{i}_main"), &root)
            .unwrap();
    }
    println!(
        "\n10 containers of the 50 MB image: image store {:.1} MB (blobs and one unpacked root), container layers {:.3} MB",
        disk_usage(store.root()) as f64 / 1e6,
        disk_usage(&dir.join("containers")) as f64 / 1e6
    );
    let _ = std::fs::remove_dir_all(dir);
}

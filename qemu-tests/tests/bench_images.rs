//! `make bench-images` (with the host-side pull benchmark): on the appliance
//! under TCG, the time from a fetched commit to a pod running on a 50 MB
//! and on a 500 MB registry image, and the disk ten pods of one image take.
//! Skipped by `make test` (`--skip bench_`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, must, repo_root, test_image};
use berth_registry::fixtures::{self, TestRegistry};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(900);
const REG: &str = "10.0.2.100:5000";

fn push_image(reg: &TestRegistry, name: &str, mb: usize, layers: usize) -> u64 {
    let mut blobs = vec![fixtures::gzip(&fixtures::busybox_layer(&[]).unwrap())];
    for i in 0..layers {
        let body = fixtures::noise(mb * 1_000_000 / layers, (mb * 7 + i) as u64);
        let path = format!("data/blob{i}");
        blobs.push(fixtures::gzip(
            &berth_runtime::images::archive::layer(&[(&path, &body, 0o644)]).unwrap(),
        ));
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sleep", "1000000"], "Env": ["PATH=/bin"]}});
    reg.push_image(name, "1", &blobs, true, &config).unwrap();
    blobs.iter().map(|b| b.len() as u64).sum()
}

fn pod(name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - {{name: main, image: \"{REG}/{image}:1\"}}\n"
    )
}

fn running(vm: &Vm, names: &[String]) {
    vm.pods_until(&format!("{} running", names.len()), SETTLE, |p| {
        names
            .iter()
            .all(|n| p.get(n).is_some_and(|p| p["status"] == "Running"))
    });
}

#[test]
#[ignore = "benchmark: make bench-images"]
fn bench_registry_images_on_the_appliance() {
    let image = must(test_image());
    let work = repo_root().join("target/qemu-tests/bench-images-registry");
    let _ = std::fs::remove_dir_all(&work);
    let reg = TestRegistry::start(&work, None).expect("registry");
    let small = push_image(&reg, "fifty", 50, 2);
    let large = push_image(&reg, "five-hundred", 500, 5);
    let git = must(GitHost::fresh("bench-images", "desired.git"));
    must(git.push(&[("b/README", "registry images\n")], "empty"));
    let mut options = VmOptions::new("bench-images");
    options.disk_bytes = 6 << 30;
    options.memory_mib = 2048;
    options.guest_forwards = vec![(REG.to_string(), reg.port)];
    options.tcp_pipe = Some(env!("CARGO_BIN_EXE_berth-tcp-pipe").into());
    options.esp_config = Some(format!(
        "node:\n  name: bench\ngit:\n  url: git://{GIT_HOST}/desired.git\n  branch: main\n  path: b\n  pollInterval: 5s\nimages:\n  registries:\n    \"{REG}\": {{insecure: true}}\n"
    ));
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    let mut files: Vec<(String, String)> = Vec::new();
    let step = |vm: &mut Vm,
                files: &mut Vec<(String, String)>,
                add: Vec<(String, String)>,
                names: Vec<String>,
                what: &str| {
        files.extend(add);
        let borrowed: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        let commit = must(git.push(&borrowed, what));
        let fetched = must(vm.wait_for(&format!("at {}", &commit[..12]), SETTLE));
        let start = Instant::now();
        running(vm, &names);
        // The poll that saw it adds up to 2 s.
        let since_fetch = vm.started.elapsed().as_secs_f64() - fetched.as_secs_f64();
        println!(
            "{what}: {since_fetch:.1} s from the commit fetched to running ({:.1} s polling)",
            start.elapsed().as_secs_f64()
        );
    };
    step(
        &mut vm,
        &mut files,
        vec![("b/fifty.yaml".into(), pod("fifty", "fifty"))],
        vec!["fifty".into()],
        &format!(
            "a pod on a 50 MB image ({:.1} MB compressed)",
            small as f64 / 1e6
        ),
    );
    step(
        &mut vm,
        &mut files,
        vec![("b/big.yaml".into(), pod("big", "five-hundred"))],
        vec!["big".into()],
        &format!(
            "a pod on a 500 MB image ({:.1} MB compressed)",
            large as f64 / 1e6
        ),
    );
    let many: Vec<(String, String)> = (0..10)
        .map(|i| {
            (
                format!("b/many-{i}.yaml"),
                pod(&format!("many-{i}"), "fifty"),
            )
        })
        .collect();
    let names: Vec<String> = (0..10).map(|i| format!("many-{i}")).collect();
    step(
        &mut vm,
        &mut files,
        many,
        names,
        "10 more pods of the 50 MB image (present)",
    );
    let du = vm.sh("du -sx --block-size=1 /var/lib/berth/images/rootfs /var/lib/berth/images/blobs /var/lib/berth/containers");
    println!("disk with 11 pods of the 50 MB image and one of the 500 MB (du, bytes):\n{du}");
    // -x: each container's root is an overlay mounted inside its directory.
    let per = vm.sh("du -sx --block-size=1 /var/lib/berth/containers/default_many-*_main | awk '{s+=$1} END {print s/NR}'");
    println!(
        "average per container of the 10 (its writable layer): {} bytes",
        per.trim()
    );
    must(vm.poweroff(Duration::from_secs(120)));
}

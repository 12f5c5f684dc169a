//! Over-the-air updates on the real image: the bundle `image/build.sh`
//! wrote, made into version N+1 by the test (a marker file written into
//! its root with debugfs) and signed with a key of the test's; a bad N+1
//! whose `berth` exits at once; a tampered copy. The good and the bad N+1
//! are published with `berth bundle push` to a registry on the host that
//! the guest reaches through a `guestfwd`; the tampered one and a copy of
//! the good one reach the guest on a second, read-only disk, for the
//! installs by hand.
//!
//! One boot sequence: a tampered bundle is refused with nothing written; a
//! power cut while slot B is written by hand leaves slot A booting; then
//! N+1 is declared in Git (a NodeImage): the agent downloads it from the
//! registry, writes slot B, stops its pod and reboots; N+1 passes its
//! health gate (the pod that ran before is ready again), is blessed by
//! systemd-bless-boot and stays across another reboot; the bad N+1,
//! declared next with two tries, fails its gate on each and systemd-boot
//! boots slot B again by itself, where the agent reports why and does not
//! try that declaration again.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_qemu_tests::{
    GIT_HOST, GitHost, Vm, VmOptions, must, repo_root, retry_on_tcg_flake, test_bundle, test_image,
};
use berth_registry::fixtures::TestRegistry;

const BOOT: Duration = Duration::from_secs(240);
const GATE: Duration = Duration::from_secs(300);
const INSTALL: Duration = Duration::from_secs(600);

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn an_update_installs_gates_promotes_and_a_bad_one_falls_back_by_itself() {
    retry_on_tcg_flake("update", update_scenario);
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of `base` whose root image `debugfs` edits with `commands`,
/// described as `version` and signed with `key`.
fn variant(base: &Path, dir: &Path, version: &str, commands: &str, key: &Path) {
    fs::create_dir_all(dir).unwrap();
    for part in ["vmlinuz", "initrd.img"] {
        fs::copy(base.join(part), dir.join(part)).unwrap();
    }
    let image = dir.join("root.img");
    run(Command::new("zstd")
        .args(["-q", "-d", "-f"])
        .arg(base.join("root.img.zst"))
        .arg("-o")
        .arg(&image));
    let script = dir.join("debugfs.cmd");
    fs::write(&script, commands).unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&image));
    fs::remove_file(&script).unwrap();
    run(Command::new("zstd")
        .args(["-q", "-f", "-T0", "-3", "--rm"])
        .arg(&image)
        .arg("-o")
        .arg(dir.join("root.img.zst")));
    run(Command::new(repo_root().join("target/release/berth"))
        .args(["bundle", "describe"])
        .arg(dir)
        .args(["--version", version]));
    run(Command::new("ssh-keygen")
        .args(["-Y", "sign", "-q", "-n", "berth-bundle", "-f"])
        .arg(key)
        .arg(dir.join("bundle.json")));
}

/// The bundles the scenario installs: `good/`, `bad/`, `tampered/` under
/// the returned directory; an ext4 image of `good/` and `tampered/` (for
/// the installs by hand); and the allowed-signers line of the key that
/// signed them.
fn bundles() -> (PathBuf, PathBuf, String) {
    let base = must(test_bundle());
    let work = repo_root().join("target/qemu-tests/update-bundles");
    let _ = fs::remove_dir_all(&work);
    let tree = work.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let key = work.join("release");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "release", "-f"])
        .arg(&key));
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let public: Vec<&str> = public.split_whitespace().take(2).collect();

    let marker = work.join("marker");
    fs::write(&marker, "0.1.0+update.1\n").unwrap();
    variant(
        &base,
        &tree.join("good"),
        "0.1.0+update.1",
        &format!("write {} /usr/lib/berth/update-marker\n", marker.display()),
        &key,
    );
    // An N+1 whose berth (agent and gate alike) exits at start.
    let broken = work.join("broken");
    fs::write(
        &broken,
        "#!/bin/sh\necho 'berth: broken build' >&2\nexit 1\n",
    )
    .unwrap();
    variant(
        &base,
        &tree.join("bad"),
        "0.1.0+broken.1",
        &format!(
            "rm /usr/bin/berth\nwrite {} /usr/bin/berth\nsif /usr/bin/berth mode 0100755\n",
            broken.display()
        ),
        &key,
    );
    // The good bundle with one byte of its kernel changed after signing.
    let tampered = tree.join("tampered");
    fs::create_dir_all(&tampered).unwrap();
    for part in [
        "bundle.json",
        "bundle.json.sig",
        "initrd.img",
        "root.img.zst",
    ] {
        fs::hard_link(tree.join("good").join(part), tampered.join(part)).unwrap();
    }
    let mut kernel = fs::read(tree.join("good/vmlinuz")).unwrap();
    let mid = kernel.len() / 2;
    kernel[mid] ^= 0x01;
    fs::write(tampered.join("vmlinuz"), kernel).unwrap();

    let on_disk = work.join("on-disk");
    fs::create_dir_all(&on_disk).unwrap();
    for b in ["good", "tampered"] {
        fs::create_dir_all(on_disk.join(b)).unwrap();
        for f in fs::read_dir(tree.join(b)).unwrap() {
            let f = f.unwrap();
            fs::hard_link(f.path(), on_disk.join(b).join(f.file_name())).unwrap();
        }
    }
    let bytes: u64 = run(Command::new("du").args(["-sb"]).arg(&on_disk))
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    let disk = work.join("bundles.img");
    let mib = bytes / (1 << 20) * 11 / 10 + 64;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&on_disk)
        .arg(&disk)
        .arg(format!("{mib}M")));
    (
        tree,
        disk,
        format!("release@test {} {}", public[0], public[1]),
    )
}

/// Publishes `dir` to `registry` as `berth/os:<tag>` with `berth bundle push`.
fn publish(registry: &TestRegistry, dir: &Path, tag: &str) -> String {
    let started = Instant::now();
    let out = run(Command::new(repo_root().join("target/release/berth"))
        .args(["bundle", "push", "--insecure"])
        .arg(dir)
        .arg(format!("{}/berth/os:{tag}", registry.host())));
    println!(
        "published {tag} in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        out.trim()
    );
    out
}

/// The guest's address of the registry (a `guestfwd` to the host's).
const REGISTRY: &str = "10.0.2.100:5000";

fn node_image(version: &str, tag: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth.dev/v1alpha1\nkind: NodeImage\nmetadata: {{name: os}}\nspec:\n  version: {version}\n  bundle: {{image: {REGISTRY}/berth/os:{tag}}}\n  nodeSelector: {{matchLabels: {{site: lab}}}}\n  gateSeconds: 240\n{extra}"
    )
}

fn entries(vm: &Vm) -> String {
    vm.sh("ls /efi/loader/entries | tr '\\n' ' '")
}

fn mount_bundles(vm: &Vm, allowed: &str) {
    vm.sh(&format!(
        "mkdir -p /run/bundles && mount -o ro /dev/vdb /run/bundles && echo '{allowed}' > /run/allowed"
    ));
}

fn wait_in_guest(vm: &Vm, what: &str, command: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let (rc, out) = vm
            .exec(command, Duration::from_secs(60))
            .unwrap_or((-1, String::new()));
        if rc == 0 {
            return out;
        }
        assert!(Instant::now() < end, "{what} not within {timeout:?}: {out}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn update_scenario() {
    let image = must(test_image());
    let (tree, disk, allowed) = bundles();
    let work = repo_root().join("target/qemu-tests/update-registry");
    let _ = fs::remove_dir_all(&work);
    let registry = TestRegistry::start(&work, None).expect("registry");
    publish(&registry, &tree.join("good"), "update.1");
    publish(&registry, &tree.join("bad"), "broken.1");
    let git = must(GitHost::fresh("update", "desired.git"));
    // web's `sleep`, PID 1 of its namespace, ignores SIGTERM: a grace
    // period of 3 s keeps each of its stops from waiting the default 30 s.
    must(git.push(
        &[(
            "pods/web.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, 'exec sleep 1000000']\n    readinessProbe: {exec: {command: ['true']}, periodSeconds: 2}\n",
        )],
        "a pod the update must bring back",
    ));
    let mut options = VmOptions::new("update");
    options.esp_config = Some(format!(
        "node:\n  name: update\n  labels: {{site: lab}}\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 5s\nimages:\n  registries:\n    \"{REGISTRY}\": {{insecure: true}}\nupdates:\n  allowedSigners: /efi/berth/bundle-signers\n"
    ));
    options.esp_files = vec![("bundle-signers".into(), format!("{allowed}\n"))];
    options.extra_drives = vec![disk];
    options.guest_forwards = vec![(REGISTRY.to_string(), registry.port)];
    options.tcp_pipe = Some(env!("CARGO_BIN_EXE_berth-tcp-pipe").into());
    let (vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    let ready = |vm: &Vm, what: &str| {
        vm.pods_until(what, BOOT, |p| {
            p.get("web").is_some_and(|w| {
                w["status"] == "Running"
                    && w["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            })
        })
    };
    ready(&vm, "web ready on slot A");
    assert!(vm.sh("cat /proc/cmdline").contains("berth.slot=a"));
    assert_eq!(entries(&vm).trim(), "berth-a.conf");
    mount_bundles(&vm, &allowed);

    // Tampered: refused before anything is written.
    let started = Instant::now();
    let (rc, out) = must(vm.exec(
        "berth update install /run/bundles/tampered --allowed-signers /run/allowed 2>&1",
        INSTALL,
    ));
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("vmlinuz: kernel has sha256"), "{out}");
    println!(
        "tampered bundle refused (every part hashed first): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(entries(&vm).trim(), "berth-a.conf");
    assert_eq!(
        vm.sh("head -c 4194304 /dev/disk/by-partlabel/root-b | tr -d '\\000' | wc -c")
            .trim(),
        "0",
        "slot B was written to"
    );

    // A power cut while slot B is written: slot A boots.
    // A unit of its own: the test channel's cgroup ends with each command.
    vm.sh("systemd-run --unit=test-install -p StandardOutput=file:/run/install.log -p StandardError=file:/run/install.log berth update install /run/bundles/good --allowed-signers /run/allowed");
    wait_in_guest(
        &vm,
        "the install writing",
        "grep -q 'writing' /run/install.log",
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = vm.sh("cat /run/install.log");
    assert!(
        !log.contains("installed as"),
        "the install finished before the cut: {log}"
    );
    let mut vm = must(vm.power_cut(&git, &options, 2));
    must(vm.wait_for("berth: agent started", BOOT));
    assert!(
        vm.sh("cat /proc/cmdline").contains("berth.slot=a"),
        "slot A boots after the cut"
    );
    assert_eq!(entries(&vm).trim(), "berth-a.conf");
    ready(&vm, "web ready after the cut");

    // N+1 declared in Git: the agent downloads it from the registry,
    // writes slot B, stops web and reboots. When web's container stops is
    // written to /var (shared by both slots) by a watcher of its own.
    // Outside the shutdown's transaction (no default dependencies): the
    // agent asks for the reboot the moment web has stopped, and the
    // watcher must not be stopped with everything else before it writes.
    vm.sh("systemd-run --unit=test-watch -p DefaultDependencies=no sh -c 'while systemctl -q is-active berth-default_web_main.service; do sleep 0.1; done; date +%s.%N > /var/lib/web-stopped.tmp && mv /var/lib/web-stopped.tmp /var/lib/web-stopped; sync'");
    let declared = Instant::now();
    must(git.push(
        &[(
            "pods/os.yaml",
            &node_image("0.1.0+update.1", "update.1", ""),
        )],
        "run OS version 0.1.0+update.1",
    ));
    let vm = must(vm.after_reset(&git, &options, 3, INSTALL));
    let rebooting = declared.elapsed();
    let console = fs::read_to_string(vm.dir.join("console-2.log")).unwrap_or_default();
    println!(
        "NodeImage pushed to the reset into slot B (fetch, download, write, stop, reboot): {:.1} s",
        rebooting.as_secs_f64()
    );
    let mut vm = vm;
    must(vm.wait_for("berth: agent started", BOOT));
    assert!(
        vm.sh("cat /proc/cmdline").contains("berth.slot=b"),
        "slot B boots; slot A's console: {}",
        vm.dir.join("console-2.log").display()
    );
    drop(console);
    assert_eq!(
        vm.sh("cat /usr/lib/berth/update-marker").trim(),
        "0.1.0+update.1"
    );
    ready(&vm, "web ready on slot B");
    println!(
        "NodeImage pushed to web ready on slot B: {:.1} s",
        declared.elapsed().as_secs_f64()
    );
    let gate = wait_in_guest(
        &vm,
        "the gate passing",
        "journalctl -b -u berth-update-gate.service -o cat | grep 'gate: passed'",
        GATE,
    );
    println!("{gate}");
    assert!(gate.contains("1 of 1 pods ready again"), "{gate}");
    let stamp = |vm: &Vm, cmd: &str| -> f64 {
        let out = vm.sh(cmd);
        out.split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time in {out:?} ({cmd})"))
    };
    let back = stamp(
        &vm,
        "journalctl -b 0 -o short-unix -t berth | grep 'container main of pod default/web is ready' | head -n 1",
    );
    let gate_passed = stamp(
        &vm,
        "journalctl -b 0 -o short-unix -u berth-update-gate.service | grep 'gate: passed' | head -n 1",
    );
    // A figure, not a check: a watcher the shutdown cut short leaves none.
    let stopped: Option<f64> = vm
        .sh("cat /var/lib/web-stopped 2>/dev/null || true")
        .trim()
        .parse()
        .ok();
    match stopped {
        Some(stopped) => println!(
            "downtime of pod default/web (its container stopped on slot A to ready on slot B): {:.1} s",
            back - stopped
        ),
        None => println!(
            "downtime of pod default/web: not measured (the watcher on slot A wrote nothing before the reboot)"
        ),
    }
    println!(
        "gate passed {:.1} s after the pod was ready",
        gate_passed - back
    );
    wait_in_guest(
        &vm,
        "the entry blessed",
        "test -e /efi/loader/entries/berth-b.conf",
        Duration::from_secs(60),
    );
    println!(
        "NodeImage pushed to slot B blessed: {:.1} s",
        declared.elapsed().as_secs_f64()
    );
    let status = vm.sh("berth update status");
    assert!(
        status.contains("update to 0.1.0+update.1 in slot B: Promoted (agent passed"),
        "{status}"
    );
    assert!(
        status.contains("slot B: 0.1.0+update.1 (booted)"),
        "{status}"
    );
    assert!(
        vm.sh("systemctl is-active systemd-bless-boot.service")
            .contains("active")
    );
    common::await_status_branch(&git, "update", "the promotion", GATE, |d| {
        d.os.as_ref().is_some_and(|os| {
            os.slot == "B"
                && os.version == "0.1.0+update.1"
                && os.other_slot_version.as_deref() == Some("0.1.0")
                && os.update.as_ref().is_some_and(|u| {
                    u.state == "Promoted"
                        && u.declaration.as_deref()
                            == Some("0.1.0+update.1 from image 10.0.2.100:5000/berth/os:update.1")
                })
                && os.activity.is_none()
        })
    });
    assert_eq!(
        vm.sh("findmnt -n -o OPTIONS /efi | cut -d, -f1").trim(),
        "ro",
        "the ESP is read-only again after the blessing"
    );
    // The download is gone once written.
    assert_eq!(
        vm.sh("ls /var/lib/berth/update 2>/dev/null | wc -l").trim(),
        "0"
    );

    // It stays: another reboot boots slot B, uncounted, no gate, and the
    // declaration is current.
    let (vm, _, _) = must(vm.reboot_from_guest(&git, &options, 4, "berth: agent started", BOOT));
    assert!(vm.sh("cat /proc/cmdline").contains("berth.slot=b"));
    ready(&vm, "web ready on slot B after another reboot");
    let (_, gate_state) = must(vm.exec(
        "systemctl is-active berth-update-gate.service",
        Duration::from_secs(30),
    ));
    assert!(!gate_state.contains("failed"), "{gate_state}");
    wait_in_guest(
        &vm,
        "the agent finding the declaration current",
        "journalctl -b -t berth -o cat | grep 'OS update (NodeImage os): Current'",
        Duration::from_secs(60),
    );

    // The bad N+1, declared with two tries: the agent writes it into slot
    // A and reboots; each boot of it fails its gate and reboots; then
    // systemd-boot boots slot B again by itself.
    let asked = Instant::now();
    must(git.push(
        &[(
            "pods/os.yaml",
            &node_image("0.1.0+broken.1", "broken.1", "  tries: 2\n"),
        )],
        "run OS version 0.1.0+broken.1",
    ));
    let vm = must(vm.after_reset(&git, &options, 5, INSTALL));
    let vm = must(vm.after_reset(&git, &options, 6, Duration::from_secs(180)));
    let vm = must(vm.after_reset(&git, &options, 7, BOOT));
    let mut vm = vm;
    must(vm.wait_for("berth: agent started", BOOT));
    println!(
        "bad N+1: NodeImage pushed to slot B's agent started again after two failed tries: {:.1} s",
        asked.elapsed().as_secs_f64()
    );
    assert!(
        vm.sh("cat /proc/cmdline").contains("berth.slot=b"),
        "slot B boots again"
    );
    let listing = entries(&vm);
    assert!(listing.contains("berth-a+0-2.conf"), "{listing}");
    let status = vm.sh("berth update status");
    assert!(
        status.contains("in slot A: RolledBack (slot A never reached its health gate in 2 boots"),
        "{status}"
    );
    ready(&vm, "web ready on slot B after the rollback");
    common::await_status_branch(&git, "update", "the rollback", GATE, |d| {
        d.os.as_ref().is_some_and(|os| {
            os.slot == "B"
                && os.update.as_ref().is_some_and(|u| {
                    u.state == "RolledBack"
                        && u.version == "0.1.0+broken.1"
                        && u.message
                            .contains("never reached its health gate in 2 boots")
                })
                && os.activity.as_ref().is_some_and(|a| a.phase == "Refused")
        })
    });
    // Not tried again while the declaration stays: nothing is downloaded
    // or written, over several passes.
    std::thread::sleep(Duration::from_secs(20));
    let log = vm.sh("journalctl -b -t berth -o cat | grep 'OS update' || true");
    assert!(log.contains("Refused"), "{log}");
    assert!(!log.contains("Stage"), "{log}");
    assert_eq!(entries(&vm), listing, "the entries changed");
    for boot in [5, 6] {
        let console =
            fs::read_to_string(vm.dir.join(format!("console-{boot}.log"))).unwrap_or_default();
        // systemd shortens the unit's name to the console's width.
        assert!(
            console.contains("berth: broken build")
                && console.contains("Failed to start")
                && console.contains("berth-update-gate.")
                && console.contains("reboot: Restarting system"),
            "boot {boot} of the bad slot shows no failed gate and reboot"
        );
    }
}

//! The appliance, booted for real: UEFI (OVMF + systemd-boot) under TCG, the
//! node config from the ESP and from SMBIOS credentials, a Git remote on the
//! host, a pushed commit fetched, a bad commit rejected while the last good
//! revision stays. Run by `scripts/test.sh` with `--ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use berth_qemu_tests::{
    GIT_HOST, GitHost, Vm, VmOptions, repo_root, retry_on_tcg_flake, status_json, test_image,
};

const BOOT: Duration = Duration::from_secs(180);
const FETCH: Duration = Duration::from_secs(120);

fn must<T>(r: berth_qemu_tests::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn the_node_boots_fetches_its_branch_and_keeps_the_last_good_revision() {
    // The example pods start too, so the kernel flips static keys under TCG.
    retry_on_tcg_flake("fetch", fetch_scenario);
}

fn fetch_scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("fetch", "desired.git"));
    must(git.add_dir(&repo_root().join("manifests"), "manifests"));
    let good = must(git.push(&[], "the example manifests"));

    let mut options = VmOptions::new("fetch");
    // The ESP names the node and the path; SMBIOS credentials name the remote.
    options.esp_config = Some("node:\n  name: esp-node\n  labels: {disk: ssd}\ngit:\n  branch: main\n  path: manifests\n  pollInterval: 5s\n".into());
    options
        .credentials
        .push(("berth.repo".into(), format!("git://{GIT_HOST}/desired.git")));
    let (mut vm, ready) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    let accepted = format!("revision {} accepted", &good[..12]);
    let fetched = must(vm.wait_for(&accepted, FETCH));
    println!(
        "boot to agent ready: {:.1} s; to first revision accepted: {:.1} s",
        ready.as_secs_f64(),
        fetched.as_secs_f64()
    );
    // The ESP named the node (waited for: the console may hold half a line).
    must(vm.wait_for("4 pods for node esp-node", Duration::from_secs(30)));
    // The cache pod pinned to disk=ssd is planned: the labels came from the ESP too.
    must(vm.wait_for(
        "start berth-default_cache_cache.service",
        Duration::from_secs(30),
    ));

    let (rc, out) = must(vm.exec("berth status --output json", Duration::from_secs(60)));
    assert_eq!(rc, 0, "{out}");
    assert_eq!(must(status_json(&out))["lastGood"]["revision"], good);
    // For docs/benchmarks.md: where the boot time goes.
    let (_, out) = must(vm.exec(
        "systemd-analyze time; systemd-analyze critical-chain berth-agent.service",
        Duration::from_secs(60),
    ));
    println!("{out}");

    // A bad commit: reported, and the last good revision stays.
    let pushed_at = std::time::Instant::now();
    let bad = must(git.push(&[("manifests/broken.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, image: busybox, imagee: typo}]}\n")], "a typo"));
    must(vm.wait_for(
        &format!(
            "revision {} rejected (1 errors); keeping {}",
            &bad[..12],
            &good[..12]
        ),
        FETCH,
    ));
    println!(
        "push to rejection logged: {:.1} s",
        pushed_at.elapsed().as_secs_f64()
    );
    // The error itself is logged right after the rejection line.
    must(vm.wait_for("unknown field \"imagee\"", Duration::from_secs(30)));
    let (_, out) = must(vm.exec("berth status --output json", Duration::from_secs(60)));
    let status = must(status_json(&out));
    assert_eq!(status["lastGood"]["revision"], good);
    assert_eq!(status["lastAttempted"]["revision"], bad);

    // The fix is accepted.
    let pushed_at = std::time::Instant::now();
    let fixed = must(git.push(
        &[(
            "manifests/broken.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fixed}\n",
        )],
        "fix the typo",
    ));
    must(vm.wait_for(&format!("revision {} accepted", &fixed[..12]), FETCH));
    println!(
        "push to new revision accepted: {:.1} s",
        pushed_at.elapsed().as_secs_f64()
    );

    // The appliance's shape: read-only root, /var grown to the disk.
    let (rc, _) = must(vm.exec("touch /usr/berth-was-here", Duration::from_secs(30)));
    assert_ne!(rc, 0, "the root filesystem is writable");
    let (rc, out) = must(vm.exec("df -k /var | tail -n1", Duration::from_secs(30)));
    assert_eq!(rc, 0, "{out}");
    let kib: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    println!("/var: {} MiB on a 3 GiB disk", kib / 1024);
    assert!(kib > 1024 * 1024, "/var did not grow: {out}");
    let (rc, out) = must(vm.exec(
        "systemctl is-active berth-agent.service",
        Duration::from_secs(30),
    ));
    assert_eq!((rc, out.trim()), (0, "active"));
    // Berth's initrd mounted the root read-only and /var and the ESP as the
    // root's fstab says; the agent's start loaded the modules it relies on;
    // nothing the image masks or reorders left a unit failed.
    let (rc, out) = must(vm.exec(
        "findmnt -n -o OPTIONS / | cut -d, -f1; findmnt -n -o OPTIONS /var | cut -d, -f1; findmnt -n -o OPTIONS /efi | cut -d, -f1",
        Duration::from_secs(30),
    ));
    assert_eq!(
        (rc, out.split_whitespace().collect::<Vec<_>>()),
        (0, vec!["ro", "rw", "ro"])
    );
    // systemd-boot's entry editor is off: no kernel command line typed at
    // the console (init=/bin/sh) gets past it.
    let (rc, out) = must(vm.exec(
        "grep -x 'editor no' /efi/loader/loader.conf",
        Duration::from_secs(30),
    ));
    assert_eq!((rc, out.trim()), (0, "editor no"), "{out}");
    let (rc, out) = must(vm.exec(
        "test -e /proc/sys/net/bridge/bridge-nf-call-iptables && test -e /dev/loop-control",
        Duration::from_secs(30),
    ));
    assert_eq!(rc, 0, "br_netfilter or loop is not loaded: {out}");
    let (_, out) = must(vm.exec(
        "systemctl is-system-running --wait; systemctl --failed --no-legend --plain",
        Duration::from_secs(120),
    ));
    assert_eq!(out.trim(), "running", "the boot left units failed");
    must(vm.poweroff(Duration::from_secs(120)));
}

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn a_node_without_config_says_so_and_keeps_retrying() {
    let image = must(test_image());
    let git = must(GitHost::fresh("no-config", "unused.git"));
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &VmOptions::new("no-config"),
        "berth: agent started",
        BOOT,
    ));
    must(vm.wait_for("no Git URL is configured", FETCH));
    // Retried with backoff, not crash-looping: the same process says it again.
    must(vm.wait_for_nth("no Git URL is configured", 1, FETCH));
    let (rc, out) = must(vm.exec(
        "systemctl show -p NRestarts --value berth-agent.service",
        Duration::from_secs(60),
    ));
    assert_eq!(
        (rc, out.trim()),
        (0, "0"),
        "the agent restarted instead of retrying"
    );
    must(vm.poweroff(Duration::from_secs(120)));
}

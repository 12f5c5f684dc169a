//! Registry images on the real appliance: pods run images the node pulls
//! from registries on the host's loopback (reached through QEMU's
//! `guestfwd`), one behind a login; a root image under `runAsNonRoot` is
//! refused with a clear status; containers cannot see the node's processes
//! or write outside their volumes; `berth exec` runs commands inside; and
//! images no pod uses any more are collected.
//! Run by `scripts/test.sh` with `--ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use berth_qemu_tests::{
    GIT_HOST, GitHost, Vm, VmOptions, must, repo_root, retry_on_tcg_flake, test_image,
};
use berth_registry::fixtures::{self, TestRegistry};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(240);
const OPEN: &str = "10.0.2.100:5000";
const PRIVATE: &str = "10.0.2.101:5001";

/// A pod of one container. Its `sleep`, PID 1 of its namespace, ignores
/// SIGTERM: a grace period of 3 s keeps each stop (and the poweroff) from
/// waiting the default 30.
fn pod(name: &str, image: &str, extra_spec: &str, extra_container: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 3
{extra_spec}  containers:
  - name: main
    image: {image}
{extra_container}"
    )
}

fn secret(password: &str) -> String {
    format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: regcred}}
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{{\"auths\": {{\"{PRIVATE}\": {{\"username\": \"puller\", \"password\": \"{password}\"}}}}}}'
"
    )
}

fn manifests(password: &str, with_app: bool) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("im/regcred.yaml", secret(password)),
        (
            "im/nonroot.yaml",
            pod(
                "nonroot",
                &format!("{OPEN}/team/nonroot:1"),
                "  securityContext: {runAsNonRoot: true}\n",
                "",
            ),
        ),
        (
            "im/private.yaml",
            pod(
                "private",
                &format!("{PRIVATE}/private/app:1"),
                "  imagePullSecrets: [{name: regcred}]\n",
                "",
            ),
        ),
    ];
    if with_app {
        // Its command comes from the image config; it tries to mount and
        // to make a user namespace, which the default filter refuses.
        f.push((
            "im/pulled.yaml",
            pod(
                "pulled",
                &format!("{OPEN}/team/app:1"),
                "  volumes: [{name: data, emptyDir: {}}]\n",
                "    command: [sh, -c, \"busybox mount -t tmpfs none /data && echo MOUNTED || echo mount-refused; busybox unshare -U true && echo UNSHARED || echo unshare-refused; exec sleep 1000000\"]
    securityContext: {readOnlyRootFilesystem: true}
    volumeMounts: [{name: data, mountPath: /data}]
",
            ),
        ));
        f.push((
            "im/rootimg.yaml",
            pod(
                "rootimg",
                &format!("{OPEN}/team/app:1"),
                "  securityContext: {runAsNonRoot: true}\n",
                "",
            ),
        ));
    }
    f
}

fn push(git: &GitHost, files: &[(&'static str, String)], message: &str) -> String {
    let borrowed: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    must(git.push(&borrowed, message))
}

fn status_of(pods: &std::collections::BTreeMap<String, serde_json::Value>, name: &str) -> String {
    pods.get(name)
        .and_then(|p| p["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn messages(pods: &std::collections::BTreeMap<String, serde_json::Value>, name: &str) -> String {
    pods.get(name)
        .map(|p| p["messages"].to_string())
        .unwrap_or_default()
}

/// `berth exec` in the guest: exit code and output.
fn exec(vm: &Vm, pod: &str, command: &str) -> (i32, String) {
    must(vm.exec(
        &format!("berth exec {pod} -- {command}"),
        Duration::from_secs(60),
    ))
}

#[test]
#[ignore = "needs QEMU, OVMF, docker-registry and the test image (scripts/test.sh runs it)"]
fn registry_images_run_isolated_and_unused_ones_are_collected() {
    retry_on_tcg_flake("images", scenario);
}

fn scenario() {
    let image = must(test_image());
    let work = repo_root().join("target/qemu-tests/images-registries");
    let _ = std::fs::remove_dir_all(&work);
    let open = TestRegistry::start(&work.join("open"), None).expect("registry");
    let private = TestRegistry::start(&work.join("private"), Some(("puller", "s3cret")))
        .expect("registry with login");
    let passwd: &[u8] = b"root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000::/:/bin/sh\n";
    let layer =
        fixtures::gzip(&fixtures::busybox_layer(&[("etc/passwd", passwd, 0o644)]).expect("layer"));
    // Three images sharing one layer, each with a config (and so a digest)
    // of its own: collection goes by digest.
    let config = |user: &str, name: &str| {
        serde_json::json!({"architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["sleep", "1000000"], "Env": ["PATH=/bin", format!("IMAGE={name}")], "User": user}})
    };
    open.push_image(
        "team/app",
        "1",
        std::slice::from_ref(&layer),
        true,
        &config("", "app"),
    )
    .unwrap();
    open.push_image(
        "team/nonroot",
        "1",
        std::slice::from_ref(&layer),
        true,
        &config("1000:1000", "nonroot"),
    )
    .unwrap();
    private
        .push_image(
            "private/app",
            "1",
            std::slice::from_ref(&layer),
            true,
            &config("", "private"),
        )
        .unwrap();

    let git = must(GitHost::fresh("images", "desired.git"));
    let first = push(&git, &manifests("wrong", true), "pods from registries");
    let mut options = VmOptions::new("images");
    options.guest_forwards = vec![
        (OPEN.to_string(), open.port),
        (PRIVATE.to_string(), private.port),
    ];
    options.tcp_pipe = Some(env!("CARGO_BIN_EXE_berth-tcp-pipe").into());
    options.esp_config = Some(format!(
        "node:\n  name: im\ngit:\n  url: git://{GIT_HOST}/desired.git\n  branch: main\n  path: im\n  pollInterval: 5s\nimages:\n  registries:\n    \"{OPEN}\": {{insecure: true}}\n    \"{PRIVATE}\": {{insecure: true}}\n  gc: {{minimumAge: 1s, maximumAge: 20s}}\n"
    ));
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    let fetched = must(vm.wait_for(&format!("at {}", &first[..12]), SETTLE));

    // Pulled and running; the root image under runAsNonRoot refused; the
    // private one refused its wrong password.
    let pods = vm.pods_until("registry pods settle", SETTLE, |p| {
        status_of(p, "pulled") == "Running"
            && status_of(p, "nonroot") == "Running"
            && status_of(p, "rootimg") == "CreateContainerConfigError"
            && matches!(
                status_of(p, "private").as_str(),
                "ErrImagePull" | "ImagePullBackOff"
            )
    });
    println!(
        "commit fetched to registry pods running: {:.1} s",
        vm.started.elapsed().as_secs_f64() - fetched.as_secs_f64()
    );
    assert!(
        messages(&pods, "rootimg").contains("runAsNonRoot"),
        "{}",
        messages(&pods, "rootimg")
    );
    let denied = messages(&pods, "private");
    assert!(
        denied.contains("credentials were refused") && denied.contains("imagePullSecrets"),
        "{denied}"
    );

    // berth exec: output and exit code come back; the user is the image's.
    let (rc, out) = exec(&vm, "pulled", "sh -c 'echo inside; exit 3'");
    assert_eq!((rc, out.trim()), (3, "inside"), "{out}");
    assert_eq!(exec(&vm, "nonroot", "id -u").1.trim(), "1000");
    // Its own processes only: its sleep and the exec'd ones.
    let (_, procs) = exec(&vm, "pulled", "sh -c 'ls /proc | grep -c \"^[0-9]\"'");
    let count: u32 = procs.trim().parse().unwrap_or(999);
    assert!(count <= 4, "the container sees {count} processes");
    let (_, host_procs) = must(vm.exec("ls /proc | grep -c '^[0-9]'", Duration::from_secs(30)));
    assert!(
        host_procs.trim().parse::<u32>().unwrap_or(0) > 20,
        "{host_procs}"
    );
    // Read-only root, writable volume; nothing of the node's /run or state.
    let (rc, out) = exec(&vm, "pulled", "touch /rootfile");
    if rc == 0 {
        let (_, why) = must(vm.exec(
            "systemctl show -p ReadOnlyPaths -p RootDirectory -p SystemCallFilter berth-default_pulled_main.service; cat /proc/$(systemctl show -p MainPID --value berth-default_pulled_main.service)/mountinfo",
            Duration::from_secs(30),
        ));
        panic!("the read-only root took a write:\n{why}");
    }
    assert!(out.contains("Read-only"), "{out}");
    assert_eq!(exec(&vm, "pulled", "touch /data/ok").0, 0);
    for path in [
        "/run/dbus/system_bus_socket",
        "/run/systemd/private",
        "/var/lib/berth",
    ] {
        let (rc, out) = exec(&vm, "pulled", &format!("ls {path}"));
        assert_ne!(rc, 0, "{path} is visible: {out}");
    }
    // The container's own process: no new privileges, the seccomp filter,
    // the runtime's capability set (without MKNOD under a private /dev).
    let (_, status) = exec(&vm, "pulled", "cat /proc/1/status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("CapBnd:\t00000000a00425fb"), "{status}");
    let logs = vm.sh("berth logs pulled");
    assert!(
        logs.contains("mount-refused") && logs.contains("unshare-refused"),
        "{logs}"
    );
    let (_, devs) = exec(&vm, "pulled", "ls /dev");
    assert!(!devs.contains("vda") && devs.contains("null"), "{devs}");

    // The right password: the private image is pulled after its back-off.
    push(&git, &manifests("s3cret", true), "the right pull secret");
    vm.pods_until("the private image runs", SETTLE, |p| {
        status_of(p, "private") == "Running"
    });
    let listed = vm.sh("berth images");
    for reference in [
        format!("{OPEN}/team/app:1"),
        format!("{OPEN}/team/nonroot:1"),
        format!("{PRIVATE}/private/app:1"),
    ] {
        assert!(listed.contains(&reference), "{reference} not in:\n{listed}");
    }

    // Both pods of team/app gone: once unused for maximumAge its image goes;
    // the images pods still run stay.
    must(git.remove("im/pulled.yaml"));
    must(git.remove("im/rootimg.yaml"));
    push(&git, &manifests("s3cret", false), "team/app no longer used");
    let end = Instant::now() + SETTLE;
    loop {
        let listed = vm.sh("berth images");
        if !listed.contains(&format!("{OPEN}/team/app:1")) {
            assert!(
                listed.contains(&format!("{OPEN}/team/nonroot:1")),
                "{listed}"
            );
            assert!(
                listed.contains(&format!("{PRIVATE}/private/app:1")),
                "{listed}"
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "team/app:1 was not collected:\n{listed}"
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    let journal = vm.sh("journalctl -u berth-agent --no-pager");
    assert!(
        journal.contains(&format!("image {OPEN}/team/app:1 collected")),
        "{journal}"
    );
    vm.pods_until("the remaining pods keep running", SETTLE, |p| {
        status_of(p, "nonroot") == "Running" && status_of(p, "private") == "Running"
    });
    must(vm.poweroff(Duration::from_secs(120)));
}

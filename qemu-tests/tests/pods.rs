//! Pods as systemd units on the real appliance: pushed pods run in
//! `berth.slice/berth-<qos>.slice/...` with the cgroup values the plan
//! computed, a killed main process is restarted, a removed pod is stopped
//! and its units are gone, an agent restart and a reboot converge without
//! duplicates, and an admin's own unit is left alone. Prints the figures
//! docs/benchmarks.md quotes. Run by `scripts/test.sh` with `--ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_plan::{NodeInfo, PropertyValue};

mod common;
use berth_qemu_tests::{GIT_HOST, GitHost, Vm, VmOptions, retry_on_tcg_flake, test_image};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(180);

fn must<T>(r: berth_qemu_tests::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Pods whose `sleep` is PID 1 of their namespace ignore SIGTERM: a grace
/// period of 3 s, not 30, keeps the reboot from waiting for them.
const PODS: &[(&str, &str)] = &[
    (
        "pods/gold.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: gold}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sleep, \"1000000\"]\n    resources:\n      limits: {cpu: 500m, memory: 64Mi}\n",
    ),
    (
        "pods/silver.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: silver}\nspec:\n  terminationGracePeriodSeconds: 3\n  securityContext: {runAsUser: 1000, runAsGroup: 1000}\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"echo started as uid `id -u`; exec sleep 1000000\"]\n    resources:\n      requests: {cpu: 250m, memory: 32Mi}\n      limits: {memory: 128Mi}\n",
    ),
    (
        "pods/bronze.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bronze}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"trap '' TERM; while :; do sleep 1; done\"]\n",
    ),
    (
        "pods/crasher.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: crasher}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"exit 3\"]\n",
    ),
    // Takes memory without bound: the kernel's OOM killer ends it at its
    // limit, again and again.
    (
        "pods/hog.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hog}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sh, -c, \"cat /dev/zero | tail\"]\n    resources:\n      limits: {memory: 24Mi}\n",
    ),
    (
        "pods/ghost.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  containers:\n  - name: main\n    image: registry.example/ghost:1.0\n    imagePullPolicy: Never\n    command: [/ghost]\n",
    ),
    (
        "pods/huge.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: huge}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sleep, \"1\"]\n    resources:\n      requests: {cpu: \"64\"}\n",
    ),
    (
        "pods/nobin.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: nobin}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [/no/such/program]\n",
    ),
    // A command line with `$` in every form: Kubernetes expands `$(VAR)`
    // and turns `$$` into `$`; the shell gets the rest as written.
    (
        "pods/dollars.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: dollars}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: busybox:1.37\n    env:\n    - {name: GREETING, value: hi}\n    - name: TOKEN\n      valueFrom: {secretKeyRef: {name: creds, key: token}}\n    command: [sh, -c]\n    args:\n    - |-\n      for i in 1 2; do echo \"loop=${i}\"; done\n      echo 'twice=$$$$'\n      echo \"var=$(GREETING)\"\n      echo 'escaped=$$(GREETING)'\n      X=set; echo \"plain=$X\"\n      exec sleep 1000000\n",
    ),
    (
        "pods/creds.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData:\n  token: 's3cr\"et $HOME `x` \\\\n'\n",
    ),
    // Asks for what would reach root on the node; the node's level is the
    // default, baseline.
    (
        "pods/rootish.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: rootish}\nspec:\n  securityContext:\n    seccompProfile: {type: Unconfined}\n  containers:\n  - name: main\n    image: busybox:1.37\n    command: [sleep, \"1000000\"]\n    securityContext:\n      capabilities: {add: [SYS_ADMIN]}\n",
    ),
];

/// An OOM-killed container shows `OOMKilled` with exit code 137 as its
/// last state; the crash-looping pod's story is in `berth get events` and
/// on the status branch, each repeat counted.
fn oom_and_events(vm: &Vm, git: &GitHost) {
    let pods = pods_until(vm, "the hog OOM-killed and restarted", SETTLE, |p| {
        p["hog"]["containers"][0]["lastState"]["reason"] == "OOMKilled"
    });
    let hog = &pods["hog"]["containers"][0];
    println!("hog: {hog}");
    assert_eq!(hog["lastState"]["exitCode"], 137, "{hog}");
    assert!(
        hog["restartCount"].as_u64().is_some_and(|n| n >= 1),
        "{hog}"
    );
    let text = sh(vm, "berth get pods");
    assert!(
        text.contains("default/hog main: last terminated OOMKilled (exit code 137)"),
        "{text}"
    );

    // The crash loop's story: scheduled, created, started, backing off.
    let end = Instant::now() + SETTLE;
    let events = loop {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&sh(vm, "berth get events -o json")).expect("events as JSON");
        let of = |object: &str, reason: &str| {
            events
                .iter()
                .find(|e| e["object"] == object && e["reason"] == reason)
                .cloned()
        };
        // Backed off twice or more, over one entry or two: a crash the
        // agent saw only as a restart (under TCG a pass can miss the exit,
        // and systemd forgets its status when the next run starts) is told
        // without the exit code, so it is an entry of its own.
        let backoffs: u64 = events
            .iter()
            .filter(|e| e["object"] == "Pod/default/crasher" && e["reason"] == "BackOff")
            .map(|e| e["count"].as_u64().unwrap_or(1))
            .sum();
        let told_code = events.iter().any(|e| {
            e["object"] == "Pod/default/crasher"
                && e["reason"] == "BackOff"
                && e["message"].as_str().is_some_and(|m| m.contains("code 3"))
        });
        let oom = of("Pod/default/hog", "OOMKilling");
        if backoffs >= 2 && told_code && oom.is_some() {
            break events;
        }
        assert!(
            Instant::now() < end,
            "no crash loop story: {}",
            sh(vm, "berth get events")
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    println!("{}", sh(vm, "berth get events"));
    let story: Vec<&str> = events
        .iter()
        .filter(|e| e["object"] == "Pod/default/crasher")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for reason in ["Scheduled", "Created", "Started", "BackOff"] {
        assert!(story.contains(&reason), "{reason} missing: {story:?}");
    }
    let backoffs: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["object"] == "Pod/default/crasher" && e["reason"] == "BackOff")
        .collect();
    assert!(
        backoffs.iter().all(|b| b["type"] == "Warning"),
        "{backoffs:?}"
    );
    // Counted, not repeated: one entry per message however often it backs
    // off, the exit code in it once the agent has seen an exit.
    let with_code: Vec<&&serde_json::Value> = backoffs
        .iter()
        .filter(|b| b["message"].as_str().is_some_and(|m| m.contains("code 3")))
        .collect();
    assert_eq!(with_code.len(), 1, "{backoffs:?}");
    assert!(backoffs.len() <= 2, "{backoffs:?}");
    let backoff = backoffs
        .iter()
        .max_by_key(|b| b["count"].as_u64())
        .expect("BackOff");
    assert!(
        backoff["count"].as_u64() < Some(2)
            || backoff["lastTimestamp"].as_u64() > backoff["firstTimestamp"].as_u64(),
        "{backoff}"
    );

    // On the status branch: the last events of each pod.
    common::await_status_branch(git, "pods", "the OOM kill", SETTLE, |d| {
        d.events
            .get("Pod/default/hog")
            .is_some_and(|e| e.iter().any(|e| e.reason == "OOMKilling"))
            && d.pods.iter().any(|p| {
                p.name == "hog"
                    && p.containers.iter().any(|c| {
                        c.last_state
                            .as_ref()
                            .is_some_and(|l| l.reason == "OOMKilled" && l.exit_code == Some(137))
                    })
            })
    });
}

/// Runs a guest command that must succeed.
fn sh(vm: &Vm, command: &str) -> String {
    let (rc, out) = must(vm.exec(command, Duration::from_secs(60)));
    assert_eq!(rc, 0, "{command}: {out}");
    out
}

fn pods_until(
    vm: &Vm,
    what: &str,
    timeout: Duration,
    done: impl Fn(&BTreeMap<String, serde_json::Value>) -> bool,
) -> BTreeMap<String, serde_json::Value> {
    vm.pods_until(what, timeout, done)
}

fn status_of(pods: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    pods.get(name)
        .and_then(|p| p["status"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn unit_of(name: &str) -> String {
    format!("berth-default_{name}_main.service")
}

/// `InvocationID` of each unit: a restarted unit gets a new one.
fn invocations(vm: &Vm, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            sh(
                vm,
                &format!("systemctl show -p InvocationID --value {}", unit_of(n)),
            )
        })
        .collect()
}

/// The cgroup files of a running container, and its oom_score_adj.
fn cgroup_values(vm: &Vm, name: &str, qos: &str) -> (String, String, String, String) {
    let dir = format!(
        "/sys/fs/cgroup/berth.slice/berth-{qos}.slice/berth-{qos}-default_{name}.slice/{}",
        unit_of(name)
    );
    let read = |f: &str| sh(vm, &format!("cat {dir}/{f}")).trim().to_string();
    let pid = sh(
        vm,
        &format!("systemctl show -p MainPID --value {}", unit_of(name)),
    );
    let oom = sh(vm, &format!("cat /proc/{}/oom_score_adj", pid.trim()));
    (
        read("cpu.weight"),
        read("cpu.max"),
        read("memory.max"),
        oom.trim().to_string(),
    )
}

/// The same values as the plan states them, for the node the guest is.
fn planned_values(
    manifests: &std::path::Path,
    memory: u64,
    cpus: u64,
) -> BTreeMap<String, (String, String, String, String)> {
    let catalog = berth_manifest::load_dir(manifests, &berth_manifest::LoadOptions::default())
        .expect("manifests load");
    let node = NodeInfo::new("pods", BTreeMap::new(), memory, cpus * 1000);
    let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
        reference: "busybox:1.37".into(),
        cmd: vec!["sh".into()],
        ..Default::default()
    }]);
    let plan = berth_plan::plan_node(
        &catalog,
        &node,
        &images,
        &berth_plan::ActualState::default(),
        "t",
    );
    let number = |v: Option<&PropertyValue>| match v {
        Some(PropertyValue::Unsigned(x)) => Some(i128::from(*x)),
        Some(PropertyValue::Signed(x)) => Some(i128::from(*x)),
        _ => None,
    };
    plan.pods
        .iter()
        .flat_map(|p| p.containers.iter().map(move |c| (p, c)))
        .map(|(p, c)| {
            let props = c.properties_for_apply();
            let weight = number(props.get("CPUWeight")).unwrap_or(100);
            let cpu_max = number(props.get("CPUQuotaPerSecUSec"))
                .map_or("max 100000".into(), |q| format!("{} 100000", q / 10));
            let memory_max = number(props.get("MemoryMax")).map_or("max".into(), |m| m.to_string());
            let oom = number(props.get("OOMScoreAdjust")).unwrap_or(0);
            (
                p.id.name.clone(),
                (weight.to_string(), cpu_max, memory_max, oom.to_string()),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn pushed_pods_run_as_units_with_their_qos_and_converge_after_restarts() {
    retry_on_tcg_flake("pods", scenario);
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("pods", "desired.git"));
    let first = must(git.push(PODS, "ten pods and a secret"));

    let mut options = VmOptions::new("pods");
    options.esp_config = Some(format!(
        "node:\n  name: pods\ngit:\n  url: git://{GIT_HOST}/desired.git\n  branch: main\n  path: pods\n  pollInterval: 5s\n"
    ));
    let (mut vm, ready) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    println!("boot to agent ready: {:.1} s", ready.as_secs_f64());
    // An admin's own unit, named like Berth's: never touched.
    sh(
        &vm,
        "systemd-run --unit berth-admin-debug.service --description 'admin debug shell' sleep 1000000",
    );
    let admin_invocation = sh(
        &vm,
        "systemctl show -p InvocationID --value berth-admin-debug.service",
    );

    // The in-memory systemd's contract, held against PID 1.
    let (rc, contract) = must(vm.exec("berth systemd-contract", Duration::from_secs(120)));
    println!("{contract}");
    assert_eq!(
        rc, 0,
        "PID 1 broke the contract the fake keeps:\n{contract}"
    );
    assert_eq!(
        contract.lines().filter(|l| l.starts_with("ok ")).count(),
        berth_runtime::contract::CASES.len(),
        "{contract}"
    );

    let fetched = must(vm.wait_for(&format!("at {}", &first[..12]), SETTLE));
    let pods = pods_until(&vm, "three QoS pods running", SETTLE, |p| {
        ["gold", "silver", "bronze"]
            .iter()
            .all(|n| status_of(p, n) == "Running")
    });
    let running_at = vm.started.elapsed();
    println!(
        "commit fetched to 3 pods running: {:.1} s",
        running_at.as_secs_f64() - fetched.as_secs_f64()
    );
    assert_eq!(pods["gold"]["qosClass"], "Guaranteed");
    assert_eq!(pods["silver"]["qosClass"], "Burstable");
    assert_eq!(pods["bronze"]["qosClass"], "BestEffort");

    // Faults, each reported and none blocking the others.
    let pods = pods_until(&vm, "faults reported", SETTLE, |p| {
        // An exit code shows once an observation falls in the back-off
        // (unit and service properties are two reads, and a restart can
        // start between them and reset the main process's status); the
        // same holds for the missing binary's 203/EXEC.
        status_of(p, "crasher") == "CrashLoopBackOff"
            && p["crasher"]["containers"][0]["lastExitCode"] == 3
            && status_of(p, "ghost") == "ErrImageNeverPull"
            && status_of(p, "huge") == "OutOfcpu"
            && status_of(p, "rootish") == "Forbidden"
            && status_of(p, "dollars") == "Running"
            && p["nobin"]["containers"][0]["lastExitCode"] == 203
    });
    println!("{}", sh(&vm, "berth get pods"));
    // The pod that asked for SYS_ADMIN without seccomp never got a unit.
    let rootish = serde_json::to_string(&pods["rootish"]).unwrap();
    assert!(
        rootish.contains("capabilities_baseline") && rootish.contains("seccompProfile_baseline"),
        "{rootish}"
    );
    assert_eq!(
        sh(
            &vm,
            "systemctl list-units --all --no-legend 'berth-default_rootish*'"
        )
        .trim(),
        "",
        "a pod Pod Security refuses has a unit"
    );
    let crasher = &pods["crasher"]["containers"][0];
    assert_eq!(crasher["lastExitCode"], 3, "{crasher}");
    oom_and_events(&vm, &git);
    let nobin = serde_json::to_string(&pods["nobin"]).unwrap();
    assert!(
        nobin.contains("203"),
        "a missing binary shows systemd's 203/EXEC: {nobin}"
    );

    // The cgroup values are the plan's, for each QoS class.
    let memory_kib: u64 = sh(
        &vm,
        "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
    )
    .trim()
    .parse()
    .expect("MemTotal");
    let cpus: u64 = sh(&vm, "nproc").trim().parse().expect("nproc");
    // The work tree still holds exactly the first commit.
    let planned = planned_values(&git.work.join("pods"), memory_kib * 1024, cpus);
    for (name, qos) in [
        ("gold", "guaranteed"),
        ("silver", "burstable"),
        ("bronze", "besteffort"),
    ] {
        let actual = cgroup_values(&vm, name, qos);
        println!(
            "{name} ({qos}): cpu.weight {} cpu.max {:?} memory.max {} oom_score_adj {}",
            actual.0, actual.1, actual.2, actual.3
        );
        assert_eq!(
            actual, planned[name],
            "{name}: cgroup (left) differs from the plan (right)"
        );
    }
    // The image's numeric user came through userdb, and the log through the journal.
    let pid = sh(
        &vm,
        &format!("systemctl show -p MainPID --value {}", unit_of("silver")),
    );
    let uid_line = sh(&vm, &format!("grep ^Uid: /proc/{}/status", pid.trim()));
    assert!(
        uid_line.split_whitespace().nth(1) == Some("1000"),
        "{uid_line}"
    );
    let log = sh(&vm, "berth logs default/silver");
    assert!(log.contains("started as uid 1000"), "{log}");
    // A value from a Secret reaches the container as written, and is
    // neither in the unit's properties (readable over D-Bus by any local
    // user) nor in its transient unit file; its file is root's alone.
    let secret = "s3cr\"et $HOME `x` \\\\n";
    let (rc, seen) = must(vm.exec(
        "berth exec dollars -- sh -c 'printf %s \"$TOKEN\"'",
        Duration::from_secs(60),
    ));
    assert_eq!((rc, seen.trim_end_matches('\n')), (0, secret), "{seen:?}");
    let shown = sh(
        &vm,
        "systemctl show -p Environment -p EnvironmentFiles berth-default_dollars_main.service",
    );
    assert!(!shown.contains("s3cr"), "{shown}");
    assert!(
        shown.contains(
            "EnvironmentFiles=/var/lib/berth/containers/default_dollars_main/environment-"
        ),
        "{shown}"
    );
    let (rc, _) = must(vm.exec(
        "grep -rq s3cr /run/systemd/transient/",
        Duration::from_secs(30),
    ));
    assert_ne!(rc, 0, "the secret is in a transient unit file");
    let mode = sh(
        &vm,
        "stat -c '%a %U' /var/lib/berth/containers/default_dollars_main/environment-*",
    );
    assert_eq!(mode.trim(), "600 root");
    // Kubernetes' rules for `$`, and nothing of systemd's.
    let log = sh(&vm, "berth logs default/dollars");
    let printed: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|w| {
            ["loop=", "twice=", "var=", "escaped=", "plain="]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .collect();
    assert_eq!(
        printed,
        [
            "loop=1",
            "loop=2",
            "twice=$$",
            "var=hi",
            "escaped=$(GREETING)",
            "plain=set"
        ],
        "{log}"
    );

    // A killed main process is restarted by systemd (Restart=always).
    sh(
        &vm,
        &format!(
            "systemctl kill --kill-whom=main -s KILL {}",
            unit_of("gold")
        ),
    );
    pods_until(&vm, "gold restarted", SETTLE, |p| {
        status_of(p, "gold") == "Running"
            && p["gold"]["containers"][0]["restartCount"].as_u64() == Some(1)
    });

    // An agent restart disturbs nothing: same invocations, no actions.
    let before = invocations(&vm, &["gold", "silver", "bronze"]);
    sh(&vm, "systemctl restart berth-agent.service");
    must(vm.wait_for_nth("berth: agent started", 1, SETTLE));
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(
        invocations(&vm, &["gold", "silver", "bronze"]),
        before,
        "an agent restart restarted pods"
    );
    let rss_kib = sh(
        &vm,
        "grep VmRSS /proc/$(systemctl show -p MainPID --value berth-agent)/status",
    );
    println!("agent after restart, managing the pods: {}", rss_kib.trim());

    // A memory limit change is applied live (resizePolicy NotRequired):
    // the cgroup changes, the process does not.
    let gold_before = invocations(&vm, &["gold"]);
    let resized = must(git.push(
        &[("pods/gold.yaml", &PODS[0].1.replace("64Mi", "96Mi"))],
        "more memory for gold",
    ));
    sh(&vm, "systemctl reload berth-agent.service");
    must(vm.wait_for(&format!("at {}", &resized[..12]), SETTLE));
    must(vm.wait_for("update berth-default_gold_main.service", SETTLE));
    let end = Instant::now() + SETTLE;
    while cgroup_values(&vm, "gold", "guaranteed").2 != (96u64 << 20).to_string() {
        assert!(Instant::now() < end, "gold's memory.max did not change");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        invocations(&vm, &["gold"]),
        gold_before,
        "a live resize restarted gold"
    );

    // The agent killed in the middle of applying a plan: the next start
    // converges, and nothing is duplicated or leaked.
    let many = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: many}\nspec:\n  replicas: 12\n  selector: {matchLabels: {app: many}}\n  template:\n    metadata: {labels: {app: many}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - name: main\n        image: busybox:1.37\n        command: [sleep, \"1000000\"]\n";
    let burst = must(git.push(&[("pods/many.yaml", many)], "twelve replicas"));
    sh(&vm, "systemctl reload berth-agent.service");
    must(vm.wait_for("plan: start berth-default_many-", SETTLE));
    sh(&vm, "systemctl kill -s KILL berth-agent.service");
    must(vm.wait_for_nth("berth: agent started", 2, SETTLE));
    let killed_at = vm.started.elapsed();
    pods_until(&vm, "twelve replicas running after the kill", SETTLE, |p| {
        (0..12).all(|i| status_of(p, &format!("many-{i}")) == "Running")
    });
    println!(
        "agent SIGKILLed mid-apply of {}: restarted and converged {:.1} s after its restart",
        &burst[..12],
        vm.started.elapsed().as_secs_f64() - killed_at.as_secs_f64()
    );
    let count = |pattern: &str| {
        sh(
            &vm,
            &format!("systemctl list-units --all --plain --no-legend '{pattern}' | wc -l"),
        )
        .trim()
        .parse::<u32>()
        .unwrap()
    };
    assert_eq!(count("berth-default_many-*_main.service"), 12);
    assert_eq!(count("var-lib-berth-containers-default_many*.mount"), 12);
    assert_eq!(count("berth-besteffort-default_many*.slice"), 12);
    must(git.remove("pods/many.yaml"));
    must(git.push(&[], "no more replicas"));
    sh(&vm, "systemctl reload berth-agent.service");
    pods_until(&vm, "replicas gone", SETTLE, |p| !p.contains_key("many-0"));

    // A removed pod is stopped, its units and its container root gone.
    must(git.remove("pods/bronze.yaml"));
    let removal = must(git.push(&[], "remove bronze"));
    sh(&vm, "systemctl reload berth-agent.service");
    must(vm.wait_for(&format!("at {}", &removal[..12]), SETTLE));
    pods_until(&vm, "bronze gone", SETTLE, |p| !p.contains_key("bronze"));
    let left = sh(
        &vm,
        "systemctl list-units --all --plain --no-legend 'berth*bronze*' 'var-lib-berth-containers-default_bronze*'; ls /var/lib/berth/containers",
    );
    assert!(
        !left.contains("bronze"),
        "bronze left units or files behind: {left}"
    );
    // The agent's lines about a pod carry it as a journal field, and every
    // line of a pass its revision.
    let about_bronze = sh(
        &vm,
        "journalctl --no-pager -o cat _SYSTEMD_UNIT=berth-agent.service BERTH_POD=default/bronze",
    );
    for line in [
        "plan: start berth-default_bronze_main.service",
        "plan: stop berth-default_bronze_main.service",
    ] {
        assert!(
            about_bronze.contains(line),
            "journalctl BERTH_POD=default/bronze lacks {line:?}: {about_bronze}"
        );
    }
    let in_pass = sh(
        &vm,
        &format!(
            "journalctl --no-pager -o cat _SYSTEMD_UNIT=berth-agent.service BERTH_REVISION={}",
            &removal[..12]
        ),
    );
    assert!(
        in_pass.contains("plan: stop berth-default_bronze_main.service"),
        "journalctl BERTH_REVISION={}: {in_pass}",
        &removal[..12]
    );
    // bronze ignores SIGTERM: systemd kills it after its 3 s grace period.
    let journal = sh(
        &vm,
        "journalctl --no-pager -u berth-default_bronze_main.service",
    );
    assert!(
        journal.contains("stop-sigterm' timed out. Killing"),
        "no SIGKILL after the grace period: {journal}"
    );

    // The admin's unit is untouched.
    assert_eq!(
        sh(
            &vm,
            "systemctl show -p InvocationID --value berth-admin-debug.service"
        ),
        admin_invocation
    );

    // A reboot: transient units are gone; the agent recreates each once.
    let (vm, _) = must(vm.reboot_until(&git, &options, 2, "berth: agent started", BOOT));
    pods_until(&vm, "pods back after reboot", SETTLE, |p| {
        ["gold", "silver"]
            .iter()
            .all(|n| status_of(p, n) == "Running")
    });
    let units = sh(
        &vm,
        "systemctl list-units --all --plain --no-legend 'berth-default_*.service' | awk '{print $1}' | sort",
    );
    let names: Vec<&str> = units.lines().collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "duplicate units after reboot");
    assert!(names.contains(&unit_of("gold").as_str()), "{units}");
    let mounts = sh(
        &vm,
        "systemctl list-units --plain --no-legend 'var-lib-berth-containers-*.mount' | wc -l",
    );
    println!(
        "after reboot: {} container units, {} container mounts",
        names.len(),
        mounts.trim()
    );
    must(vm.poweroff(Duration::from_secs(120)));
}

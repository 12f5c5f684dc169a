//! Pod networking on the real appliance: each pod gets its own namespace
//! and address, pods talk by pod IP, a client pod reaches a Service by its
//! cluster IP with traffic spread over two backends, the NodePort answers
//! from the host through QEMU's forward on loopback, a deleted nftables
//! table is put back and reported, names resolve through the cluster DNS
//! responder, probes judge health (a pod not yet ready gets no Service
//! traffic, a failed liveness probe restarts its container, a startup
//! probe holds liveness off), and a reboot keeps every pod's address.
//! Run by `scripts/test.sh` with `--ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use berth_qemu_tests::{
    GIT_HOST, GitHost, Hammer, Load, Vm, VmOptions, deployment_status, free_loopback_port,
    http_get_loopback, must, replica_alias, retry_on_tcg_flake, test_image,
};

const BOOT: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(240);
const CLUSTER_IP: &str = "10.96.0.50";
const NODE_PORT: u16 = 30080;

/// Pods whose stop this scenario does not test have a grace period of 3 s:
/// their programs (`sleep`, busybox `httpd`, `nc`) are PID 1 of their
/// namespace and ignore SIGTERM, so each of their stops, and each clean
/// reboot, would otherwise wait the default 30 s before SIGKILL.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "net/echo.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 3
      containers:
      - name: httpd
        image: busybox:1.37
        command: [sh, -c, \"mkdir -p /tmp/www && cat /etc/hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www\"]
        ports:
        - {name: http, containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  selector: {app: echo}
  ports:
  - {name: web, port: 80, targetPort: http, nodePort: 30080}
",
    ),
    (
        "net/client.yaml",
        "apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: busybox:1.37
    command: [sleep, \"1000000\"]
",
    ),
    (
        "net/empty.yaml",
        "apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports:
  - {port: 80}
",
    ),
];

const GREET_IP: &str = "10.96.0.60";

/// Probes: two pods behind one Service, one ready at once and one whose
/// readiness turns true after 10 s (it answers `early` until then, `late`
/// after); a pod whose liveness endpoint goes away after 8 s; a pod whose
/// startup probe holds off a liveness probe that would fail at first.
const HEALTH: &str = "apiVersion: v1
kind: Pod
metadata: {name: greet-fast, labels: {app: greet}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: httpd
    image: busybox:1.37
    command: [sh, -c, \"mkdir -p /tmp/www; echo fast > /tmp/www/index.html; exec httpd -f -p 8080 -h /tmp/www\"]
    readinessProbe:
      httpGet: {path: /index.html, port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: greet-slow, labels: {app: greet}}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: httpd
    image: busybox:1.37
    command: [sh, -c, \"mkdir -p /tmp/www; echo early > /tmp/www/index.html; httpd -p 8080 -h /tmp/www; sleep 10; echo late > /tmp/www/index.html; touch /tmp/ready; exec sleep 1000000\"]
    readinessProbe:
      exec: {command: [test, -e, /tmp/ready]}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: greet}
spec:
  clusterIP: 10.96.0.60
  selector: {app: greet}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: sick}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: httpd
    image: busybox:1.37
    command: [sh, -c, \"mkdir -p /tmp/www; touch /tmp/www/healthz; (sleep 8; rm /tmp/www/healthz) & exec httpd -f -p 8080 -h /tmp/www\"]
    livenessProbe:
      httpGet: {path: /healthz, port: 8080}
      periodSeconds: 1
      failureThreshold: 2
      terminationGracePeriodSeconds: 2
---
apiVersion: v1
kind: Pod
metadata: {name: slowstart}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: busybox:1.37
    command: [sh, -c, \"sleep 6; touch /tmp/started; exec sleep 1000000\"]
    startupProbe:
      exec: {command: [test, -e, /tmp/started]}
      initialDelaySeconds: 8
      periodSeconds: 1
      failureThreshold: 30
    livenessProbe:
      exec: {command: [test, -e, /tmp/started]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {name: graceful}
spec:
  terminationGracePeriodSeconds: 10
  containers:
  - name: main
    image: busybox:1.37
    env: [{name: ROUND, value: \"1\"}]
    command: [sh, -c, \"trap 'if [ -e /data/prestop ]; then echo prestop-first >> /data/order; else echo term-first >> /data/order; fi; exit 0' TERM; while true; do sleep 1; done\"]
    lifecycle:
      preStop:
        exec: {command: [sh, -c, \"date +%s > /data/prestop; sleep 2\"]}
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpcish}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: busybox:1.37
    command: [nc, -ll, -p, \"9000\", -e, /cfg/answer.sh]
    readinessProbe:
      grpc: {port: 9000}
      periodSeconds: 1
    volumeMounts: [{name: cfg, mountPath: /cfg}]
  volumes: [{name: cfg, configMap: {name: grpc-answer, defaultMode: 493}}]
";

/// The grpcish pod's server: a canned answer (the prober's tests check the
/// same script against the prober on loopback).
const GRPC_ANSWER: &str = include_str!("../../agent/berth-agent/tests/grpc/answer.sh");

/// The health manifests, with the ConfigMap holding `GRPC_ANSWER`.
fn health_yaml(round: &str) -> String {
    let script: String = GRPC_ANSWER.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: grpc-answer}}\ndata:\n  answer.sh: |\n{script}",
        HEALTH.replace("value: \"1\"", &format!("value: \"{round}\""))
    )
}

fn container<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// The probes part of the scenario, on the running node.
fn health(vm: &Vm, git: &GitHost) {
    must(git.push(&[("net/health.yaml", &health_yaml("1"))], "probes"));
    let pods = vm.pods_until("greet-slow running", SETTLE, |p| {
        p.get("greet-slow")
            .is_some_and(|p| p["status"] == "Running")
            && p.get("greet-fast")
                .is_some_and(|p| p["status"] == "Running")
    });
    let slow = &pods["greet-slow"];
    assert_eq!(container(slow, "httpd")["ready"], false, "{slow}");
    // A client hammers the Service from the moment the slow pod runs: it
    // must never reach the slow pod before its readiness turned true.
    let hammer = format!(
        "ip netns exec default_client busybox sh -c 'for i in $(seq 1 120); do busybox wget -q -T 2 -O - http://{GREET_IP}/ 2>/dev/null || echo none; sleep 0.1; done'"
    );
    let (rc, out) = must(vm.exec(&hammer, Duration::from_secs(240)));
    assert_eq!(rc, 0, "{out}");
    let mut by_answer: BTreeMap<String, u32> = BTreeMap::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *by_answer.entry(line.to_string()).or_default() += 1;
    }
    println!("hammering the Service while greet-slow became ready: {by_answer:?}");
    assert_eq!(
        by_answer.get("early"),
        None,
        "a request reached greet-slow before it was ready: {by_answer:?}"
    );
    assert!(
        by_answer.get("fast").is_some_and(|n| *n > 0),
        "{by_answer:?}"
    );
    assert!(
        by_answer.get("late").is_some_and(|n| *n > 0),
        "greet-slow receives traffic once ready: {by_answer:?}"
    );
    let pods = vm.pods_until("greet-slow ready", SETTLE, |p| {
        p.get("greet-slow")
            .is_some_and(|p| container(p, "httpd")["ready"] == true)
    });
    let ready = pods["greet-slow"]["conditions"].to_string();
    assert!(ready.contains("lastTransitionTime"), "{ready}");

    // Liveness: the endpoint goes after 8 s; two failures kill the
    // container (busybox httpd, PID 1 of its namespace, ignores SIGTERM:
    // SIGKILL after the probe's 2 s grace), and systemd restarts it.
    let pods = vm.pods_until("sick restarted for its liveness probe", SETTLE, |p| {
        p.get("sick").is_some_and(|p| {
            let c = container(p, "httpd");
            c["restartCount"].as_u64().unwrap_or(0) >= 1
                && c["lastKill"].as_str().is_some_and(|k| {
                    k.contains("Liveness probe failed: HTTP probe failed with statuscode: 404")
                })
        })
    });
    println!("sick: {}", container(&pods["sick"], "httpd"));
    // On the status branch too, with the count and the reason.
    common::await_status_branch(git, "net", "the kill", SETTLE, |d| {
        d.pods.iter().filter(|p| p.name == "sick").any(|p| {
            p.containers.iter().any(|c| {
                c.restart_count >= 1
                    && c.last_kill
                        .as_deref()
                        .is_some_and(|k| k.starts_with("Liveness probe failed"))
            })
        })
    });

    // The startup probe (first run at 8 s, file there at 6 s) held the
    // liveness probe off, which would have failed at once.
    let pods = vm.pods_until("slowstart started", SETTLE, |p| {
        p.get("slowstart")
            .is_some_and(|p| container(p, "main")["started"] == true)
    });
    let c = container(&pods["slowstart"], "main");
    assert_eq!(c["restartCount"], 0, "{c}");
    assert_eq!(c["ready"], true, "{c}");
    let status = vm.sh("berth status");
    println!("{status}");

    // grpc: ready while the (canned) health server says SERVING, not
    // ready once it says NOT_SERVING.
    vm.pods_until("grpcish ready", SETTLE, |p| {
        p.get("grpcish")
            .is_some_and(|p| container(p, "main")["ready"] == true)
    });
    vm.sh("berth exec grpcish -- touch /tmp/down");
    // Not ready, for the server's NOT_SERVING (busybox nc now and then
    // resets a connection while it listens again: a failure of another
    // kind, which the last failure may show for a moment).
    vm.pods_until("grpcish not ready for NOT_SERVING", SETTLE, |p| {
        p.get("grpcish").is_some_and(|p| {
            let c = container(p, "main");
            c["ready"] == false
                && c["probes"]
                    .to_string()
                    .contains("service unhealthy (responded with \\\"NOT_SERVING\\\")")
        })
    });

    // preStop: a changed pod restarts its container; the hook writes its
    // marker to the pod's volume before SIGTERM reaches the container
    // (whose handler records which came first).
    vm.pods_until("graceful running", SETTLE, |p| {
        p.get("graceful").is_some_and(|p| p["status"] == "Running")
    });
    must(git.push(
        &[("net/health.yaml", &health_yaml("2"))],
        "graceful changed",
    ));
    let end = Instant::now() + SETTLE;
    let order = loop {
        let (rc, out) = must(vm.exec(
            "berth exec graceful -- cat /data/order",
            Duration::from_secs(60),
        ));
        if rc == 0 && !out.trim().is_empty() {
            break out;
        }
        assert!(Instant::now() < end, "no order recorded: {out}");
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(order.trim(), "prestop-first", "{order}");
}

/// echo as the rollout part has it: a readiness probe, and `strategy`.
fn echo(version: &str, image: &str, strategy: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo}}
spec:
  replicas: 2
  {strategy}
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: httpd
        image: {image}
        command: [sh, -c, \"mkdir -p /tmp/www && cat /etc/hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www\"]
        env: [{{name: VERSION, value: \"{version}\"}}]
        ports:
        - {{name: http, containerPort: 8080}}
        readinessProbe:
          httpGet: {{path: /index.html, port: 8080}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  selector: {{app: echo}}
  ports:
  - {{name: web, port: 80, targetPort: http, nodePort: 30080}}
"
    )
}

const ROLLING: &str =
    "strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}";

/// Stops the requests and checks that none failed during `what` (with
/// the agent's last plan lines printed when some did).
fn none_failed(vm: &Vm, hammer: Hammer, what: &str) -> Load {
    let load = hammer.finish();
    if load.failed > 0 {
        println!(
            "{}",
            vm.sh("journalctl -u berth-agent.service -o short-unix --no-pager -n 150 | grep -E 'plan:|ready|Deployment|Services'")
        );
    }
    assert_eq!(load.failed, 0, "requests failed during {what}: {load:?}");
    assert!(load.sent > 50, "too few requests during {what}: {load:?}");
    load
}

fn echo_status(vm: &Vm) -> serde_json::Value {
    deployment_status(vm, "default/echo")
}

/// Waits until echo's rollout for `commit` is complete; returns its
/// status and how long that took.
fn rolled(vm: &Vm, commit: &str, what: &str) -> (serde_json::Value, f64) {
    let start = Instant::now();
    let end = start + SETTLE;
    loop {
        let d = echo_status(vm);
        let reason = d["conditions"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if d["revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && commit.starts_with(r))
            && reason == "NewReplicaSetAvailable"
        {
            return (d, start.elapsed().as_secs_f64());
        }
        assert!(
            Instant::now() < end,
            "{what}: the rollout did not complete: {d}\n{}",
            vm.sh("berth status")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The echo pods' container units, loaded whatever their state.
fn echo_units(vm: &Vm) -> Vec<String> {
    vm.sh("systemctl list-units --all --plain --no-legend 'berth-default_echo-*_httpd.service' | awk '{print $1}'")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Rollouts under load: a change rolls without one failed request, a
/// revision whose image does not exist is rolled back while the old pods
/// serve, a fix rolls forward, Recreate stops before it starts, and an
/// agent killed mid-rollout resumes without a duplicate.
fn rollouts(vm: &mut Vm, git: &GitHost, host_port: u16) {
    // From a serving node: after the reboot the Service answers once its
    // pods are observed running.
    let end = Instant::now() + SETTLE;
    let mut answered = 0;
    while answered < 5 {
        match http_get_loopback(host_port) {
            Ok(body) if !body.is_empty() => answered += 1,
            _ => answered = 0,
        }
        assert!(Instant::now() < end, "the node port never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    let hammer = Hammer::start(host_port);
    let since = vm.sh("date +%s").trim().to_string();
    let probed = must(git.push(
        &[("net/echo.yaml", &echo("1", "busybox:1.37", ROLLING))],
        "echo probed",
    ));
    let (_, first) = rolled(vm, &probed, "a readiness probe added");
    // Where the first rollout's time went, by the agent's clock (one run
    // took 53.7 s where the next took 23.8 s).
    println!(
        "{}",
        vm.sh(&format!(
            "journalctl -u berth-agent.service -o short-unix --no-pager --since @{since} | grep -E 'fetched|accepted|plan:|ready|Deployment|applied|kill'"
        ))
    );
    let env = must(git.push(
        &[("net/echo.yaml", &echo("2", "busybox:1.37", ROLLING))],
        "echo env 2",
    ));
    let (d, second) = rolled(vm, &env, "an env var changed");
    let load = none_failed(vm, hammer, "the rollouts");
    println!(
        "rollouts of 2 replicas (maxSurge 1, maxUnavailable 0) under load: {first:.1} s and {second:.1} s; {load:?}"
    );
    let hash = d["templateHash"].as_str().unwrap_or_default().to_string();
    assert_eq!(echo_units(vm).len(), 2, "{:?}", echo_units(vm));

    // An image that cannot be pulled (its registry, on the guest's own
    // loopback, refuses): the new pod cannot pull, the revision
    // is rolled back, the old pods serve throughout.
    let hammer = Hammer::start(host_port);
    let bad = must(git.push(
        &[(
            "net/echo.yaml",
            &echo("3", "127.0.0.1:5/echo:missing", ROLLING),
        )],
        "echo bad image",
    ));
    let end = Instant::now() + SETTLE;
    let rolled_back = loop {
        let status = berth_qemu_tests::status_json(&vm.sh("berth status -o json")).expect("json");
        let r = status["rolledBack"].clone();
        if r["revision"] == bad.as_str() && r["to"] == env.as_str() {
            break r;
        }
        assert!(Instant::now() < end, "no rollback: {status}");
        std::thread::sleep(Duration::from_secs(1));
    };
    println!("rolled back: {rolled_back}");
    assert!(
        rolled_back["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ErrImagePull") || r.contains("ImagePullBackOff")),
        "{rolled_back}"
    );
    // Back on the healthy template, its pods untouched.
    let end = Instant::now() + SETTLE;
    while echo_status(vm)["templateHash"] != hash.as_str()
        || echo_units(vm).iter().any(|u| !u.contains(&hash))
    {
        assert!(
            Instant::now() < end,
            "not back on {hash}: {:?}",
            echo_units(vm)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // On the status branch too.
    common::await_status_branch(git, "net", "the rollback", SETTLE, |d| {
        d.revisions
            .rolled_back
            .as_ref()
            .is_some_and(|r| r.revision == bad && r.to.as_deref() == Some(env.as_str()))
    });
    // The failed commit is not tried again; a fix rolls forward.
    let fix = must(git.push(
        &[("net/echo.yaml", &echo("4", "busybox:1.37", ROLLING))],
        "echo fixed",
    ));
    let (_, fixed) = rolled(vm, &fix, "the fix");
    let load = none_failed(vm, hammer, "the rollback");
    println!("bad image rolled back and the fix rolled forward ({fixed:.1} s): {load:?}");

    // Recreate: every old pod stops before a new one starts.
    // The agent's journal, not the console (which a serial line delays).
    let since = vm.sh("date +%s").trim().to_string();
    let recreate = must(git.push(
        &[(
            "net/echo.yaml",
            &echo("5", "busybox:1.37", "strategy: {type: Recreate}"),
        )],
        "echo recreated",
    ));
    let (d, _) = rolled(vm, &recreate, "Recreate");
    let new_hash = d["templateHash"].as_str().unwrap_or_default().to_string();
    let log = vm.sh(&format!(
        "journalctl -u berth-agent.service -o cat --no-pager --since @{since}"
    ));
    let last_stop = log
        .lines()
        .enumerate()
        // The unit's name, not the reason (which names the new template).
        .filter(|(_, l)| {
            l.contains("plan: stop berth-default_echo-")
                && !l.contains(&format!("plan: stop berth-default_echo-{new_hash}"))
        })
        .map(|(i, _)| i)
        .max()
        .expect("old pods stopped");
    let first_start = log
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(&format!("plan: start berth-default_echo-{new_hash}")))
        .map(|(i, _)| i)
        .min()
        .expect("new pods started");
    assert!(
        last_stop < first_start,
        "Recreate started before it stopped:\n{log}"
    );

    // The agent killed in the middle of a rollout: the next one resumes
    // it, and no pod is duplicated.
    let starts = vm.console_text().matches("berth: agent started").count();
    let slow = must(git.push(
        &[(
            "net/echo.yaml",
            &echo(
                "6",
                "busybox:1.37",
                &format!("minReadySeconds: 5\n  {ROLLING}"),
            ),
        )],
        "echo with minReadySeconds",
    ));
    // Killed once the rollout has started a new pod and not finished.
    let end = Instant::now() + SETTLE;
    loop {
        let d = echo_status(vm);
        if d["revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && slow.starts_with(r))
            && d["updatedReplicas"].as_u64().is_some_and(|n| n >= 1)
        {
            assert_eq!(
                d["conditions"][0]["reason"], "ReplicaSetUpdated",
                "the rollout ended before the kill: {d}"
            );
            break;
        }
        assert!(Instant::now() < end, "the rollout did not start: {d}");
        std::thread::sleep(Duration::from_millis(250));
    }
    vm.sh("systemctl kill -s KILL berth-agent.service");
    must(vm.wait_for_nth("berth: agent started", starts, SETTLE));
    let (d, resumed) = rolled(vm, &slow, "after the agent was killed");
    let last = d["templateHash"].as_str().unwrap_or_default().to_string();
    let units = echo_units(vm);
    println!(
        "agent killed mid-rollout: resumed and completed {resumed:.1} s later; units {units:?}"
    );
    assert_eq!(units.len(), 2, "{units:?}");
    assert!(units.iter().all(|u| u.contains(&last)), "{units:?}");
}

/// The node rebooted in the middle of a rollout: it comes back on the
/// revision that was rolling, finishes the rollout from its record, and
/// runs each replica once (old pods lost in the reboot are not started
/// again: the rollout starts new ones in their place).
fn reboot_mid_rollout(vm: Vm, git: &GitHost, options: &VmOptions) -> Vm {
    let rolling = must(git.push(
        &[(
            "net/echo.yaml",
            &echo(
                "7",
                "busybox:1.37",
                &format!("minReadySeconds: 5\n  {ROLLING}"),
            ),
        )],
        "echo 7, rebooted mid-rollout",
    ));
    let end = Instant::now() + SETTLE;
    loop {
        let d = echo_status(&vm);
        if d["revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && rolling.starts_with(r))
            && d["updatedReplicas"].as_u64().is_some_and(|n| n >= 1)
        {
            assert_eq!(
                d["conditions"][0]["reason"], "ReplicaSetUpdated",
                "the rollout ended before the reboot: {d}"
            );
            break;
        }
        assert!(Instant::now() < end, "the rollout did not start: {d}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (vm, _) = must(vm.reboot_until(git, options, 3, "berth: agent started", BOOT));
    let (d, seconds) = rolled(&vm, &rolling, "after a reboot mid-rollout");
    let hash = d["templateHash"].as_str().unwrap_or_default().to_string();
    let units = echo_units(&vm);
    println!(
        "rebooted mid-rollout: complete {seconds:.1} s after the agent started; units {units:?}"
    );
    assert_eq!(units.len(), 2, "{units:?}");
    assert!(units.iter().all(|u| u.contains(&hash)), "{units:?}");
    let status = berth_qemu_tests::status_json(&vm.sh("berth status -o json")).expect("json");
    assert!(
        status["rolledBack"]["revision"] != rolling.as_str(),
        "a reboot is no failed rollout: {status}"
    );
    vm.pods_until("the client back after the reboot", SETTLE, |p| {
        p.get("client").is_some_and(|c| c["status"] == "Running")
    });
    vm
}

/// One HTTP GET from inside the client pod's network namespace, with the
/// node's own busybox.
fn get_from_client(vm: &Vm, url: &str) -> (i32, String) {
    must(vm.exec(
        &format!("ip netns exec default_client busybox wget -q -T 5 -O - {url}"),
        Duration::from_secs(60),
    ))
}

/// A command run inside the client pod's container (its network, mount
/// and root), so it resolves names with the pod's own resolv.conf.
fn in_client(vm: &Vm, command: &str) -> (i32, String) {
    vm.in_container("berth-default_client_main.service", command)
}

fn ips(pods: &BTreeMap<String, serde_json::Value>) -> BTreeMap<String, String> {
    pods.iter()
        .filter_map(|(n, p)| Some((n.clone(), p["podIP"].as_str()?.to_string())))
        .collect()
}

fn running_with_ips(p: &BTreeMap<String, serde_json::Value>) -> bool {
    ["echo-0", "echo-1", "client"].iter().all(|n| {
        p.get(*n)
            .is_some_and(|p| p["status"] == "Running" && p["podIP"].is_string())
    })
}

#[test]
#[ignore = "needs QEMU, OVMF and the test image (scripts/test.sh runs it)"]
fn pods_talk_services_balance_node_ports_answer_and_addresses_survive_a_reboot() {
    retry_on_tcg_flake("network", scenario);
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("network", "desired.git"));
    let first = must(git.push(MANIFESTS, "echo behind a Service, a client"));
    let host_port = must(free_loopback_port());
    let mut options = VmOptions::new("network");
    options.esp_config = Some(format!(
        "node:\n  name: net\ngit:\n  url: git://{GIT_HOST}/desired.git\n  branch: main\n  path: net\n  pollInterval: 5s\n"
    ));
    options.host_forwards = vec![(host_port, NODE_PORT)];
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        BOOT,
    ));
    let fetched = must(vm.wait_for(&format!("at {}", &first[..12]), SETTLE));
    let pods = vm.pods_until("three pods running with IPs", SETTLE, running_with_ips);
    println!(
        "commit fetched to 3 pods running with IPs: {:.1} s",
        vm.started.elapsed().as_secs_f64() - fetched.as_secs_f64()
    );
    let before = ips(&pods);
    println!("pod IPs: {before:?}");
    let distinct: std::collections::BTreeSet<&String> = before.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "each pod has its own address: {before:?}"
    );
    assert!(
        before.values().all(|ip| ip.starts_with("10.88.")),
        "{before:?}"
    );

    // Each pod is alone in its namespace with lo and eth0.
    let links = vm.sh("ip netns exec default_client ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort");
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["eth0", "lo"],
        "{links}"
    );
    // Containers see their pod's resolv.conf and hosts.
    let pid = vm.sh("systemctl show -p MainPID --value berth-default_client_main.service");
    let resolv = vm.sh(&format!("cat /proc/{}/root/etc/resolv.conf", pid.trim()));
    assert!(resolv.contains("nameserver 10.88.0.1"), "{resolv}");
    assert!(
        resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );

    // Pod to pod, by pod IP, no NAT: the server sees the client's address.
    let echo0 = &before["echo-0"];
    let (rc, body) = get_from_client(&vm, &format!("http://{echo0}:8080/"));
    assert_eq!(
        (rc, replica_alias(body.trim()).as_str()),
        (0, "echo-0"),
        "client → echo-0 by pod IP"
    );

    // Pod to Service by cluster IP: both backends answer.
    let end = Instant::now() + SETTLE;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    while seen.len() < 2 || seen.values().sum::<u32>() < 16 {
        assert!(
            Instant::now() < end,
            "cluster IP spread: {seen:?}\n{}",
            vm.sh("berth status")
        );
        let (rc, body) = get_from_client(&vm, &format!("http://{CLUSTER_IP}/"));
        if rc == 0 {
            *seen.entry(replica_alias(body.trim())).or_default() += 1;
        } else {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    println!(
        "cluster IP answers over {} requests: {seen:?}",
        seen.values().sum::<u32>()
    );
    assert!(
        seen.keys().all(|k| k == "echo-0" || k == "echo-1"),
        "{seen:?}"
    );

    // By DNS name, short (the pod's search path) and full; SRV for the
    // named port; other names forwarded to the node's resolver.
    let mut by_name: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..8 {
        let (rc, body) = in_client(&vm, "/bin/wget -q -T 5 -O - http://echo/");
        assert_eq!(rc, 0, "wget http://echo/ in the client pod: {body}");
        *by_name.entry(replica_alias(body.trim())).or_default() += 1;
    }
    println!("by DNS name: {by_name:?}");
    assert!(
        by_name.keys().all(|k| k == "echo-0" || k == "echo-1"),
        "{by_name:?}"
    );
    let (rc, out) = in_client(&vm, "/bin/nslookup echo.default.svc.cluster.local");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(CLUSTER_IP), "{out}");
    let (rc, out) = in_client(
        &vm,
        "/bin/nslookup -type=srv _web._tcp.echo.default.svc.cluster.local",
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("80") && out.contains("echo.default.svc.cluster.local"),
        "{out}"
    );
    let (rc, out) = in_client(&vm, "/bin/nslookup nosuch.default.svc.cluster.local");
    assert_ne!(rc, 0, "an unknown Service is NXDOMAIN: {out}");
    let (rc, out) = in_client(&vm, "/bin/nslookup localhost.");
    assert_eq!(
        rc, 0,
        "a name outside the cluster is forwarded to the node's resolver: {out}"
    );
    assert!(out.contains("127.0.0.1"), "{out}");

    // A Service that selects nothing refuses at once.
    let status = berth_qemu_tests::status_json(&vm.sh("berth status -o json")).expect("json");
    let services = status["network"]["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let nobody = services
        .iter()
        .find(|s| s["name"] == "default/nobody")
        .unwrap_or_else(|| panic!("status lists default/nobody: {services:?}"));
    let nobody_ip = nobody["clusterIP"].as_str().expect("leased").to_string();
    assert!(nobody_ip.starts_with("10.96."), "{nobody_ip}");
    let problems = status["network"]["problems"].to_string();
    assert!(
        problems.contains("Service/default/nobody: spec.selector: matches no pod"),
        "{problems}"
    );
    let (rc, out) = get_from_client(&vm, &format!("http://{nobody_ip}/"));
    assert_ne!(rc, 0, "no endpoints: {out}");
    assert!(out.contains("refused"), "refused, not timed out: {out}");

    // The NodePort, from the host, through QEMU's forward on loopback.
    let end = Instant::now() + SETTLE;
    let answer = loop {
        match http_get_loopback(host_port) {
            Ok(body) if !body.is_empty() => break body,
            other => {
                assert!(Instant::now() < end, "node port from the host: {other:?}");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    let answer = replica_alias(answer.trim());
    assert!(answer == "echo-0" || answer == "echo-1", "{answer}");

    // The table deleted by hand: put back, and recorded as healed drift.
    vm.sh("nft delete table ip berth");
    let end = Instant::now() + SETTLE;
    loop {
        let status = berth_qemu_tests::status_json(&vm.sh("berth status -o json")).expect("json");
        let healed = status["healed"].to_string();
        if healed.contains("nftables table ip berth") {
            break;
        }
        assert!(
            Instant::now() < end,
            "the deleted table was not restored: {healed}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let (rc, body) = get_from_client(&vm, &format!("http://{CLUSTER_IP}/"));
    assert_eq!(rc, 0, "the Service answers again: {body}");

    health(&vm, &git);

    // A reboot: the namespaces are gone with /run; the pods come back with
    // the same addresses.
    let (mut vm, _) = must(vm.reboot_until(&git, &options, 2, "berth: agent started", BOOT));
    let pods = vm.pods_until("pods back after reboot", SETTLE, running_with_ips);
    let after = ips(&pods);
    for (pod, ip) in &before {
        assert_eq!(
            after.get(pod),
            Some(ip),
            "addresses kept across the reboot: {after:?}"
        );
    }
    let (rc, body) = get_from_client(&vm, &format!("http://{echo0}:8080/"));
    assert_eq!(
        (rc, replica_alias(body.trim()).as_str()),
        (0, "echo-0"),
        "after the reboot"
    );

    rollouts(&mut vm, &git, host_port);
    let vm = reboot_mid_rollout(vm, &git, &options);

    // Removing the client pod removes its namespace and lease.
    must(git.remove("net/client.yaml"));
    must(git.push(&[], "client removed"));
    let end = Instant::now() + SETTLE;
    loop {
        let left = vm.sh("ls /run/netns");
        if !left.contains("default_client") {
            break;
        }
        assert!(Instant::now() < end, "the client's namespace stays: {left}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let leases = vm.sh("cat /var/lib/berth/network/leases.json");
    assert!(!leases.contains("default_client"), "{leases}");
    must(vm.poweroff(Duration::from_secs(120)));
}

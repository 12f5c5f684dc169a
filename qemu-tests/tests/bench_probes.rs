//! Benchmark, not a check: what probes cost the agent, and how fast a
//! readiness change reaches the Service. Prints the figures that
//! docs/benchmarks.md quotes. `make bench-probes` runs it; the QEMU tier of
//! `make test` skips it.
//!
//! In one boot: 50 pods of busybox httpd behind a Service, first without
//! probes, then with an `httpGet` and a `tcpSocket` probe each, then with
//! an `exec` probe added, every probe at `periodSeconds: 1`; the agent's
//! CPU over 60 s of each. Then one pod's readiness file is removed and the
//! guest times how long until its address leaves the Service's map.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Duration;

use berth_qemu_tests::{
    AgentCpu, GIT_HOST, GitHost, Vm, VmOptions, must, retry_on_tcg_flake, test_image,
};

const WAIT: Duration = Duration::from_secs(900);
const PODS: u32 = 50;

fn sh(vm: &Vm, command: &str) -> String {
    let (rc, out) = must(vm.exec(command, Duration::from_secs(300)));
    assert_eq!(rc, 0, "{command}: {out}");
    out
}

fn pods(probes: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {PODS}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: main
        image: busybox:1.37
        command: [sh, -c, \"mkdir -p /tmp/www; echo ok > /tmp/www/ready; exec httpd -f -p 8080 -h /tmp/www\"]
        resources: {{requests: {{cpu: 10m, memory: 4Mi}}}}
{probes}---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: 10.96.0.70
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
"
    )
}

const NETWORK_PROBES: &str = "        readinessProbe:
          httpGet: {path: /ready, port: 8080}
          periodSeconds: 1
          failureThreshold: 1
        livenessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
";

const EXEC_PROBE: &str = "        startupProbe:
          exec: {command: [\"true\"]}
          periodSeconds: 1
";

#[test]
#[ignore = "benchmark: needs QEMU and the test image (make bench-probes)"]
fn bench_probes_cost_and_readiness_latency() {
    retry_on_tcg_flake("bench-probes", scenario);
}

fn settle(vm: &mut Vm, git: &GitHost, yaml: &str, what: &str, all_ready: bool) {
    let rev = must(git.push(&[("pods/web.yaml", yaml)], what));
    sh(vm, "systemctl reload berth-agent.service");
    // A changed probe changes the template: the Deployment rolls to it.
    must(vm.wait_for(&format!("revision {} accepted", &rev[..12]), WAIT));
    let end = std::time::Instant::now() + WAIT;
    loop {
        if !all_ready {
            break;
        }
        let listed: Vec<serde_json::Value> =
            serde_json::from_str(&sh(vm, "berth get pods -o json")).unwrap_or_default();
        let ready = listed
            .iter()
            .filter(|p| p["containers"][0]["ready"] == true)
            .count();
        if ready == PODS as usize && listed.len() == PODS as usize {
            break;
        }
        assert!(std::time::Instant::now() < end, "{what}: {ready} ready");
        std::thread::sleep(Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_secs(15));
}

fn row(name: &str, c: &AgentCpu) -> String {
    format!(
        "{PODS} pods, {name}, every 1 s: agent {:.2}% CPU (user {:.2}, system {:.2}; prober thread user {:.2}, system {:.2}), its children {:.2}%, guest softirq {:.2}% (60 s)",
        c.user + c.system,
        c.user,
        c.system,
        c.prober_user,
        c.prober_system,
        c.children,
        c.guest_softirq
    )
}

fn scenario() {
    let image = must(test_image());
    let git = must(GitHost::fresh("bench-probes", "desired.git"));
    must(git.push(
        &[(
            "pods/web.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: empty}\n",
        )],
        "nothing yet",
    ));
    let mut options = VmOptions::new("bench-probes");
    options.esp_config = Some(format!(
        "node:\n  name: bench\ngit:\n  url: git://{GIT_HOST}/desired.git\n  path: pods\n  pollInterval: 60s\n"
    ));
    let (mut vm, _) = must(Vm::boot_until(
        &image,
        &git,
        &options,
        "berth: agent started",
        WAIT,
    ));
    let mut rows = Vec::new();
    // The exec rows (BERTH_BENCH_EXEC=1) load a TCG guest until its network
    // probes time out and liveness kills follow; they are measured apart.
    let with_exec = std::env::var_os("BERTH_BENCH_EXEC").is_some();
    let mut configs = vec![
        ("no probes", String::new()),
        ("httpGet + tcpSocket", NETWORK_PROBES.to_string()),
    ];
    if with_exec {
        configs.push((
            "httpGet + tcpSocket + exec",
            format!("{NETWORK_PROBES}{EXEC_PROBE}"),
        ));
    }
    for (name, probes) in configs {
        settle(&mut vm, &git, &pods(&probes), name, true);
        let cpu = vm.agent_cpu(60);
        println!("bench: {}", row(name, &cpu));
        rows.push((name, cpu));
        // Every probe is a connection the node's conntrack keeps for
        // TIME_WAIT's 120 s: the table must hold them.
        println!(
            "bench: {name}: conntrack entries {} of at most {}",
            vm.sh("cat /proc/sys/net/netfilter/nf_conntrack_count")
                .trim(),
            vm.sh("cat /proc/sys/net/netfilter/nf_conntrack_max").trim()
        );
    }
    if with_exec {
        // An exec probe that keeps running: a readiness one (a liveness
        // one timing out on an overloaded guest would kill and restart).
        let exec_forever = NETWORK_PROBES.replace(
            "httpGet: {path: /ready, port: 8080}",
            "exec: {command: [\"true\"]}",
        );
        settle(&mut vm, &git, &pods(&exec_forever), "exec readiness", false);
        let cpu = vm.agent_cpu(60);
        let name = "exec readiness + tcpSocket liveness";
        println!("bench: {}", row(name, &cpu));
        rows.push((name, cpu));
        let guest_load = vm.sh("cat /proc/loadavg");
        println!("bench: guest load with exec probes: {guest_load}");
        settle(
            &mut vm,
            &git,
            &pods(NETWORK_PROBES),
            "network probes again",
            true,
        );
    }

    // Readiness → endpoint gone: remove one pod's readiness file and time,
    // in the guest, until its address leaves the Service's endpoints.
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&sh(&vm, "berth get pods -o json")).unwrap();
    // Replica 7, whatever its template hash.
    let web7 = listed
        .iter()
        .find(|p| berth_qemu_tests::replica_alias(p["name"].as_str().unwrap_or("")) == "web-7")
        .expect("replica web-7");
    let ip = web7["podIP"]
        .as_str()
        .expect("web-7 has an address")
        .to_string();
    let name = web7["name"].as_str().unwrap_or_default().to_string();
    let mut latencies = Vec::new();
    let mut noticed = Vec::new();
    for _ in 0..5 {
        // t0 after the file is gone; t1 when the Service no longer picks
        // the endpoint; and, from the journal, when the agent logged the pod
        // not ready (the probe's part, before nftables is changed).
        // The Service's own chain, which picks among its endpoints: a
        // small listing, so the polling loop's own cost (each `nft` a
        // process start under TCG) adds little to what it measures.
        let script = format!(
            "chain=$(nft list table ip berth | sed -n 's/.*chain \\(svc_default_web_[^ ]*\\) .*/\\1/p' | head -1); \
             [ -n \"$chain\" ] && nft list chain ip berth $chain | grep -q '_{ip}_8080' || exit 3; \
             berth exec {name} -- rm /tmp/www/ready; t0=$(date +%s%N); while nft list chain ip berth $chain | grep -q '_{ip}_8080'; do :; done; t1=$(date +%s%N); \
             tn=$(journalctl -u berth-agent.service -o short-unix -n 30 --no-pager | grep '{name} is not ready' | tail -1 | cut -d' ' -f1); \
             echo $(( (t1 - t0) / 1000000 )) $t0 $tn"
        );
        let out = sh(&vm, &script);
        let f: Vec<&str> = out.split_whitespace().collect();
        latencies.push(f[0].parse::<u64>().unwrap());
        let t0 = f[1].parse::<f64>().unwrap() / 1e9;
        if let Some(tn) = f.get(2).and_then(|t| t.parse::<f64>().ok()) {
            noticed.push(((tn - t0) * 1000.0).round() as i64);
        }
        sh(
            &vm,
            &format!("berth exec {name} -- sh -c 'echo ok > /tmp/www/ready'"),
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    let dropped = vm.sh("dmesg | grep -c 'table full' || true");
    println!(
        "bench: kernel messages of a full conntrack table: {}",
        dropped.trim()
    );
    // A probe that times out on an overloaded node kills its container:
    // none should have.
    let kills = vm.console_text().matches("berth: plan: kill ").count();
    println!("bench: liveness kills during the bench: {kills}");
    for (name, cpu) in &rows {
        println!("bench: {}", row(name, cpu));
    }
    println!(
        "bench: readiness false → endpoint gone (period 1 s, failureThreshold 1): {latencies:?} ms"
    );
    println!("bench: of which until the agent logged it not ready: {noticed:?} ms");
    must(vm.poweroff(Duration::from_secs(120)));
}

//! Each kind of bad input gets an error naming file, line, object and field,
//! `berth` exits non-zero, and the valid objects next to it are still planned.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{TempDir, berth};
use serde_json::Value;

const GOOD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: good
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: [\"sleep\", \"1d\"]
";
const GOOD_UNIT: &str = "berth-default_good_main.service";

struct Case {
    name: &'static str,
    file: &'static str,
    content: String,
    /// Expected in one diagnostic: line, object, field, and a message fragment.
    line: Option<u32>,
    object: Option<&'static str>,
    field: Option<&'static str>,
    message: &'static str,
}

fn pod_with(container_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n    - name: main\n      image: busybox:1.37\n      command: [\"true\"]\n{container_extra}"
    )
}

fn cases() -> Vec<Case> {
    let mut alias_bomb = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\ndata:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..12 {
        let p = i - 1;
        alias_bomb.push_str(&format!(
            "  a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    vec![
        Case {
            name: "malformed YAML",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n".into(),
            line: Some(4),
            object: None,
            field: None,
            message: "invalid YAML",
        },
        Case {
            name: "duplicate keys",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dup\ndata:\n  a: \"1\"\n  a: \"2\"\n".into(),
            line: Some(7),
            object: None,
            field: None,
            message: "duplicate",
        },
        Case { name: "alias bomb", file: "bad.yaml", content: alias_bomb, line: None, object: None, field: None, message: "invalid YAML" },
        Case {
            name: "unknown kind",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: Pdo\nmetadata:\n  name: typo\n".into(),
            line: Some(2),
            object: Some("Pdo/default/typo"),
            field: Some("kind"),
            message: "v1 Pdo is not a kind Berth supports",
        },
        Case {
            name: "unknown custom kind",
            file: "bad.yaml",
            content: "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n".into(),
            line: Some(2),
            object: Some("Widget/default/w"),
            field: Some("kind"),
            message: "no CustomResourceDefinition",
        },
        Case {
            name: "unknown field",
            file: "bad.yaml",
            content: pod_with("      imagePullPolcy: Always\n"),
            line: Some(10),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].imagePullPolcy"),
            message: "unknown field \"imagePullPolcy\"",
        },
        Case {
            name: "wrong type",
            file: "bad.yaml",
            content: "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  replicas: \"three\"\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: busybox, command: [\"true\"]}]\n".into(),
            line: Some(6),
            object: Some("Deployment/default/bad"),
            field: Some("spec.replicas"),
            message: "invalid type: string \"three\"",
        },
        Case {
            name: "invalid cpu quantity",
            file: "bad.yaml",
            content: pod_with("      resources:\n        limits:\n          cpu: 1.5.5\n"),
            line: Some(12),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].resources.limits.cpu"),
            message: "invalid quantity \"1.5.5\"",
        },
        Case {
            name: "negative memory",
            file: "bad.yaml",
            content: pod_with("      resources:\n        requests:\n          memory: -1Gi\n"),
            line: Some(12),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].resources.requests.memory"),
            message: "must not be negative",
        },
        Case {
            name: "path escape in a name",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ../x\n".into(),
            line: Some(4),
            object: Some("ConfigMap/default/../x"),
            field: Some("metadata.name"),
            message: "RFC 1123 subdomain",
        },
        Case {
            name: "shell metacharacter in a name",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a;b\nspec:\n  containers: [{name: c, image: busybox, command: [\"true\"]}]\n".into(),
            line: Some(4),
            object: Some("Pod/default/a;b"),
            field: Some("metadata.name"),
            message: "RFC 1123 subdomain",
        },
        Case {
            name: "300-character name",
            file: "bad.yaml",
            content: format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}\n", "a".repeat(300)),
            line: Some(4),
            object: None,
            field: Some("metadata.name"),
            message: "must be 1 to 253 characters long (is 300)",
        },
        Case {
            name: "container name with a dash-free unit escape",
            file: "bad.yaml",
            content: pod_with("    - name: Main_2\n      image: busybox\n      command: [\"true\"]\n"),
            line: Some(10),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[1].name"),
            message: "RFC 1123 label",
        },
        Case {
            name: "same object twice",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: twice}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: twice}\n".into(),
            line: Some(7),
            object: Some("ConfigMap/default/twice"),
            field: Some("metadata.name"),
            message: "declared more than once",
        },
        Case {
            name: "no command and no image entrypoint",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n    - name: main\n      image: scratch-app:1\n".into(),
            // The field is absent, so the line is the container's.
            line: Some(7),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].command"),
            message: "has neither Entrypoint nor Cmd",
        },
        Case {
            name: "env reference to a missing ConfigMap",
            file: "bad.yaml",
            content: pod_with("      env:\n        - name: X\n          valueFrom:\n            configMapKeyRef: {name: nowhere, key: k}\n"),
            line: Some(13),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].env[0].valueFrom.configMapKeyRef.name"),
            message: "ConfigMap default/nowhere does not exist",
        },
        Case {
            name: "env reference to a missing key",
            file: "bad.yaml",
            content: format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata: {{a: \"1\"}}\n---\n{}",
                pod_with("      env:\n        - name: X\n          valueFrom:\n            configMapKeyRef:\n              name: settings\n              key: b\n")
            ),
            line: Some(20),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].env[0].valueFrom.configMapKeyRef.key"),
            message: "has no key \"b\"",
        },
        Case {
            name: "an env name systemd refuses",
            file: "bad.yaml",
            content: pod_with("      env:\n        - name: my.setting\n          value: x\n"),
            line: Some(11),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].env[0].name"),
            message: "cannot be passed to systemd",
        },
        Case {
            name: "namespace that is not declared",
            file: "bad.yaml",
            content: "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: nowhere\n".into(),
            line: Some(5),
            object: Some("ConfigMap/nowhere/x"),
            field: Some("metadata.namespace"),
            message: "is not declared",
        },
        Case {
            name: "request above limit",
            file: "bad.yaml",
            content: pod_with("      resources:\n        requests: {cpu: \"2\"}\n        limits: {cpu: \"1\"}\n"),
            line: Some(11),
            object: Some("Pod/default/bad"),
            field: Some("spec.containers[0].resources.requests.cpu"),
            message: "must be less than or equal to the cpu limit",
        },
        Case {
            name: "custom object violating its schema",
            file: "bad.yaml",
            content: "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {plural: widgets, kind: Widget}\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema:\n          type: object\n          properties:\n            spec:\n              type: object\n              properties:\n                size: {type: integer, maximum: 10}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec:\n  size: 11\n".into(),
            line: Some(25),
            object: Some("Widget/default/w"),
            field: Some("spec.size"),
            message: "must be less than or equal to 10",
        },
    ]
}

fn diagnostics(report: &Value) -> Vec<Value> {
    let mut all = report["loadDiagnostics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    all.extend(
        report["diagnostics"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    all
}

#[test]
fn bad_input_is_reported_precisely_and_the_rest_is_still_planned() {
    let mut failures = Vec::new();
    for case in cases() {
        let dir = TempDir::new("bad");
        dir.write("good.yaml", GOOD);
        dir.write(case.file, &case.content);
        let images = dir.write(
            "../images-for-bad.yaml",
            "images:\n  - reference: scratch-app:1\n",
        );
        let run = berth(&[
            "plan",
            dir.path().to_str().expect("utf-8"),
            "--node",
            "n1",
            "--node-memory",
            "1Gi",
            "--node-cpus",
            "1",
            "--images",
            images.to_str().expect("utf-8"),
            "--output",
            "json",
        ]);
        let report: Value = match serde_json::from_str(&run.stdout) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!(
                    "{}: output is not JSON ({e}): {}{}",
                    case.name, run.stdout, run.stderr
                ));
                continue;
            }
        };
        if run.code != 1 {
            failures.push(format!("{}: exit code {} (want 1)", case.name, run.code));
        }
        let planned = report["plan"]["actions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["unit"] == GOOD_UNIT));
        if !planned {
            failures.push(format!(
                "{}: the valid pod next to the bad input was not planned",
                case.name
            ));
        }
        let matching = diagnostics(&report).into_iter().find(|d| {
            d["severity"] == "error"
                && d["source"]["file"] == case.file
                && case.line.is_none_or(|l| d["source"]["line"] == l)
                && case.object.is_none_or(|o| object_name(d) == o)
                && case.field.is_none_or(|f| d["field"] == f)
                && d["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(case.message))
        });
        if matching.is_none() {
            failures.push(format!(
                "{}: no diagnostic matched; got {:#}",
                case.name,
                Value::Array(diagnostics(&report))
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_file_of_50_megabytes_is_refused_unread() {
    let dir = TempDir::new("big");
    dir.write("good.yaml", GOOD);
    let mut big = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\ndata:\n");
    let line = format!("  k: \"{}\"\n", "x".repeat(1000));
    while big.len() < 50 * 1024 * 1024 {
        big.push_str(&line);
    }
    dir.write("big.yaml", &big);
    let run = berth(&[
        "validate",
        dir.path().to_str().expect("utf-8"),
        "--output",
        "json",
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON");
    let d = &report["diagnostics"][0];
    assert_eq!(d["source"]["file"], "big.yaml");
    assert!(
        d["message"]
            .as_str()
            .is_some_and(|m| m.contains("larger than the 8388608-byte limit")),
        "{d}"
    );
    assert_eq!(report["objects"], 1, "the good pod still loads");
}

#[test]
fn validate_fails_on_warnings_only_when_strict() {
    let dir = TempDir::new("strict");
    dir.write("pod.yaml", format!("{GOOD}      tty: true\n"));
    let lax = berth(&["validate", dir.path().to_str().expect("utf-8")]);
    assert_eq!(lax.code, 0, "{}", lax.stdout);
    assert!(
        lax.stdout.contains(
            "pod.yaml:10: warning: Pod/default/good: spec.containers[0].tty: Berth does not support"
        ),
        "{}",
        lax.stdout
    );
    let strict = berth(&["validate", "--strict", dir.path().to_str().expect("utf-8")]);
    assert_eq!(strict.code, 1);
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let dir = TempDir::new("flags");
    dir.write("good.yaml", GOOD);
    let path = dir.path().to_str().expect("utf-8");
    for (args, fragment) in [
        (vec!["--node", "Bad_Name"], "--node:"),
        (
            vec!["--node", "n1", "--node-labels", "disk"],
            "--node-labels: \"disk\" is not key=value",
        ),
        (
            vec!["--node", "n1", "--node-memory", "lots"],
            "--node-memory: invalid quantity",
        ),
        (
            vec!["--node", "n1", "--node-cpus=-2"],
            "--node-cpus: invalid quantity \"-2\": must not be negative",
        ),
        (
            vec!["--node", "n1", "--namespace", "../etc"],
            "--namespace:",
        ),
        (
            vec!["--node", "n1", "--actual", "/nonexistent/actual.yaml"],
            "--actual: cannot read /nonexistent/actual.yaml",
        ),
    ] {
        let mut full = vec!["plan", path];
        full.extend(args);
        let run = berth(&full);
        assert_eq!(run.code, 2, "{full:?}: {}", run.stderr);
        assert!(run.stderr.contains(fragment), "{full:?}: {}", run.stderr);
    }
    let missing = berth(&["validate", "/nonexistent/dir"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing
            .stderr
            .contains("cannot read manifest directory /nonexistent/dir"),
        "{}",
        missing.stderr
    );
}

/// Services and claims are planned too: what a node could not program or
/// bind is reported by `berth validate` with file, line, object and field.
#[test]
fn validate_reports_service_and_claim_problems_with_file_line_object_and_field() {
    let dir = TempDir::new("services");
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec:\n  containers:\n  - {name: c, image: busybox:1.37, command: [sleep, \"1\"]}\n";
    let services = "apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {port: 80, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec:
  type: NodePort
  selector: {app: nobody}
  ports:
  - {name: one, port: 80, nodePort: 30080}
  - {name: two, port: 81, nodePort: 40000}
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 80}]
";
    let claim = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: fast\n  resources: {requests: {storage: 1Gi}}\n";
    dir.write("pod.yaml", pod);
    dir.write("services.yaml", services);
    dir.write("claim.yaml", claim);
    let run = berth(&["validate", dir.path().to_str().unwrap(), "--output", "json"]);
    assert_eq!(
        run.code, 1,
        "node port errors fail validation: {}{}",
        run.stdout, run.stderr
    );
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let found = diagnostics(&report);
    let expect = [
        (
            "services.yaml",
            17,
            "error",
            "Service/default/b",
            "spec.ports[0].nodePort",
            "30080 is already taken by Service default/a",
        ),
        (
            "services.yaml",
            18,
            "error",
            "Service/default/b",
            "spec.ports[1].nodePort",
            "40000 is outside the node port range 30000-32767",
        ),
        (
            "services.yaml",
            15,
            "warning",
            "Service/default/b",
            "spec.selector",
            "matches no pod in the repository",
        ),
        (
            "services.yaml",
            24,
            "warning",
            "Service/default/lb",
            "spec.type",
            "type LoadBalancer is not supported",
        ),
        (
            "claim.yaml",
            6,
            "warning",
            "PersistentVolumeClaim/default/data",
            "spec.storageClassName",
            "StorageClass \"fast\" does not exist",
        ),
    ];
    for (file, line, severity, object, field, message) in expect {
        assert!(
            found.iter().any(|d| d["source"]["file"] == file
                && d["source"]["line"] == line
                && d["severity"] == severity
                && object_name(d) == object
                && d["field"] == field
                && d["message"].as_str().is_some_and(|m| m.contains(message))),
            "no {severity} at {file}:{line} on {object} {field} saying {message:?} in {found:#?}"
        );
    }
    // Nothing is said of the Service that is fine.
    assert!(
        found.iter().all(|d| object_name(d) != "Service/default/a"),
        "{found:#?}"
    );
}

/// `Kind/namespace/name` of a diagnostic's object.
fn object_name(d: &Value) -> String {
    let obj = &d["object"];
    let ns = obj["namespace"]
        .as_str()
        .map(|n| format!("{n}/"))
        .unwrap_or_default();
    format!(
        "{}/{ns}{}",
        obj["kind"].as_str().unwrap_or(""),
        obj["name"].as_str().unwrap_or("")
    )
}

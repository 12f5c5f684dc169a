//! Loading behaviours that span documents and objects: lists, CRDs and their
//! objects, scoping, and the hints an error gives.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_manifest::{Catalog, Object, SourceFile, load_sources};

fn load(files: &[(&str, &str)]) -> Catalog {
    load_sources(
        files
            .iter()
            .map(|(p, t)| SourceFile {
                path: p.into(),
                text: t.to_string(),
            })
            .collect(),
    )
}

fn messages(c: &Catalog) -> Vec<String> {
    c.diagnostics.iter().map(|d| d.to_string()).collect()
}

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: backups.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: backups, kind: Backup}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [source]
              properties:
                source: {type: string, minLength: 1}
                retention: {type: integer, default: 7, minimum: 1}
                mode: {type: string, enum: [full, incremental], default: full}
                extra:
                  type: object
                  x-kubernetes-preserve-unknown-fields: true
                tags:
                  type: array
                  x-kubernetes-list-type: set
                  items: {type: string}
    - name: v1beta1
      served: false
      storage: false
      schema:
        openAPIV3Schema: {type: object}
"#;

#[test]
fn custom_objects_get_their_schema_defaults() {
    let c = load(&[
        ("crd.yaml", CRD),
        (
            "b.yaml",
            "apiVersion: example.com/v1\nkind: Backup\nmetadata: {name: b}\nspec:\n  source: pvc/data\n  extra: {anything: [1, 2]}\n",
        ),
    ]);
    assert_eq!(c.error_count(), 0, "{:#?}", messages(&c));
    let custom = c
        .objects
        .iter()
        .find_map(|o| match &o.object {
            Object::Custom(x) => Some(x),
            _ => None,
        })
        .expect("custom object");
    assert_eq!(custom.value["spec"]["retention"], 7);
    assert_eq!(custom.value["spec"]["mode"], "full");
    assert_eq!(custom.value["spec"]["extra"]["anything"][1], 2);
}

#[test]
fn custom_objects_are_checked_against_their_schema() {
    let bad = "apiVersion: example.com/v1\nkind: Backup\nmetadata: {name: b}\nspec:\n  retention: 0\n  mode: partial\n  colour: red\n  tags: [a, a]\n";
    let c = load(&[("crd.yaml", CRD), ("b.yaml", bad)]);
    let all = messages(&c).join("\n");
    for expected in [
        "b.yaml:4: error: Backup/default/b: spec.source: required",
        "b.yaml:5: error: Backup/default/b: spec.retention: must be greater than or equal to 1",
        "b.yaml:6: error: Backup/default/b: spec.mode: unsupported value \"partial\": must be one of \"full\", \"incremental\"",
        "b.yaml:7: error: Backup/default/b: spec.colour: unknown field",
        "b.yaml:8: error: Backup/default/b: spec.tags[1]: duplicate value \"a\"",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in\n{all}");
    }
    assert_eq!(c.rejected.len(), 1);
}

#[test]
fn a_version_the_crd_does_not_serve_is_refused() {
    let c = load(&[
        ("crd.yaml", CRD),
        (
            "b.yaml",
            "apiVersion: example.com/v1beta1\nkind: Backup\nmetadata: {name: b}\n",
        ),
    ]);
    assert!(
        messages(&c)
            .iter()
            .any(|m| m.contains("does not serve \"example.com/v1beta1\"; served versions: v1")),
        "{:#?}",
        messages(&c)
    );
}

#[test]
fn a_crd_whose_name_does_not_match_its_names_is_refused() {
    let c = load(&[(
        "crd.yaml",
        &CRD.replace("name: backups.example.com", "name: backup.example.com"),
    )]);
    assert!(
        messages(&c)
            .iter()
            .any(|m| m.contains("metadata.name: must be spec.names.plural + \".\" + spec.group")),
        "{:#?}",
        messages(&c)
    );
}

#[test]
fn list_items_are_loaded_as_objects_with_their_own_lines() {
    let list = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: a}\n  - apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: b}\n    data: {bad/key: x}\n";
    let c = load(&[("list.yaml", list)]);
    assert_eq!(c.objects.len(), 1);
    assert_eq!(
        messages(&c),
        [
            "list.yaml:10: error: ConfigMap/default/b: data[\"bad/key\"]: key \"bad/key\" may contain only letters, digits, '-', '_' and '.'"
        ]
    );
}

#[test]
fn an_old_api_version_of_a_known_kind_names_the_right_one() {
    let c = load(&[(
        "d.yaml",
        "apiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: d}\n",
    )]);
    assert!(
        messages(&c)[0].contains(
            "apps/v1beta1 Deployment is not a kind Berth supports: use apiVersion apps/v1"
        ),
        "{:#?}",
        messages(&c)
    );
}

#[test]
fn a_namespace_on_a_cluster_scoped_object_is_a_warning() {
    let c = load(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  namespace: default\n",
    )]);
    assert_eq!(c.error_count(), 0);
    assert_eq!(
        messages(&c),
        [
            "ns.yaml:5: warning: Namespace/apps: metadata.namespace: Namespace is cluster-scoped; the namespace is ignored"
        ]
    );
}

#[test]
fn a_malformed_document_does_not_take_its_neighbours_down() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n---\nkind: [broken\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: third}\n";
    let c = load(&[("multi.yaml", text)]);
    let names: Vec<&str> = c.objects.iter().map(|o| o.id.name.as_str()).collect();
    assert_eq!(names, ["first", "third"]);
    assert_eq!(c.rejected.len(), 1);
    assert_eq!(c.rejected[0].source.line, Some(5), "{:#?}", c.rejected);
}

#[test]
fn the_content_digest_changes_with_any_byte() {
    let a = load(&[(
        "a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    )]);
    let b = load(&[(
        "a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
    )]);
    let a2 = load(&[(
        "a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    )]);
    assert_ne!(a.content_digest, b.content_digest);
    assert_eq!(a.content_digest, a2.content_digest);
    assert_eq!(a.content_digest.len(), 12);
}

const NODE_IMAGE: &str = "apiVersion: berth.dev/v1alpha1\nkind: NodeImage\nmetadata: {name: edge}\nspec:\n  version: 1.2.0\n  bundle: {image: registry.example/berth/os:1.2.0}\n  nodeSelector: {matchLabels: {site: edge}}\n  maintenanceWindow: {start: '02:00', duration: 2h}\n  tries: 2\n";

#[test]
fn a_node_image_loads_cluster_scoped_with_its_spec() {
    let c = load(&[("os.yaml", NODE_IMAGE)]);
    assert_eq!(c.error_count(), 0, "{:#?}", messages(&c));
    let o = &c.objects[0];
    assert_eq!(o.id.namespace, None);
    assert_eq!(o.id.group, "berth.dev");
    let Object::NodeImage(n) = &o.object else {
        panic!("{:?}", o.object)
    };
    assert_eq!(n.spec.version, "1.2.0");
    assert_eq!(n.spec.tries(), 2);
    assert_eq!(n.spec.gate_seconds(), 300);
    assert_eq!(
        n.spec.source(),
        "image registry.example/berth/os:1.2.0".to_string()
    );
}

#[test]
fn a_bad_node_image_names_each_field() {
    let bad = NODE_IMAGE
        .replace("version: 1.2.0", "version: 'one two'")
        .replace(
            "bundle: {image: registry.example/berth/os:1.2.0}",
            "bundle: {image: r/os:1, url: 'http://r/os'}",
        )
        .replace("'02:00'", "'2am'")
        .replace(
            "tries: 2",
            "tries: 12\n  gateSeconds: 5\n  maxUnavailable: 0\n  reboot: now",
        );
    let c = load(&[("os.yaml", &bad)]);
    let text = messages(&c).join("\n");
    for (field, says) in [
        ("spec.version", "must be at most 64 letters"),
        ("spec.bundle", "set one of image and url"),
        ("spec.maintenanceWindow", "is not HH:MM"),
        ("spec.tries", "outside 1..9"),
        ("spec.gateSeconds", "outside 30..3600"),
        ("spec.maxUnavailable", "at least 1"),
        ("spec.reboot", "unknown field"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(field) && l.contains(says)),
            "{field}: {says} not in\n{text}"
        );
    }
    assert!(text.contains("os.yaml"), "{text}");
    assert!(c.objects.is_empty(), "a bad NodeImage is rejected");
    let url = |u: &str| {
        NODE_IMAGE.replace(
            "{image: registry.example/berth/os:1.2.0}",
            &format!("{{url: '{u}'}}"),
        )
    };
    let c = load(&[("os.yaml", &url("ftp://updates.example/os/"))]);
    assert_eq!(c.error_count(), 1, "{:#?}", messages(&c));
    assert!(
        messages(&c)
            .iter()
            .any(|m| m.contains("spec.bundle.url") && m.contains("must be an https:// URL")),
        "{:#?}",
        messages(&c)
    );
    let c = load(&[("os.yaml", &url("http://10.0.2.100:8080/os/"))]);
    assert_eq!(c.error_count(), 0, "{:#?}", messages(&c));
    assert!(
        messages(&c)
            .iter()
            .any(|m| m.contains("spec.bundle.url") && m.contains("marks insecure")),
        "{:#?}",
        messages(&c)
    );
    let c = load(&[("os.yaml", &url("https://updates.example/os/"))]);
    assert!(messages(&c).is_empty(), "{:#?}", messages(&c));
}

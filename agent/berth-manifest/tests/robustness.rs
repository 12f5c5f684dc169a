//! Hostile or broken input never panics the loader and always ends as either
//! an accepted object or a diagnostic.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;

use berth_manifest::{SourceFile, load_sources};

fn examples() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("manifests/ readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let name = path
                    .strip_prefix(&root)
                    .expect("under root")
                    .display()
                    .to_string();
                out.push((name, std::fs::read_to_string(&path).expect("utf-8")));
            }
        }
    }
    assert!(out.len() >= 4, "examples missing: {out:?}");
    out
}

#[test]
fn every_truncation_of_every_example_loads_without_panicking() {
    let mut cases = 0;
    let all = examples();
    let namespace = all
        .iter()
        .find(|(n, _)| n == "namespace.yaml")
        .map(|(_, t)| t.clone())
        .expect("namespace.yaml");
    for (name, text) in all {
        let mut cut = 0;
        for line in text.split_inclusive('\n') {
            cut += line.len();
            // Cut at the end of the line and in the middle of it.
            for end in [cut, cut - line.len() / 2] {
                // Beside the Namespace the examples use, as in manifests/.
                let mut files = vec![SourceFile {
                    path: name.clone().into(),
                    text: text[..end].to_string(),
                }];
                if name != "namespace.yaml" {
                    files.push(SourceFile {
                        path: "namespace.yaml".into(),
                        text: namespace.clone(),
                    });
                }
                let catalog = load_sources(files);
                for r in &catalog.rejected {
                    let reasons = catalog
                        .diagnostics
                        .iter()
                        .filter(|d| d.is_error() && d.source.file == r.source.file)
                        .count();
                    assert!(
                        reasons > 0,
                        "{name} cut at {end}: a rejection without a reason: {r:?}"
                    );
                }
                if end == text.len() {
                    assert_eq!(
                        catalog.error_count(),
                        0,
                        "{name} whole: {:#?}",
                        catalog.diagnostics
                    );
                }
                cases += 1;
            }
        }
    }
    assert!(cases > 100, "only {cases} cases ran");
}

#[test]
fn deep_nesting_is_refused_not_overflowing_the_stack() {
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let catalog = load_sources(vec![SourceFile {
        path: "deep.yaml".into(),
        text,
    }]);
    assert_eq!(catalog.objects.len(), 0);
    assert_eq!(catalog.error_count(), 1, "{:#?}", catalog.diagnostics);
}

#[test]
fn binary_garbage_and_odd_documents_are_reported() {
    for text in [
        "\u{0}\u{1}\u{2}",
        "- just\n- a list\n",
        "42\n",
        "'a string'\n",
        "{}\n",
        "apiVersion: v1\n",
        "kind: Pod\n",
    ] {
        let catalog = load_sources(vec![SourceFile {
            path: "odd.yaml".into(),
            text: text.to_string(),
        }]);
        assert!(catalog.objects.is_empty(), "{text:?} produced an object");
        assert!(
            catalog.error_count() >= 1,
            "{text:?}: {:#?}",
            catalog.diagnostics
        );
    }
}

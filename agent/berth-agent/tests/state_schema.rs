//! The files the agent keeps on /var carry a schema version, since both
//! root slots share them: files written before schema versions are read
//! and written forward; a file of a newer schema (an update's agent wrote
//! it, then the node rolled back) stops the agent by name, and the loaders
//! leave it exactly as it was, so no claim, lease or revision is lost.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use berth_agent::state::{AgentState, RevisionRecord, StateStore, check_schemas, schema_files};
use berth_net::ipam::LeaseBook;
use berth_storage::book::{Book, ClaimRef};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    let dir = std::env::temp_dir().join(format!("berth-schema-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Rewrites a file as the release before schema versions wrote it.
fn without_schema(path: &Path) {
    let mut v = json(path);
    v.as_object_mut().unwrap().remove("schema");
    fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// The state a node keeps: its last good revision, a lease, a claim, an image.
fn populate(dir: &Path) {
    let store = StateStore::new(dir);
    store
        .save(&AgentState {
            last_good: Some(RevisionRecord {
                revision: "c0ffee".into(),
                at: 1,
                objects: 3,
                pods: 1,
                actions: 0,
            }),
            ..AgentState::default()
        })
        .unwrap();
    let mut leases = LeaseBook::new(
        "10.88.0.0/16".parse().unwrap(),
        "10.96.0.0/16".parse().unwrap(),
    );
    let ip = leases.pods.lease("default/web").unwrap();
    assert_eq!(ip.to_string(), "10.88.0.2");
    leases.save(&dir.join("network/leases.json")).unwrap();
    let mut book = Book::default();
    book.static_bindings.insert(
        "pv-data".into(),
        ClaimRef {
            namespace: "default".into(),
            name: "data".into(),
        },
    );
    fs::create_dir_all(dir.join("storage")).unwrap();
    book.save(&dir.join("storage/volumes.json")).unwrap();
    fs::create_dir_all(dir.join("images")).unwrap();
    fs::write(
        dir.join("images/refs.json"),
        br#"{"docker.io/library/busybox:1.37": "sha256:0000000000000000000000000000000000000000000000000000000000000001"}"#,
    )
    .unwrap();
}

fn reads_everything(dir: &Path) {
    let state = StateStore::new(dir).load();
    assert_eq!(state.last_good.unwrap().revision, "c0ffee");
    let (leases, problem) = LeaseBook::load(
        &dir.join("network/leases.json"),
        "10.88.0.0/16".parse().unwrap(),
        "10.96.0.0/16".parse().unwrap(),
    );
    assert_eq!(problem, None);
    assert_eq!(
        leases.pods.get("default/web").map(|ip| ip.to_string()),
        Some("10.88.0.2".into())
    );
    let (book, problem) = Book::load(&dir.join("storage/volumes.json"));
    assert_eq!(problem, None);
    assert_eq!(book.static_bindings["pv-data"].name, "data");
    let images = berth_images::ImageStore::open(&dir.join("images")).unwrap();
    assert_eq!(
        images.resolve("busybox:1.37").as_deref(),
        Some("sha256:0000000000000000000000000000000000000000000000000000000000000001")
    );
}

#[test]
fn files_from_before_schema_versions_are_read_and_written_forward() {
    let t = tmp("older");
    populate(&t.0);
    for (path, _) in schema_files(&t.0) {
        if path.exists() {
            without_schema(&path);
        }
    }
    check_schemas(&t.0).expect("older files pass");
    reads_everything(&t.0);
    // Saved again, it carries the current schema (the image store's
    // references are migrated by its own test).
    StateStore::new(&t.0)
        .save(&StateStore::new(&t.0).load())
        .unwrap();
    assert_eq!(json(&t.0.join("state.json"))["schema"], 1);
    reads_everything(&t.0);
}

#[test]
fn a_newer_schema_stops_the_agent_by_name_and_nothing_is_lost() {
    for (i, name) in [
        "state.json",
        "network/leases.json",
        "storage/volumes.json",
        "images/refs.json",
    ]
    .iter()
    .enumerate()
    {
        let t = tmp(&format!("newer{i}"));
        populate(&t.0);
        // The images' references as schema 1 first (they were written bare).
        if *name == "images/refs.json" {
            let bare = json(&t.0.join(name));
            fs::write(
                t.0.join(name),
                serde_json::to_vec(&serde_json::json!({"schema": 1, "refs": bare})).unwrap(),
            )
            .unwrap();
        }
        let path = t.0.join(name);
        let mut v = json(&path);
        v["schema"] = 2.into();
        v["somethingNew"] = "a field this Berth does not know".into();
        let newer = serde_json::to_vec(&v).unwrap();
        fs::write(&path, &newer).unwrap();
        let e = check_schemas(&t.0).expect_err("a newer file is refused");
        let text = e.to_string();
        assert!(
            text.contains(name) && text.contains("schema 2, written by a newer Berth"),
            "{text}"
        );
        // The loaders that would move a damaged file aside leave it.
        let _ = LeaseBook::load(
            &t.0.join("network/leases.json"),
            "10.88.0.0/16".parse().unwrap(),
            "10.96.0.0/16".parse().unwrap(),
        );
        let _ = Book::load(&t.0.join("storage/volumes.json"));
        assert_eq!(fs::read(&path).unwrap(), newer, "{name} was changed");
        // The slot that wrote it reads everything as it was.
        v.as_object_mut().unwrap().remove("somethingNew");
        v["schema"] = 1.into();
        fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        check_schemas(&t.0).expect("back to schema 1");
        reads_everything(&t.0);
    }
}

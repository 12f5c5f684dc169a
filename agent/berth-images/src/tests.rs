use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("berth-images-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

enum Item<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

fn layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match item {
            Item::File(path, body) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(body.len() as u64);
                h.set_mode(0o755);
                // Raw names, so `..` and absolute paths reach the unpacker.
                set_raw_path(&mut h, path);
                h.set_cksum();
                b.append(&h, *body).expect("append");
            }
            Item::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                set_raw_path(&mut h, path);
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            Item::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                set_raw_path(&mut h, path);
                h.set_link_name(target).expect("link");
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn set_raw_path(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
}

/// An OCI image-layout archive with one image of the given layers.
fn archive(dir: &Path, reference: &str, layers: &[Vec<u8>], config: serde_json::Value) -> PathBuf {
    let path = dir.join("image.tar");
    super::archive::write(&path, reference, layers, &config).expect("archive");
    path
}

#[test]
fn an_imported_image_is_unpacked_with_whiteouts_applied_and_its_config_catalogued() {
    let s = Scratch::new("whiteouts");
    let lower = layer(&[
        Item::Dir("bin"),
        Item::File("bin/sh", b"shell"),
        Item::File("etc/gone", b"x"),
        Item::Dir("data"),
        Item::File("data/old", b"old"),
    ]);
    let upper = layer(&[
        Item::File("etc/.wh.gone", b""),
        Item::Dir("data"),
        Item::File("data/new", b"new"),
        Item::File("data/.wh..wh..opq", b""),
    ]);
    let config = serde_json::json!({"config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/data", "User": "1000:1000"}});
    let tarball = archive(&s.0, "busybox:1.37", &[lower, upper], config);
    let store = ImageStore::open(&s.0.join("store")).expect("open");
    let imported = store.import_archive(&tarball).expect("imports");
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].reference, "docker.io/library/busybox:1.37");
    assert!(imported[0].new);
    let root = store.rootfs("busybox:1.37").expect("unpacked");
    assert_eq!(fs::read(root.join("bin/sh")).expect("sh"), b"shell");
    assert!(!root.join("etc/gone").exists(), "whiteout removes the file");
    assert!(
        !root.join("data/old").exists(),
        "opaque dir hides the lower layer"
    );
    assert_eq!(
        fs::read(root.join("data/new")).expect("new"),
        b"new",
        "opaque keeps its own layer"
    );
    let catalog = store.catalog();
    assert_eq!(catalog[0].cmd, vec!["sh".to_string()]);
    assert_eq!(catalog[0].working_dir.as_deref(), Some("/data"));
    assert_eq!(catalog[0].user.as_deref(), Some("1000:1000"));
    let again = store.import_archive(&tarball).expect("re-import");
    assert!(
        !again[0].new,
        "an image already unpacked is not unpacked again"
    );
}

#[test]
fn layers_that_climb_out_of_the_root_are_refused() {
    for (name, items) in [
        ("dotdot", vec![Item::File("../escaped", b"x")]),
        ("absolute", vec![Item::File("/etc/escaped", b"x")]),
        (
            "symlink",
            vec![
                Item::Symlink("link", "/tmp"),
                Item::File("link/escaped", b"x"),
            ],
        ),
    ] {
        let s = Scratch::new(name);
        let tarball = archive(&s.0, "evil:1", &[layer(&items)], serde_json::json!({}));
        let store = ImageStore::open(&s.0.join("store")).expect("open");
        let err = store.import_archive(&tarball).expect_err("refused");
        assert!(matches!(err, ImageError::Escape { .. }), "{name}: {err}");
        assert!(
            store.rootfs("evil:1").is_none(),
            "{name}: nothing usable is left"
        );
        assert!(!s.0.join("escaped").exists());
    }
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let s = Scratch::new("digest");
    let tarball = archive(
        &s.0,
        "a:1",
        &[layer(&[Item::File("f", b"x")])],
        serde_json::json!({}),
    );
    let mut bytes = fs::read(&tarball).expect("read");
    // Flip the layer's content byte inside the outer tar.
    let at = bytes.windows(1).rposition(|w| w == b"x").expect("content");
    bytes[at] = b'y';
    fs::write(&tarball, &bytes).expect("write");
    let store = ImageStore::open(&s.0.join("store")).expect("open");
    let err = store.import_archive(&tarball).expect_err("refused");
    assert!(matches!(err, ImageError::Digest { .. }), "{err}");
}

#[test]
fn an_unreadable_reference_file_stops_collection_and_keeps_everything() {
    let s = Scratch::new("refs-broken");
    let tarball = archive(
        &s.0,
        "busybox:1.37",
        &[layer(&[Item::File("bin/sh", b"shell")])],
        serde_json::json!({"config": {"Cmd": ["sh"]}}),
    );
    let store = ImageStore::open(&s.0.join("store")).expect("open");
    store.import_archive(&tarball).expect("imports");
    let root = store.rootfs("busybox:1.37").expect("unpacked");
    // A power cut or a bad disk leaves the reference file half-written.
    fs::write(s.0.join("store/refs.json"), b"{\"docker.io/library/busy").expect("write");
    let err = store
        .collect(&HashSet::new(), |_, _| true)
        .expect_err("nothing is known to be in use");
    assert!(err.to_string().contains("refs.json"), "{err}");
    assert!(err.to_string().contains("no image is collected"), "{err}");
    assert!(root.join("bin/sh").exists(), "the image's root is kept");
    let blobs = fs::read_dir(s.0.join("store/blobs/sha256"))
        .expect("blobs")
        .count();
    assert!(blobs >= 3, "manifest, config and layer are kept: {blobs}");
    // Nor is the broken file overwritten with a partial view by a new image.
    assert!(store.import_archive(&tarball).is_err());
    assert_eq!(
        fs::read(s.0.join("store/refs.json")).expect("read"),
        b"{\"docker.io/library/busy"
    );
}

#[test]
fn references_from_before_schema_versions_are_read_and_saved_forward() {
    let s = Scratch::new("refs-schema");
    let store = ImageStore::open(&s.0).expect("store");
    let digest = format!("sha256:{}", "1".repeat(64));
    fs::write(
        s.0.join("refs.json"),
        format!(r#"{{"docker.io/library/busybox:1.37": "{digest}"}}"#),
    )
    .expect("write");
    assert_eq!(store.resolve("busybox:1.37"), Some(digest.clone()));
    let refs = store.refs().expect("readable");
    store.save_refs(&refs).expect("saved");
    let saved: serde_json::Value =
        serde_json::from_slice(&fs::read(s.0.join("refs.json")).expect("read")).expect("json");
    assert_eq!(saved["schema"], 1);
    assert_eq!(
        saved["refs"]["docker.io/library/busybox:1.37"],
        digest.as_str()
    );
    assert_eq!(store.resolve("busybox:1.37"), Some(digest));
    // A newer schema is an error naming it, never an empty store (which
    // would let collection remove every image).
    fs::write(s.0.join("refs.json"), r#"{"schema": 2, "refs": {}}"#).expect("write");
    let e = store.refs().expect_err("refused").to_string();
    assert!(e.contains("schema 2, written by a newer Berth"), "{e}");
}

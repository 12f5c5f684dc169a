//! Pulls against a real registry (Debian's `docker-registry`) on loopback,
//! and against hand-made servers for what a real one does not do (hang,
//! answer garbage, send more than it promised). Run by `make test` (tier 2,
//! as root: the full-disk case mounts a small tmpfs).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use berth_images::{ImageStore, UnpackLimits, archive};
use berth_registry::fixtures::{self, OCI_INDEX, OCI_MANIFEST, TestRegistry};
use berth_registry::{Client, Credential, HostConfig, Progress, PullError, RegistryConfig};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("berth-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.join("small"))
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config that speaks plain HTTP to these registries.
fn plain_http(hosts: &[&str], timeout: Duration) -> RegistryConfig {
    let mut config = RegistryConfig {
        timeout,
        ..RegistryConfig::default()
    };
    for h in hosts {
        config.hosts.insert(
            h.to_string(),
            HostConfig {
                mirrors: vec![],
                insecure: true,
            },
        );
    }
    config
}

fn client_for(hosts: &[&str]) -> Client {
    Client::new(plain_http(hosts, Duration::from_secs(3)))
}

fn config(cmd: &[&str]) -> serde_json::Value {
    serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": cmd, "Env": ["PATH=/bin"]}})
}

fn pull(
    client: &Client,
    store: &ImageStore,
    reference: &str,
    creds: &[Credential],
) -> Result<berth_registry::Pulled, PullError> {
    client.pull(store, reference, creds, &Progress::default())
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn images_pull_by_tag_and_digest_and_a_second_pull_fetches_nothing() {
    let s = Scratch::new("tag");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let base = fixtures::gzip(&archive::layer(&[("etc/base", b"base\n", 0o644)]).unwrap());
    let app = fixtures::gzip(&archive::layer(&[("app/hello", b"hello\n", 0o755)]).unwrap());
    let digest = reg
        .push_image(
            "team/app",
            "1.0",
            &[base.clone(), app.clone()],
            true,
            &config(&["/app/hello"]),
        )
        .unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let client = client_for(&[&reg.host()]);
    let by_tag = format!("{}/team/app:1.0", reg.host());

    let progress = Progress::default();
    let p = client.pull(&store, &by_tag, &[], &progress).unwrap();
    assert_eq!(p.manifest, digest);
    assert!(p.new);
    assert!(p.downloaded >= (base.len() + app.len()) as u64);
    assert_eq!(
        progress.done.load(Ordering::Relaxed),
        progress.total.load(Ordering::Relaxed)
    );
    let root = store.rootfs(&by_tag).expect("unpacked");
    assert_eq!(
        std::fs::read_to_string(root.join("app/hello")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/base")).unwrap(),
        "base\n"
    );
    let catalog = store.catalog();
    let entry = catalog
        .iter()
        .find(|c| c.reference == by_tag)
        .expect("catalogued");
    assert_eq!(entry.cmd, ["/app/hello"]);

    let again = pull(&client, &store, &by_tag, &[]).unwrap();
    assert_eq!((again.downloaded, again.new), (0, false));

    // By digest: the same image, nothing fetched, its own reference.
    let by_digest = format!("{}/team/app@{digest}", reg.host());
    let d = pull(&client, &store, &by_digest, &[]).unwrap();
    assert_eq!((d.manifest.as_str(), d.downloaded), (digest.as_str(), 0));
    assert_eq!(store.rootfs(&by_digest), Some(root));

    // A second image sharing the base layer fetches only its own.
    let other = fixtures::gzip(&archive::layer(&[("app/other", b"x", 0o644)]).unwrap());
    reg.push_image(
        "team/other",
        "1",
        &[base.clone(), other.clone()],
        true,
        &config(&["/x"]),
    )
    .unwrap();
    // Cross-repository: the registry has the base layer under team/app only,
    // so it is pushed again; the store still has it and fetches only the rest.
    let o = pull(
        &client,
        &store,
        &format!("{}/team/other:1", reg.host()),
        &[],
    )
    .unwrap();
    let config_len = serde_json::to_vec(&config(&["/x"])).unwrap().len() as u64;
    assert_eq!(o.downloaded, other.len() as u64 + config_len);

    // A tag or digest the registry does not have.
    let e = pull(
        &client,
        &store,
        &format!("{}/team/app:9.9", reg.host()),
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, PullError::NotFound { .. }), "{e}");
    let e = pull(
        &client,
        &store,
        &format!("{}/team/app@sha256:{}", reg.host(), "0".repeat(64)),
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, PullError::NotFound { .. }), "{e}");
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_multi_platform_index_gives_the_nodes_platform() {
    let s = Scratch::new("index");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let mut entries = Vec::new();
    for arch in ["arm64", "amd64", "s390x"] {
        let layer = archive::layer(&[("arch", arch.as_bytes(), 0o644)]).unwrap();
        let body = reg
            .image_manifest("multi", &[layer], false, &config(&["/x"]))
            .unwrap();
        let d = reg
            .push_manifest("multi", &fixtures::digest(&body), OCI_MANIFEST, &body)
            .unwrap();
        entries.push(
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": body.len(),
            "platform": {"architecture": arch, "os": "linux"}}),
        );
    }
    let index = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    .unwrap();
    reg.push_manifest("multi", "v1", OCI_INDEX, &index).unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let mut config = plain_http(&[&reg.host()], Duration::from_secs(3));
    for arch in ["amd64", "arm64"] {
        config.architecture = arch.into();
        let client = Client::new(config.clone());
        let r = format!("{}/multi:v1", reg.host());
        pull(&client, &store, &r, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(store.rootfs(&r).unwrap().join("arch")).unwrap(),
            arch
        );
    }
    config.architecture = "riscv64".into();
    let e = pull(
        &Client::new(config),
        &store,
        &format!("{}/multi:v1", reg.host()),
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("no linux/riscv64 image"), "{e}");
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_registry_with_a_login_needs_the_right_pull_secret() {
    let s = Scratch::new("auth");
    let reg = TestRegistry::start(&s.0.join("reg"), Some(("puller", "right-pw"))).unwrap();
    let layer = archive::layer(&[("f", b"private", 0o644)]).unwrap();
    reg.push_image("private/app", "1", &[layer], false, &config(&["/f"]))
        .unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let client = client_for(&[&reg.host()]);
    let r = format!("{}/private/app:1", reg.host());
    let secret = |pw: &str| {
        let body = format!(
            r#"{{"auths": {{"{}": {{"username": "puller", "password": "{pw}"}}}}}}"#,
            reg.host()
        );
        berth_registry::parse_docker_config(".dockerconfigjson", body.as_bytes()).unwrap()
    };

    let e = pull(&client, &store, &r, &[]).unwrap_err();
    assert!(
        e.is_auth() && e.to_string().contains("no imagePullSecret"),
        "{e}"
    );
    let e = pull(&client, &store, &r, &secret("wrong")).unwrap_err();
    assert!(e.is_auth() && e.to_string().contains("refused"), "{e}");
    assert!(store.rootfs(&r).is_none());
    // A wrong credential for the host, then a right one for the repository:
    // each is tried, the most specific first.
    let mut both = secret("wrong");
    let body = format!(
        r#"{{"auths": {{"{}/private": {{"username": "puller", "password": "right-pw"}}}}}}"#,
        reg.host()
    );
    both.extend(berth_registry::parse_docker_config(".dockerconfigjson", body.as_bytes()).unwrap());
    pull(&client, &store, &r, &both).unwrap();
    assert!(store.rootfs(&r).is_some());
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn corrupted_content_is_refused_and_nothing_of_it_is_kept() {
    let s = Scratch::new("corrupt");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let layer = fixtures::gzip(&archive::layer(&[("f", &[7u8; 100_000], 0o644)]).unwrap());
    reg.push_image(
        "bad",
        "1",
        std::slice::from_ref(&layer),
        true,
        &config(&["/f"]),
    )
    .unwrap();
    // Flip bytes of the layer where the registry stores it, keeping its size.
    let file = reg.blob_file(&fixtures::digest(&layer));
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let client = client_for(&[&reg.host()]);
    let r = format!("{}/bad:1", reg.host());
    let e = pull(&client, &store, &r, &[]).unwrap_err();
    assert!(matches!(e, PullError::Digest { .. }), "{e}");
    assert!(store.rootfs(&r).is_none());
    assert!(!store.has_blob(&fixtures::digest(&layer)));
    assert!(
        !store
            .partial_blob(&fixtures::digest(&layer))
            .unwrap()
            .exists()
    );

    // A digest reference the registry serves other content for is refused
    // too: the manifest pushed under a digest tag is checked on arrival.
    let good = reg
        .image_manifest(
            "pin",
            &[archive::layer(&[("g", b"g", 0o644)]).unwrap()],
            false,
            &config(&["/g"]),
        )
        .unwrap();
    let digest = reg.push_manifest("pin", "1", OCI_MANIFEST, &good).unwrap();
    let e = pull(
        &client,
        &store,
        &format!("{}/pin@sha256:{}", reg.host(), "1".repeat(64)),
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, PullError::NotFound { .. }), "{e}");
    pull(
        &client,
        &store,
        &format!("{}/pin@{digest}", reg.host()),
        &[],
    )
    .unwrap();
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_cut_download_resumes_where_it_stopped() {
    let s = Scratch::new("resume");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let layer = archive::layer(&[("big", &big, 0o644)]).unwrap();
    reg.push_image(
        "resume",
        "1",
        std::slice::from_ref(&layer),
        false,
        &config(&["/big"]),
    )
    .unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    // What a pull cut at a third left behind.
    let third = layer.len() / 3;
    std::fs::write(
        store.partial_blob(&fixtures::digest(&layer)).unwrap(),
        &layer[..third],
    )
    .unwrap();
    let client = client_for(&[&reg.host()]);
    let p = pull(&client, &store, &format!("{}/resume:1", reg.host()), &[]).unwrap();
    let config_len = serde_json::to_vec(&config(&["/big"])).unwrap().len();
    assert_eq!(p.downloaded as usize, layer.len() - third + config_len);
    let root = store.rootfs(&format!("{}/resume:1", reg.host())).unwrap();
    assert_eq!(std::fs::read(root.join("big")).unwrap(), big);

    // A partial file of garbage fails the digest check, is deleted, and the
    // next pull starts over and succeeds.
    let store2 = ImageStore::open(&s.0.join("store2")).unwrap();
    std::fs::write(
        store2.partial_blob(&fixtures::digest(&layer)).unwrap(),
        vec![0u8; third],
    )
    .unwrap();
    let e = pull(&client, &store2, &format!("{}/resume:1", reg.host()), &[]).unwrap_err();
    assert!(matches!(e, PullError::Digest { .. }), "{e}");
    pull(&client, &store2, &format!("{}/resume:1", reg.host()), &[]).unwrap();
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_moved_tag_gives_the_new_image_and_the_old_stays_while_a_container_uses_it() {
    let s = Scratch::new("moved");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let client = client_for(&[&reg.host()]);
    let r = format!("{}/moving:stable", reg.host());
    let v1 = reg
        .push_image(
            "moving",
            "stable",
            &[archive::layer(&[("v", b"1", 0o644)]).unwrap()],
            false,
            &config(&["/v"]),
        )
        .unwrap();
    pull(&client, &store, &r, &[]).unwrap();
    let old_root = store.rootfs(&r).unwrap();
    let v2 = reg
        .push_image(
            "moving",
            "stable",
            &[archive::layer(&[("v", b"2", 0o644)]).unwrap()],
            false,
            &config(&["/v"]),
        )
        .unwrap();
    let p = pull(&client, &store, &r, &[]).unwrap();
    assert_eq!((p.manifest.as_str(), p.new), (v2.as_str(), true));
    assert_eq!(
        std::fs::read_to_string(store.rootfs(&r).unwrap().join("v")).unwrap(),
        "2"
    );
    // A container still runs on v1: collection keeps its root.
    let keep: HashSet<String> = [v1.clone(), v2.clone()].into_iter().collect();
    let c = store.collect(&keep, |_, _| true).unwrap();
    assert!(c.images.is_empty());
    assert!(old_root.is_dir());
    // Once it is gone, v1's root and blobs are swept; v2 is kept while wanted.
    let keep: HashSet<String> = [v2.clone()].into_iter().collect();
    let c = store.collect(&keep, |_, _| true).unwrap();
    assert!(c.images.is_empty() && c.bytes > 0);
    assert!(!old_root.exists());
    assert!(!store.has_blob(&v1));
    assert!(store.rootfs(&r).is_some());
    // Unwanted, it goes, blobs and all.
    let c = store.collect(&HashSet::new(), |_, _| true).unwrap();
    assert_eq!(c.images, std::slice::from_ref(&r));
    assert!(store.rootfs(&r).is_none() && !store.has_blob(&v2));
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn hostile_layers_are_refused_and_leave_no_root() {
    let s = Scratch::new("hostile");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let client = client_for(&[&reg.host()]);
    // `../escaped` written as a raw name (the tar crate refuses to build it).
    let mut climb = archive::layer(&[("placeholder", b"x", 0o644)]).unwrap();
    climb[..11].copy_from_slice(b"../escaped\0");
    let mut h = tar::Header::from_byte_slice(&climb[..512]).clone();
    h.set_cksum();
    climb[..512].copy_from_slice(h.as_bytes());
    // A symlink out of the root, then a file written through it.
    let mut b = tar::Builder::new(Vec::new());
    let mut link = fixtures::header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut link, "out", s.0.join("outside").to_str().unwrap())
        .unwrap();
    let mut f = fixtures::header(tar::EntryType::Regular, 0o644, 1);
    b.append_data(&mut f, "out/planted", &b"x"[..]).unwrap();
    let through = b.into_inner().unwrap();
    std::fs::create_dir_all(s.0.join("outside")).unwrap();
    // A decompression bomb: 64 MiB of zeros in a few kilobytes.
    let bomb = fixtures::gzip(&archive::layer(&[("zeros", &vec![0u8; 64 << 20], 0o644)]).unwrap());
    assert!(bomb.len() < 1 << 20);
    for (name, layer, gz, why) in [
        ("climb", climb, false, "`..`"),
        ("through", through, false, "symlink"),
        ("bomb", bomb, true, "more than"),
    ] {
        reg.push_image(name, "1", &[layer], gz, &config(&["/x"]))
            .unwrap();
        let mut config = client.config().clone();
        config.limits = UnpackLimits {
            max_bytes: 16 << 20,
            ..UnpackLimits::default()
        };
        let e = pull(
            &Client::new(config),
            &store,
            &format!("{}/{name}:1", reg.host()),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains(why), "{name}: {e}");
        assert!(store.rootfs(&format!("{}/{name}:1", reg.host())).is_none());
    }
    assert!(!s.0.join("outside/planted").exists());
    // A device node in a layer is not made (devices come from the runtime's
    // private /dev); the rest of the layer is.
    let mut b = tar::Builder::new(Vec::new());
    let mut dev = fixtures::header(tar::EntryType::Char, 0o666, 0);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(1).unwrap();
    b.append_data(&mut dev, "mem", &[][..]).unwrap();
    let mut f = fixtures::header(tar::EntryType::Regular, 0o644, 2);
    b.append_data(&mut f, "ok", &b"ok"[..]).unwrap();
    reg.push_image(
        "devices",
        "1",
        &[b.into_inner().unwrap()],
        false,
        &config(&["/x"]),
    )
    .unwrap();
    let r = format!("{}/devices:1", reg.host());
    pull(&client, &store, &r, &[]).unwrap();
    let root = store.rootfs(&r).unwrap();
    assert!(root.join("ok").is_file());
    assert!(std::fs::symlink_metadata(root.join("mem")).is_err());
    assert!(!s.0.join("escaped").exists() && !s.0.join("store/escaped").exists());
    let leftovers: Vec<_> = std::fs::read_dir(s.0.join("store/rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
#[ignore = "needs root and docker-registry; run by make test (tier 2)"]
fn a_disk_that_fills_during_a_pull_fails_it_cleanly() {
    let s = Scratch::new("full");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let noise: Vec<u8> = (0..12_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    reg.push_image(
        "large",
        "1",
        &[archive::layer(&[("noise", &noise, 0o644)]).unwrap()],
        false,
        &config(&["/x"]),
    )
    .unwrap();
    let small = s.0.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount tmpfs (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = ImageStore::open(&small).unwrap();
    let client = client_for(&[&reg.host()]);
    let e = pull(&client, &store, &format!("{}/large:1", reg.host()), &[]).unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
    assert!(store.list().is_empty());
    let used: u64 = berth_images::disk_usage(&small);
    assert!(used < 1 << 20, "{used} bytes left behind");
}

/// A server that accepts and then does what `answer` says with each connection.
fn fake_server(answer: impl Fn(&mut std::net::TcpStream) + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            answer(&mut conn);
        }
    });
    port
}

fn fault(port: u16, timeout: Duration) -> (PullError, Duration) {
    let s = Scratch::new(&format!("fault{port}"));
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let host = format!("127.0.0.1:{port}");
    let config = plain_http(&[&host], timeout);
    let start = Instant::now();
    let e = pull(&Client::new(config), &store, &format!("{host}/app:1"), &[]).unwrap_err();
    assert!(store.list().is_empty());
    (e, start.elapsed())
}

#[test]
fn a_registry_that_is_down_hangs_or_answers_garbage_fails_the_pull_clearly() {
    // Down: nothing listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (e, _) = fault(port, Duration::from_secs(2));
    assert!(matches!(e, PullError::Unreachable { .. }), "{e}");
    // Hangs: accepts and never answers; the pull gives up after the timeout.
    let port = fake_server(|_| std::thread::sleep(Duration::from_secs(30)));
    let (e, took) = fault(port, Duration::from_secs(1));
    assert!(matches!(e, PullError::Unreachable { .. }), "{e}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // Garbage instead of HTTP.
    let port = fake_server(|c| {
        let _ = c.write_all(b"\x00\x01garbage garbage\r\n\r\n");
    });
    let (e, _) = fault(port, Duration::from_secs(2));
    assert!(
        matches!(
            e,
            PullError::Unreachable { .. } | PullError::Protocol { .. }
        ),
        "{e}"
    );
    // HTTP, but the manifest is not JSON.
    let port = fake_server(|c| {
        let _ = c.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!",
        );
    });
    let (e, _) = fault(port, Duration::from_secs(2));
    assert!(e.to_string().contains("not JSON"), "{e}");
    // A manifest whose Docker-Content-Digest disagrees with its bytes.
    let port = fake_server(|c| {
        let body = br#"{"schemaVersion":2,"config":{"digest":"sha256:00","size":1},"layers":[]}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nDocker-Content-Digest: sha256:{}\r\nConnection: close\r\n\r\n",
            body.len(),
            "a".repeat(64)
        );
        let _ = c.write_all(head.as_bytes());
        let _ = c.write_all(body);
    });
    let (e, _) = fault(port, Duration::from_secs(2));
    assert!(matches!(e, PullError::Digest { .. }), "{e}");
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn mirrors_are_tried_first_and_a_failing_one_falls_back_to_the_registry() {
    let s = Scratch::new("mirror");
    let origin = TestRegistry::start(&s.0.join("origin"), None).unwrap();
    let mirror = TestRegistry::start(&s.0.join("mirror"), None).unwrap();
    // The same name, different content: which one answered shows in the file.
    origin
        .push_image(
            "app",
            "1",
            &[archive::layer(&[("from", b"origin", 0o644)]).unwrap()],
            false,
            &config(&["/x"]),
        )
        .unwrap();
    mirror
        .push_image(
            "app",
            "1",
            &[archive::layer(&[("from", b"mirror", 0o644)]).unwrap()],
            false,
            &config(&["/x"]),
        )
        .unwrap();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = format!("{}/app:1", origin.host());
    for (mirrors, expect) in [
        (vec![mirror.url()], "mirror"),
        (
            vec![format!("http://127.0.0.1:{dead}"), mirror.url()],
            "mirror",
        ),
        (vec![format!("http://127.0.0.1:{dead}")], "origin"),
    ] {
        let store =
            ImageStore::open(&s.0.join(format!("store-{}", mirrors.len()) + expect)).unwrap();
        let mut config = plain_http(&[&origin.host()], Duration::from_secs(3));
        if let Some(h) = config.hosts.get_mut(&origin.host()) {
            h.mirrors = mirrors.clone();
        }
        pull(&Client::new(config), &store, &r, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(store.rootfs(&r).unwrap().join("from")).unwrap(),
            expect,
            "{mirrors:?}"
        );
    }
    // Without `insecure`, the registry is spoken to over TLS only: a plain
    // HTTP registry then fails rather than being used in the clear.
    let store = ImageStore::open(&s.0.join("store-tls")).unwrap();
    let e = pull(
        &Client::new(RegistryConfig {
            timeout: Duration::from_secs(3),
            ..RegistryConfig::default()
        }),
        &store,
        &r,
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, PullError::Unreachable { .. }), "{e}");
}

#[test]
fn the_puller_pulls_once_per_image_and_waits_out_its_back_off() {
    use berth_registry::{PullPhase, Puller};
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    // A registry that refuses every login: each connection is counted.
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hits);
    let port = fake_server(move |c| {
        seen.fetch_add(1, Ordering::SeqCst);
        let _ = c.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let s = Scratch::new("puller");
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let host = format!("127.0.0.1:{port}");
    let config = plain_http(&[&host], Duration::from_secs(2));
    let (tx, rx) = std::sync::mpsc::channel();
    let puller = Puller::start(
        Client::new(config),
        store.clone(),
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    let reference = format!("{host}/app:1");
    // Many pods asking at once: one pull.
    let first = puller.request(&reference, vec![], true);
    for _ in 0..20 {
        assert_eq!(puller.request(&reference, vec![], true).seq, first.seq);
    }
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the pull ends");
    let failed = puller.status(&reference).unwrap();
    assert_eq!(failed.phase, PullPhase::Failed);
    assert!(failed.auth_error, "{failed:?}");
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no imagePullSecret"),
        "{failed:?}"
    );
    assert!(
        failed.retry_at >= failed.finished_at.unwrap() + berth_registry::puller::FIRST_BACKOFF_SECS
    );
    let after_one = hits.load(Ordering::SeqCst);
    assert_eq!(after_one, 1);
    // Asked again and again within the back-off: no new attempt.
    for _ in 0..50 {
        assert_eq!(puller.request(&reference, vec![], true).seq, first.seq);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hits.load(Ordering::SeqCst), after_one);
    // What `berth images` reads shows the failure.
    let recorded = berth_registry::puller::read_pulls(&store);
    assert_eq!(recorded[&reference].phase, PullPhase::Failed);
    assert_eq!(berth_registry::puller::backoff_secs(1), 10);
    assert_eq!(berth_registry::puller::backoff_secs(3), 40);
    assert_eq!(berth_registry::puller::backoff_secs(30), 300);
}

/// A registry that speaks token auth, as Docker Hub and most hosted ones
/// do: `401` with a `Bearer` challenge, a token service that checks the
/// login, and content only for the token it issued.
fn token_registry(user: &'static str, password: &'static str) -> (u16, String) {
    use std::collections::HashMap;
    let config = serde_json::to_vec(&config(&["/hello"])).unwrap();
    let layer = archive::layer(&[("hello", b"from behind a token", 0o644)]).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": fixtures::digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": fixtures::digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = fixtures::digest(&manifest);
    let mut content: HashMap<String, Vec<u8>> = HashMap::new();
    content.insert("/v2/team/app/manifests/1".into(), manifest);
    content.insert(
        format!("/v2/team/app/blobs/{}", fixtures::digest(&config)),
        config,
    );
    content.insert(
        format!("/v2/team/app/blobs/{}", fixtures::digest(&layer)),
        layer,
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:{password}")
        )
    );
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = vec![0u8; 8192];
            let n = conn.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let auth = request
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Authorization: ")
                        .or_else(|| l.strip_prefix("authorization: "))
                })
                .unwrap_or("")
                .trim()
                .to_string();
            let reply = |c: &mut std::net::TcpStream, status: &str, extra: &str, body: &[u8]| {
                let head = format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(body);
            };
            if path.starts_with("/token?") {
                assert!(
                    path.contains("scope=repository%3Ateam%2Fapp%3Apull")
                        || path.contains("scope=repository:team/app:pull"),
                    "{path}"
                );
                let token = if auth == basic {
                    "GOOD"
                } else if auth.is_empty() {
                    "ANONYMOUS"
                } else {
                    ""
                };
                if token.is_empty() {
                    reply(&mut conn, "401 Unauthorized", "", b"{}");
                } else {
                    reply(
                        &mut conn,
                        "200 OK",
                        "",
                        format!("{{\"token\": \"{token}\"}}").as_bytes(),
                    );
                }
            } else if auth != "Bearer GOOD" {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test\",scope=\"repository:team/app:pull\"\r\n"
                );
                reply(&mut conn, "401 Unauthorized", &challenge, b"");
            } else if let Some(body) = content.get(&path) {
                reply(&mut conn, "200 OK", "", body);
            } else {
                reply(&mut conn, "404 Not Found", "", b"");
            }
        }
    });
    (port, manifest_digest)
}

#[test]
fn token_auth_logs_in_with_the_pull_secret_and_refuses_without_it() {
    let (port, digest) = token_registry("robot", "t0ken");
    let s = Scratch::new("token");
    let host = format!("127.0.0.1:{port}");
    let config = plain_http(&[&host], Duration::from_secs(3));
    let client = Client::new(config);
    let reference = format!("{host}/team/app:1");
    let creds = |pw: &str| {
        let body =
            format!(r#"{{"auths": {{"{host}": {{"username": "robot", "password": "{pw}"}}}}}}"#);
        berth_registry::parse_docker_config(".dockerconfigjson", body.as_bytes()).unwrap()
    };
    // Anonymous: a token, but not one that reads this repository.
    let store = ImageStore::open(&s.0.join("anonymous")).unwrap();
    let e = pull(&client, &store, &reference, &[]).unwrap_err();
    assert!(
        e.is_auth() && e.to_string().contains("no imagePullSecret"),
        "{e}"
    );
    // A wrong password: the token service says no.
    let e = pull(&client, &store, &reference, &creds("wrong")).unwrap_err();
    assert!(
        e.is_auth() && e.to_string().contains("token service"),
        "{e}"
    );
    // The right one.
    let p = pull(&client, &store, &reference, &creds("t0ken")).unwrap();
    assert_eq!(p.manifest, digest);
    let root = store.rootfs(&reference).unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("hello")).unwrap(),
        "from behind a token"
    );
}

#[test]
fn a_mirror_gets_only_the_credentials_written_for_it() {
    use std::sync::{Arc, Mutex};
    // A mirror and a registry that both want a login, and note whether a
    // request carried one.
    let server = |seen: Arc<Mutex<Vec<bool>>>| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                seen.lock()
                    .unwrap()
                    .push(request.contains("\r\nauthorization:"));
                let _ = conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        port
    };
    let mirror_seen = Arc::new(Mutex::new(Vec::new()));
    let registry_seen = Arc::new(Mutex::new(Vec::new()));
    let mirror = server(Arc::clone(&mirror_seen));
    let registry = server(Arc::clone(&registry_seen));
    let host = format!("127.0.0.1:{registry}");
    let mut config = plain_http(&[&host], Duration::from_secs(3));
    config
        .hosts
        .get_mut(&host)
        .unwrap()
        .mirrors
        .push(format!("http://127.0.0.1:{mirror}"));
    let client = Client::new(config);
    let s = Scratch::new("mirror-creds");
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    let login = |matches: &str| Credential {
        matches: matches.to_string(),
        username: "u".into(),
        password: "p".into(),
    };

    // The registry's login: sent to the registry, never to its mirror.
    let _ = pull(&client, &store, &format!("{host}/app:1"), &[login(&host)]).unwrap_err();
    assert!(
        !mirror_seen.lock().unwrap().is_empty(),
        "the mirror was asked first"
    );
    assert!(
        mirror_seen.lock().unwrap().iter().all(|auth| !auth),
        "the registry's credentials went to the mirror"
    );
    assert!(registry_seen.lock().unwrap().iter().any(|auth| *auth));

    // A secret that names the mirror is the mirror's to receive.
    mirror_seen.lock().unwrap().clear();
    let _ = pull(
        &client,
        &store,
        &format!("{host}/app:1"),
        &[login(&format!("127.0.0.1:{mirror}"))],
    )
    .unwrap_err();
    assert!(mirror_seen.lock().unwrap().iter().any(|auth| *auth));
}

/// A bundle's files, written under `dir`.
fn bundle_files(dir: &std::path::Path) -> Vec<(String, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    [
        ("bundle.json", b"{\"schema\": 1}\n".to_vec()),
        ("bundle.json.sig", b"signature\n".to_vec()),
        ("root.img.zst", big),
        ("vmlinuz", b"kernel".to_vec()),
    ]
    .into_iter()
    .map(|(name, body)| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        (name.to_string(), path)
    })
    .collect()
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_bundle_pushed_as_an_artifact_pulls_back_byte_for_byte_and_resumes() {
    let s = Scratch::new("artifact");
    let reg = TestRegistry::start(&s.0.join("reg"), None).unwrap();
    let files = bundle_files(&s.0.join("bundle"));
    let client = client_for(&[&reg.host()]);
    let reference = format!("{}/berth/os:2", reg.host());
    let pushed = client.push_artifact(&reference, &files, &[]).unwrap();
    // Again: every blob is there, only the manifest is put.
    assert_eq!(
        client.push_artifact(&reference, &files, &[]).unwrap(),
        pushed
    );

    let store = ImageStore::open(&s.0.join("store")).unwrap();
    // A cut download left a third of the root image.
    let root = std::fs::read(&files[2].1).unwrap();
    let third = root.len() / 3;
    std::fs::write(
        store.partial_blob(&fixtures::digest(&root)).unwrap(),
        &root[..third],
    )
    .unwrap();
    let progress = Progress::default();
    let a = client
        .pull_artifact(&store, &reference, &[], &progress)
        .unwrap();
    assert_eq!(a.manifest, pushed);
    let names: Vec<&str> = a.parts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["bundle.json", "bundle.json.sig", "root.img.zst", "vmlinuz"]
    );
    let small: usize = files
        .iter()
        .filter(|(n, _)| n != "root.img.zst")
        .map(|(_, p)| std::fs::metadata(p).unwrap().len() as usize)
        .sum();
    assert_eq!(a.downloaded as usize, root.len() - third + small);
    assert_eq!(
        progress.done.load(Ordering::Relaxed),
        progress.total.load(Ordering::Relaxed)
    );
    for ((name, digest), (_, path)) in a.parts.iter().zip(&files) {
        let blob = store.blob_file(digest).unwrap();
        assert_eq!(
            std::fs::read(blob).unwrap(),
            std::fs::read(path).unwrap(),
            "{name}"
        );
    }
    // Nothing is downloaded a second time.
    let again = client
        .pull_artifact(&store, &reference, &[], &Progress::default())
        .unwrap();
    assert_eq!(again.downloaded, 0);
    // Nothing was unpacked or named as an image.
    assert!(store.list().is_empty());

    // An ordinary image is not a bundle.
    let layer = archive::layer(&[("etc/x", b"x\n", 0o644)]).unwrap();
    reg.push_image("app", "1", &[layer], false, &config(&["/x"]))
        .unwrap();
    let e = client
        .pull_artifact(
            &store,
            &format!("{}/app:1", reg.host()),
            &[],
            &Progress::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("is not a Berth bundle"), "{e}");

    // A part whose title is a path is refused before anything is fetched.
    let digest = reg.push_blob("evil", b"x").unwrap();
    let cfg = reg.push_blob("evil", b"{}").unwrap();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": berth_registry::BUNDLE_ARTIFACT_TYPE,
        "config": {"mediaType": berth_registry::BUNDLE_ARTIFACT_TYPE, "digest": cfg, "size": 2},
        "layers": [{"mediaType": berth_registry::BUNDLE_PART_TYPE, "digest": digest, "size": 1,
            "annotations": {"org.opencontainers.image.title": "../../etc/passwd"}}],
    }))
    .unwrap();
    reg.push_manifest("evil", "1", OCI_MANIFEST, &body).unwrap();
    let e = client
        .pull_artifact(
            &store,
            &format!("{}/evil:1", reg.host()),
            &[],
            &Progress::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("no plain file name"), "{e}");
    assert!(!store.has_blob(&digest));
}

#[test]
#[ignore = "needs docker-registry; run by make test (tier 2)"]
fn a_push_to_a_registry_with_a_login_needs_it() {
    let s = Scratch::new("artifact-login");
    let reg = TestRegistry::start(&s.0.join("reg"), Some(("pusher", "s3cret"))).unwrap();
    let files = bundle_files(&s.0.join("bundle"));
    let client = client_for(&[&reg.host()]);
    let reference = format!("{}/berth/os:2", reg.host());
    let e = client.push_artifact(&reference, &files, &[]).unwrap_err();
    assert!(e.is_auth(), "{e}");
    let login = |password: &str| Credential {
        matches: reg.host(),
        username: "pusher".into(),
        password: password.into(),
    };
    let e = client
        .push_artifact(&reference, &files, &[login("wrong")])
        .unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    client
        .push_artifact(&reference, &files, &[login("s3cret")])
        .unwrap();
    let store = ImageStore::open(&s.0.join("store")).unwrap();
    client
        .pull_artifact(&store, &reference, &[login("s3cret")], &Progress::default())
        .unwrap();
}

/// A web server of one file at `/b/root.img.zst` that honours `Range:
/// bytes=N-`; returns its port and the bytes it sent.
fn file_server(body: Vec<u8>) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            if !request.starts_with("GET /b/root.img.zst ") {
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let from = request
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("range: bytes=")
                        .map(str::to_string)
                })
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            let (status, part) = match from {
                Some(f) => ("206 Partial Content", &body[f..]),
                None => ("200 OK", &body[..]),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                part.len()
            );
            let _ = conn.write_all(part);
            counter.fetch_add(part.len(), Ordering::Relaxed);
        }
    });
    (port, sent)
}

#[test]
fn a_bundle_part_from_a_web_server_resumes_and_is_bounded() {
    let s = Scratch::new("fetch");
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (port, sent) = file_server(body.clone());
    let host = format!("127.0.0.1:{port}");
    let url = format!("http://{host}/b/root.img.zst");
    let dest = s.0.join("root.img.zst");
    // Plain HTTP only for a host the config marks insecure.
    let strict = Client::new(RegistryConfig::default());
    let e = strict
        .fetch_file(&url, &dest, body.len() as u64, &Progress::default())
        .unwrap_err();
    assert!(e.to_string().contains("only https://"), "{e}");
    assert_eq!(sent.load(Ordering::Relaxed), 0);

    let client = client_for(&[&host]);
    std::fs::write(dest.with_extension("partial"), &body[..400_000]).unwrap();
    let progress = Progress::default();
    let fetched = client
        .fetch_file(&url, &dest, body.len() as u64, &progress)
        .unwrap();
    assert_eq!(fetched, 600_000);
    assert_eq!(sent.load(Ordering::Relaxed), 600_000);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!dest.with_extension("partial").exists());
    assert_eq!(progress.done.load(Ordering::Relaxed), 1_000_000);

    // More than the signed size says: refused, nothing kept.
    let e = client
        .fetch_file(&url, &s.0.join("short"), 1000, &Progress::default())
        .unwrap_err();
    assert!(e.to_string().contains("longer than the 1000 bytes"), "{e}");
    assert!(!s.0.join("short").exists() && !s.0.join("short.partial").exists());
    let e = client
        .fetch_file(
            &format!("http://{host}/b/missing"),
            &s.0.join("missing"),
            10,
            &Progress::default(),
        )
        .unwrap_err();
    assert!(matches!(e, PullError::NotFound { .. }), "{e}");
}

//! Bundles made and signed as `make image` makes them (Debian's `zstd`,
//! `ssh-keygen -Y sign`), checked and installed into slots held in files,
//! with the ESP a directory: every refusal leaves the booting slot as it
//! was, and systemd-boot's choice (computed by its rules) follows the
//! entries.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_git::{AllowedSigners, SignatureError};
use berth_update::bundle::{self, BundleError, Manifest};
use berth_update::slots::{Layout, Slot, SlotError};

struct Tmp(PathBuf);

impl Tmp {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("berth-update-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        Tmp(dir)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes that do not compress to nothing, different per seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Runs of zeros too, as a filesystem image has.
            if (i / 4096) % 3 == 0 { 0 } else { x as u8 }
        })
        .collect()
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key));
    let public = fs::read_to_string(key.with_extension("pub")).expect("public key");
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    (key, public)
}

fn sign(dir: &Path, key: &Path, namespace: &str) {
    let _ = fs::remove_file(dir.join(bundle::SIGNATURE_FILE));
    run(Command::new("ssh-keygen")
        .args(["-Y", "sign", "-q", "-n", namespace, "-f"])
        .arg(key)
        .arg(dir.join(bundle::MANIFEST_FILE)));
}

/// A bundle as `image/build.sh` makes one: the root image compressed by
/// Debian's zstd, the manifest described by Berth, signed by ssh-keygen.
fn make_bundle(dir: &Path, image: &[u8], version: &str, key: &Path) -> Manifest {
    fs::create_dir_all(dir).expect("bundle dir");
    fs::write(dir.join("root.img"), image).expect("root image");
    run(Command::new("zstd")
        .args(["-q", "-f", "-3", "--rm"])
        .arg(dir.join("root.img")));
    fs::write(dir.join("vmlinuz"), noise(300_000, 7)).expect("kernel");
    fs::write(dir.join("initrd.img"), noise(200_000, 8)).expect("initrd");
    let m = Manifest::describe(
        dir,
        version,
        "amd64",
        "root.img.zst",
        "vmlinuz",
        "initrd.img",
    )
    .expect("describes");
    sign(dir, key, "berth-bundle");
    m
}

/// An ESP with the image's first entry, and two slot "partitions".
fn node(dir: &Path, slot_bytes: u64) -> Layout {
    let esp = dir.join("esp");
    fs::create_dir_all(esp.join("loader/entries")).expect("esp");
    fs::write(
        esp.join("loader/entries/berth-a.conf"),
        "title   Berth 0.1.0 (slot A)\nsort-key berth\nversion 1\nlinux   /berth/a/vmlinuz\ninitrd  /berth/a/initrd.img\noptions root=PARTUUID=aaaa-1 berth.slot=a ro console=ttyS0,115200 quiet\n",
    )
    .expect("entry");
    // Something that is not Berth's: left alone.
    fs::write(esp.join("loader/entries/memtest.conf"), "title memtest\n").expect("entry");
    let devices = [dir.join("root-a.part"), dir.join("root-b.part")];
    for d in &devices {
        let f = fs::File::create(d).expect("partition");
        f.set_len(slot_bytes).expect("size");
    }
    Layout {
        esp,
        devices,
        partuuids: ["aaaa-1".into(), "bbbb-2".into()],
    }
}

#[test]
fn a_signed_bundle_installs_into_the_other_slot_and_boots_by_systemd_boot_rules() {
    let tmp = Tmp::new("good");
    let (key, public) = keygen(&tmp.0, "release");
    let allowed =
        AllowedSigners::parse(&format!("release@berth {public}\n"), "allowed").expect("allowed");
    let image = noise(3 << 20, 1);
    let made = make_bundle(&tmp.0.join("bundle"), &image, "0.2.0", &key);
    assert_eq!(made.root.image_size, image.len() as u64);
    assert!(
        made.root.size < made.root.image_size,
        "the root is compressed"
    );

    let verified = bundle::verify(&tmp.0.join("bundle"), &allowed, "amd64").expect("verifies");
    assert_eq!(verified.manifest, made);
    assert_eq!(verified.signer.principals, "release@berth");

    let node = node(&tmp.0, 4 << 20);
    let before = node.default_entry().expect("entries").expect("an entry");
    assert_eq!((before.slot, before.generation), (Slot::A, 1));

    node.retire(Slot::B).expect("retire");
    let written = node.write_root(Slot::B, &verified).expect("writes");
    assert_eq!(written.bytes, image.len() as u64);
    let on_disk = fs::read(node.device(Slot::B)).expect("read slot");
    assert_eq!(&on_disk[..image.len()], image.as_slice());
    let entry = node
        .install_boot(Slot::B, &verified, &before.options, 3)
        .expect("boot entry");
    assert_eq!(entry.file, "berth-b+3.conf");
    assert_eq!(entry.generation, 2);
    assert_eq!(
        entry.options,
        "root=PARTUUID=bbbb-2 berth.slot=b ro console=ttyS0,115200 quiet"
    );
    assert_eq!(
        fs::read(node.slot_dir(Slot::B).join("vmlinuz")).expect("kernel"),
        fs::read(tmp.0.join("bundle/vmlinuz")).expect("kernel")
    );
    assert_eq!(
        node.installed(Slot::B).map(|m| m.version),
        Some("0.2.0".into())
    );
    let text = fs::read_to_string(node.esp.join("loader/entries/berth-b+3.conf")).expect("entry");
    assert!(text.contains("linux   /berth/b/vmlinuz\n"), "{text}");
    assert!(text.contains("sort-key berth\nversion 2\n"), "{text}");
    // No temporary file is left on the ESP.
    let leftovers: Vec<_> = walk(&node.esp)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Being tried: it boots (and takes a try each time).
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::B)
    );
    let entries = node.esp.join("loader/entries");
    fs::rename(
        entries.join("berth-b+3.conf"),
        entries.join("berth-b+2-1.conf"),
    )
    .expect("a try");
    let trying = node.default_entry().expect("entries").expect("entry");
    assert_eq!(
        (trying.slot, trying.tries_left, trying.tries_done),
        (Slot::B, Some(2), Some(1))
    );
    assert!(trying.is_trying());
    // Out of tries: slot A boots again, with nobody doing anything.
    fs::rename(
        entries.join("berth-b+2-1.conf"),
        entries.join("berth-b+0-3.conf"),
    )
    .expect("tries out");
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::A)
    );
    // Blessed (systemd-bless-boot drops the counter): B for good.
    fs::rename(
        entries.join("berth-b+0-3.conf"),
        entries.join("berth-b.conf"),
    )
    .expect("bless");
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::B)
    );

    // The next update goes to A, above B.
    let image2 = noise(2 << 20, 2);
    make_bundle(&tmp.0.join("bundle2"), &image2, "0.3.0", &key);
    let v2 = bundle::verify(&tmp.0.join("bundle2"), &allowed, "amd64").expect("verifies");
    node.retire(Slot::A).expect("retire");
    assert!(
        fs::metadata(entries.join("memtest.conf")).is_ok(),
        "other entries stay"
    );
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::B)
    );
    node.write_root(Slot::A, &v2).expect("writes");
    let e = node
        .install_boot(Slot::A, &v2, &trying.options, 3)
        .expect("entry");
    assert_eq!((e.file.as_str(), e.generation), ("berth-a+3.conf", 3));
    assert!(
        e.options.starts_with("root=PARTUUID=aaaa-1 berth.slot=a "),
        "{}",
        e.options
    );
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::A)
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn tampered_unsigned_or_foreign_bundles_are_refused_naming_what_failed() {
    let tmp = Tmp::new("bad");
    let (key, public) = keygen(&tmp.0, "release");
    let (other, _) = keygen(&tmp.0, "mallory");
    let allowed =
        AllowedSigners::parse(&format!("release@berth {public}\n"), "allowed").expect("allowed");
    let dir = tmp.0.join("bundle");
    make_bundle(&dir, &noise(1 << 20, 3), "0.2.0", &key);
    bundle::verify(&dir, &allowed, "amd64").expect("verifies as made");

    // A part changed after signing: named, with both digests.
    let root = dir.join("root.img.zst");
    let good_root = fs::read(&root).expect("root");
    let mut bad = good_root.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    fs::write(&root, &bad).expect("tamper");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("tampered root");
    assert!(matches!(e, BundleError::Part { field: "root", .. }), "{e}");
    assert!(e.to_string().contains("the signed manifest says"), "{e}");
    fs::write(&root, &good_root).expect("restore");
    fs::write(dir.join("initrd.img"), b"short").expect("tamper");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("tampered initrd");
    assert!(
        matches!(
            e,
            BundleError::Part {
                field: "initrd",
                ..
            }
        ),
        "{e}"
    );
    fs::write(dir.join("initrd.img"), noise(200_000, 8)).expect("restore");
    bundle::verify(&dir, &allowed, "amd64").expect("verifies restored");

    // The manifest changed after signing (a digest swapped for another).
    let manifest = fs::read_to_string(dir.join(bundle::MANIFEST_FILE)).expect("manifest");
    fs::write(
        dir.join(bundle::MANIFEST_FILE),
        manifest.replace("0.2.0", "0.9.0"),
    )
    .expect("tamper");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("forged manifest");
    assert!(
        matches!(
            e,
            BundleError::Signature(SignatureError::BadSignature { .. })
        ),
        "{e}"
    );
    fs::write(dir.join(bundle::MANIFEST_FILE), &manifest).expect("restore");

    // Signed by a key not allowed; signed as a commit; not signed at all.
    sign(&dir, &other, "berth-bundle");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("unknown key");
    assert!(
        matches!(e, BundleError::Signature(SignatureError::UnknownKey { .. })),
        "{e}"
    );
    sign(&dir, &key, "git");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("git namespace");
    assert!(e.to_string().contains("not \"berth-bundle\""), "{e}");
    fs::remove_file(dir.join(bundle::SIGNATURE_FILE)).expect("unsign");
    let e = bundle::verify(&dir, &allowed, "amd64").expect_err("unsigned");
    assert!(
        matches!(e, BundleError::Signature(SignatureError::Unsigned(_))),
        "{e}"
    );
    // A key allowed only for commits does not sign bundles.
    sign(&dir, &key, "berth-bundle");
    let git_only = AllowedSigners::parse(
        &format!("release@berth namespaces=\"git\" {public}\n"),
        "allowed",
    )
    .expect("allowed");
    let e = bundle::verify(&dir, &git_only, "amd64").expect_err("git-only key");
    assert!(
        matches!(e, BundleError::Signature(SignatureError::UnknownKey { .. })),
        "{e}"
    );
    // Another architecture's bundle.
    let e = bundle::verify(&dir, &allowed, "arm64").expect_err("architecture");
    assert!(
        e.to_string()
            .contains("architecture amd64 is not this node's (arm64)"),
        "{e}"
    );
}

#[test]
fn manifests_that_could_reach_outside_the_bundle_or_are_newer_are_refused() {
    let p = Path::new("b/bundle.json");
    let sha = "0".repeat(64);
    let good = serde_json::json!({
        "schema": 1, "version": "0.2.0", "architecture": "amd64",
        "root": {"file": "root.img.zst", "size": 1, "sha256": sha, "compression": "zstd", "imageSize": 2, "imageSha256": sha},
        "kernel": {"file": "vmlinuz", "size": 1, "sha256": sha},
        "initrd": {"file": "initrd.img", "size": 1, "sha256": sha},
    });
    Manifest::parse(good.to_string().as_bytes(), p).expect("parses");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        Manifest::parse(v.to_string().as_bytes(), p)
            .expect_err("refused")
            .to_string()
    };
    assert!(with(&|v| v["kernel"]["file"] = "../../etc/shadow".into()).contains("kernel.file"));
    assert!(with(&|v| v["initrd"]["file"] = "bundle.json".into()).contains("initrd.file"));
    assert!(with(&|v| v["root"]["sha256"] = "ABC".into()).contains("root.sha256"));
    assert!(with(&|v| v["root"]["compression"] = "xz".into()).contains("root.compression"));
    assert!(with(&|v| v["schema"] = 2.into()).contains("schema 2 is newer"));
    assert!(with(&|v| v["version"] = "1 2".into()).contains("version"));
    assert!(with(&|v| v["extra"] = 1.into()).contains("extra"));
}

#[test]
fn a_slot_too_small_or_a_cut_write_leaves_the_booting_slot_the_default() {
    let tmp = Tmp::new("small");
    let (key, public) = keygen(&tmp.0, "release");
    let allowed = AllowedSigners::parse(&format!("r {public}\n"), "allowed").expect("allowed");
    make_bundle(&tmp.0.join("bundle"), &noise(3 << 20, 4), "0.2.0", &key);
    let verified = bundle::verify(&tmp.0.join("bundle"), &allowed, "amd64").expect("verifies");

    let node = node(&tmp.0, 2 << 20);
    node.retire(Slot::B).expect("retire");
    let e = node.write_root(Slot::B, &verified).expect_err("too small");
    assert!(
        matches!(e, SlotError::TooSmall { slot: Slot::B, needed, .. } if needed == 3 << 20),
        "{e}"
    );
    assert!(e.to_string().contains("too small"), "{e}");
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::A)
    );
    assert!(
        node.entries()
            .expect("entries")
            .iter()
            .all(|e| e.slot == Slot::A)
    );

    // A slot that had been installed before, cut while being rewritten:
    // its entry went first, so nothing boots it.
    let node = self::node(&tmp.0, 4 << 20);
    node.write_root(Slot::B, &verified).expect("writes");
    node.install_boot(Slot::B, &verified, "ro", 0)
        .expect("entry");
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::B)
    );
    node.retire(Slot::A).expect("retire A for the next update");
    // (the power goes here: A's partition half written, no entry)
    {
        use std::io::Write as _;
        let mut part = fs::OpenOptions::new()
            .write(true)
            .open(node.device(Slot::A))
            .expect("open");
        part.write_all(&noise(1 << 20, 9)).expect("half");
    }
    assert_eq!(
        node.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::B)
    );
    assert!(
        node.entries()
            .expect("entries")
            .iter()
            .all(|e| e.slot == Slot::B)
    );

    // A partition that does not hold what was written is caught on read-back.
    let image = tmp.0.join("bundle/root.img.zst");
    let mut m = verified.clone();
    m.manifest.root.image_sha256 = "f".repeat(64);
    let e = node.write_root(Slot::A, &m).expect_err("mismatch");
    assert!(
        matches!(e, SlotError::Mismatch { slot: Slot::A, .. }),
        "{e}"
    );
    assert!(image.exists());
}

#[test]
fn the_os_status_follows_the_record_the_entries_and_the_slot_that_booted() {
    use berth_update::record::{Attempt, SCHEMA, UpdateRecord};
    let tmp = Tmp::new("status");
    let (key, public) = keygen(&tmp.0, "release");
    let allowed = AllowedSigners::parse(&format!("r {public}\n"), "allowed").expect("allowed");
    make_bundle(&tmp.0.join("bundle"), &noise(1 << 20, 5), "0.2.0", &key);
    let verified = bundle::verify(&tmp.0.join("bundle"), &allowed, "amd64").expect("verifies");
    let node = node(&tmp.0, 2 << 20);
    let state = tmp.0.join("state");
    fs::create_dir_all(&state).expect("state");
    let on_a = "root=PARTUUID=aaaa-1 berth.slot=a ro";
    let on_b = "root=PARTUUID=bbbb-2 berth.slot=b ro";

    // Slot A's manifest is not on this ESP: an image from before bundles.
    let s = berth_update::os_status(&node.esp, on_a, &state);
    assert_eq!(
        (s.version.as_str(), s.slot.as_str(), s.update),
        ("unknown", "A", None)
    );
    let none = berth_update::os_status(&node.esp, "root=/dev/vda2", &state);
    assert_eq!(none.slot, "");

    let mut record = UpdateRecord {
        schema: SCHEMA,
        version: "0.2.0".into(),
        from_version: "0.1.0".into(),
        from_slot: Slot::A,
        to_slot: Slot::B,
        installed_at: 1,
        tries: 3,
        gate_seconds: 60,
        pods: vec!["default/web".into()],
        attempts: Vec::new(),
        declaration: None,
    };
    record.save(&state).expect("save");
    node.retire(Slot::B).expect("retire");
    let state_of = |cmdline: &str| {
        let s = berth_update::os_status(&node.esp, cmdline, &state);
        let u = s.update.clone().expect("an update");
        (u.state, u.message, s)
    };
    // Cut before the entry was written.
    assert_eq!(state_of(on_a).0, "Incomplete");
    node.write_root(Slot::B, &verified).expect("write");
    node.install_boot(Slot::B, &verified, on_a, 3)
        .expect("entry");
    let (st, msg, s) = state_of(on_a);
    assert_eq!((st.as_str(), msg.as_str()), ("Installed", "boots next"));
    assert_eq!(s.other_slot_version.as_deref(), Some("0.2.0"));
    // Booted, gate not decided.
    assert_eq!(state_of(on_b).0, "Gating");
    let (_, _, s) = state_of(on_b);
    assert_eq!((s.version.as_str(), s.slot.as_str()), ("0.2.0", "B"));
    // Failed once, then out of tries: back on A, with the failed check.
    record.attempts.push(Attempt {
        boot_id: "b1".into(),
        at: 2,
        passed: false,
        detail: "pod default/web not running and ready within 60 s".into(),
    });
    record.save(&state).expect("save");
    let entries = node.esp.join("loader/entries");
    fs::rename(
        entries.join("berth-b+3.conf"),
        entries.join("berth-b+0-3.conf"),
    )
    .expect("out of tries");
    let (st, msg, _) = state_of(on_a);
    assert_eq!(st, "RolledBack");
    assert!(
        msg.contains("pod default/web not running and ready within 60 s (1 of 3 boots tried)"),
        "{msg}"
    );
    // Passed and blessed.
    record.attempts.push(Attempt {
        boot_id: "b2".into(),
        at: 3,
        passed: true,
        detail: "agent passed, Git fetched, 1 of 1 pods ready again after 20 s".into(),
    });
    record.save(&state).expect("save");
    fs::rename(
        entries.join("berth-b+0-3.conf"),
        entries.join("berth-b.conf"),
    )
    .expect("blessed");
    let (st, msg, _) = state_of(on_b);
    assert_eq!(st, "Promoted");
    assert!(msg.contains("1 of 1 pods ready again"), "{msg}");
    // A record this Berth cannot read is said, not hidden.
    fs::write(state.join("update.json"), "{\"schema\": 9}").expect("write");
    let s = berth_update::os_status(&node.esp, on_b, &state);
    assert!(
        s.error.as_deref().is_some_and(|e| e.contains("schema 9")),
        "{s:?}"
    );
}

#[test]
fn an_install_for_a_declaration_checks_the_version_and_records_the_declaration() {
    use berth_update::install::{self, InstallError, Node, Request};
    let tmp = Tmp::new("declared");
    let (key, public) = keygen(&tmp.0, "release");
    let allowed = AllowedSigners::parse(&format!("r {public}\n"), "allowed").expect("allowed");
    make_bundle(&tmp.0.join("bundle"), &noise(1 << 20, 7), "0.2.0", &key);
    let layout = node(&tmp.0, 2 << 20);
    let state = tmp.0.join("state");
    fs::create_dir_all(&state).expect("state");
    let cmdline = "root=PARTUUID=aaaa-1 berth.slot=a ro";
    let target = Node {
        esp: &layout.esp,
        cmdline,
        state_dir: &state,
    };
    let bundle_dir = tmp.0.join("bundle");
    let request = |version: &'static str| Request {
        bundle: &bundle_dir,
        allowed: &allowed,
        architecture: "amd64",
        tries: 2,
        gate_seconds: 120,
        pods: vec!["default/web".into()],
        version: Some(version),
        declaration: Some(format!("{version} from image r.example/os:{version}")),
    };
    let mut steps = Vec::new();
    // A bundle of another version than the NodeImage declares: refused,
    // nothing written, nothing recorded.
    let e = install::install(&request("0.3.0"), &layout, &target, &mut |s| {
        steps.push(s.to_string());
    })
    .unwrap_err();
    assert!(
        matches!(&e, InstallError::Version { declared, bundle } if declared == "0.3.0" && bundle == "0.2.0"),
        "{e}"
    );
    assert!(steps.is_empty(), "{steps:?}");
    assert!(!state.join(berth_update::record::FILE).exists());
    assert_eq!(
        layout.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::A)
    );
    // Not booted from a slot: refused by name.
    let no_slot = Node {
        cmdline: "root=/dev/vda2",
        ..target
    };
    let e = install::install(&request("0.2.0"), &layout, &no_slot, &mut |_| {}).unwrap_err();
    assert!(matches!(e, InstallError::NoSlot), "{e}");

    let entry = install::install(&request("0.2.0"), &layout, &target, &mut |s| {
        steps.push(s.to_string());
    })
    .expect("installs");
    assert_eq!(
        (entry.file.as_str(), entry.slot),
        ("berth-b+2.conf", Slot::B)
    );
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(
        steps[2].contains("installed as berth-b+2.conf"),
        "{}",
        steps[2]
    );
    let record = berth_update::UpdateRecord::load(&state)
        .expect("readable")
        .expect("a record");
    assert_eq!(
        record.declaration.as_deref(),
        Some("0.2.0 from image r.example/os:0.2.0")
    );
    assert_eq!((record.tries, record.gate_seconds), (2, 120));
    let status = berth_update::os_status(&layout.esp, cmdline, &state);
    let update = status.update.expect("an update");
    assert_eq!(
        (update.state.as_str(), update.declaration.as_deref()),
        ("Installed", Some("0.2.0 from image r.example/os:0.2.0"))
    );

    // The declaration leaves Git before the reboot: taken back, slot A
    // stays the next boot, and nothing is reported as an update.
    assert_eq!(
        install::withdraw(&layout, &target).expect("withdraws"),
        Some("0.2.0".to_string())
    );
    assert_eq!(
        layout.default_entry().expect("entries").map(|e| e.slot),
        Some(Slot::A)
    );
    assert_eq!(layout.newest_entry(Slot::B).expect("entries"), None);
    assert_eq!(
        berth_update::os_status(&layout.esp, cmdline, &state).update,
        None
    );
    // Nothing more to take back.
    assert_eq!(install::withdraw(&layout, &target).expect("nothing"), None);
}

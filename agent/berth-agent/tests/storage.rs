//! The agent's storage pass against the real provisioner (root: loop
//! devices, ext4, mounts), in a scratch directory: crashes in the middle of
//! provisioning, a claim too big for the node, a lost book, a mount undone
//! by hand, an image removed by hand, and a subPath leading out of its
//! volume. `scripts/test.sh` runs it in tier 2 with `--ignored`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use berth_agent::storage::Storage;
use berth_plan::volumes::VolumeDirs;
use berth_storage::book::{Book, ClaimRef, Phase, Provisioned, Reclaim};
use berth_storage::driver::VolumeDriver;
use berth_storage::loopfs::LoopDriver;
use berth_storage::mounts;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/var/tmp/berth-agent-storage-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn storage(&self) -> PathBuf {
        self.0.join("storage")
    }

    fn dirs(&self) -> VolumeDirs {
        VolumeDirs {
            disk_dir: self.0.join("volumes").display().to_string(),
            run_dir: self.0.join("run").display().to_string(),
            sub_path_dir: self.0.join("subpaths").display().to_string(),
            claims_dir: self.0.join("claims").display().to_string(),
            host_path_prefixes: Vec::new(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = mounts::unmount_below(&self.0);
        let driver = LoopDriver::new(self.storage());
        for (v, _) in driver.list().unwrap_or_default() {
            let _ = driver.delete(&v);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CLASS: &str = "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: \"true\"}
provisioner: berth.dev/local
reclaimPolicy: Delete
volumeBindingMode: Immediate
";

fn claim(name: &str, size: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: {size}}}}}\n"
    )
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  containers:
  - name: main
    image: busybox:1.37
    command: [sleep, \"1000\"]
    volumeMounts:
    - {name: data, mountPath: /data, subPath: inner}
  volumes:
  - name: data
    persistentVolumeClaim: {claimName: data}
";

/// The catalog and the desired pods for these documents.
fn load(
    docs: &[String],
    dirs: &VolumeDirs,
) -> (berth_manifest::Catalog, Vec<berth_plan::DesiredPod>) {
    let catalog = berth_manifest::load_sources(
        docs.iter()
            .enumerate()
            .map(|(i, text)| berth_manifest::SourceFile {
                path: format!("{i}.yaml").into(),
                text: text.clone(),
            })
            .collect(),
    );
    let mut node = berth_plan::NodeInfo::new("n", Default::default(), 1 << 30, 2000);
    node.volumes = dirs.clone();
    let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
        reference: "busybox:1.37".into(),
        cmd: vec!["sh".into()],
        ..Default::default()
    }]);
    let plan = berth_plan::plan_node(&catalog, &node, &images, &Default::default(), "r");
    (catalog, plan.pods)
}

fn images(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("images"))
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
#[ignore = "privileged: loop devices, mkfs.ext4 and mounts (root)"]
fn provisioning_cut_short_by_a_crash_is_finished_once_and_a_too_big_claim_leaves_nothing() {
    let scratch = Scratch::new("crash");
    let dirs = scratch.dirs();
    // What a kill between the book's write and mkfs's end leaves: the
    // intent in the book and a torn image under its temporary name.
    let claim_ref = ClaimRef {
        namespace: "default".into(),
        name: "data".into(),
    };
    let mut book = Book::default();
    book.volumes.insert(
        "pvc_default_data_0".into(),
        Provisioned {
            claim: claim_ref,
            class: "local".into(),
            capacity_bytes: 16 << 20,
            reclaim: Reclaim::Delete,
            phase: Phase::Creating,
        },
    );
    book.next_serial = 1;
    book.save(&scratch.storage().join("volumes.json")).unwrap();
    std::fs::create_dir_all(scratch.storage().join("images")).unwrap();
    std::fs::write(
        scratch.storage().join("images/pvc_default_data_0.img.new"),
        b"torn",
    )
    .unwrap();

    let driver = LoopDriver::new(scratch.storage());
    let free = driver.free_bytes().unwrap();
    let huge = format!("{}Mi", (free >> 20) + 1024);
    let docs = [
        CLASS.to_string(),
        claim("data", "16Mi"),
        claim("huge", &huge),
    ];
    let (catalog, pods) = load(&docs, &dirs);
    let mut storage = Storage::new(scratch.storage(), Box::new(driver));
    let (record, log, _) =
        storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    assert_eq!(
        images(&scratch.storage()),
        ["pvc_default_data_0.img"],
        "one volume for the claim, the torn file gone, nothing for the huge claim; log: {log:?}"
    );
    let data = record.claims.iter().find(|c| c.name == "data").unwrap();
    assert_eq!(
        (data.phase.as_str(), data.volume.as_deref()),
        ("Bound", Some("pvc_default_data_0"))
    );
    let huge = record.claims.iter().find(|c| c.name == "huge").unwrap();
    assert_eq!(huge.phase, "Pending");
    assert_eq!(huge.reason.as_deref(), Some("ProvisioningFailed"));
    assert!(
        huge.message
            .as_deref()
            .unwrap()
            .contains("free for volumes"),
        "{huge:?}"
    );
    let (book, _) = Book::load(&scratch.storage().join("volumes.json"));
    assert_eq!(
        book.volumes.len(),
        1,
        "no record left for the refused claim: {book:?}"
    );
    assert!(mounts::is_mount_point(Path::new(
        &dirs.claim_dir("default", "data")
    )));

    // A second pass changes nothing.
    let (again, log, _) =
        storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    assert_eq!(images(&scratch.storage()), ["pvc_default_data_0.img"]);
    let phases =
        |r: &berth_agent::storage::StorageRecord| -> Vec<(String, String, Option<String>)> {
            r.claims
                .iter()
                .map(|c| (c.name.clone(), c.phase.clone(), c.volume.clone()))
                .collect()
        };
    assert_eq!(phases(&again), phases(&record));
    assert!(log.is_empty(), "{log:?}");
}

#[test]
#[ignore = "privileged: loop devices, mkfs.ext4 and mounts (root)"]
fn a_lost_book_keeps_the_data_and_hand_edits_are_healed_or_reported() {
    let scratch = Scratch::new("book");
    let dirs = scratch.dirs();
    let docs = [CLASS.to_string(), claim("data", "16Mi"), POD.to_string()];
    let (catalog, pods) = load(&docs, &dirs);
    let mut storage = Storage::new(
        scratch.storage(),
        Box::new(LoopDriver::new(scratch.storage())),
    );
    storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    let claim_dir = PathBuf::from(dirs.claim_dir("default", "data"));
    std::fs::write(claim_dir.join("keep"), b"precious").unwrap();
    assert!(
        storage.prepare_pods(&pods, &dirs).is_empty(),
        "the pod's volumes are ready"
    );
    assert!(
        claim_dir.join("inner").is_dir(),
        "the subPath was made inside the claim"
    );

    // The mount undone by hand: mounted again and reported.
    mounts::unmount(&claim_dir).unwrap();
    let (_, _, remounted) =
        storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    assert_eq!(remounted.len(), 1, "{remounted:?}");
    assert_eq!(std::fs::read(claim_dir.join("keep")).unwrap(), b"precious");

    // A planted symlink as the subPath: the pod does not start.
    std::fs::remove_dir(claim_dir.join("inner")).unwrap();
    std::os::unix::fs::symlink("/etc", claim_dir.join("inner")).unwrap();
    let _ = mounts::unmount_below(Path::new(&dirs.sub_path_dir));
    let blocked = storage.prepare_pods(&pods, &dirs);
    let why = &blocked["default_app"];
    assert!(why.contains("leads outside the volume"), "{why}");
    std::fs::remove_file(claim_dir.join("inner")).unwrap();

    // The book lost (a corrupt file): a new agent adopts the image for its
    // claim, with Retain, and the data is still there.
    drop(storage);
    mounts::unmount_below(&scratch.0).unwrap();
    std::fs::write(scratch.storage().join("volumes.json"), b"\0garbage").unwrap();
    let mut storage = Storage::new(
        scratch.storage(),
        Box::new(LoopDriver::new(scratch.storage())),
    );
    let (record, log, _) =
        storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    assert!(
        record
            .problems
            .iter()
            .any(|p| p.contains("not a volume book")),
        "{record:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("adopted volume pvc_default_data_0")),
        "{log:?}"
    );
    let data = &record.claims[0];
    assert_eq!(
        (data.phase.as_str(), data.volume.as_deref()),
        ("Bound", Some("pvc_default_data_0"))
    );
    assert_eq!(std::fs::read(claim_dir.join("keep")).unwrap(), b"precious");
    assert_eq!(record.volumes[0].reclaim_policy, "Retain");

    // The image removed by hand: the claim is Lost, with the reason.
    mounts::unmount_below(&scratch.0).unwrap();
    let driver = LoopDriver::new(scratch.storage());
    driver.unstage("pvc_default_data_0").unwrap();
    std::fs::remove_file(driver.image("pvc_default_data_0")).unwrap();
    let mut storage = Storage::new(scratch.storage(), Box::new(driver));
    let (record, _, _) =
        storage.reconcile(&catalog, &pods, &std::collections::BTreeSet::new(), &dirs);
    let data = &record.claims[0];
    assert_eq!(data.phase, "Lost", "{data:?}");
    assert!(
        data.message.as_deref().unwrap().contains("is missing"),
        "{data:?}"
    );
    let blocked = storage.prepare_pods(&pods, &dirs);
    assert!(
        blocked["default_app"].contains("not bound (Lost)"),
        "{blocked:?}"
    );
}

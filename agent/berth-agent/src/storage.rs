//! Claims, volumes and pod volumes, each pass: bind claims (provisioning
//! through the driver), publish bound volumes at their claims' mount
//! points, make every pod's volumes ready, and remove what pods and claims
//! that left Git had.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use berth_manifest::{Catalog, Object, Quantity};
use berth_plan::DesiredPod;
use berth_plan::volumes::{VolumeDirs, VolumeSource};
use berth_storage::binder::{self, Binding, ClaimSpec, ClassSpec, StaticPv, Step};
use berth_storage::book::{Book, ClaimRef, Phase, Reclaim};
use berth_storage::driver::{DriverError, VolumeDriver};
use berth_storage::mounts::{KernelMounts, Mounts};
use berth_storage::podvol;
use serde::{Deserialize, Serialize};

/// Usage at or above this share of a claim's capacity shows as a condition.
pub const NEAR_FULL_PERCENT: u64 = 90;
/// Less than this left counts as full.
pub const FULL_BELOW_BYTES: u64 = 1 << 20;

/// A claim as status shows it, like `kubectl get pvc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRecord {
    pub namespace: String,
    pub name: String,
    /// `Pending`, `Bound` or `Lost`.
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `NearFull` (at or over 90 %) or `Full`, and a resize not allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<String>,
}

/// A volume the provisioner holds, like `kubectl get pv`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub name: String,
    pub claim: String,
    pub phase: String,
    pub reclaim_policy: String,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageRecord {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRecord>,
    /// What the storage pass could not do (logged once each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

pub struct Storage {
    dir: PathBuf,
    driver: Box<dyn VolumeDriver>,
    /// The node's mount table, or a fake in tests.
    mounts: Box<dyn Mounts>,
    book: Option<Book>,
    bindings: BTreeMap<ClaimRef, Binding>,
    /// Claim mount points this agent mounted; one found unmounted later
    /// was undone outside Berth (drift, put back and reported).
    published: BTreeSet<PathBuf>,
}

/// A claim mount point found unmounted and mounted again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remounted {
    pub claim: String,
    pub path: PathBuf,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.dir)
            .field("provisioner", &self.driver.provisioner())
            .field("bindings", &self.bindings)
            .finish_non_exhaustive()
    }
}

fn bytes_of(
    q: Option<&berth_manifest::k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) -> u64 {
    q.and_then(|q| Quantity::parse(&q.0).ok())
        .and_then(|q| q.units().ok())
        .unwrap_or(0)
}

/// What `berth validate` says of claims: those no PersistentVolume and no
/// StorageClass can serve on a fresh node (the binder's own decision,
/// against an empty book, with every claim in use), each a warning on the
/// claim's `spec.storageClassName` with file and line. They would stay
/// `Pending`, as Kubernetes leaves them.
pub fn claim_diagnostics(catalog: &Catalog) -> Vec<berth_manifest::Diagnostic> {
    let (claims, pvs, classes) = inputs(catalog);
    let in_use: BTreeSet<ClaimRef> = claims.iter().map(|c| c.claim.clone()).collect();
    let decision = binder::decide(
        &berth_storage::book::Book::default(),
        &claims,
        &pvs,
        &classes,
        &in_use,
    );
    let mut out = Vec::new();
    for (claim, binding) in &decision.bindings {
        let Binding::Pending { reason, message } = binding else {
            continue;
        };
        let Some(object) = catalog.objects.iter().find(|o| {
            matches!(o.object, Object::PersistentVolumeClaim(_))
                && o.id.name == claim.name
                && o.id.namespace.clone().unwrap_or_default() == claim.namespace
        }) else {
            continue;
        };
        let issue = berth_manifest::FieldIssue::warning(
            berth_manifest::FieldPath::parse("spec.storageClassName"),
            format!("no class can serve the claim ({reason}): {message}; it stays Pending"),
        );
        out.push(catalog.diagnostic(object, &issue));
    }
    out
}

/// Claims, static PVs and classes as the binder takes them.
fn inputs(catalog: &Catalog) -> (Vec<ClaimSpec>, Vec<StaticPv>, Vec<ClassSpec>) {
    let (mut claims, mut pvs, mut classes) = (Vec::new(), Vec::new(), Vec::new());
    for o in &catalog.objects {
        match &o.object {
            Object::PersistentVolumeClaim(c) => {
                let Some(spec) = &c.spec else { continue };
                claims.push(ClaimSpec {
                    claim: ClaimRef {
                        namespace: o.id.namespace.clone().unwrap_or_default(),
                        name: o.id.name.clone(),
                    },
                    class: spec.storage_class_name.clone(),
                    request_bytes: bytes_of(
                        spec.resources
                            .as_ref()
                            .and_then(|r| r.requests.as_ref())
                            .and_then(|r| r.get("storage")),
                    ),
                    access_modes: spec.access_modes.clone().unwrap_or_default(),
                    volume_name: spec.volume_name.clone().filter(|v| !v.is_empty()),
                });
            }
            Object::PersistentVolume(p) => {
                let Some(spec) = &p.spec else { continue };
                let path = spec
                    .local
                    .as_ref()
                    .map(|l| l.path.clone())
                    .or_else(|| spec.host_path.as_ref().map(|h| h.path.clone()))
                    .unwrap_or_default();
                pvs.push(StaticPv {
                    name: o.id.name.clone(),
                    class: spec.storage_class_name.clone().unwrap_or_default(),
                    capacity_bytes: bytes_of(spec.capacity.as_ref().and_then(|c| c.get("storage"))),
                    access_modes: spec.access_modes.clone().unwrap_or_default(),
                    path,
                    reserved_for: spec.claim_ref.as_ref().and_then(|r| {
                        Some(ClaimRef {
                            namespace: r.namespace.clone()?,
                            name: r.name.clone()?,
                        })
                    }),
                });
            }
            Object::StorageClass(s) => classes.push(ClassSpec {
                name: o.id.name.clone(),
                provisioner: s.provisioner.clone(),
                reclaim: Reclaim::parse(s.reclaim_policy.as_deref()),
                wait_for_first_consumer: s.volume_binding_mode.as_deref()
                    == Some("WaitForFirstConsumer"),
                allow_expansion: s.allow_volume_expansion == Some(true),
                default: s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                    .is_some_and(|v| v == "true"),
            }),
            _ => {}
        }
    }
    (claims, pvs, classes)
}

/// Claims the pods mount, by namespace and name.
fn mounted_claims(pods: &[DesiredPod]) -> BTreeSet<ClaimRef> {
    pods.iter()
        .flat_map(|p| {
            p.volumes.iter().filter_map(|v| match &v.source {
                VolumeSource::Claim { claim, .. } => Some(ClaimRef {
                    namespace: p.id.namespace.clone(),
                    name: claim.clone(),
                }),
                _ => None,
            })
        })
        .collect()
}

impl Storage {
    /// Storage on the node's own mount table.
    pub fn new(dir: impl Into<PathBuf>, driver: Box<dyn VolumeDriver>) -> Self {
        Self::with_mounts(dir, driver, Box::new(KernelMounts))
    }

    /// Storage on any mount table: [`berth_storage::fake::FakeMounts`] in
    /// tests.
    pub fn with_mounts(
        dir: impl Into<PathBuf>,
        driver: Box<dyn VolumeDriver>,
        mounts: Box<dyn Mounts>,
    ) -> Self {
        Self {
            dir: dir.into(),
            driver,
            mounts,
            book: None,
            bindings: BTreeMap::new(),
            published: BTreeSet::new(),
        }
    }

    fn book_path(&self) -> PathBuf {
        self.dir.join("volumes.json")
    }

    fn save(&self, book: &Book, problems: &mut Vec<String>) -> bool {
        match book.save(&self.book_path()) {
            Ok(()) => true,
            Err(e) => {
                problems.push(format!("{}: {e}", self.book_path().display()));
                false
            }
        }
    }

    /// Binds claims and publishes their volumes. Returns the storage
    /// status, lines for the journal, and the claim mounts that were
    /// undone by hand and put back.
    ///
    /// `departing`: pods Git no longer wants whose containers still run
    /// (stopping within their grace period). No claim is released, deleted
    /// or unmounted while any runs: one of them may still be writing to it.
    pub fn reconcile(
        &mut self,
        catalog: &Catalog,
        pods: &[DesiredPod],
        departing: &BTreeSet<String>,
        dirs: &VolumeDirs,
    ) -> (StorageRecord, Vec<String>, Vec<Remounted>) {
        let mut remounted = Vec::new();
        let mut problems = Vec::new();
        let mut log = Vec::new();
        let mut book = match self.book.take() {
            Some(b) => b,
            None => {
                let (mut b, note) = Book::load(&self.book_path());
                problems.extend(note);
                let on_disk = self.driver.list().unwrap_or_default();
                let adopted = b.adopt(&on_disk);
                for name in &adopted {
                    log.push(format!(
                        "storage: adopted volume {name}, found on disk without a record (kept: Retain)"
                    ));
                }
                if !adopted.is_empty() {
                    self.save(&b, &mut problems);
                }
                b
            }
        };
        let (claims, pvs, classes) = inputs(catalog);
        let in_use = mounted_claims(pods);
        let decision = binder::decide(&book, &claims, &pvs, &classes, &in_use);
        let mut bindings = decision.bindings;
        for step in &decision.steps {
            if let Step::Release { volume } | Step::Delete { volume } = step
                && !departing.is_empty()
            {
                log.push(format!(
                    "storage: volume {volume} is released once the containers of {} have stopped",
                    departing.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            // The intent is on disk before the disk changes.
            binder::record(&mut book, step);
            if !self.save(&book, &mut problems) {
                break;
            }
            // A volume leaving its claim leaves the claim's mount point first.
            if let Step::Release { volume } | Step::Delete { volume } = step
                && let Some(v) = book.volumes.get(volume)
            {
                let target = PathBuf::from(dirs.claim_dir(&v.claim.namespace, &v.claim.name));
                let _ = self.mounts.unmount(&target);
                let _ = std::fs::remove_dir(&target);
            }
            match self.carry_out(step, &mut book) {
                Ok(Some(line)) => log.push(line),
                Ok(None) => {}
                Err((claim, e)) => {
                    if let Some(claim) = claim {
                        bindings.insert(
                            claim,
                            Binding::Pending {
                                reason: "ProvisioningFailed".into(),
                                message: e.clone(),
                            },
                        );
                    }
                    problems.push(e);
                }
            }
            self.save(&book, &mut problems);
        }

        // Publish: the claim's mount point shows its volume.
        let mut claim_dirs = BTreeSet::new();
        for (claim, binding) in bindings.iter_mut() {
            let target = PathBuf::from(dirs.claim_dir(&claim.namespace, &claim.name));
            let source = match binding {
                Binding::Provisioned { volume } => match self.driver.stage(volume) {
                    Ok(p) => p,
                    Err(e) => {
                        let message = match e {
                            DriverError::NotFound(m) => format!(
                                "{m}: its data is gone (removed by hand?); delete and recreate the claim to start empty"
                            ),
                            other => other.to_string(),
                        };
                        *binding = Binding::Pending {
                            reason: "Lost".into(),
                            message: message.clone(),
                        };
                        problems.push(format!("claim {claim}: {message}"));
                        continue;
                    }
                },
                Binding::Static { path, .. } => {
                    let real = std::fs::canonicalize(&*path).map(|p| p.display().to_string());
                    match real {
                        Ok(r)
                            if dirs
                                .host_path_prefixes
                                .iter()
                                .any(|p| berth_plan::volumes::under_prefix(&r, p)) =>
                        {
                            PathBuf::from(r)
                        }
                        Ok(r) => {
                            let message = format!(
                                "the PersistentVolume's path {path} resolves to {r}, outside the prefixes this node allows (storage.hostPathPrefixes)"
                            );
                            problems.push(format!("claim {claim}: {message}"));
                            *binding = Binding::Pending {
                                reason: "VolumeNotAllowed".into(),
                                message,
                            };
                            continue;
                        }
                        Err(e) => {
                            let message = format!("the PersistentVolume's path {path}: {e}");
                            problems.push(format!("claim {claim}: {message}"));
                            *binding = Binding::Pending {
                                reason: "Lost".into(),
                                message,
                            };
                            continue;
                        }
                    }
                }
                Binding::Pending { .. } => continue,
            };
            claim_dirs.insert(target.clone());
            if self.mounts.is_mount_point(&target) {
                continue;
            }
            let made = std::fs::create_dir_all(&target)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.mounts
                        .bind(&source, &target)
                        .map_err(|e| e.to_string())
                });
            match made {
                Ok(()) if self.published.contains(&target) => remounted.push(Remounted {
                    claim: claim.to_string(),
                    path: target.clone(),
                }),
                Ok(()) => log.push(format!(
                    "storage: claim {claim} mounted at {}",
                    target.display()
                )),
                Err(e) => problems.push(format!(
                    "claim {claim}: mounting {} at {}: {e}",
                    source.display(),
                    target.display()
                )),
            }
        }
        // Mount points of claims no longer bound (and not mounted by a pod,
        // nor by a pod still stopping).
        if let Some(entries) = std::fs::read_dir(&dirs.claims_dir)
            .ok()
            .filter(|_| departing.is_empty())
        {
            for e in entries.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let held = name.split_once('_').is_some_and(|(ns, c)| {
                    in_use.contains(&ClaimRef {
                        namespace: ns.into(),
                        name: c.into(),
                    })
                });
                if claim_dirs.contains(&path) || held {
                    continue;
                }
                let _ = self.mounts.unmount(&path);
                let _ = std::fs::remove_dir(&path);
            }
        }

        let record = self.status(&book, &bindings, &decision.notes, problems);
        self.book = Some(book);
        self.bindings = bindings;
        self.published = claim_dirs;
        (record, log, remounted)
    }

    /// Performs one step; the book already holds its intent.
    fn carry_out(
        &self,
        step: &Step,
        book: &mut Book,
    ) -> Result<Option<String>, (Option<ClaimRef>, String)> {
        match step {
            Step::Provision {
                volume,
                claim,
                bytes,
                ..
            } => match self.driver.create(volume, *bytes) {
                Ok(size) => {
                    // Any user of a pod may write to a fresh volume, as with
                    // an emptyDir; the pod may narrow it.
                    if let Ok(root) = self.driver.stage(volume) {
                        use std::os::unix::fs::PermissionsExt;
                        let _ =
                            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777));
                    }
                    if let Some(v) = book.volumes.get_mut(volume) {
                        v.phase = Phase::Bound;
                        v.capacity_bytes = size;
                    }
                    Ok(Some(format!(
                        "storage: provisioned {volume} ({}) for claim {claim}",
                        berth_storage::format_size(size)
                    )))
                }
                Err(e) => {
                    // Nothing half-made stays: the record goes too.
                    book.volumes.remove(volume);
                    let _ = self.driver.delete(volume);
                    Err((
                        Some(claim.clone()),
                        format!("claim {claim}: provisioning failed: {e}"),
                    ))
                }
            },
            Step::Expand { volume, bytes } => match self.driver.expand(volume, *bytes) {
                Ok(size) => {
                    if let Some(v) = book.volumes.get_mut(volume) {
                        v.capacity_bytes = size;
                    }
                    Ok(Some(format!(
                        "storage: volume {volume} grown to {}",
                        berth_storage::format_size(size)
                    )))
                }
                Err(e) => Err((None, format!("volume {volume}: growing failed: {e}"))),
            },
            Step::Release { volume } => {
                let _ = self.driver.unstage(volume);
                Ok(Some(format!(
                    "storage: claim of {volume} is gone; volume kept (Retain), Released"
                )))
            }
            Step::Delete { volume } => match self.driver.delete(volume) {
                Ok(()) => {
                    book.volumes.remove(volume);
                    Ok(Some(format!("storage: volume {volume} deleted (Delete)")))
                }
                Err(e) => Err((None, format!("volume {volume}: deleting failed: {e}"))),
            },
            Step::BindStatic { pv, claim } => Ok(Some(format!(
                "storage: claim {claim} bound to PersistentVolume {pv}"
            ))),
            Step::ReleaseStatic { pv } => Ok(Some(format!(
                "storage: PersistentVolume {pv} Released (its claim is gone)"
            ))),
            Step::ForgetStatic { .. } => Ok(None),
        }
    }

    fn status(
        &self,
        book: &Book,
        bindings: &BTreeMap<ClaimRef, Binding>,
        notes: &BTreeMap<ClaimRef, String>,
        mut problems: Vec<String>,
    ) -> StorageRecord {
        let mut claims = Vec::new();
        for (claim, binding) in bindings {
            let mut r = ClaimRecord {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                ..Default::default()
            };
            match binding {
                Binding::Provisioned { volume } => {
                    r.phase = "Bound".into();
                    r.volume = Some(volume.clone());
                    r.capacity_bytes = book.volumes.get(volume).map(|v| v.capacity_bytes);
                    if let Ok(stats) = self.driver.stats(volume) {
                        r.used_bytes = Some(stats.used_bytes);
                        let total = stats.used_bytes + stats.available_bytes;
                        // Full: what is left cannot take a file's next block
                        // group (ext4 keeps a little room it never hands out).
                        if stats.available_bytes < FULL_BELOW_BYTES {
                            r.conditions.push("Full".into());
                        } else if total > 0 && stats.used_bytes * 100 >= total * NEAR_FULL_PERCENT {
                            r.conditions.push("NearFull".into());
                        }
                    }
                }
                Binding::Static { pv, path } => {
                    r.phase = "Bound".into();
                    r.volume = Some(pv.clone());
                    if let Ok((total, free)) = self.mounts.fs_size(Path::new(path)) {
                        r.capacity_bytes = Some(total);
                        r.used_bytes = Some(total - free);
                    }
                }
                Binding::Pending { reason, message } => {
                    r.phase = if reason == "Lost" { "Lost" } else { "Pending" }.into();
                    r.reason = Some(reason.clone());
                    r.message = Some(message.clone());
                }
            }
            if let Some(note) = notes.get(claim) {
                r.conditions.push(format!("Resizing: {note}"));
            }
            claims.push(r);
        }
        let volumes = book
            .volumes
            .iter()
            .map(|(name, v)| VolumeRecord {
                name: name.clone(),
                claim: v.claim.to_string(),
                phase: format!("{:?}", v.phase),
                reclaim_policy: format!("{:?}", v.reclaim),
                capacity_bytes: v.capacity_bytes,
            })
            .collect();
        problems.sort();
        problems.dedup();
        StorageRecord {
            claims,
            volumes,
            problems,
        }
    }

    /// Makes every pod's volumes and subPaths ready. Returns, per pod key,
    /// why it cannot start yet.
    pub fn prepare_pods(&self, pods: &[DesiredPod], dirs: &VolumeDirs) -> BTreeMap<String, String> {
        let mut blocked = BTreeMap::new();
        for pod in pods {
            if let Err(e) = self.prepare_pod(pod, dirs) {
                blocked.insert(pod.id.key(), e);
            }
        }
        blocked
    }

    fn prepare_pod(&self, pod: &DesiredPod, dirs: &VolumeDirs) -> Result<(), String> {
        for v in &pod.volumes {
            if let VolumeSource::Claim { claim, .. } = &v.source {
                let key = ClaimRef {
                    namespace: pod.id.namespace.clone(),
                    name: claim.clone(),
                };
                match self.bindings.get(&key) {
                    None => {
                        return Err(format!(
                            "volume {:?}: PersistentVolumeClaim {key} not found",
                            v.name
                        ));
                    }
                    Some(Binding::Pending { reason, message }) => {
                        return Err(format!(
                            "volume {:?}: claim {key} is not bound ({reason}): {message}",
                            v.name
                        ));
                    }
                    Some(_) => {}
                }
            }
            podvol::prepare(v, &dirs.host_path_prefixes, self.mounts.as_ref())
                .map_err(|e| format!("volume {:?}: {e}", v.name))?;
        }
        for unit in pod.units() {
            for sub in &unit.sub_paths {
                let Some(v) = pod.volumes.iter().find(|v| v.name == sub.volume) else {
                    continue;
                };
                podvol::stage_sub_path(Path::new(&v.host_path), sub, self.mounts.as_ref())
                    .map_err(|e| format!("container {}: {e}", unit.container))?;
            }
        }
        Ok(())
    }

    /// Removes the volume directories of pods Git no longer wants.
    pub fn remove_others(&self, pods: &[DesiredPod], dirs: &VolumeDirs) -> Vec<String> {
        let keep: BTreeSet<String> = pods.iter().map(|p| p.id.key()).collect();
        let mut removed = Vec::new();
        for key in podvol::pods_on_disk(dirs) {
            if keep.contains(&key) {
                continue;
            }
            match podvol::remove_pod(dirs, &key, self.mounts.as_ref()) {
                Ok(()) => removed.push(format!("storage: removed the volumes of pod {key}")),
                Err(e) => removed.push(format!("storage: pod {key}: {e}")),
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    //! The storage pass on the in-memory driver and mount table (both held
    //! to the real ones' contracts in tier 2); the real provisioner's own
    //! pass tests are in `tests/storage.rs`.
    #![allow(clippy::expect_used)]

    use super::*;
    use berth_storage::fake::{FakeDriver, FakeMounts};

    const DOCS: &str = "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: \"true\"}
provisioner: berth.dev/local
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: huge}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 8Gi}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: fast}
---
apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  containers:
  - name: main
    image: busybox:1.37
    volumeMounts:
    - {name: data, mountPath: /data, subPath: inner}
    - {name: scratch, mountPath: /scratch}
    - {name: settings, mountPath: /etc/app}
  volumes:
  - name: data
    persistentVolumeClaim: {claimName: data}
  - name: scratch
    emptyDir: {medium: Memory, sizeLimit: 8Mi}
  - name: settings
    configMap: {name: settings}
---
apiVersion: v1
kind: Pod
metadata: {name: waits}
spec:
  containers:
  - name: main
    image: busybox:1.37
    volumeMounts: [{name: big, mountPath: /big}]
  volumes:
  - name: big
    persistentVolumeClaim: {claimName: huge}
";

    fn scratch(name: &str) -> (PathBuf, VolumeDirs) {
        let dir =
            std::env::temp_dir().join(format!("berth-storage-pass-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        let dirs = VolumeDirs {
            disk_dir: dir.join("volumes").display().to_string(),
            run_dir: dir.join("run").display().to_string(),
            sub_path_dir: dir.join("subpaths").display().to_string(),
            claims_dir: dir.join("claims").display().to_string(),
            host_path_prefixes: Vec::new(),
        };
        (dir, dirs)
    }

    fn load(text: &str, dirs: &VolumeDirs) -> (Catalog, Vec<DesiredPod>) {
        let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
            path: "storage.yaml".into(),
            text: text.into(),
        }]);
        let mut node = berth_plan::NodeInfo::new("n", BTreeMap::new(), 1 << 30, 2000);
        node.volumes = dirs.clone();
        let images = berth_plan::ImageCatalog::new([berth_plan::ImageConfig {
            reference: "busybox:1.37".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        }]);
        let plan = berth_plan::plan_node(&catalog, &node, &images, &Default::default(), "r");
        (catalog, plan.pods)
    }

    #[test]
    fn claims_are_provisioned_and_published_pods_prepared_hand_edits_healed_and_leavers_removed() {
        let (dir, dirs) = scratch("pass");
        let (catalog, pods) = load(DOCS, &dirs);
        let mounts = FakeMounts::new(dir.join("stash"));
        let driver = FakeDriver::new(dir.join("storage/volumes"), 1 << 30);
        let mut storage = Storage::with_mounts(
            dir.join("storage"),
            Box::new(driver),
            Box::new(mounts.clone()),
        );

        let (record, log, remounted) = storage.reconcile(&catalog, &pods, &BTreeSet::new(), &dirs);
        let phase = |name: &str| {
            let c = record.claims.iter().find(|c| c.name == name).expect(name);
            (c.phase.clone(), c.reason.clone())
        };
        assert_eq!(phase("data"), ("Bound".to_string(), None), "{record:?}");
        assert_eq!(
            phase("huge"),
            (
                "Pending".to_string(),
                Some("ProvisioningFailed".to_string())
            )
        );
        assert!(remounted.is_empty());
        assert!(
            log.iter()
                .any(|l| l.contains("claim default/data mounted at")),
            "{log:?}"
        );
        let claim_dir = PathBuf::from(dirs.claim_dir("default", "data"));
        assert!(mounts.is_mount_point(&claim_dir));
        // What is written at the claim's mount point is in its volume.
        std::fs::write(claim_dir.join("keep"), b"precious").expect("write");
        let volume = record.claims[0].volume.clone().expect("a volume");
        assert_eq!(
            std::fs::read(dir.join("storage/volumes").join(&volume).join("keep"))
                .expect("in the volume"),
            b"precious"
        );

        // The pod on the bound claim is ready; the one on the claim that
        // cannot be provisioned waits, with the reason.
        let blocked = storage.prepare_pods(&pods, &dirs);
        assert_eq!(blocked.keys().collect::<Vec<_>>(), ["default_waits"]);
        assert!(
            blocked["default_waits"]
                .contains("claim default/huge is not bound (ProvisioningFailed)"),
            "{blocked:?}"
        );
        assert!(
            claim_dir.join("inner").is_dir(),
            "the subPath made in the claim"
        );
        let points = mounts.mount_points();
        let under = |base: &str| points.iter().filter(|p| p.starts_with(base)).count();
        // subPath bind, memory emptyDir and ConfigMap tmpfs.
        assert_eq!(under(&dirs.sub_path_dir), 1, "{points:?}");
        assert_eq!(under(&dirs.run_dir), 2, "{points:?}");
        let app = pods.iter().find(|p| p.id.name == "app").expect("app");
        let settings = app
            .volumes
            .iter()
            .find(|v| v.name == "settings")
            .expect("settings");
        assert_eq!(
            std::fs::read_to_string(Path::new(&settings.host_path).join("mode"))
                .expect("projected"),
            "fast"
        );

        // A second pass changes nothing.
        let (_, log, remounted) = storage.reconcile(&catalog, &pods, &BTreeSet::new(), &dirs);
        assert!(
            log.is_empty() && remounted.is_empty(),
            "{log:?} {remounted:?}"
        );
        assert!(storage.prepare_pods(&pods, &dirs).len() == 1);

        // The claim's mount undone by hand: put back, reported, data there.
        mounts.unmount(&claim_dir).expect("unmount by hand");
        let (_, _, remounted) = storage.reconcile(&catalog, &pods, &BTreeSet::new(), &dirs);
        assert_eq!(remounted.len(), 1, "{remounted:?}");
        assert_eq!(
            std::fs::read(claim_dir.join("keep")).expect("back"),
            b"precious"
        );

        // Pods and claims leave Git together. While the pod's containers
        // still run (their grace period), the claim stays mounted and its
        // volume is neither released nor deleted: the last writes land.
        let (catalog, pods) = load(DOCS.split("---").next().expect("the class"), &dirs);
        let stopping = BTreeSet::from(["default/app".to_string()]);
        let (record, log, _) = storage.reconcile(&catalog, &pods, &stopping, &dirs);
        assert!(
            log.iter()
                .any(|l| l.contains("is released once the containers of default/app have stopped")),
            "{log:?}"
        );
        assert_eq!(record.volumes.len(), 1, "{record:?}");
        assert!(
            mounts.is_mount_point(&claim_dir),
            "unmounted under a running pod"
        );
        std::fs::write(claim_dir.join("last"), b"written while stopping").expect("write");
        // Then it has stopped: the claim's mount and volume go (Delete),
        // and so do the pods' volume directories and mounts.
        let (record, _, _) = storage.reconcile(&catalog, &pods, &BTreeSet::new(), &dirs);
        assert!(
            record.claims.is_empty() && record.volumes.is_empty(),
            "{record:?}"
        );
        assert!(!mounts.is_mount_point(&claim_dir));
        let removed = storage.remove_others(&pods, &dirs);
        assert!(
            removed.contains(&"storage: removed the volumes of pod default_app".to_string()),
            "{removed:?}"
        );
        assert_eq!(mounts.mount_points(), Vec::<PathBuf>::new());
        let _ = std::fs::remove_dir_all(dir);
    }
}

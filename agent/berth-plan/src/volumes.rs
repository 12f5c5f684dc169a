//! A pod's volumes, resolved against the catalog: where each lives on the
//! node, what goes in it, and the bind mounts each container gets.
//!
//! Paths are fixed by the pod and volume names, so a unit's `BindPaths=`
//! never changes when a ConfigMap's content or a claim's volume does: the
//! agent updates what is behind the path instead of restarting containers.

use std::collections::BTreeMap;
use std::fmt;

use berth_manifest::k8s_openapi::api::core::v1::{KeyToPath, Volume};
use berth_manifest::model::Container;
use berth_manifest::{FieldIssue, FieldPath, Quantity};

use crate::context::Context;
pub use crate::node::{
    DEFAULT_CLAIMS_DIR, DEFAULT_DISK_DIR, DEFAULT_RUN_DIR, DEFAULT_SUB_PATH_DIR, VolumeDirs,
};
use crate::select::PodInstance;
use crate::units::{BindMount, PodId};

/// Bytes that must not reach a log, a plan printout or a status file.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(pub Vec<u8>);

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// One file of a ConfigMap or Secret volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedFile {
    /// Relative to the volume, already checked for `..` and absolute paths.
    pub path: String,
    pub mode: u32,
    pub data: Sensitive,
}

/// What `hostPath.type` asks to find (or make) at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPathType {
    /// No check.
    Any,
    DirectoryOrCreate,
    Directory,
    FileOrCreate,
    File,
    Socket,
    CharDevice,
    BlockDevice,
}

impl HostPathType {
    fn parse(text: Option<&str>) -> Self {
        match text.unwrap_or("") {
            "DirectoryOrCreate" => Self::DirectoryOrCreate,
            "Directory" => Self::Directory,
            "FileOrCreate" => Self::FileOrCreate,
            "File" => Self::File,
            "Socket" => Self::Socket,
            "CharDevice" => Self::CharDevice,
            "BlockDevice" => Self::BlockDevice,
            _ => Self::Any,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A directory on the data partition, or a tmpfs of `size_bytes`.
    EmptyDir {
        memory: bool,
        size_bytes: Option<u64>,
    },
    HostPath {
        kind: HostPathType,
    },
    /// ConfigMaps and Secrets, rendered to files; `secret` when any of
    /// them is a Secret. Such volumes live on tmpfs only.
    Files {
        files: Vec<ProjectedFile>,
        secret: bool,
    },
    Claim {
        claim: String,
        read_only: bool,
    },
}

/// A volume of a pod, and where it lives on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    pub name: String,
    pub source: VolumeSource,
    /// What containers bind: a directory the agent makes, a hostPath, or
    /// the claim's mount point.
    pub host_path: String,
}

/// A container's bind of a volume's `subPath`: the agent resolves it inside
/// the volume without following symlinks out of it, and binds the result
/// at `stage`, which is what the unit's `BindPaths=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubPathBind {
    pub volume: String,
    pub sub_path: String,
    pub stage: String,
    /// Kubernetes makes a missing subPath a directory.
    pub create: bool,
}

impl VolumeDirs {
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> String {
        format!(
            "{}/{namespace}_{claim}",
            self.claims_dir.trim_end_matches('/')
        )
    }
}

/// Is `path` equal to or below `prefix`, component-wise?
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn file_mode(m: Option<i32>) -> u32 {
    m.and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644)
}

/// The files of a ConfigMap or Secret volume: every key, or `items`.
fn project(
    entries: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    describe: &str,
    path: &FieldPath,
    errors: &mut Vec<FieldIssue>,
) -> Vec<ProjectedFile> {
    let default = file_mode(default_mode);
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match entries.get(&item.key) {
                Some(data) => Some(ProjectedFile {
                    path: item.path.clone(),
                    mode: item.mode.map_or(default, |m| file_mode(Some(m))),
                    data: Sensitive(data.clone()),
                }),
                None => {
                    errors.push(FieldIssue::error(
                        path.key("items").index(i).key("key"),
                        format!("{describe} has no key {:?}", item.key),
                    ));
                    None
                }
            })
            .collect(),
        _ => entries
            .iter()
            .map(|(k, v)| ProjectedFile {
                path: k.clone(),
                mode: default,
                data: Sensitive(v.clone()),
            })
            .collect(),
    }
}

fn config_map_entries(
    ctx: &Context<'_>,
    namespace: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    ctx.config_map(namespace, name).map(|cm| {
        cm.data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .chain(cm.binary_data.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect()
    })
}

pub(crate) fn secret_entries(
    ctx: &Context<'_>,
    namespace: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    ctx.secret(namespace, name).map(|secret| {
        secret
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(
                secret
                    .string_data
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
            )
            .collect()
    })
}

/// A ConfigMap or Secret volume, before its object is looked up.
struct FilesSource<'a> {
    kind: &'static str,
    field: &'static str,
    name_field: &'static str,
    name: &'a str,
    optional: bool,
    items: Option<&'a [KeyToPath]>,
    default_mode: Option<i32>,
}

impl<'a> FilesSource<'a> {
    fn config_map(
        name: &'a str,
        optional: Option<bool>,
        items: Option<&'a [KeyToPath]>,
        default_mode: Option<i32>,
    ) -> Self {
        Self {
            kind: "ConfigMap",
            field: "configMap",
            name_field: "name",
            name,
            optional: optional == Some(true),
            items,
            default_mode,
        }
    }

    /// `name_field` is `secretName` in a volume, `name` in a projection.
    fn secret(
        name: &'a str,
        name_field: &'static str,
        optional: Option<bool>,
        items: Option<&'a [KeyToPath]>,
        default_mode: Option<i32>,
    ) -> Self {
        Self {
            kind: "Secret",
            field: "secret",
            name_field,
            name,
            optional: optional == Some(true),
            items,
            default_mode,
        }
    }

    /// `entries` is the object's keys and values, `None` when it does not
    /// exist: an error unless the volume is optional (then it is empty).
    fn resolve(
        &self,
        namespace: &str,
        entries: Option<BTreeMap<String, Vec<u8>>>,
        vpath: &FieldPath,
        errors: &mut Vec<FieldIssue>,
    ) -> Option<VolumeSource> {
        self.files(namespace, entries, vpath, errors)
            .map(|files| VolumeSource::Files {
                files,
                secret: self.is_secret(),
            })
    }

    fn is_secret(&self) -> bool {
        self.kind == "Secret"
    }

    /// The files, or `None` (with an error) for a missing object.
    fn files(
        &self,
        namespace: &str,
        entries: Option<BTreeMap<String, Vec<u8>>>,
        vpath: &FieldPath,
        errors: &mut Vec<FieldIssue>,
    ) -> Option<Vec<ProjectedFile>> {
        let describe = format!("{} {namespace}/{}", self.kind, self.name);
        let path = vpath.key(self.field);
        let entries = match entries {
            Some(e) => e,
            None if self.optional => BTreeMap::new(),
            None => {
                errors.push(FieldIssue::error(
                    path.key(self.name_field),
                    format!("{describe} not found; the pod cannot start without it (set optional: true to start with an empty volume)"),
                ));
                return None;
            }
        };
        let mut item_errors = Vec::new();
        let files = project(
            &entries,
            self.items,
            self.default_mode,
            &describe,
            &path,
            &mut item_errors,
        );
        if !self.optional {
            errors.append(&mut item_errors);
        }
        Some(files)
    }
}

/// Resolves `spec.volumes`. Errors and warnings name fields relative to
/// the source object.
pub fn pod_volumes(
    instance: &PodInstance<'_>,
    ctx: &Context<'_>,
    memory_limit: Option<u64>,
    errors: &mut Vec<FieldIssue>,
) -> Vec<PodVolume> {
    let id = &instance.id;
    let dirs = &ctx.node.volumes;
    let spec_path = FieldPath::parse(instance.spec_path);
    let mut out = Vec::new();
    for (i, v) in instance.spec.volumes.iter().flatten().enumerate() {
        let vpath = spec_path.key("volumes").index(i);
        if let Some(volume) = pod_volume(id, v, &vpath, ctx, memory_limit, dirs, errors) {
            out.push(volume);
        }
    }
    out
}

fn pod_volume(
    id: &PodId,
    v: &Volume,
    vpath: &FieldPath,
    ctx: &Context<'_>,
    memory_limit: Option<u64>,
    dirs: &VolumeDirs,
    errors: &mut Vec<FieldIssue>,
) -> Option<PodVolume> {
    let run = || {
        format!(
            "{}/{}/{}",
            dirs.run_dir.trim_end_matches('/'),
            id.key(),
            v.name
        )
    };
    let (source, host_path) = if let Some(h) = &v.host_path {
        if !dirs
            .host_path_prefixes
            .iter()
            .any(|p| under_prefix(&h.path, p))
        {
            let allowed = if dirs.host_path_prefixes.is_empty() {
                "none".to_string()
            } else {
                dirs.host_path_prefixes.join(", ")
            };
            errors.push(FieldIssue::error(
                vpath.key("hostPath").key("path"),
                format!(
                    "{:?} is not under a prefix this node allows for hostPath volumes (storage.hostPathPrefixes: {allowed})",
                    h.path
                ),
            ));
            return None;
        }
        (
            VolumeSource::HostPath {
                kind: HostPathType::parse(h.type_.as_deref()),
            },
            h.path.clone(),
        )
    } else if let Some(c) = &v.config_map {
        let entries = config_map_entries(ctx, &id.namespace, &c.name);
        let files =
            FilesSource::config_map(&c.name, c.optional, c.items.as_deref(), c.default_mode);
        (files.resolve(&id.namespace, entries, vpath, errors)?, run())
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let entries = secret_entries(ctx, &id.namespace, &name);
        let files = FilesSource::secret(
            &name,
            "secretName",
            s.optional,
            s.items.as_deref(),
            s.default_mode,
        );
        (files.resolve(&id.namespace, entries, vpath, errors)?, run())
    } else if let Some(pr) = &v.projected {
        // The sources' files side by side in one volume, each source with
        // the volume's default mode unless its items say otherwise.
        let mut all: Vec<ProjectedFile> = Vec::new();
        let mut secret = false;
        for (i, source) in pr.sources.iter().flatten().enumerate() {
            let spath = vpath.key("projected").key("sources").index(i);
            let (files, entries) = if let Some(c) = &source.config_map {
                (
                    FilesSource::config_map(
                        &c.name,
                        c.optional,
                        c.items.as_deref(),
                        pr.default_mode,
                    ),
                    config_map_entries(ctx, &id.namespace, &c.name),
                )
            } else if let Some(c) = &source.secret {
                (
                    FilesSource::secret(
                        &c.name,
                        "name",
                        c.optional,
                        c.items.as_deref(),
                        pr.default_mode,
                    ),
                    secret_entries(ctx, &id.namespace, &c.name),
                )
            } else {
                continue;
            };
            let mut got = files.files(&id.namespace, entries, &spath, errors)?;
            secret |= files.is_secret();
            for f in &got {
                if all.iter().any(|a| a.path == f.path) {
                    errors.push(FieldIssue::error(
                        spath.clone(),
                        format!("{} {} projects {:?}, which an earlier source of this volume already projects", files.kind, files.name, f.path),
                    ));
                }
            }
            all.append(&mut got);
        }
        (VolumeSource::Files { files: all, secret }, run())
    } else if let Some(c) = &v.persistent_volume_claim {
        (
            VolumeSource::Claim {
                claim: c.claim_name.clone(),
                read_only: c.read_only == Some(true),
            },
            dirs.claim_dir(&id.namespace, &c.claim_name),
        )
    } else {
        // emptyDir, also when no source is set (the API server's default).
        let e = v.empty_dir.as_ref();
        let memory = e.and_then(|e| e.medium.as_deref()) == Some("Memory");
        let limit = e
            .and_then(|e| e.size_limit.as_ref())
            .and_then(|q| Quantity::parse(&q.0).ok())
            .and_then(|q| q.units().ok());
        if memory {
            // Like the kubelet: the size limit, else the pod's memory limit,
            // else tmpfs' own default (half the node's memory).
            let size = limit.or(memory_limit);
            (
                VolumeSource::EmptyDir {
                    memory: true,
                    size_bytes: size,
                },
                run(),
            )
        } else {
            (
                VolumeSource::EmptyDir {
                    memory: false,
                    size_bytes: limit,
                },
                format!(
                    "{}/{}/{}",
                    dirs.disk_dir.trim_end_matches('/'),
                    id.key(),
                    v.name
                ),
            )
        }
    };
    Some(PodVolume {
        name: v.name.clone(),
        source,
        host_path,
    })
}

/// A container's `volumeMounts` as systemd binds: `(read-write, read-only)`,
/// and the `subPath` binds the agent stages for them.
pub fn container_binds(
    id: &PodId,
    container: &Container,
    volumes: &[PodVolume],
    dirs: &VolumeDirs,
) -> (Vec<BindMount>, Vec<BindMount>, Vec<SubPathBind>) {
    let mut rw = Vec::new();
    let mut ro = Vec::new();
    let mut staged = Vec::new();
    for (n, m) in container.volume_mounts.iter().flatten().enumerate() {
        let Some(volume) = volumes.iter().find(|v| v.name == m.name) else {
            continue;
        };
        let forced_ro = match &volume.source {
            VolumeSource::Files { .. } => true,
            VolumeSource::Claim { read_only, .. } => *read_only,
            _ => false,
        };
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let stage = format!(
                    "{}/{}/{}/{n}",
                    dirs.sub_path_dir.trim_end_matches('/'),
                    id.key(),
                    container.name
                );
                staged.push(SubPathBind {
                    volume: volume.name.clone(),
                    sub_path: sub.trim_end_matches('/').to_string(),
                    stage: stage.clone(),
                    create: !matches!(volume.source, VolumeSource::Files { .. }),
                });
                stage
            }
            None => volume.host_path.clone(),
        };
        let bind = BindMount {
            source,
            destination: m.mount_path.trim_end_matches('/').to_string(),
            recursive: true,
        };
        if forced_ro || m.read_only == Some(true) {
            ro.push(bind);
        } else {
            rw.push(bind);
        }
    }
    (rw, ro, staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_components() {
        assert!(under_prefix("/srv/data", "/srv"));
        assert!(under_prefix("/srv", "/srv/"));
        assert!(!under_prefix("/srvx/data", "/srv"));
        assert!(!under_prefix("/etc", "/srv"));
    }

    fn plan(docs: &str, prefixes: &[&str]) -> crate::NodePlan {
        let catalog = berth_manifest::load_sources(vec![berth_manifest::SourceFile {
            path: "p.yaml".into(),
            text: docs.into(),
        }]);
        let mut node = crate::NodeInfo::new("n", Default::default(), 1 << 30, 2000);
        node.volumes.host_path_prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        // hostPath volumes: only the privileged level allows them.
        node.pod_security = crate::podsecurity::Level::Privileged;
        let images = crate::ImageCatalog::new([crate::ImageConfig {
            reference: "busybox:1.37".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        }]);
        crate::plan_node(&catalog, &node, &images, &Default::default(), "r")
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37\n    volumeMounts:\n    - {name: cfg, mountPath: /etc/app}\n    - {name: host, mountPath: /host, readOnly: true}\n    - {name: cfg, mountPath: /etc/one, subPath: a.conf}\n  volumes:\n  - name: cfg\n    configMap: {name: app, items: [{key: a, path: a.conf, mode: 0600}]}\n  - name: host\n    hostPath: {path: /srv/data, type: Directory}\n";

    #[test]
    fn volumes_become_binds_at_fixed_paths() {
        let docs = format!(
            "{POD}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: app}}\ndata: {{a: x, b: z}}\n"
        );
        let p = plan(&docs, &["/srv"]);
        assert_eq!(p.pods.len(), 1, "{:?}", p.diagnostics);
        let pod = &p.pods[0];
        let files = match &pod.volumes[0].source {
            VolumeSource::Files { files, .. } => files.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            files,
            [ProjectedFile {
                path: "a.conf".into(),
                mode: 0o600,
                data: Sensitive(b"x".to_vec())
            }]
        );
        let unit = &pod.containers[0];
        let props = unit.properties_for_apply();
        let ro = match props.get("BindReadOnlyPaths") {
            Some(crate::PropertyValue::Binds(b)) => crate::units::binds_text(b),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            ro,
            "/run/berth/volumes/default_p/cfg:/etc/app /srv/data:/host /run/berth/subpaths/default_p/c/2:/etc/one"
        );
        assert!(
            props.get("BindPaths").is_none(),
            "ConfigMaps are never writable"
        );
        assert_eq!(unit.sub_paths[0].sub_path, "a.conf");
    }

    #[test]
    fn missing_objects_keys_and_disallowed_host_paths_are_named() {
        let docs = format!(
            "{POD}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: app}}\ndata: {{b: z}}\n"
        );
        let p = plan(&docs, &["/srv/other"]);
        assert!(p.pods.is_empty());
        let found: Vec<String> = p.diagnostics.iter().map(ToString::to_string).collect();
        let text = found.join("\n");
        assert!(
            text.contains(
                "spec.volumes[0].configMap.items[0].key: ConfigMap default/app has no key \"a\""
            ),
            "{text}"
        );
        assert!(
            text.contains("spec.volumes[1].hostPath.path: \"/srv/data\" is not under a prefix this node allows for hostPath volumes (storage.hostPathPrefixes: /srv/other)"),
            "{text}"
        );
        let p = plan(POD, &["/srv"]);
        let text = p
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("ConfigMap default/app not found"), "{text}");
    }

    #[test]
    fn size_limits_are_enforced_so_they_are_not_warnings() {
        let docs = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37\n    resources: {limits: {ephemeral-storage: 64Mi}}\n  volumes:\n  - {name: disk, emptyDir: {sizeLimit: 1Gi}}\n  - {name: mem, emptyDir: {medium: Memory, sizeLimit: 1Gi}}\n";
        let p = plan(docs, &[]);
        assert_eq!(p.pods.len(), 1);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        // The disk one is measured (the memory one is a tmpfs of its size).
        let limits = &p.pods[0].ephemeral;
        assert_eq!(limits.empty_dirs, [("disk".to_string(), 1 << 30)]);
        assert_eq!(limits.containers, [("c".to_string(), 64 << 20)]);
        assert_eq!(limits.pod, Some(64 << 20));
    }

    #[test]
    fn projected_volumes_merge_their_sources() {
        let docs = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37\n    volumeMounts: [{name: all, mountPath: /etc/all}]\n  volumes:\n  - name: all\n    projected:\n      defaultMode: 0440\n      sources:\n      - configMap: {name: app}\n      - secret: {name: tls, items: [{key: key, path: tls/key.pem, mode: 0400}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: app}\ndata: {a: x}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: tls}\nstringData: {key: k}\n";
        let p = plan(docs, &[]);
        assert_eq!(p.pods.len(), 1, "{:?}", p.diagnostics);
        match &p.pods[0].volumes[0].source {
            VolumeSource::Files { files, secret, .. } => {
                let got: Vec<(&str, u32)> =
                    files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
                assert_eq!(got, [("a", 0o440), ("tls/key.pem", 0o400)]);
                assert!(*secret);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secret_bytes_do_not_show_in_debug_output() {
        let f = ProjectedFile {
            path: "token".into(),
            mode: 0o400,
            data: Sensitive(b"hunter2".to_vec()),
        };
        let shown = format!("{f:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<7 bytes>"), "{shown}");
    }
}

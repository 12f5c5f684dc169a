//! Loading a directory of manifests into a [`Catalog`] of validated objects.
//!
//! Each file is read, split into documents, parsed, decoded into Kubernetes'
//! own types with unknown fields rejected, and checked. A bad document or
//! object is rejected with diagnostics; the rest of the tree is still loaded.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::crd::{self, CrdRegistry, Lookup};
use crate::diag::{Diagnostic, FieldIssue, FieldPath, ObjectRef, PathSegment, Severity, SourceRef};
use crate::names;
use crate::nodeimage;
use crate::objects::{BuiltinKind, CustomObject, Object, group_of};
use crate::supported;
use crate::validate;
use crate::yaml::{self, Chunk};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};

/// Namespaces that exist on every Kubernetes cluster without being declared.
pub const BUILTIN_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Files larger than this are refused unread. Kubernetes' own limit for one
    /// object is about 1.5 MiB; a manifest file holding many is allowed more.
    pub max_file_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read manifest directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is neither a directory nor a YAML file")]
    NotManifests { path: PathBuf },
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Relative to the loaded directory.
    pub path: PathBuf,
    pub text: String,
}

/// Where an object came from: a file, a document in it, and a path inside the
/// document (non-root for items of a `List`).
#[derive(Debug, Clone)]
pub struct ObjectSource {
    pub file: usize,
    pub chunk: Chunk,
    pub prefix: FieldPath,
    /// The line the object starts on, when known without parsing again.
    pub line: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct LoadedObject {
    pub id: ObjectRef,
    pub source: ObjectSource,
    pub object: Object,
}

/// An object (or a document that could not become one) that was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub source: SourceRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
}

/// Everything loaded from one tree of manifests.
#[derive(Debug, Default)]
pub struct Catalog {
    pub files: Vec<SourceFile>,
    pub objects: Vec<LoadedObject>,
    pub rejected: Vec<Rejected>,
    pub diagnostics: Vec<Diagnostic>,
    /// A digest of every file's path and content: names the tree when no Git
    /// revision is given.
    pub content_digest: String,
    /// ConfigMaps and Secrets by (kind, namespace, name), made on first use.
    by_name: std::sync::OnceLock<std::collections::HashMap<(String, String, String), usize>>,
}

impl Catalog {
    /// The ConfigMap or Secret `kind` named `name` in `namespace`.
    pub fn config_object(&self, kind: &str, namespace: &str, name: &str) -> Option<&LoadedObject> {
        let index = self.by_name.get_or_init(|| {
            self.objects
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o.object, Object::ConfigMap(_) | Object::Secret(_)))
                .map(|(i, o)| {
                    (
                        (
                            o.id.kind.clone(),
                            o.id.namespace.clone().unwrap_or_default(),
                            o.id.name.clone(),
                        ),
                        i,
                    )
                })
                .collect()
        });
        index
            .get(&(kind.to_string(), namespace.to_string(), name.to_string()))
            .map(|i| &self.objects[*i])
    }

    pub fn source_ref(&self, source: &ObjectSource, path: &FieldPath) -> SourceRef {
        let file = &self.files[source.file];
        let line = if path.is_root() && source.line.is_some() {
            source.line
        } else {
            let mut full = source.prefix.clone();
            full.0.extend(path.0.iter().cloned());
            yaml::locate(&file.text, &source.chunk, &full).or(source.line)
        };
        SourceRef {
            file: file.path.clone(),
            line,
        }
    }

    /// Turns an issue found on a loaded object (by the loader or by a later
    /// stage such as the planner) into a diagnostic with file and line.
    pub fn diagnostic(&self, object: &LoadedObject, issue: &FieldIssue) -> Diagnostic {
        Diagnostic {
            severity: issue.severity,
            source: self.source_ref(&object.source, &issue.path),
            object: Some(object.id.clone()),
            field: (!issue.path.is_root()).then(|| issue.path.to_string()),
            message: issue.message.clone(),
        }
    }

    /// The same, but at the object's own line: for issues a stage reports
    /// in bulk (a full node refusing thousands of pods), where finding the
    /// field's line would parse each object's text again.
    pub fn diagnostic_at_object(&self, object: &LoadedObject, issue: &FieldIssue) -> Diagnostic {
        Diagnostic {
            severity: issue.severity,
            source: self.source_ref(&object.source, &FieldPath::root()),
            object: Some(object.id.clone()),
            field: (!issue.path.is_root()).then(|| issue.path.to_string()),
            message: issue.message.clone(),
        }
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count()
    }

    fn reject(&mut self, object: LoadedObject, issues: &[FieldIssue]) {
        for issue in issues {
            let d = self.diagnostic(&object, issue);
            self.diagnostics.push(d);
        }
        let source = self.source_ref(&object.source, &FieldPath::root());
        self.rejected.push(Rejected {
            source,
            object: Some(object.id),
        });
    }
}

/// Lists the `*.yaml` and `*.yml` files under `root` (or `root` itself when
/// it is a file), sorted, skipping hidden files and directories such as `.git`.
pub fn discover(root: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta = fs::metadata(root).map_err(|source| LoadError::ReadDir {
        path: root.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        return if is_yaml(root) {
            Ok(vec![root.to_path_buf()])
        } else {
            Err(LoadError::NotManifests {
                path: root.to_path_buf(),
            })
        };
    }
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|source| LoadError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| LoadError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // file_type does not follow symlinks: a link loop cannot trap the walk.
            let ft = entry.file_type().map_err(|source| LoadError::ReadDir {
                path: path.clone(),
                source,
            })?;
            if ft.is_dir() {
                stack.push(path);
            } else if is_yaml(&path) && (ft.is_file() || path.is_file()) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Loads every manifest under `root`.
pub fn load_dir(root: &Path, options: &LoadOptions) -> Result<Catalog, LoadError> {
    let paths = discover(root)?;
    let base = if root.is_file() {
        root.parent().unwrap_or(Path::new(""))
    } else {
        root
    };
    let mut inputs = Vec::with_capacity(paths.len());
    let mut early = Vec::new();
    for path in paths {
        let rel = path
            .strip_prefix(base)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.clone());
        let read = fs::metadata(&path)
            .map(|m| m.len())
            .and_then(|size| accept_file(&rel, size, options, || fs::read(&path)));
        match read {
            Ok(Ok(file)) => inputs.push(file),
            Ok(Err(refusal)) => early.push(refusal),
            Err(e) => early.push(refusal(&rel, format!("cannot read: {e}"))),
        }
    }
    Ok(load_with_refusals(inputs, early))
}

fn refusal(rel: &Path, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        source: SourceRef {
            file: rel.to_path_buf(),
            line: None,
        },
        object: None,
        field: None,
        message,
    }
}

/// One manifest file as the loader takes it: refused unread when larger
/// than the limit, refused when not UTF-8. The same rule for a directory
/// (`berth validate`) and a commit's tree (the node), so a node reads
/// exactly what `berth validate` reads. The outer error is `read`'s own.
pub fn accept_file(
    rel: &Path,
    size: u64,
    options: &LoadOptions,
    read: impl FnOnce() -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Result<SourceFile, Diagnostic>> {
    if size > options.max_file_bytes {
        return Ok(Err(refusal(
            rel,
            format!(
                "file is {size} bytes, larger than the {}-byte limit for one manifest file; split it",
                options.max_file_bytes
            ),
        )));
    }
    Ok(match String::from_utf8(read()?) {
        Ok(text) => Ok(SourceFile {
            path: rel.to_path_buf(),
            text,
        }),
        Err(e) => Err(refusal(
            rel,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )),
    })
}

/// Loads files already in memory, with the files refused before reading
/// (each an error that rejects the tree, first in the diagnostics).
pub fn load_with_refusals(inputs: Vec<SourceFile>, refused: Vec<Diagnostic>) -> Catalog {
    let mut catalog = load_sources(inputs);
    for d in refused {
        catalog.rejected.push(Rejected {
            source: d.source.clone(),
            object: None,
        });
        catalog.diagnostics.insert(0, d);
    }
    catalog
}

/// What one file yields before the cross-file checks.
#[derive(Debug, Default)]
struct FileOutcome {
    /// With their warnings, if any.
    accepted: Vec<(LoadedObject, Vec<FieldIssue>)>,
    rejected: Vec<(LoadedObject, Vec<FieldIssue>)>,
    broken: Vec<Diagnostic>,
}

/// Loads manifests already in memory (`path` is only used in diagnostics).
pub fn load_sources(files: Vec<SourceFile>) -> Catalog {
    let mut catalog = Catalog {
        content_digest: digest(&files),
        files,
        ..Catalog::default()
    };
    let outcomes = load_files_parallel(&catalog.files);
    catalog
        .objects
        .reserve_exact(outcomes.iter().map(|o| o.accepted.len()).sum());
    let mut pending_custom = Vec::new();
    for (file, outcome) in outcomes.into_iter().enumerate() {
        for mut d in outcome.broken {
            d.source.file = catalog.files[file].path.clone();
            catalog.rejected.push(Rejected {
                source: d.source.clone(),
                object: None,
            });
            catalog.diagnostics.push(d);
        }
        for (object, issues) in outcome.rejected {
            catalog.reject(object, &issues);
        }
        for (object, warnings) in outcome.accepted {
            for issue in &warnings {
                let d = catalog.diagnostic(&object, issue);
                catalog.diagnostics.push(d);
            }
            if matches!(object.object, Object::Custom(_)) {
                pending_custom.push(object);
            } else {
                catalog.objects.push(object);
            }
        }
    }
    check_custom_objects(&mut catalog, pending_custom);
    check_duplicates(&mut catalog);
    check_namespaces(&mut catalog);
    catalog
}

fn digest(files: &[SourceFile]) -> String {
    let mut hasher = Sha256::new();
    let mut order: Vec<&SourceFile> = files.iter().collect();
    order.sort_by(|a, b| a.path.cmp(&b.path));
    for f in order {
        hasher.update(f.path.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update((f.text.len() as u64).to_le_bytes());
        hasher.update(f.text.as_bytes());
    }
    let out = hasher.finalize();
    out.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn load_files_parallel(files: &[SourceFile]) -> Vec<FileOutcome> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    if workers <= 1 {
        return files
            .iter()
            .enumerate()
            .map(|(i, f)| load_file(i, &f.text))
            .collect();
    }
    let mut results: Vec<Option<FileOutcome>> = (0..files.len()).map(|_| None).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= files.len() {
                break;
            }
            mine.push((i, load_file(i, &files[i].text)));
        }
        mine
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..workers).map(|_| scope.spawn(work)).collect();
        // This thread works too: one thread (and one allocator arena, whose
        // freed memory only its threads reuse) fewer.
        for (i, outcome) in work() {
            results[i] = Some(outcome);
        }
        for handle in handles {
            // A worker only panics on a bug; surface it rather than lose files.
            match handle.join() {
                Ok(done) => {
                    for (i, outcome) in done {
                        results[i] = Some(outcome);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    results.into_iter().flatten().collect()
}

fn load_file(file: usize, text: &str) -> FileOutcome {
    let mut out = FileOutcome::default();
    for chunk in yaml::split_documents(text) {
        match yaml::parse_chunk(text, &chunk) {
            Err(e) => out.broken.push(Diagnostic {
                severity: Severity::Error,
                source: SourceRef {
                    file: PathBuf::new(),
                    line: e.line.or(Some(chunk.first_line)),
                },
                object: None,
                field: None,
                message: format!(
                    "invalid YAML in document {}: {}",
                    chunk.index + 1,
                    e.message
                ),
            }),
            Ok(None) => {}
            Ok(Some(value)) => {
                let source = ObjectSource {
                    file,
                    chunk,
                    prefix: FieldPath::root(),
                    line: first_content_line(text, &chunk),
                };
                load_value(value, source, &mut out);
            }
        }
    }
    out
}

/// The loader fills in the file path of file-level diagnostics after the
/// parallel phase, because workers only know the file's index.
fn first_content_line(text: &str, chunk: &Chunk) -> Option<u32> {
    text[chunk.start..chunk.end]
        .lines()
        .position(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !t.starts_with("---") && !t.starts_with('%')
        })
        .map(|i| chunk.first_line + i as u32)
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn load_value(value: Value, source: ObjectSource, out: &mut FileOutcome) {
    let placeholder = |kind: &str, name: &str| ObjectRef {
        group: String::new(),
        kind: kind.into(),
        namespace: None,
        name: name.into(),
    };
    let Value::Object(_) = &value else {
        let object = LoadedObject {
            id: placeholder("<document>", "<none>"),
            source,
            object: Object::Custom(Box::default()),
        };
        out.rejected.push((
            object,
            vec![FieldIssue::error(
                FieldPath::root(),
                "not a Kubernetes object: expected a mapping with apiVersion, kind and metadata",
            )],
        ));
        return;
    };
    let api_version = str_at(&value, "apiVersion").unwrap_or("").to_string();
    let kind = str_at(&value, "kind").unwrap_or("").to_string();
    if is_list(&api_version, &kind, &value) {
        if let Some(Value::Array(items)) = value.get("items") {
            for (i, item) in items.iter().enumerate() {
                let mut s = source.clone();
                s.prefix = s.prefix.key("items").index(i);
                s.line = None;
                load_value(item.clone(), s, out);
            }
        }
        return;
    }
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let builtin = BuiltinKind::find(&api_version, &kind);
    let node_image = api_version == nodeimage::API_VERSION && kind == nodeimage::KIND;
    let namespaced = !node_image && builtin.is_none_or(BuiltinKind::namespaced);
    let declared_ns = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = ObjectRef {
        group: group_of(&api_version).to_string(),
        kind: if kind.is_empty() {
            "<no kind>".into()
        } else {
            kind.clone()
        },
        namespace: namespaced.then(|| declared_ns.clone().unwrap_or_else(|| "default".into())),
        name: if name.is_empty() {
            "<no name>".into()
        } else {
            name.clone()
        },
    };
    let mut issues = Vec::new();
    let root = FieldPath::root();
    if api_version.is_empty() {
        issues.push(FieldIssue::error(root.key("apiVersion"), "required"));
    }
    if kind.is_empty() {
        issues.push(FieldIssue::error(root.key("kind"), "required"));
    }
    if name.is_empty() {
        issues.push(FieldIssue::error(
            root.key("metadata").key("name"),
            "required: Berth needs a name for every object",
        ));
    }
    if !issues.is_empty() {
        let object = LoadedObject {
            id,
            source,
            object: Object::Custom(Box::default()),
        };
        out.rejected.push((object, issues));
        return;
    }
    let name_rule = match builtin {
        Some(BuiltinKind::Namespace) => names::dns1123_label(&name),
        Some(BuiltinKind::Service) => names::dns1035_label(&name),
        _ => names::dns1123_subdomain(&name),
    };
    if let Err(e) = name_rule {
        issues.push(FieldIssue::error(root.key("metadata").key("name"), e));
    }
    match (&declared_ns, namespaced) {
        (Some(ns), true) => {
            if let Err(e) = names::dns1123_label(ns) {
                issues.push(FieldIssue::error(root.key("metadata").key("namespace"), e));
            }
        }
        (Some(_), false) => issues.push(FieldIssue::warning(
            root.key("metadata").key("namespace"),
            format!("{kind} is cluster-scoped; the namespace is ignored"),
        )),
        _ => {}
    }
    let object = match builtin {
        Some(b) => decode_builtin(b, value, &mut issues),
        None if node_image => decode(value, &mut issues).map(|n: nodeimage::NodeImage| {
            nodeimage::validate(&n, &mut issues);
            Object::NodeImage(Box::new(n))
        }),
        None if is_builtin_group(&api_version, &kind) => {
            let wanted = BuiltinKind::ALL
                .iter()
                .find(|b| b.kind() == kind)
                .map(|b| b.api_version());
            let hint = wanted
                .map(|v| format!(": use apiVersion {v}"))
                .unwrap_or_default();
            issues.push(FieldIssue::error(
                root.key("kind"),
                format!("{api_version} {kind} is not a kind Berth supports{hint}"),
            ));
            None
        }
        // Checked against the CustomResourceDefinitions once every file is loaded.
        None => Some(Object::Custom(Box::new(CustomObject {
            api_version,
            kind,
            value,
        }))),
    };
    let object = LoadedObject {
        id,
        source,
        object: object.unwrap_or_else(|| Object::Custom(Box::default())),
    };
    if issues.iter().any(|i| i.severity == Severity::Error) {
        out.rejected.push((object, issues));
    } else {
        out.accepted.push((object, issues));
    }
}

fn is_list(api_version: &str, kind: &str, value: &Value) -> bool {
    (kind == "List" && api_version == "v1")
        || (kind.ends_with("List") && value.get("items").is_some_and(Value::is_array))
}

/// Groups and versions that belong to Kubernetes itself: a kind there that
/// Berth does not know is an error, never a custom object.
fn is_builtin_group(api_version: &str, kind: &str) -> bool {
    let group = group_of(api_version);
    group.is_empty()
        || group.ends_with(".k8s.io")
        || ["apps", "batch", "autoscaling", "policy", "extensions"].contains(&group)
        || BuiltinKind::ALL
            .iter()
            .any(|b| b.kind() == kind && group_of(b.api_version()) == group)
}

fn decode_builtin(kind: BuiltinKind, value: Value, issues: &mut Vec<FieldIssue>) -> Option<Object> {
    // Walk the document before the decode consumes it (moving its strings
    // into the typed object instead of copying them).
    let unsupported = supported::unsupported_fields(kind, &value);
    let object = match kind {
        BuiltinKind::Pod => decode(value, issues).map(|p: Pod| {
            validate::metadata(&p.metadata, issues);
            match &p.spec {
                Some(spec) => validate::pod_spec(spec, &FieldPath::root().key("spec"), issues),
                None => issues.push(FieldIssue::error(FieldPath::root().key("spec"), "required")),
            }
            Object::Pod(Box::new(p.into()))
        }),
        BuiltinKind::Deployment => decode(value, issues).map(|d: Deployment| {
            validate::metadata(&d.metadata, issues);
            validate::deployment(&d, issues);
            Object::Deployment(Box::new(d.into()))
        }),
        // Checked as Kubernetes types, then kept as Berth's own.
        BuiltinKind::Service => decode(value, issues).map(|s: Service| {
            validate::metadata(&s.metadata, issues);
            validate::service(&s, issues);
            Object::Service(Box::new(s.into()))
        }),
        BuiltinKind::ConfigMap => decode(value, issues).map(|c: ConfigMap| {
            validate::metadata(&c.metadata, issues);
            validate::config_map(&c, issues);
            Object::ConfigMap(Box::new(c.into()))
        }),
        BuiltinKind::Secret => decode(value, issues).map(|s: Secret| {
            validate::metadata(&s.metadata, issues);
            validate::secret(&s, issues);
            Object::Secret(Box::new(s.into()))
        }),
        BuiltinKind::Namespace => decode(value, issues).map(|n| Object::Namespace(Box::new(n))),
        BuiltinKind::PersistentVolume => {
            decode(value, issues).map(|p| Object::PersistentVolume(Box::new(p)))
        }
        BuiltinKind::PersistentVolumeClaim => {
            decode(value, issues).map(|p| Object::PersistentVolumeClaim(Box::new(p)))
        }
        BuiltinKind::StorageClass => {
            decode(value, issues).map(|s| Object::StorageClass(Box::new(s)))
        }
        BuiltinKind::CustomResourceDefinition => {
            decode(value, issues).map(|c| Object::CustomResourceDefinition(Box::new(c)))
        }
    }?;
    match &object {
        // Validated above, before conversion.
        Object::Pod(_)
        | Object::Deployment(_)
        | Object::Service(_)
        | Object::ConfigMap(_)
        | Object::Secret(_) => {}
        Object::Namespace(n) => validate::metadata(&n.metadata, issues),
        Object::PersistentVolume(p) => {
            validate::metadata(&p.metadata, issues);
            validate::persistent_volume(p, issues);
        }
        Object::PersistentVolumeClaim(p) => {
            validate::metadata(&p.metadata, issues);
            validate::persistent_volume_claim(p, issues);
        }
        Object::StorageClass(s) => {
            validate::metadata(&s.metadata, issues);
            validate::storage_class(s, issues);
        }
        Object::CustomResourceDefinition(c) => {
            validate::metadata(&c.metadata, issues);
            crd::validate_definition(c, issues);
        }
        Object::Custom(_) | Object::NodeImage(_) => {}
    }
    issues.extend(unsupported);
    Some(object)
}

/// Decodes into a Kubernetes type; unknown fields and wrong types become
/// errors that name their field.
fn decode<T: DeserializeOwned>(value: Value, issues: &mut Vec<FieldIssue>) -> Option<T> {
    let mut unknown = Vec::new();
    let result = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
        let de = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize::<_, T>(de)
    };
    for path in unknown {
        let field = match path.0.last() {
            Some(PathSegment::Key(k)) => k.clone(),
            _ => path.to_string(),
        };
        issues.push(FieldIssue::error(path, format!("unknown field {field:?}")));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let mut path = FieldPath::root();
            for segment in e.path().iter() {
                path = match segment {
                    serde_path_to_error::Segment::Seq { index } => path.index(*index),
                    serde_path_to_error::Segment::Map { key } => path.key(key.clone()),
                    serde_path_to_error::Segment::Enum { variant } => path.key(variant.clone()),
                    serde_path_to_error::Segment::Unknown => path,
                };
            }
            issues.push(FieldIssue::error(path, e.into_inner().to_string()));
            None
        }
    }
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> FieldPath {
    use serde_ignored::Path as P;
    match path {
        P::Root => FieldPath::root(),
        P::Seq { parent, index } => ignored_path(parent).index(*index),
        P::Map { parent, key } => ignored_path(parent).key(key.clone()),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

fn check_custom_objects(catalog: &mut Catalog, pending: Vec<LoadedObject>) {
    let mut registry = CrdRegistry::default();
    for o in &catalog.objects {
        if let Object::CustomResourceDefinition(c) = &o.object {
            registry.insert(c);
        }
    }
    for mut object in pending {
        let Object::Custom(custom) = &mut object.object else {
            continue;
        };
        let mut issues = Vec::new();
        match registry.lookup(&custom.api_version, &custom.kind) {
            Lookup::UnknownKind => issues.push(FieldIssue::error(
                FieldPath::root().key("kind"),
                format!(
                    "unknown kind {:?} in {:?}: no CustomResourceDefinition in this tree declares it (kubectl: no matches for kind)",
                    custom.kind, custom.api_version
                ),
            )),
            Lookup::UnservedVersion { crd, served } => issues.push(FieldIssue::error(
                FieldPath::root().key("apiVersion"),
                format!("CustomResourceDefinition {crd} does not serve {:?}; served versions: {}", custom.api_version, served.join(", ")),
            )),
            Lookup::Found { namespaced, schema } => {
                if !namespaced {
                    object.id.namespace = None;
                }
                if let Some(schema) = schema {
                    crd::validate_object(schema, &mut custom.value, &mut issues);
                }
            }
        }
        if issues.iter().any(|i| i.severity == Severity::Error) {
            catalog.reject(object, &issues);
        } else {
            catalog.objects.push(object);
        }
    }
}

fn check_duplicates(catalog: &mut Catalog) {
    // Hashed by reference: no identity is copied, and 30,000 objects are
    // grouped in one pass.
    let mut by_id: std::collections::HashMap<&ObjectRef, Vec<usize>> =
        std::collections::HashMap::with_capacity(catalog.objects.len());
    for (i, o) in catalog.objects.iter().enumerate() {
        by_id.entry(&o.id).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = by_id.into_values().filter(|v| v.len() > 1).collect();
    groups.sort_by(|a, b| catalog.objects[a[0]].id.cmp(&catalog.objects[b[0]].id));
    let mut drop = BTreeSet::new();
    for indices in &groups {
        let places: Vec<String> = indices
            .iter()
            .map(|&i| {
                catalog
                    .source_ref(&catalog.objects[i].source, &FieldPath::root())
                    .to_string()
            })
            .collect();
        for &i in indices {
            let issue = FieldIssue::error(
                FieldPath::root().key("metadata").key("name"),
                format!(
                    "declared more than once (at {}): every copy is rejected, since Berth cannot tell which one is meant",
                    places.join(", ")
                ),
            );
            let d = catalog.diagnostic(&catalog.objects[i], &issue);
            catalog.diagnostics.push(d);
            drop.insert(i);
        }
    }
    remove_rejected(catalog, &drop);
}

fn check_namespaces(catalog: &mut Catalog) {
    let declared: BTreeSet<String> = catalog
        .objects
        .iter()
        .filter(|o| matches!(o.object, Object::Namespace(_)))
        .map(|o| o.id.name.clone())
        .chain(BUILTIN_NAMESPACES.iter().map(|s| s.to_string()))
        .collect();
    let mut drop = BTreeSet::new();
    for (i, o) in catalog.objects.iter().enumerate() {
        if let Some(ns) = &o.id.namespace
            && !declared.contains(ns)
        {
            let issue = FieldIssue::error(
                FieldPath::root().key("metadata").key("namespace"),
                format!("namespace {ns:?} is not declared: add a Namespace object named {ns:?}"),
            );
            let d = catalog.diagnostic(o, &issue);
            catalog.diagnostics.push(d);
            drop.insert(i);
        }
    }
    remove_rejected(catalog, &drop);
}

fn remove_rejected(catalog: &mut Catalog, drop: &BTreeSet<usize>) {
    if drop.is_empty() {
        return;
    }
    let objects = std::mem::take(&mut catalog.objects);
    for (i, o) in objects.into_iter().enumerate() {
        if drop.contains(&i) {
            let source = catalog.source_ref(&o.source, &FieldPath::root());
            catalog.rejected.push(Rejected {
                source,
                object: Some(o.id),
            });
        } else {
            catalog.objects.push(o);
        }
    }
}

//! Diagnostics: what the loader tells a user about their manifests.
//!
//! Every diagnostic names the file, the line when the parser can tell it, the
//! object (`kind/namespace/name`) and the field, so that a user can jump to
//! the exact place from a CI log.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// The identity of an object: Kubernetes' group, kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    /// `apps`, `storage.k8s.io`, ... and the empty string for the core group.
    pub group: String,
    pub kind: String,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// Where in the source a diagnostic points.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SourceRef {
    /// Relative to the directory that was loaded.
    pub file: PathBuf,
    /// 1-based; `None` when neither parser nor locator could tell.
    pub line: Option<u32>,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}", self.file.display(), line),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub source: SourceRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// A field path such as `spec.containers[0].resources.limits.cpu`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {sev}:", self.source)?;
        if let Some(object) = &self.object {
            write!(f, " {object}:")?;
        }
        if let Some(field) = &self.field {
            write!(f, " {field}:")?;
        }
        write!(f, " {}", self.message)
    }
}

/// A problem found while checking one object, before it is placed in a file.
/// The loader adds the file, the line and the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldIssue {
    pub severity: Severity,
    /// Path from the object's root, as segments, so the loader can find its line.
    pub path: FieldPath,
    pub message: String,
}

impl FieldIssue {
    pub fn error(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            path,
            message: message.into(),
        }
    }
    pub fn warning(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            path,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathSegment {
    Key(String),
    Index(usize),
}

/// A path into a YAML/JSON document: `spec.containers[0].image`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(pub Vec<PathSegment>);

impl FieldPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Key(key.into()));
        Self(segments)
    }
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Index(index));
        Self(segments)
    }
    /// Parses `spec.containers[0].image` (keys with dots cannot be expressed; the
    /// callers that need them build paths with [`FieldPath::key`]).
    pub fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                segments.push(PathSegment::Key(rest[..open].to_string()));
                rest = &rest[open..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    let Some(close) = stripped.find(']') else {
                        break;
                    };
                    if let Ok(i) = stripped[..close].parse() {
                        segments.push(PathSegment::Index(i));
                    }
                    rest = &stripped[close + 1..];
                }
            } else {
                segments.push(PathSegment::Key(rest.to_string()));
            }
        }
        Self(segments)
    }
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for segment in &self.0 {
            match segment {
                PathSegment::Key(k) => {
                    let plain = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if plain {
                        if !first {
                            f.write_str(".")?;
                        }
                        f.write_str(k)?;
                    } else {
                        write!(f, "[{k:?}]")?;
                    }
                }
                PathSegment::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// An enumerated field: `value` must be one of `allowed`, as Kubernetes
/// reports it ("unsupported value "X": must be A, B or C").
pub fn one_of(value: &str, allowed: &[&str], path: FieldPath, issues: &mut Vec<FieldIssue>) {
    if allowed.contains(&value) {
        return;
    }
    let list = match allowed.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    issues.push(FieldIssue::error(
        path,
        format!("unsupported value {value:?}: must be {list}"),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_print_like_kubectl_and_parse_back() {
        let p = FieldPath::root()
            .key("spec")
            .key("containers")
            .index(0)
            .key("image");
        assert_eq!(p.to_string(), "spec.containers[0].image");
        assert_eq!(FieldPath::parse("spec.containers[0].image"), p);
        let labels = FieldPath::root()
            .key("metadata")
            .key("labels")
            .key("app.kubernetes.io/name");
        assert_eq!(
            labels.to_string(),
            "metadata.labels[\"app.kubernetes.io/name\"]"
        );
    }
}

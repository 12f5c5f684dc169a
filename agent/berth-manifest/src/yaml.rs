//! The one place that knows which YAML crate Berth uses.
//!
//! Documents in the common subset of manifests are read by
//! [`fastyaml`](crate::fastyaml) (block structure, single-line values),
//! everything else and every error by `serde-saphyr`.
//!
//! `serde-saphyr` is pure Rust, rejects duplicate keys, and bounds aliases,
//! nesting and event counts, so a hostile manifest cannot exhaust the agent.
//! Everything else in Berth sees `serde_json::Value` documents and line numbers.
//!
//! A file is split into documents at `---`/`...` marker lines before parsing.
//! YAML forbids those markers at the start of a line inside any content, so
//! the split is exact, and it lets one malformed document be rejected while
//! its neighbours in the same file are still planned.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Budget, Options, Spanned};

use crate::diag::{FieldPath, PathSegment};

/// Per-document limits. Kubernetes' own limit for one object is about 1.5 MiB
/// (etcd), so these are generous for real manifests and small for attacks.
fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_events = 500_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_nodes = 200_000;
    budget.max_depth = 64;
    budget.max_documents = 1;
    let mut options = Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    // Kubernetes reads YAML 1.1, where `defaultMode: 0644` is octal (420);
    // YAML 1.2 would read 644 (a mode of 01204).
    options.legacy_octal_numbers = true;
    options
}

/// One `---`-separated part of a file, before parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// 0-based position among the file's non-empty documents.
    pub index: usize,
    /// 1-based line of the chunk's first line in the file.
    pub first_line: u32,
    /// Byte range in the file's text.
    pub start: usize,
    pub end: usize,
}

/// Splits a file into document chunks at lines that start with `---` or `...`.
/// Chunks holding nothing but blank lines and comments are dropped.
pub fn split_documents(text: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut start = 0usize;
    let mut first_line = 1u32;
    let mut offset = 0usize;
    let push = |start: usize, end: usize, first_line: u32, chunks: &mut Vec<Chunk>| {
        let body = &text[start..end];
        let has_content = body.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !is_marker(l) && !t.starts_with('%')
        }) || body.lines().any(|l| is_marker(l) && marker_has_content(l));
        if has_content {
            let index = chunks.len();
            chunks.push(Chunk {
                index,
                first_line,
                start,
                end,
            });
        }
    };
    for (line_no, line) in (1u32..).zip(text.split_inclusive('\n')) {
        if is_marker(line) && offset > start {
            push(start, offset, first_line, &mut chunks);
            start = offset;
            first_line = line_no;
        }
        if line.starts_with("...") && is_marker(line) {
            // `...` ends a document; what follows starts the next one.
            push(start, offset + line.len(), first_line, &mut chunks);
            start = offset + line.len();
            first_line = line_no + 1;
        }
        offset += line.len();
    }
    if offset > start {
        push(start, offset, first_line, &mut chunks);
    }
    chunks
}

fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    for marker in ["---", "..."] {
        if let Some(rest) = line.strip_prefix(marker) {
            return rest.is_empty() || rest.starts_with([' ', '\t']);
        }
    }
    false
}

fn marker_has_content(line: &str) -> bool {
    let rest = line.trim_end_matches(['\n', '\r']);
    let rest = rest.get(3..).unwrap_or("").trim();
    !rest.is_empty() && !rest.starts_with('#')
}

/// A YAML syntax or limit error, with the file line when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    pub line: Option<u32>,
    pub message: String,
}

/// Parses one chunk into a JSON value. `Ok(None)` for a document that is
/// empty or `null`.
pub fn parse_chunk(text: &str, chunk: &Chunk) -> Result<Option<serde_json::Value>, YamlError> {
    let body = &text[chunk.start..chunk.end];
    if let Some(value) = crate::fastyaml::parse(body) {
        return Ok(Some(value));
    }
    match general(body) {
        Ok(serde_json::Value::Null) => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(err) => {
            let line = err
                .location()
                .map(|l| l.line() as u32)
                .filter(|&l| l > 0)
                .map(|l| l + chunk.first_line - 1);
            Err(YamlError {
                line,
                message: clean_message(&err.to_string()),
            })
        }
    }
}

/// The general parser, with Berth's limits.
pub(crate) fn general(body: &str) -> Result<serde_json::Value, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options::<serde_json::Value>(body, options())
}

/// The crate's messages end with its own position suffix; Berth prints the
/// file line itself, so keep only the first line of the message.
fn clean_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    let first = match first.rfind(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    first.trim_end_matches(':').to_string()
}

/// Finds the file line of `path` inside a chunk: of the deepest existing
/// part of the path, so a missing field points at its parent.
/// Only called when something is reported, so it parses the chunk again.
pub fn locate(text: &str, chunk: &Chunk, path: &FieldPath) -> Option<u32> {
    let body = &text[chunk.start..chunk.end];
    let root: Spanned<LocNode> = serde_saphyr::from_str_with_options(body, options()).ok()?;
    let mut line = root.referenced.line() as u32;
    let mut node = &root.value;
    for segment in &path.0 {
        let next = match (segment, node) {
            (PathSegment::Key(k), LocNode::Map(entries)) => entries
                .iter()
                .find(|(key, _)| &key.value == k)
                .map(|(key, value)| (key.referenced.line() as u32, &value.value)),
            (PathSegment::Index(i), LocNode::Seq(items)) => items
                .get(*i)
                .map(|item| (item.referenced.line() as u32, &item.value)),
            _ => None,
        };
        match next {
            Some((l, n)) => {
                line = l;
                node = n;
            }
            None => break,
        }
    }
    (line > 0).then(|| line + chunk.first_line - 1)
}

/// The byte range in the file of the scalar at `path`, when every part of
/// the path exists and it ends on a scalar: what a tool that edits one value
/// in place (the drift branch's adopting change) replaces, leaving the
/// file's comments and layout alone.
pub fn scalar_range(text: &str, chunk: &Chunk, path: &FieldPath) -> Option<std::ops::Range<usize>> {
    let body = &text[chunk.start..chunk.end];
    let root: Spanned<LocNode> = serde_saphyr::from_str_with_options(body, options()).ok()?;
    let mut node = &root;
    for segment in &path.0 {
        node = match (segment, &node.value) {
            (PathSegment::Key(k), LocNode::Map(entries)) => entries
                .iter()
                .find(|(key, _)| &key.value == k)
                .map(|(_, v)| v)?,
            (PathSegment::Index(i), LocNode::Seq(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    if !matches!(node.value, LocNode::Leaf) {
        return None;
    }
    let span = node.referenced.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    (len > 0 && start + len <= body.len()).then(|| chunk.start + start..chunk.start + start + len)
}

/// A document tree that remembers where each node is, for [`locate`].
#[derive(Debug)]
enum LocNode {
    Leaf,
    Seq(Vec<Spanned<LocNode>>),
    Map(Vec<(Spanned<String>, Spanned<LocNode>)>),
}

impl<'de> Deserialize<'de> for LocNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LocVisitor)
    }
}

struct LocVisitor;

impl<'de> Visitor<'de> for LocVisitor {
    type Value = LocNode;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_unit<E: de::Error>(self) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_none<E: de::Error>(self) -> Result<LocNode, E> {
        Ok(LocNode::Leaf)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<LocNode, D::Error> {
        LocNode::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LocNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(LocNode::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LocNode, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<serde_json::Value>>()? {
            let text = match &key.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let value = map.next_value()?;
            entries.push((
                Spanned {
                    value: text,
                    referenced: key.referenced,
                    defined: key.defined,
                },
                value,
            ));
        }
        Ok(LocNode::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_markers_and_keep_file_lines() {
        let text = "# leading comment\n---\na: 1\n---\n# only a comment\n---\nb:\n  c: 2\n...\n";
        let chunks = split_documents(text);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].first_line, 2);
        assert_eq!(chunks[1].first_line, 6);
        let second = parse_chunk(text, &chunks[1])
            .expect("parses")
            .expect("not empty");
        assert_eq!(second["b"]["c"], 2);
        assert_eq!(locate(text, &chunks[1], &FieldPath::parse("b.c")), Some(8));
        assert_eq!(
            locate(text, &chunks[1], &FieldPath::parse("b.missing")),
            Some(7)
        );
    }

    #[test]
    fn a_marker_with_inline_content_is_a_document() {
        let chunks = split_documents("--- {a: 1}\n");
        assert_eq!(chunks.len(), 1);
    }

    #[test]
    fn duplicate_keys_are_rejected_with_their_line() {
        let text = "a: 1\nb: 2\na: 3\n";
        let chunk = split_documents(text)[0];
        let err = parse_chunk(text, &chunk).expect_err("duplicate key");
        assert_eq!(err.line, Some(3), "{err:?}");
        assert!(
            err.message.to_lowercase().contains("duplicate"),
            "{}",
            err.message
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let chunk = split_documents(&text)[0];
        assert!(parse_chunk(&text, &chunk).is_err());
    }

    #[test]
    fn sequence_items_are_located() {
        let text = "items:\n  - name: a\n  - name: b\n    image: x\n";
        let chunk = split_documents(text)[0];
        assert_eq!(
            locate(text, &chunk, &FieldPath::parse("items[1].image")),
            Some(4)
        );
    }

    #[test]
    fn scalar_range_finds_the_value_token_and_nothing_else() {
        let text = "a: 1\n---\nkind: Pod\nspec:\n  containers:\n  - name: app\n    resources:\n      limits: {cpu: \"1\"}\n      requests:\n        memory: 64Mi   # keep\n";
        let chunks = split_documents(text);
        let chunk = &chunks[1];
        let path = FieldPath::parse("spec.containers[0].resources.requests.memory");
        let range = scalar_range(text, chunk, &path).expect("found");
        assert_eq!(&text[range], "64Mi");
        let quoted = FieldPath::parse("spec.containers[0].resources.limits.cpu");
        let range = scalar_range(text, chunk, &quoted).expect("found");
        assert_eq!(&text[range], "\"1\"");
        for missing in [
            "spec.containers[0].resources.limits.memory",
            "spec.containers[1].name",
            "spec.containers[0].resources",
        ] {
            assert_eq!(
                scalar_range(text, chunk, &FieldPath::parse(missing)),
                None,
                "{missing}"
            );
        }
    }
}

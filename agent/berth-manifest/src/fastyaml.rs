//! A fast path for the YAML that manifests are made of: block mappings and
//! sequences, plain, quoted and single-line flow values. It reads a document
//! straight into a `serde_json::Value`, about ten times faster than the
//! general parser, and gives up (`None`) on anything else: anchors, tags,
//! block scalars, multi-line values, tabs, the YAML 1.1 words (`yes`, `On`),
//! numbers other than plain decimal integers, duplicate keys, and anything
//! malformed. The general parser then reads the document as before, so a
//! document is either read here exactly as it would be there, or not here at
//! all; errors and their lines always come from the general parser. The
//! tests compare the two on every manifest in the repository and on
//! generated corpora.

use serde_json::{Map, Number, Value};

/// Nesting deeper than this is left to the general parser and its limit.
const MAX_DEPTH: usize = 48;
/// So are documents with more nodes than this (its budget counts events).
const MAX_NODES: usize = 100_000;

/// The document as a value, or `None` when it is not in the fast subset.
pub fn parse(body: &str) -> Option<Value> {
    if body.starts_with('\u{feff}') {
        return None;
    }
    let mut lines = Vec::new();
    for raw in body.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.contains('\t') {
            return None;
        }
        let text = raw.trim_start_matches(' ');
        let indent = raw.len() - text.len();
        let text = text.trim_end_matches(' ');
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if indent == 0 {
            if text == "---"
                || (text.starts_with("--- ") && text[4..].trim_start().starts_with('#'))
            {
                if !lines.is_empty() {
                    return None;
                }
                continue;
            }
            if text.starts_with("---") || text.starts_with("...") || text.starts_with('%') {
                return None;
            }
        }
        lines.push(Line { indent, text });
    }
    if lines.is_empty() || lines[0].indent != 0 {
        return None;
    }
    let mut p = Parser {
        lines,
        pos: 0,
        nodes: 0,
    };
    // A manifest is a mapping; anything else goes the long way.
    split_key(p.lines[0].text)??;
    let value = p.mapping(0, None, 0)?;
    (p.pos == p.lines.len()).then_some(value)
}

#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    indent: usize,
    /// Without the indentation and trailing spaces; never blank or a
    /// comment.
    text: &'a str,
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
    nodes: usize,
}

impl<'a> Parser<'a> {
    fn count(&mut self) -> Option<()> {
        self.nodes += 1;
        (self.nodes <= MAX_NODES).then_some(())
    }

    /// A block mapping whose entries start at column `indent`. `first` is
    /// an entry that starts mid-line (after a sequence's `- `), already
    /// consumed from the lines.
    fn mapping(&mut self, indent: usize, first: Option<&'a str>, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.count()?;
        let mut map = Map::new();
        let mut pending = first;
        loop {
            let text = match pending.take() {
                Some(t) => t,
                None => {
                    let Some(line) = self.lines.get(self.pos) else {
                        break;
                    };
                    if line.indent < indent {
                        break;
                    }
                    if line.indent > indent {
                        return None;
                    }
                    self.pos += 1;
                    line.text
                }
            };
            let (key, rest) = split_key(text)??;
            let value = if rest.is_empty() {
                self.block_value(indent, depth)?
            } else {
                let v = inline_value(rest)?;
                self.count()?;
                // A value that goes on over the next lines is left to the
                // general parser.
                if self.lines.get(self.pos).is_some_and(|l| l.indent > indent) {
                    return None;
                }
                v
            };
            if map.insert(key, value).is_some() {
                return None;
            }
        }
        Some(Value::Object(map))
    }

    /// The value of `key:` with nothing after it: the lines indented more
    /// than the key, or a sequence at the key's own column, or null.
    fn block_value(&mut self, indent: usize, depth: usize) -> Option<Value> {
        let Some(next) = self.lines.get(self.pos).copied() else {
            self.count()?;
            return Some(Value::Null);
        };
        if next.indent == indent && is_item(next.text) {
            return self.sequence(indent, depth + 1);
        }
        if next.indent <= indent {
            self.count()?;
            return Some(Value::Null);
        }
        if is_item(next.text) {
            return self.sequence(next.indent, depth + 1);
        }
        if split_key(next.text)?.is_some() {
            return self.mapping(next.indent, None, depth + 1);
        }
        None
    }

    /// A block sequence whose `-` are at column `indent`.
    fn sequence(&mut self, indent: usize, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.count()?;
        let mut items = Vec::new();
        while let Some(line) = self.lines.get(self.pos).copied() {
            if line.indent < indent || (line.indent == indent && !is_item(line.text)) {
                break;
            }
            if line.indent > indent {
                return None;
            }
            self.pos += 1;
            let after = &line.text[1..];
            let content = after.trim_start_matches(' ');
            if content.is_empty() || content.starts_with('#') {
                // The item is on the lines below, indented more.
                match self.lines.get(self.pos) {
                    Some(l) if l.indent > indent => {
                        let l = *l;
                        let v = if is_item(l.text) {
                            self.sequence(l.indent, depth + 1)?
                        } else if split_key(l.text)?.is_some() {
                            self.mapping(l.indent, None, depth + 1)?
                        } else {
                            return None;
                        };
                        items.push(v);
                    }
                    _ => {
                        self.count()?;
                        items.push(Value::Null);
                    }
                }
                continue;
            }
            let column = indent + 1 + (after.len() - content.len());
            if is_item(content) {
                // `- - a`: left to the general parser.
                return None;
            }
            if split_key(content)?.is_some() {
                items.push(self.mapping(column, Some(content), depth + 1)?);
            } else {
                items.push(inline_value(content)?);
                self.count()?;
                if self.lines.get(self.pos).is_some_and(|l| l.indent > indent) {
                    return None;
                }
            }
        }
        Some(Value::Array(items))
    }
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// Splits `key: rest` (rest without its comment, maybe empty). `Some(None)`
/// when the line is not a mapping entry; `None` when it is one the fast
/// path does not read.
fn split_key(text: &str) -> Option<Option<(String, &str)>> {
    match text.as_bytes().first()? {
        // A flow collection is a value (or a complex key, which its tail
        // check leaves to the general parser).
        b'[' | b'{' => return Some(None),
        b'&' | b'*' | b'!' | b'|' | b'>' | b'?' | b'%' | b'@' | b'`' | b',' | b']' | b'}' => {
            return None;
        }
        _ => {}
    }
    let (key, after) = if let Some(q) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let (key, used) = quoted(text, q)?;
        let after = text[used..].trim_start_matches(' ');
        match after.strip_prefix(':') {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => (key, rest),
            // A quoted scalar on its own: a value, not a key.
            _ if after.is_empty() || after.starts_with('#') => return Some(None),
            _ => return None,
        }
    } else {
        let bytes = text.as_bytes();
        let mut found = None;
        for i in 0..bytes.len() {
            match bytes[i] {
                b':' if i + 1 == bytes.len() || bytes[i + 1] == b' ' => {
                    found = Some(i);
                    break;
                }
                b'#' if i > 0 && bytes[i - 1] == b' ' => break,
                _ => {}
            }
        }
        let Some(i) = found else {
            return Some(None);
        };
        let key = text[..i].trim_end_matches(' ');
        if !plain_key(key) {
            return None;
        }
        (key.to_string(), &text[i + 1..])
    };
    let rest = rest_of_entry(after)?;
    Some(Some((key, rest)))
}

/// What follows `key:`, without leading spaces and a trailing comment.
fn rest_of_entry(after: &str) -> Option<&str> {
    let rest = after.trim_start_matches(' ');
    if rest.starts_with('#') {
        return Some("");
    }
    Some(rest)
}

/// A key the general parser would read as this very string.
fn plain_key(key: &str) -> bool {
    let Some(first) = key.bytes().next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == b'/' || first == b'_')
        && !special_word(key)
        && !key.contains(" #")
        && !key.contains(": ")
}

/// Words YAML 1.1 reads as booleans or null, in any case.
fn special_word(text: &str) -> bool {
    text.len() <= 5
        && matches!(
            text.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null"
        )
}

/// A value on the entry's own line: quoted, flow or plain.
fn inline_value(text: &str) -> Option<Value> {
    match text.as_bytes()[0] {
        b'"' | b'\'' => {
            let q = text.as_bytes()[0] as char;
            let (s, used) = quoted(text, q)?;
            let tail = text[used..].trim_start_matches(' ');
            (tail.is_empty()
                || (tail.starts_with('#') && used < text.len() && text.as_bytes()[used] == b' '))
                .then_some(Value::String(s))
        }
        b'[' | b'{' => {
            let mut flow = Flow {
                text: text.as_bytes(),
                src: text,
                at: 0,
                depth: 0,
            };
            let v = flow.node()?;
            flow.space();
            let tail = &text[flow.at..];
            (tail.is_empty() || (tail.starts_with('#') && text.as_bytes()[flow.at - 1] == b' '))
                .then_some(v)
        }
        _ => {
            let plain = match text.find(" #") {
                Some(i) => text[..i].trim_end_matches(' '),
                None => text,
            };
            plain_scalar(plain)
        }
    }
}

/// A plain scalar as the general parser types it, or `None` when that is
/// not certain.
fn plain_scalar(text: &str) -> Option<Value> {
    let bytes = text.as_bytes();
    let first = *bytes.first()?;
    if text.contains(": ") || text.ends_with(':') {
        return None;
    }
    match text {
        "true" => return Some(Value::Bool(true)),
        "false" => return Some(Value::Bool(false)),
        "null" | "~" => return Some(Value::Null),
        _ => {}
    }
    if first.is_ascii_alphabetic() || first == b'/' {
        return (!special_word(text)).then(|| Value::String(text.to_string()));
    }
    if first == b'-' {
        // `-f`, `--flag`: strings; `-5`: a number.
        let rest = text.trim_start_matches('-');
        if rest.bytes().next().is_some_and(|b| b.is_ascii_alphabetic()) {
            return Some(Value::String(text.to_string()));
        }
        if text.len() > 1 && text[1..].bytes().all(|b| b.is_ascii_digit()) {
            return int(text);
        }
        return None;
    }
    if first.is_ascii_digit() {
        let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == bytes.len() {
            return int(text);
        }
        // `50m`, `128Mi`, `12abc`: strings; `1e3`, `0x1F`, `0b1`, `0o7`
        // and anything with other characters are left alone.
        let letters = &bytes[digits..];
        if letters.iter().all(u8::is_ascii_alphabetic)
            && !matches!(
                letters[0],
                b'e' | b'E' | b'x' | b'X' | b'o' | b'O' | b'b' | b'B'
            )
        {
            return Some(Value::String(text.to_string()));
        }
    }
    None
}

/// A decimal integer without a leading zero (YAML 1.1 reads `0644` as
/// octal), small enough for `i64`.
fn int(text: &str) -> Option<Value> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || digits.len() > 18 || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    if text == "-0" {
        return None;
    }
    text.parse::<i64>()
        .ok()
        .map(|n| Value::Number(Number::from(n)))
}

/// A quoted scalar at the start of `text` on one line: its value and the
/// bytes it took.
fn quoted(text: &str, q: char) -> Option<(String, usize)> {
    let body = &text[1..];
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == q {
            if q == '\'' && body[i + 1..].starts_with('\'') {
                out.push('\'');
                chars.next();
                continue;
            }
            return Some((out, i + 2));
        }
        if c == '\\' && q == '"' {
            let (_, e) = chars.next()?;
            out.push(match e {
                '\\' => '\\',
                '"' => '"',
                '/' => '/',
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                _ => return None,
            });
            continue;
        }
        out.push(c);
    }
    // Not closed on this line: a multi-line scalar.
    None
}

/// A flow collection on one line.
struct Flow<'a> {
    text: &'a [u8],
    src: &'a str,
    at: usize,
    depth: usize,
}

impl Flow<'_> {
    fn space(&mut self) {
        while self.text.get(self.at) == Some(&b' ') {
            self.at += 1;
        }
    }

    fn node(&mut self) -> Option<Value> {
        self.space();
        match *self.text.get(self.at)? {
            b'[' => self.collection(b']'),
            b'{' => self.collection(b'}'),
            b'"' | b'\'' => {
                let q = self.text[self.at] as char;
                let (s, used) = quoted(&self.src[self.at..], q)?;
                self.at += used;
                Some(Value::String(s))
            }
            _ => {
                let start = self.at;
                while let Some(&b) = self.text.get(self.at) {
                    if matches!(b, b',' | b'[' | b']' | b'{' | b'}' | b'#' | b':') {
                        break;
                    }
                    self.at += 1;
                }
                let plain = self.src[start..self.at].trim_end_matches(' ');
                plain_scalar(plain)
            }
        }
    }

    fn collection(&mut self, close: u8) -> Option<Value> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let mut items = Vec::new();
        let mut map = Map::new();
        loop {
            self.space();
            if self.text.get(self.at) == Some(&close) {
                self.at += 1;
                break;
            }
            if close == b'}' {
                let key = match self.node()? {
                    Value::String(k) if !special_word(&k) => k,
                    _ => return None,
                };
                self.space();
                // `{a: b}`; a key without a value is left alone.
                if self.text.get(self.at) != Some(&b':')
                    || !matches!(self.text.get(self.at + 1), Some(b' '))
                {
                    return None;
                }
                self.at += 1;
                let value = self.node()?;
                if map.insert(key, value).is_some() {
                    return None;
                }
            } else {
                let item = self.node()?;
                self.space();
                // `[a: b]` is a one-pair mapping: left alone.
                if self.text.get(self.at) == Some(&b':') {
                    return None;
                }
                items.push(item);
            }
            self.space();
            match self.text.get(self.at)? {
                b',' => self.at += 1,
                b if *b == close => {}
                _ => return None,
            }
        }
        self.depth -= 1;
        Some(if close == b'}' {
            Value::Object(map)
        } else {
            Value::Array(items)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::parse;
    use crate::yaml::{general, split_documents};

    /// The fast path either reads a document as the general parser does,
    /// or not at all.
    fn agrees(doc: &str) -> bool {
        let Some(fast) = parse(doc) else {
            return false;
        };
        match general(doc) {
            Ok(slow) => assert_eq!(fast, slow, "the fast path differs on:\n{doc}"),
            Err(e) => {
                panic!("the fast path read a document the general parser refuses ({e}):\n{doc}")
            }
        }
        true
    }

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web   # the front end
  namespace: shop
  labels: {app: web, tier: \"front\"}
  annotations:
    berth.dev/note: 'it''s here'
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: main
        image: registry.local:5000/web:1.2
        command: [\"httpd\", \"-f\", \"-p\", \"8080\"]
        args:
          - --verbose
          - -v
        env:
        - name: GREETING
          value: \"hello \\\"world\\\"\\n\"
        - {name: EMPTY, value: \"\"}
        resources:
          requests: {cpu: 50m, memory: 32Mi}
          limits:
            cpu: 200m
            memory: 64Mi
        ports:
        - containerPort: 8080
          name: http
        readinessProbe: ~
        securityContext:
          readOnlyRootFilesystem: true
          runAsUser: -1
      volumes: []
      nodeSelector: {}
      tolerations:
      -
        key: a
      - # an item on the next lines
        key: b
";

    #[test]
    fn manifests_in_the_common_shapes_take_the_fast_path_and_read_the_same() {
        assert!(agrees(DEPLOYMENT));
        for doc in [
            "a: 1\n",
            "---\na: b\n",
            "--- # first\na: [1, -2, x, 'y z', \"\", [], {}]\n",
            "a:\n- 1\n- two\nb: null\n",
            "a:\n  - {k: v, m: [1, 2]}\n  -\n    - 3\n",
            "\"quoted key\": value\n'other': 2\n",
            "a: x#y\nb: 'c' # comment\n",
            "list:\n# between\n- a\n\n- b\n",
            "empty:\nnext: 1\n",
            "a: /bin/sh\nb: http://x:80/y\nc: inf\nd: e5\ne: 12abc\n",
            "win: 1\r\nx: z\r\n",
        ] {
            assert!(agrees(doc), "not read by the fast path:\n{doc}");
        }
    }

    #[test]
    fn everything_outside_the_subset_is_left_to_the_general_parser() {
        for doc in [
            "a: yes\n",
            "a: On\n",
            "a: TRUE\n",
            "a: Null\n",
            "a: 0644\n",
            "a: 08\n",
            "a: 1.5\n",
            "a: 1e3\n",
            "a: 0x1F\n",
            "a: +5\n",
            "a: -0\n",
            "a: .inf\n",
            "a: 99999999999999999999\n",
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "a: |\n  text\n",
            "a: >\n  text\n",
            "a: two\n  lines\n",
            "a: \"open\n  close\"\n",
            "a: \"x\\u00e9\"\n",
            "a:\tb\n",
            "a: 1\na: 2\n",
            "a: {b: 1, b: 2}\n",
            "a: [b: 1]\n",
            "a: {b}\n",
            "? a\n: b\n",
            "- a\n- b\n",
            "plain\n",
            "a: b: c\n",
            "a: b:\n",
            "y: 1\n",
            "80: http\n",
            "a:\n- - x\n",
            "<<: {a: 1}\n",
            "a: 1\n---\nb: 2\n",
            "%YAML 1.2\n---\na: 1\n",
            "a:\n    b: 1\n  c: 2\n",
            "a: [1,\n  2]\n",
            "\u{feff}a: 1\n",
        ] {
            assert!(parse(doc).is_none(), "the fast path read:\n{doc}");
        }
    }

    /// Every YAML document under `root`: (documents, read by the fast path),
    /// each one that was read compared with the general parser.
    fn compare_tree(root: std::path::PathBuf) -> (usize, usize) {
        let mut stack = vec![root];
        let (mut docs, mut fast) = (0, 0);
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name == "target" || name == "build" {
                    continue;
                }
                if path.is_dir() {
                    stack.push(path);
                } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                    let Ok(text) = std::fs::read_to_string(&path) else {
                        continue;
                    };
                    for chunk in split_documents(&text) {
                        docs += 1;
                        if agrees(&text[chunk.start..chunk.end]) {
                            fast += 1;
                        }
                    }
                }
            }
        }
        (docs, fast)
    }

    /// Every YAML file in the repository, document by document, and in
    /// `BERTH_YAML_CORPUS` when it names a directory (a checkout of other
    /// projects' manifests, say).
    #[test]
    fn every_manifest_in_the_repository_reads_the_same() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let (docs, fast) = compare_tree(root);
        assert!(docs > 20, "only {docs} documents found");
        assert!(
            fast * 2 > docs,
            "the fast path read only {fast} of {docs} documents"
        );
        if let Some(corpus) = std::env::var_os("BERTH_YAML_CORPUS") {
            let (docs, fast) = compare_tree(corpus.into());
            eprintln!("corpus: {fast} of {docs} documents read by the fast path, all alike");
        }
    }

    /// Mutations of real manifests: a character changed, a line's
    /// indentation moved, a value swapped for a tricky scalar. Wherever the
    /// fast path still reads the result, it must read what the general
    /// parser reads.
    #[test]
    fn mutated_manifests_read_the_same_or_go_the_long_way() {
        const TRICKY: &[&str] = &[
            "yes",
            "No",
            "on",
            "y",
            "~",
            "Null",
            "0644",
            "08",
            "1.5",
            "1e3",
            "0x1F",
            "+5",
            "-0",
            "-5",
            "50m",
            "1e",
            "12abc",
            "e5",
            "inf",
            ".inf",
            "a:b",
            "a: b",
            "#",
            "x #y",
            "''",
            "\"\"",
            "'a''b'",
            "\"a\\\"b\"",
            "[]",
            "{}",
            "[a, b]",
            "{a: 1}",
            "[a: 1]",
            "&a x",
            "*a",
            "!t x",
            "|",
            ">",
            "-",
            "- a",
            "--x",
            "?",
            ":",
            ",",
            "%",
            "@",
            "`",
            "\"\\t\"",
            "9223372036854775807",
            "123456789012345678",
            "-123456789012345678",
            "0",
            "00",
        ];
        const CHARS: &[u8] = b" -:#'\"[]{},&*!|>?%@`\tabc019.\n";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut tried, mut fast) = (0, 0);
        for _ in 0..std::env::var("BERTH_FUZZ_ROUNDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(4000)
        {
            let mut lines: Vec<String> = DEPLOYMENT.lines().map(str::to_string).collect();
            for _ in 0..1 + next(3) {
                let i = next(lines.len());
                match next(3) {
                    0 => {
                        let line = &mut lines[i];
                        if !line.is_empty() {
                            let at = next(line.len());
                            if line.is_char_boundary(at) && line.is_char_boundary(at + 1) {
                                let c = CHARS[next(CHARS.len())] as char;
                                line.replace_range(at..at + 1, &c.to_string());
                            }
                        }
                    }
                    1 => {
                        let line = &mut lines[i];
                        if next(2) == 0 {
                            line.insert(0, ' ');
                        } else if line.starts_with(' ') {
                            line.remove(0);
                        }
                    }
                    _ => {
                        let line = &mut lines[i];
                        if let Some(colon) = line.find(": ") {
                            line.truncate(colon + 2);
                            line.push_str(TRICKY[next(TRICKY.len())]);
                        } else if let Some(dash) = line.find("- ") {
                            line.truncate(dash + 2);
                            line.push_str(TRICKY[next(TRICKY.len())]);
                        }
                    }
                }
            }
            let doc = lines.join("\n") + "\n";
            tried += 1;
            if agrees(&doc) {
                fast += 1;
            }
        }
        assert!(
            fast > tried / 10,
            "only {fast} of {tried} mutations took the fast path"
        );
    }
}

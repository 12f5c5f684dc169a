//! CustomResourceDefinitions and the objects of the kinds they declare.
//!
//! Custom objects are checked against the definition's structural OpenAPI
//! schema the way an API server with strict field validation does: types,
//! required fields, enums, bounds, patterns, unknown fields, and defaults.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use crate::diag::{FieldIssue, FieldPath};
use crate::names;

/// The kinds the loaded CRDs declare.
#[derive(Debug, Default)]
pub struct CrdRegistry {
    kinds: BTreeMap<(String, String), CrdKind>,
}

#[derive(Debug)]
struct CrdKind {
    crd_name: String,
    namespaced: bool,
    /// version → (served, schema)
    versions: BTreeMap<String, (bool, Option<JSONSchemaProps>)>,
}

/// What the registry says about one custom object's kind.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// No CRD declares this group and kind.
    UnknownKind,
    /// The CRD exists, but does not serve this version.
    UnservedVersion { crd: &'a str, served: Vec<String> },
    Found {
        namespaced: bool,
        schema: Option<&'a JSONSchemaProps>,
    },
}

impl CrdRegistry {
    pub fn insert(&mut self, crd: &CustomResourceDefinition) {
        let spec = &crd.spec;
        let versions = spec
            .versions
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    (
                        v.served,
                        v.schema.as_ref().and_then(|s| s.open_api_v3_schema.clone()),
                    ),
                )
            })
            .collect();
        self.kinds.insert(
            (spec.group.clone(), spec.names.kind.clone()),
            CrdKind {
                crd_name: crd.metadata.name.clone().unwrap_or_default(),
                namespaced: spec.scope == "Namespaced",
                versions,
            },
        );
    }

    pub fn lookup(&self, api_version: &str, kind: &str) -> Lookup<'_> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let Some(k) = self.kinds.get(&(group.to_string(), kind.to_string())) else {
            return Lookup::UnknownKind;
        };
        match k.versions.get(version) {
            Some((true, schema)) => Lookup::Found {
                namespaced: k.namespaced,
                schema: schema.as_ref(),
            },
            _ => Lookup::UnservedVersion {
                crd: &k.crd_name,
                served: k
                    .versions
                    .iter()
                    .filter(|(_, (s, _))| *s)
                    .map(|(v, _)| v.clone())
                    .collect(),
            },
        }
    }
}

/// Checks a CRD the way the API server's validation would, as far as Berth relies on it.
pub fn validate_definition(crd: &CustomResourceDefinition, issues: &mut Vec<FieldIssue>) {
    let spec = &crd.spec;
    let spath = FieldPath::root().key("spec");
    let expected = format!("{}.{}", spec.names.plural, spec.group);
    if crd.metadata.name.as_deref() != Some(expected.as_str()) {
        issues.push(FieldIssue::error(
            FieldPath::root().key("metadata").key("name"),
            format!("must be spec.names.plural + \".\" + spec.group: {expected:?}"),
        ));
    }
    if let Err(e) = names::dns1123_subdomain(&spec.group) {
        issues.push(FieldIssue::error(spath.key("group"), e));
    } else if !spec.group.contains('.') {
        issues.push(FieldIssue::error(
            spath.key("group"),
            "should be a domain with at least one dot",
        ));
    }
    let npath = spath.key("names");
    if let Err(e) = names::dns1035_label(&spec.names.plural) {
        issues.push(FieldIssue::error(npath.key("plural"), e));
    }
    if let Some(singular) = &spec.names.singular
        && let Err(e) = names::dns1035_label(singular)
    {
        issues.push(FieldIssue::error(npath.key("singular"), e));
    }
    let kind_ok = spec
        .names
        .kind
        .starts_with(|c: char| c.is_ascii_alphabetic())
        && spec.names.kind.chars().all(|c| c.is_ascii_alphanumeric());
    if !kind_ok {
        issues.push(FieldIssue::error(
            npath.key("kind"),
            format!(
                "{:?} must be an alphanumeric identifier starting with a letter",
                spec.names.kind
            ),
        ));
    }
    crate::validate::one_of(
        &spec.scope,
        &["Namespaced", "Cluster"],
        spath.key("scope"),
        issues,
    );
    if spec.versions.is_empty() {
        issues.push(FieldIssue::error(
            spath.key("versions"),
            "must have at least one version",
        ));
    }
    let storage = spec.versions.iter().filter(|v| v.storage).count();
    if !spec.versions.is_empty() && storage != 1 {
        issues.push(FieldIssue::error(
            spath.key("versions"),
            format!("exactly one version must be the storage version (found {storage})"),
        ));
    }
    for (i, v) in spec.versions.iter().enumerate() {
        let vpath = spath.key("versions").index(i);
        match v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        {
            None => issues.push(FieldIssue::error(
                vpath.key("schema").key("openAPIV3Schema"),
                "required: apiextensions.k8s.io/v1 needs a schema for every version",
            )),
            Some(schema) => {
                schema_warnings(schema, &vpath.key("schema").key("openAPIV3Schema"), issues)
            }
        }
        if let Some(pattern_issue) = v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| bad_pattern(s, &vpath.key("schema").key("openAPIV3Schema")))
        {
            issues.push(pattern_issue);
        }
    }
}

/// Keywords Berth does not evaluate are named, once, on the definition.
fn schema_warnings(s: &JSONSchemaProps, path: &FieldPath, issues: &mut Vec<FieldIssue>) {
    if s.x_kubernetes_validations
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        issues.push(FieldIssue::warning(path.key("x-kubernetes-validations"), "CEL validation rules are not evaluated by Berth; objects are checked against the rest of the schema"));
    }
    if s.format.is_some() {
        issues.push(FieldIssue::warning(
            path.key("format"),
            "string formats are not checked by Berth",
        ));
    }
    for (name, child) in s.properties.iter().flatten() {
        schema_warnings(child, &path.key("properties").key(name.clone()), issues);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &s.items {
        schema_warnings(items, &path.key("items"), issues);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = &s.additional_properties {
        schema_warnings(extra, &path.key("additionalProperties"), issues);
    }
}

fn bad_pattern(s: &JSONSchemaProps, path: &FieldPath) -> Option<FieldIssue> {
    if let Some(p) = &s.pattern
        && let Err(e) = regex_lite::Regex::new(p)
    {
        return Some(FieldIssue::error(
            path.key("pattern"),
            format!("invalid regular expression: {e}"),
        ));
    }
    for (name, child) in s.properties.iter().flatten() {
        if let Some(issue) = bad_pattern(child, &path.key("properties").key(name.clone())) {
            return Some(issue);
        }
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(items)) => bad_pattern(items, &path.key("items")),
        _ => None,
    }
}

/// Validates a custom object against its schema and applies the schema's defaults.
pub fn validate_object(schema: &JSONSchemaProps, object: &mut Value, issues: &mut Vec<FieldIssue>) {
    let Value::Object(map) = object else { return };
    // apiVersion, kind and metadata belong to the API machinery, not the schema.
    let mut body: serde_json::Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut body_value = Value::Object(std::mem::take(&mut body));
    check(schema, &mut body_value, &FieldPath::root(), issues);
    if let Value::Object(body) = body_value {
        for (k, v) in body {
            map.insert(k, v);
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(s: &JSONSchemaProps, value: &mut Value, path: &FieldPath, issues: &mut Vec<FieldIssue>) {
    if value.is_null() {
        if !s.nullable.unwrap_or(false) {
            fail(issues, path, "must not be null".into());
        }
        return;
    }
    if s.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            fail(
                issues,
                path,
                format!("must be an integer or a string, not {}", type_name(value)),
            );
        }
    } else if let Some(t) = s.type_.as_deref() {
        let ok = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            fail(
                issues,
                path,
                format!("must be of type {t}, not {}", type_name(value)),
            );
            return;
        }
    }
    if let Some(options) = &s.enum_
        && !options.iter().any(|o| &o.0 == value)
    {
        let list: Vec<String> = options.iter().map(|o| o.0.to_string()).collect();
        fail(
            issues,
            path,
            format!(
                "unsupported value {value}: must be one of {}",
                list.join(", ")
            ),
        );
    }
    match value {
        Value::String(text) => {
            let len = text.chars().count() as i64;
            if s.min_length.is_some_and(|m| len < m) {
                fail(
                    issues,
                    path,
                    format!(
                        "must be at least {} characters long",
                        s.min_length.unwrap_or_default()
                    ),
                );
            }
            if s.max_length.is_some_and(|m| len > m) {
                fail(
                    issues,
                    path,
                    format!(
                        "must be at most {} characters long",
                        s.max_length.unwrap_or_default()
                    ),
                );
            }
            if let Some(pattern) = &s.pattern
                && let Ok(re) = regex_lite::Regex::new(pattern)
                && !re.is_match(text)
            {
                fail(
                    issues,
                    path,
                    format!("{text:?} does not match the pattern {pattern:?}"),
                );
            }
        }
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                if let Some(min) = s.minimum {
                    let excl = s.exclusive_minimum.unwrap_or(false);
                    if x < min || (excl && x == min) {
                        fail(
                            issues,
                            path,
                            format!(
                                "must be {} {min}",
                                if excl {
                                    "greater than"
                                } else {
                                    "greater than or equal to"
                                }
                            ),
                        );
                    }
                }
                if let Some(max) = s.maximum {
                    let excl = s.exclusive_maximum.unwrap_or(false);
                    if x > max || (excl && x == max) {
                        fail(
                            issues,
                            path,
                            format!(
                                "must be {} {max}",
                                if excl {
                                    "less than"
                                } else {
                                    "less than or equal to"
                                }
                            ),
                        );
                    }
                }
                if let Some(m) = s.multiple_of.filter(|m| *m > 0.0)
                    && (x / m).fract() != 0.0
                {
                    fail(issues, path, format!("must be a multiple of {m}"));
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as i64;
            if s.min_items.is_some_and(|m| n < m) {
                fail(
                    issues,
                    path,
                    format!(
                        "must have at least {} items",
                        s.min_items.unwrap_or_default()
                    ),
                );
            }
            if s.max_items.is_some_and(|m| n > m) {
                fail(
                    issues,
                    path,
                    format!(
                        "must have at most {} items",
                        s.max_items.unwrap_or_default()
                    ),
                );
            }
            if s.x_kubernetes_list_type.as_deref() == Some("set") {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        issues.push(FieldIssue::error(
                            path.index(i),
                            format!("duplicate value {item} in a list of type set"),
                        ));
                    }
                }
            }
            if let Some(JSONSchemaPropsOrArray::Schema(item_schema)) = &s.items {
                for (i, item) in items.iter_mut().enumerate() {
                    check(item_schema, item, &path.index(i), issues);
                }
            }
        }
        Value::Object(map) => {
            let props = s.properties.as_ref();
            for (name, prop) in props.into_iter().flatten() {
                if !map.contains_key(name)
                    && let Some(default) = &prop.default
                {
                    map.insert(name.clone(), default.0.clone());
                }
            }
            for required in s.required.iter().flatten() {
                if !map.contains_key(required) {
                    issues.push(FieldIssue::error(path.key(required.clone()), "required"));
                }
            }
            let n = map.len() as i64;
            if s.min_properties.is_some_and(|m| n < m) || s.max_properties.is_some_and(|m| n > m) {
                issues.push(FieldIssue::error(
                    path.clone(),
                    "has a number of properties outside minProperties/maxProperties",
                ));
            }
            let preserve = s.x_kubernetes_preserve_unknown_fields == Some(true);
            for (key, child) in map.iter_mut() {
                let cpath = path.key(key.clone());
                if let Some(prop) = props.and_then(|p| p.get(key)) {
                    check(prop, child, &cpath, issues);
                } else {
                    match &s.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(extra)) => {
                            check(extra, child, &cpath, issues)
                        }
                        Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                        _ if preserve => {}
                        _ => issues.push(FieldIssue::error(
                            cpath,
                            "unknown field: not in the CustomResourceDefinition's schema",
                        )),
                    }
                }
            }
        }
        _ => {}
    }
    for sub in s.all_of.iter().flatten() {
        check(sub, value, path, issues);
    }
    if let Some(any) = &s.any_of {
        let passing = any.iter().filter(|sub| passes(sub, value, path)).count();
        if passing == 0 {
            issues.push(FieldIssue::error(
                path.clone(),
                "matches none of the schemas in anyOf",
            ));
        }
    }
    if let Some(one) = &s.one_of {
        let passing = one.iter().filter(|sub| passes(sub, value, path)).count();
        if passing != 1 {
            issues.push(FieldIssue::error(
                path.clone(),
                format!("must match exactly one schema in oneOf (matches {passing})"),
            ));
        }
    }
    if let Some(not) = &s.not
        && passes(not, value, path)
    {
        issues.push(FieldIssue::error(
            path.clone(),
            "must not match the schema in not",
        ));
    }
}

fn fail(issues: &mut Vec<FieldIssue>, path: &FieldPath, message: String) {
    issues.push(FieldIssue::error(path.clone(), message));
}

fn passes(s: &JSONSchemaProps, value: &Value, path: &FieldPath) -> bool {
    let mut scratch = Vec::new();
    let mut copy = value.clone();
    check(s, &mut copy, path, &mut scratch);
    scratch
        .iter()
        .all(|i| i.severity != crate::diag::Severity::Error)
}

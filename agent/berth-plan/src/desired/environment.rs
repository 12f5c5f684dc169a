//! A container's environment, resolved as the kubelet does: the image's,
//! `PATH` when missing, `HOSTNAME`, `envFrom` (with its prefix), then `env`,
//! each `$(VAR)` expanded against what came before; ConfigMap and Secret
//! keys, `fieldRef` and `resourceFieldRef`. Values from Secrets are marked
//! sensitive, so plans and drift reports never show them.

use std::collections::BTreeMap;

use berth_manifest::k8s_openapi::api::core::v1::EnvVarSource;
use berth_manifest::model::Container;
use berth_manifest::model::{ConfigMapData as ConfigMap, SecretData as Secret};
use berth_manifest::{FieldIssue, FieldPath, Quantity};

use super::input::ContainerInput;
use super::model::DEFAULT_PATH;
use crate::context::Context;
use crate::expand::expand;
use crate::images::ImageConfig;
use crate::resources::container_resources;

/// An ordered environment in which a later definition replaces an earlier one in place.
#[derive(Default)]
pub(super) struct Env {
    pub(super) entries: Vec<(String, String)>,
    index: BTreeMap<String, usize>,
    pub(super) sensitive: BTreeMap<String, String>,
}

impl Env {
    pub(super) fn set(&mut self, name: &str, value: String, sensitive: Option<String>) {
        match self.index.get(name) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(name.to_string(), self.entries.len());
                self.entries.push((name.to_string(), value));
            }
        }
        match sensitive {
            Some(origin) => {
                self.sensitive.insert(name.to_string(), origin);
            }
            None => {
                self.sensitive.remove(name);
            }
        }
    }
    pub(super) fn get(&self, name: &str) -> Option<String> {
        self.index.get(name).map(|&i| self.entries[i].1.clone())
    }

    /// `$(VAR)` expanded in `text`, and, when a sensitive variable went
    /// into it, where that one comes from: the result holds its secret.
    pub(super) fn expand_tracked(&self, text: &str) -> (String, Option<String>) {
        let hit = std::cell::RefCell::new(None);
        let value = expand(text, |n| {
            if let Some(origin) = self.sensitive.get(n) {
                hit.borrow_mut()
                    .get_or_insert_with(|| format!("$({n}): {origin}"));
            }
            self.get(n)
        });
        (value, hit.into_inner())
    }

    /// `$(VAR)` expanded as every plan shows it: a sensitive variable as
    /// `<where it comes from>`, never its value.
    pub(super) fn expand_shown(&self, text: &str) -> String {
        expand(text, |n| match self.sensitive.get(n) {
            Some(origin) => Some(format!("<{origin}>")),
            None => self.get(n),
        })
    }
}

pub(super) fn environment(
    input: &ContainerInput<'_>,
    image: Option<&ImageConfig>,
    ctx: &Context<'_>,
    errors: &mut Vec<FieldIssue>,
    warnings: &mut Vec<FieldIssue>,
) -> Env {
    let c = input.container;
    let path = input.path;
    let ns = input.instance.id.namespace.as_str();
    let mut env = Env::default();
    for entry in image.map(|i| i.env.as_slice()).unwrap_or(&[]) {
        if let Some((k, v)) = entry.split_once('=') {
            env.set(k, v.to_string(), None);
        }
    }
    if env.get("PATH").is_none() {
        env.set("PATH", DEFAULT_PATH.to_string(), None);
    }
    env.set("HOSTNAME", input.instance.id.name.clone(), None);

    for (i, from) in c.env_from.iter().flatten().enumerate() {
        let fpath = path.key("envFrom").index(i);
        let prefix = from.prefix.clone().unwrap_or_default();
        // (kind, name, optional, is a secret)
        let (kind, name, optional, secret) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), _) => (
                "ConfigMap",
                r.name.as_str(),
                r.optional == Some(true),
                false,
            ),
            (None, Some(r)) => ("Secret", r.name.as_str(), r.optional == Some(true), true),
            (None, None) => continue,
        };
        let field = if secret { "secretRef" } else { "configMapRef" };
        let found = if secret {
            ctx.secrets
                .get(&(ns, name))
                .map(|s| secret_entries(s, &fpath.key(field), errors))
        } else {
            ctx.config_maps
                .get(&(ns, name))
                .map(|cm| config_map_entries(cm))
        };
        let entries = match found {
            Some(entries) => entries,
            None if optional => Vec::new(),
            None => {
                errors.push(missing_object(kind, ns, name, fpath.key(field).key("name")));
                continue;
            }
        };
        let origin_kind = secret.then_some(name);
        for (key, value) in entries {
            let name = format!("{prefix}{key}");
            if let Err(why) = berth_manifest::names::systemd_env_name(&name) {
                warnings.push(FieldIssue::warning(
                    fpath.clone(),
                    format!("key {key:?} is skipped: {why}"),
                ));
                continue;
            }
            let sensitive = origin_kind.map(|secret| format!("secret {ns}/{secret} key {key}"));
            env.set(&name, value, sensitive);
        }
    }

    for (i, var) in c.env.iter().flatten().enumerate() {
        let epath = path.key("env").index(i);
        if let Err(why) = berth_manifest::names::systemd_env_name(&var.name) {
            errors.push(FieldIssue::error(epath.key("name"), why));
            continue;
        }
        match &var.value_from {
            None => {
                // A value built from a secret is as secret as it is.
                let (value, sensitive) = env.expand_tracked(var.value.as_deref().unwrap_or(""));
                env.set(&var.name, value, sensitive);
            }
            Some(source) => {
                if let Some((value, sensitive)) =
                    value_from(input, source, &epath.key("valueFrom"), ctx, errors)
                {
                    env.set(&var.name, value, sensitive);
                }
            }
        }
    }
    for (name, value) in &env.entries {
        // systemd takes any UTF-8 value (control characters included) but,
        // like every C environment, not NUL.
        if value.contains('\0') {
            let at = c
                .env
                .iter()
                .flatten()
                .position(|v| &v.name == name)
                .map_or(path.key("env"), |i| path.key("env").index(i));
            errors.push(FieldIssue::error(at, format!("the value of {name} contains a NUL character, which no process environment can hold")));
        }
    }
    env
}

fn config_map_entries(cm: &ConfigMap) -> Vec<(String, String)> {
    cm.data
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn secret_entries(
    s: &Secret,
    path: &FieldPath,
    errors: &mut Vec<FieldIssue>,
) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in s.data.iter() {
        match String::from_utf8(v.clone()) {
            Ok(text) => {
                out.insert(k.clone(), text);
            }
            Err(_) => errors.push(FieldIssue::error(
                path.clone(),
                format!("secret key {k:?} is not UTF-8 text and cannot be an environment variable"),
            )),
        }
    }
    for (k, v) in s.string_data.iter() {
        out.insert(k.clone(), v.clone());
    }
    out.into_iter().collect()
}

/// A `configMapKeyRef` or `secretKeyRef`: a key of a named object, which may
/// be optional.
struct KeyRef<'a> {
    kind: &'a str,
    ns: &'a str,
    name: &'a str,
    key: &'a str,
    optional: bool,
}

impl KeyRef<'_> {
    /// `found` is `None` when the object does not exist, `Some(None)` when
    /// it lacks the key. Missing either is an error unless the ref is optional.
    fn resolve(
        &self,
        found: Option<Option<String>>,
        path: &FieldPath,
        errors: &mut Vec<FieldIssue>,
    ) -> Option<String> {
        match found {
            Some(Some(value)) => Some(value),
            _ if self.optional => None,
            None => {
                errors.push(missing_object(
                    self.kind,
                    self.ns,
                    self.name,
                    path.key("name"),
                ));
                None
            }
            Some(None) => {
                errors.push(FieldIssue::error(
                    path.key("key"),
                    format!(
                        "{} {}/{} has no key {:?}",
                        self.kind, self.ns, self.name, self.key
                    ),
                ));
                None
            }
        }
    }
}

fn missing_object(kind: &str, ns: &str, name: &str, path: FieldPath) -> FieldIssue {
    FieldIssue::error(
        path,
        format!("{kind} {ns}/{name} does not exist (set optional: true to allow that)"),
    )
}

fn value_from(
    input: &ContainerInput<'_>,
    source: &EnvVarSource,
    path: &FieldPath,
    ctx: &Context<'_>,
    errors: &mut Vec<FieldIssue>,
) -> Option<(String, Option<String>)> {
    let ns = input.instance.id.namespace.as_str();
    if let Some(r) = &source.config_map_key_ref {
        let found = ctx
            .config_maps
            .get(&(ns, r.name.as_str()))
            .map(|cm| cm.data.get(&r.key).cloned());
        let key = KeyRef {
            kind: "ConfigMap",
            ns,
            name: &r.name,
            key: &r.key,
            optional: r.optional == Some(true),
        };
        return key
            .resolve(found, &path.key("configMapKeyRef"), errors)
            .map(|v| (v, None));
    }
    if let Some(r) = &source.secret_key_ref {
        let rpath = path.key("secretKeyRef");
        let found = ctx.secrets.get(&(ns, r.name.as_str())).map(|s| {
            secret_entries(s, &rpath, errors)
                .into_iter()
                .find(|(k, _)| k == &r.key)
                .map(|(_, v)| v)
        });
        let key = KeyRef {
            kind: "Secret",
            ns,
            name: &r.name,
            key: &r.key,
            optional: r.optional == Some(true),
        };
        let origin = format!("secret {ns}/{} key {}", r.name, r.key);
        return key
            .resolve(found, &rpath, errors)
            .map(|v| (v, Some(origin)));
    }
    if let Some(f) = &source.field_ref {
        let meta = input.instance.metadata;
        let fp = f.field_path.as_str();
        let bracket = |prefix: &str| {
            fp.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        let value = match fp {
            "metadata.name" => Some(input.instance.id.name.clone()),
            "metadata.namespace" => Some(ns.to_string()),
            "spec.nodeName" => Some(ctx.node.name.clone()),
            "spec.serviceAccountName" => Some(
                input
                    .instance
                    .spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            ),
            _ => {
                if let Some(k) = bracket("metadata.labels['") {
                    Some(meta.labels.get(&k).cloned().unwrap_or_default())
                } else if let Some(k) = bracket("metadata.annotations['") {
                    Some(
                        meta.annotations
                            .as_ref()
                            .and_then(|l| l.get(&k))
                            .cloned()
                            .unwrap_or_default(),
                    )
                } else {
                    errors.push(FieldIssue::error(
                        path.key("fieldRef").key("fieldPath"),
                        format!("{fp:?} is not supported: use metadata.name, metadata.namespace, metadata.labels['…'], metadata.annotations['…'], spec.nodeName or spec.serviceAccountName"),
                    ));
                    None
                }
            }
        };
        return value.map(|v| (v, None));
    }
    if let Some(r) = &source.resource_field_ref {
        let rpath = path.key("resourceFieldRef");
        let target: Option<&Container> = match &r.container_name {
            Some(name) => input
                .instance
                .spec
                .containers
                .iter()
                .chain(input.instance.spec.init_containers.iter().flatten())
                .find(|c| &c.name == name),
            None => Some(input.container),
        };
        let Some(target) = target else {
            errors.push(FieldIssue::error(
                rpath.key("containerName"),
                "no container of this pod has that name",
            ));
            return None;
        };
        let res = container_resources(target);
        let divisor = match r.divisor.as_ref().map(|d| Quantity::parse(&d.0)) {
            None => None,
            Some(Ok(q)) => Some(q),
            Some(Err(e)) => {
                errors.push(FieldIssue::error(rpath.key("divisor"), e.to_string()));
                return None;
            }
        };
        let node = ctx.node;
        let (value, is_cpu) = match r.resource.as_str() {
            "limits.cpu" => (res.cpu_limit_milli.unwrap_or(node.cpu_milli), true),
            "requests.cpu" => (res.cpu_request_milli.unwrap_or(0), true),
            "limits.memory" => (res.memory_limit_bytes.unwrap_or(node.memory_bytes), false),
            "requests.memory" => (res.memory_request_bytes.unwrap_or(0), false),
            other => {
                errors.push(FieldIssue::error(rpath.key("resource"), format!("{other:?} is not supported: use limits.cpu, requests.cpu, limits.memory or requests.memory")));
                return None;
            }
        };
        let out = if is_cpu {
            let d = divisor
                .and_then(|d| d.milli().ok())
                .filter(|d| *d > 0)
                .unwrap_or(1000);
            value.div_ceil(d)
        } else {
            let d = divisor
                .and_then(|d| d.units().ok())
                .filter(|d| *d > 0)
                .unwrap_or(1);
            value.div_ceil(d)
        };
        return Some((out.to_string(), None));
    }
    None
}

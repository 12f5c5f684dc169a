//! Pod volumes and volume mounts, checked as Kubernetes' API server checks
//! them, plus what Berth refuses because it cannot provide it on a node.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, KeyToPath, PodSpec, Volume};

use crate::diag::{FieldIssue, FieldPath};
use crate::names;
use crate::quantity::Quantity;

type Issues = Vec<FieldIssue>;

fn err(issues: &mut Issues, path: FieldPath, message: impl Into<String>) {
    issues.push(FieldIssue::error(path, message));
}

/// The volume types a Berth node provides.
pub const SUPPORTED_SOURCES: &[&str] = &[
    "emptyDir",
    "hostPath",
    "configMap",
    "secret",
    "persistentVolumeClaim",
    "projected",
];

/// `hostPath.type` values, as Kubernetes spells them ("" means no check).
pub const HOST_PATH_TYPES: &[&str] = &[
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
];

/// The fields an object sets, by their names in YAML, leaving out
/// `except`: which source a volume, projection or PersistentVolume names.
pub fn set_fields(object: &impl serde::Serialize, except: &[&str]) -> Vec<String> {
    serde_json::to_value(object)
        .ok()
        .as_ref()
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, v)| !v.is_null() && !except.contains(&k.as_str()))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// A path inside a volume (`subPath`, `items[].path`): relative, without
/// `..` components, as Kubernetes requires.
pub fn relative_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        return Err(format!("{path:?} must be a relative path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} must not contain a NUL byte"));
    }
    Ok(())
}

/// A path on the node or in the container: absolute, without `..`.
pub fn absolute_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must be an absolute path"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("{path:?} must not contain '..'"));
    }
    if path.contains('\0') {
        return Err(format!("{path:?} must not contain a NUL byte"));
    }
    Ok(())
}

fn mode(m: i32, path: FieldPath, issues: &mut Issues) {
    if !(0..=0o777).contains(&m) {
        err(
            issues,
            path,
            format!(
                "{m} is not a valid file mode: must be between 0 and 0777 (octal), both inclusive"
            ),
        );
    }
}

fn items(items: Option<&[KeyToPath]>, path: &FieldPath, issues: &mut Issues) {
    let mut seen = BTreeSet::new();
    for (i, item) in items.unwrap_or(&[]).iter().enumerate() {
        let ipath = path.key("items").index(i);
        if item.key.is_empty() {
            err(issues, ipath.key("key"), "required");
        }
        if item.path.is_empty() {
            err(issues, ipath.key("path"), "required");
        } else if let Err(e) = relative_path(&item.path) {
            err(issues, ipath.key("path"), e);
        } else if item.path.starts_with("..") {
            err(
                issues,
                ipath.key("path"),
                format!("{:?} must not start with '..'", item.path),
            );
        } else if !seen.insert(item.path.clone()) {
            err(
                issues,
                ipath.key("path"),
                format!("duplicate path {:?}", item.path),
            );
        }
        if let Some(m) = item.mode {
            mode(m, ipath.key("mode"), issues);
        }
    }
}

/// Checks `spec.volumes` and every container's `volumeMounts`.
pub fn pod_volumes(spec: &PodSpec, path: &FieldPath, issues: &mut Issues) {
    let volumes = spec.volumes.as_deref().unwrap_or(&[]);
    let mut by_name: BTreeMap<&str, &Volume> = BTreeMap::new();
    for (i, v) in volumes.iter().enumerate() {
        let vpath = path.key("volumes").index(i);
        if let Err(e) = names::dns1123_label(&v.name) {
            err(issues, vpath.key("name"), e);
        }
        if by_name.insert(v.name.as_str(), v).is_some() {
            err(
                issues,
                vpath.key("name"),
                format!("duplicate volume name {:?}", v.name),
            );
        }
        // None set means emptyDir, as the API server defaults it.
        let sources = set_fields(v, &["name"]);
        if sources.len() > 1 {
            err(
                issues,
                vpath.clone(),
                format!(
                    "may not specify more than one volume type; found {}",
                    sources.join(", ")
                ),
            );
        }
        for s in &sources {
            if !SUPPORTED_SOURCES.contains(&s.as_str()) {
                err(
                    issues,
                    vpath.key(s.clone()),
                    format!(
                        "volume type {s} is not available on a Berth node; use one of {}",
                        SUPPORTED_SOURCES.join(", ")
                    ),
                );
            }
        }
        volume(v, &vpath, issues);
    }
    let lists = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", &spec.containers[..]),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            mounts(c, &by_name, &path.key(list).index(i), issues);
        }
    }
}

fn volume(v: &Volume, vpath: &FieldPath, issues: &mut Issues) {
    if let Some(e) = &v.empty_dir {
        let p = vpath.key("emptyDir");
        if let Some(medium) = e.medium.as_deref()
            && !medium.is_empty()
            && medium != "Memory"
        {
            err(
                issues,
                p.key("medium"),
                format!("unsupported value {medium:?}: must be \"\" (the node's disk) or Memory"),
            );
        }
        if let Some(limit) = &e.size_limit
            && let Err(e) = Quantity::parse(&limit.0).and_then(|q| q.units())
        {
            err(issues, p.key("sizeLimit"), e.to_string());
        }
    }
    if let Some(h) = &v.host_path {
        let p = vpath.key("hostPath");
        if h.path.is_empty() {
            err(issues, p.key("path"), "required");
        } else if let Err(e) = absolute_path(&h.path) {
            err(issues, p.key("path"), e);
        }
        if let Some(t) = &h.type_ {
            crate::diag::one_of(t, HOST_PATH_TYPES, p.key("type"), issues);
        }
    }
    if let Some(c) = &v.config_map {
        let p = vpath.key("configMap");
        if c.name.is_empty() {
            err(issues, p.key("name"), "required");
        } else if let Err(e) = names::dns1123_subdomain(&c.name) {
            err(issues, p.key("name"), e);
        }
        items(c.items.as_deref(), &p, issues);
        if let Some(m) = c.default_mode {
            mode(m, p.key("defaultMode"), issues);
        }
    }
    if let Some(s) = &v.secret {
        let p = vpath.key("secret");
        match s.secret_name.as_deref() {
            None | Some("") => err(issues, p.key("secretName"), "required"),
            Some(name) => {
                if let Err(e) = names::dns1123_subdomain(name) {
                    err(issues, p.key("secretName"), e);
                }
            }
        }
        items(s.items.as_deref(), &p, issues);
        if let Some(m) = s.default_mode {
            mode(m, p.key("defaultMode"), issues);
        }
    }
    if let Some(pr) = &v.projected {
        let p = vpath.key("projected");
        if let Some(m) = pr.default_mode {
            mode(m, p.key("defaultMode"), issues);
        }
        for (i, source) in pr.sources.iter().flatten().enumerate() {
            let spath = p.key("sources").index(i);
            let set = set_fields(source, &[]);
            if set.len() != 1 {
                err(
                    issues,
                    spath.clone(),
                    format!("must set exactly one source; found {}", set.len()),
                );
            }
            for name in set.iter().filter(|n| *n != "configMap" && *n != "secret") {
                err(
                    issues,
                    spath.key(name.clone()),
                    format!(
                        "projected source {name} is not available on a Berth node; use configMap or secret"
                    ),
                );
            }
            for (field, name, its) in [
                (
                    "configMap",
                    source.config_map.as_ref().map(|c| c.name.as_str()),
                    source.config_map.as_ref().and_then(|c| c.items.as_deref()),
                ),
                (
                    "secret",
                    source.secret.as_ref().map(|c| c.name.as_str()),
                    source.secret.as_ref().and_then(|c| c.items.as_deref()),
                ),
            ] {
                let Some(name) = name else { continue };
                let fpath = spath.key(field);
                if name.is_empty() {
                    err(issues, fpath.key("name"), "required");
                } else if let Err(e) = names::dns1123_subdomain(name) {
                    err(issues, fpath.key("name"), e);
                }
                items(its, &fpath, issues);
            }
        }
    }
    if let Some(c) = &v.persistent_volume_claim {
        let p = vpath.key("persistentVolumeClaim");
        if c.claim_name.is_empty() {
            err(issues, p.key("claimName"), "required");
        } else if let Err(e) = names::dns1123_subdomain(&c.claim_name) {
            err(issues, p.key("claimName"), e);
        }
    }
}

fn mounts(
    c: &Container,
    volumes: &BTreeMap<&str, &Volume>,
    cpath: &FieldPath,
    issues: &mut Issues,
) {
    let mut paths = BTreeSet::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mpath = cpath.key("volumeMounts").index(i);
        if !volumes.contains_key(m.name.as_str()) {
            err(
                issues,
                mpath.key("name"),
                format!("volume {:?} is not declared in spec.volumes", m.name),
            );
        }
        if m.mount_path.is_empty() {
            err(issues, mpath.key("mountPath"), "required");
        } else if let Err(e) = absolute_path(&m.mount_path) {
            err(issues, mpath.key("mountPath"), e);
        } else if m.mount_path.trim_end_matches('/').is_empty() {
            err(
                issues,
                mpath.key("mountPath"),
                "a volume cannot be mounted over the container's root",
            );
        } else if !paths.insert(m.mount_path.trim_end_matches('/').to_string()) {
            err(
                issues,
                mpath.key("mountPath"),
                format!("{:?} is mounted more than once", m.mount_path),
            );
        }
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty())
            && let Err(e) = relative_path(sub)
        {
            err(issues, mpath.key("subPath"), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Vec<String> {
        let chunk = crate::yaml::Chunk {
            index: 0,
            first_line: 1,
            start: 0,
            end: yaml.len(),
        };
        let value = crate::yaml::parse_chunk(yaml, &chunk).unwrap().unwrap();
        let spec: PodSpec = serde_json::from_value(value).unwrap();
        let mut issues = Vec::new();
        pod_volumes(&spec, &FieldPath::parse("spec"), &mut issues);
        issues
            .iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect()
    }

    #[test]
    fn a_valid_pod_has_no_issues() {
        let spec =
            "containers: []\nvolumes:\n- {name: a, secret: {secretName: s, defaultMode: 0440}}\n";
        let chunk = crate::yaml::Chunk {
            index: 0,
            first_line: 1,
            start: 0,
            end: spec.len(),
        };
        let value = crate::yaml::parse_chunk(spec, &chunk).unwrap().unwrap();
        assert_eq!(
            value["volumes"][0]["secret"]["defaultMode"], 0o440,
            "YAML 1.1 octal, as Kubernetes reads it"
        );
        let found = check(
            "containers:\n- name: c\n  volumeMounts:\n  - {name: data, mountPath: /data, subPath: a/b}\n  - {name: cfg, mountPath: /etc/app, readOnly: true}\nvolumes:\n- name: data\n  persistentVolumeClaim: {claimName: data}\n- name: cfg\n  configMap:\n    name: app\n    defaultMode: 0644\n    items: [{key: a, path: conf/a.yaml, mode: 0600}]\n- name: scratch\n- name: both\n  projected:\n    defaultMode: 0400\n    sources:\n    - configMap: {name: app}\n    - secret: {name: tls, items: [{key: tls.crt, path: certs/tls.crt}]}\n",
        );
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn escapes_and_dangling_mounts_are_named() {
        let found = check(
            "containers:\n- name: c\n  volumeMounts:\n  - {name: nope, mountPath: data}\n  - {name: a, mountPath: /x, subPath: ../../etc}\n  - {name: a, mountPath: /x/}\nvolumes:\n- name: a\n  hostPath: {path: /srv/../etc}\n- name: a\n  emptyDir: {medium: HugePages}\n- name: b\n  nfs: {server: s, path: /}\n- name: c\n  secret: {secretName: s, items: [{key: k, path: /abs}], defaultMode: 1000}\n",
        );
        assert_eq!(
            found,
            [
                "spec.volumes[0].hostPath.path: \"/srv/../etc\" must not contain '..'",
                "spec.volumes[1].name: duplicate volume name \"a\"",
                "spec.volumes[1].emptyDir.medium: unsupported value \"HugePages\": must be \"\" (the node's disk) or Memory",
                "spec.volumes[2].nfs: volume type nfs is not available on a Berth node; use one of emptyDir, hostPath, configMap, secret, persistentVolumeClaim, projected",
                "spec.volumes[3].secret.items[0].path: \"/abs\" must be a relative path",
                "spec.volumes[3].secret.defaultMode: 1000 is not a valid file mode: must be between 0 and 0777 (octal), both inclusive",
                "spec.containers[0].volumeMounts[0].name: volume \"nope\" is not declared in spec.volumes",
                "spec.containers[0].volumeMounts[0].mountPath: \"data\" must be an absolute path",
                "spec.containers[0].volumeMounts[1].subPath: \"../../etc\" must not contain '..'",
                "spec.containers[0].volumeMounts[2].mountPath: \"/x/\" is mounted more than once",
            ]
        );
    }

    #[test]
    fn projected_sources_other_than_config_maps_and_secrets_are_refused() {
        let found = check(
            "containers:\n- name: c\nvolumes:\n- name: p\n  projected:\n    sources:\n    - serviceAccountToken: {path: token}\n    - configMap: {name: a, items: [{key: k, path: ../x}]}\n",
        );
        assert_eq!(
            found,
            [
                "spec.volumes[0].projected.sources[0].serviceAccountToken: projected source serviceAccountToken is not available on a Berth node; use configMap or secret",
                "spec.volumes[0].projected.sources[1].configMap.items[0].path: \"../x\" must not contain '..'",
            ]
        );
    }

    #[test]
    fn two_sources_in_one_volume_are_refused() {
        let found = check(
            "containers:\n- name: c\nvolumes:\n- name: a\n  emptyDir: {}\n  hostPath: {path: /srv}\n",
        );
        assert_eq!(
            found,
            [
                "spec.volumes[0]: may not specify more than one volume type; found emptyDir, hostPath"
            ]
        );
    }
}

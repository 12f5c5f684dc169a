//! What the planner needs to know of a container image: the parts of its OCI
//! config that Kubernetes merges with the container spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The runtime-relevant part of an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageConfig {
    /// The image reference as pods write it, e.g. `busybox:1.37`.
    pub reference: String,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Numeric `uid[:gid]`; names need the image's /etc/passwd, resolved at start.
    #[serde(default)]
    pub user: Option<String>,
}

/// The images a node has, by reference.
#[derive(Debug, Clone, Default)]
pub struct ImageCatalog {
    images: BTreeMap<String, ImageConfig>,
}

/// The on-disk form of `--images FILE`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCatalogFile {
    pub images: Vec<ImageConfig>,
}

impl ImageCatalog {
    pub fn new(images: impl IntoIterator<Item = ImageConfig>) -> Self {
        Self {
            images: images
                .into_iter()
                .map(|i| (normalize(&i.reference), i))
                .collect(),
        }
    }

    pub fn get(&self, reference: &str) -> Option<&ImageConfig> {
        self.images.get(&normalize(reference))
    }
}

/// `busybox` and `docker.io/library/busybox:latest` are the same image.
pub fn normalize(reference: &str) -> String {
    // `app:1.2@sha256:…` is the digest's image: the tag is only a label.
    let mut r = match reference.split_once('@') {
        Some((name, digest)) => {
            let (dir, last) = name.rsplit_once('/').map_or(("", name), |(d, l)| (d, l));
            let last = last.split_once(':').map_or(last, |(n, _)| n);
            if dir.is_empty() {
                format!("{last}@{digest}")
            } else {
                format!("{dir}/{last}@{digest}")
            }
        }
        None => reference.to_string(),
    };
    let last = r.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && !r.contains('@') {
        r.push_str(":latest");
    }
    let first = r.split('/').next().unwrap_or("");
    let has_registry =
        r.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if !has_registry {
        r = if r.contains('/') {
            format!("docker.io/{r}")
        } else {
            format!("docker.io/library/{r}")
        };
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_normalize_like_docker_hub_names() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("busybox:1.37"), "docker.io/library/busybox:1.37");
        assert_eq!(normalize("org/app"), "docker.io/org/app:latest");
        assert_eq!(normalize("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(
            normalize("registry.example/app@sha256:ab"),
            "registry.example/app@sha256:ab"
        );
        assert_eq!(
            normalize("localhost:5000/team/app:1.2@sha256:ab"),
            "localhost:5000/team/app@sha256:ab"
        );
    }
}

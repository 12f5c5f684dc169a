//! Image references as Docker and Kubernetes read them:
//! `[registry/]repository[:tag][@sha256:digest]`.

use std::fmt;

/// Docker Hub's name in references, and the host its API answers on.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// `registry.example:5000`, or `docker.io`.
    pub registry: String,
    /// `library/busybox`, `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Why a reference is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image name {reference:?}: {why}")]
pub struct InvalidReference {
    pub reference: String,
    pub why: String,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, InvalidReference> {
        let bad = |why: &str| InvalidReference {
            reference: input.to_string(),
            why: why.to_string(),
        };
        if input.is_empty() || input.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(bad("a sha256 digest is 64 lowercase hex digits"));
                }
                (r, Some(d.to_string()))
            }
            None => (input, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(bad(
                    "a tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')))
        {
            return Err(bad(
                "the registry host has characters a host name cannot have",
            ));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        for component in repository.split('/') {
            let ok = !component.is_empty()
                && component.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && component
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && component
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(bad(
                    "repository path components are lowercase letters and digits, separated by '.', '_' or '-'",
                ));
            }
        }
        Ok(Self {
            registry,
            repository,
            tag: if digest.is_none() && tag.is_none() {
                Some("latest".into())
            } else {
                tag
            },
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest when
    /// pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host the registry's API answers on (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }
}

/// The normalized form, as the image store keys it.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(d) = &self.digest {
            write!(f, "@{d}")
        } else {
            write!(f, ":{}", self.tag.as_deref().unwrap_or("latest"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = Reference::parse("registry.example:5000/team/app:1.2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("registry.example:5000", "team/app", Some("1.2"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/app:1@{d}")).unwrap();
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.to_string(), format!("localhost/app@{d}"));
        // The same normalization the planner uses, so store keys agree.
        for input in [
            "busybox:1.37",
            "org/app",
            "localhost:5000/app",
            "registry.example/app",
        ] {
            assert_eq!(
                Reference::parse(input).unwrap().to_string(),
                berth_plan::images::normalize(input)
            );
        }
    }

    #[test]
    fn malformed_references_are_refused_with_the_reason() {
        for (input, why) in [
            ("", "empty"),
            ("App:1", "lowercase"),
            ("app:-x", "tag"),
            ("app@sha256:12", "64"),
            ("app@md5:00", "sha256"),
            ("reg.example/a//b", "components"),
            ("reg.ex ample/a", "characters"),
        ] {
            let e = Reference::parse(input).expect_err(input);
            assert!(e.to_string().contains(why), "{input}: {e}");
        }
    }
}

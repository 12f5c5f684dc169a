//! Registry credentials: what `imagePullSecrets` give (Secrets of type
//! `kubernetes.io/dockerconfigjson` or the older `kubernetes.io/dockercfg`),
//! and the challenge a registry answers 401 with.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::Deserialize;

/// A user name and password for one registry. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The key it was found under: `registry.example`, `registry.example/team`.
    pub matches: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("matches", &self.matches)
            .field("username", &self.username)
            .field("password", &format_args!("<{} bytes>", self.password.len()))
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
}

/// Reads the credentials of a pull Secret: the `.dockerconfigjson` key
/// (`{"auths": {...}}`) or the legacy `.dockercfg` key (the map itself).
pub fn parse_docker_config(key: &str, body: &[u8]) -> Result<Vec<Credential>, String> {
    let auths: BTreeMap<String, AuthEntry> = match key {
        ".dockerconfigjson" => {
            serde_json::from_slice::<DockerConfig>(body)
                .map_err(|e| format!("{key} is not a Docker config: {e}"))?
                .auths
        }
        ".dockercfg" => serde_json::from_slice(body)
            .map_err(|e| format!("{key} is not a Docker config: {e}"))?,
        other => return Err(format!("{other} is not a Docker config key")),
    };
    let mut out = Vec::new();
    for (server, entry) in auths {
        let (username, password) = match (entry.username, entry.password, entry.auth) {
            (Some(u), Some(p), _) => (u, p),
            (_, _, Some(auth)) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths[{server:?}].auth is not base64: {e}"))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| format!("auths[{server:?}].auth is not UTF-8"))?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| format!("auths[{server:?}].auth is not user:password"))?;
                (u.to_string(), p.to_string())
            }
            _ => {
                return Err(format!(
                    "auths[{server:?}] has neither username/password nor auth"
                ));
            }
        };
        out.push(Credential {
            matches: server_key(&server),
            username,
            password,
        });
    }
    Ok(out)
}

/// `https://registry.example/v1/` → `registry.example`; paths below the
/// host are kept (`registry.example/team`), as the kubelet matches them.
fn server_key(server: &str) -> String {
    let s = server
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let s = s
        .strip_suffix("/v1")
        .or_else(|| s.strip_suffix("/v2"))
        .unwrap_or(s);
    match s {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        other => other.to_string(),
    }
}

/// The credentials that apply to `registry/repository`, the most specific
/// first (as the kubelet tries them), each once.
pub fn matching<'a>(
    creds: &'a [Credential],
    registry: &str,
    repository: &str,
) -> Vec<&'a Credential> {
    let full = format!("{registry}/{repository}");
    let mut hits: Vec<&Credential> = creds
        .iter()
        .filter(|c| {
            c.matches == registry
                || (full.starts_with(&c.matches)
                    && full.as_bytes().get(c.matches.len()) == Some(&b'/'))
        })
        .collect();
    hits.sort_by_key(|c| std::cmp::Reverse(c.matches.len()));
    hits.dedup_by(|a, b| a.username == b.username && a.password == b.password);
    hits
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_configs_give_credentials_matched_most_specific_first() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let body = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "registry.example": {{"username": "ann", "password": "pw"}},
                "registry.example/team": {{"username": "tea", "password": "m"}}}}}}"#
        );
        let creds = parse_docker_config(".dockerconfigjson", body.as_bytes()).unwrap();
        let hub = matching(&creds, "docker.io", "library/busybox");
        assert_eq!(hub.len(), 1);
        assert_eq!(
            (hub[0].username.as_str(), hub[0].password.as_str()),
            ("bob", "s3cret")
        );
        let team: Vec<&str> = matching(&creds, "registry.example", "team/app")
            .iter()
            .map(|c| c.username.as_str())
            .collect();
        assert_eq!(team, ["tea", "ann"]);
        assert!(matching(&creds, "registry.example", "teamx/app").len() == 1);
        assert!(matching(&creds, "other.example", "team/app").is_empty());
        assert!(!format!("{:?}", hub[0]).contains("s3cret"));
        let legacy =
            parse_docker_config(".dockercfg", br#"{"r.example": {"auth": "dTpw"}}"#).unwrap();
        assert_eq!(
            (legacy[0].username.as_str(), legacy[0].password.as_str()),
            ("u", "p")
        );
        for bad in [
            &b"{"[..],
            br#"{"auths": {"r": {}}}"#,
            br#"{"auths": {"r": {"auth": "!!"}}}"#,
        ] {
            assert!(parse_docker_config(".dockerconfigjson", bad).is_err());
        }
    }

    #[test]
    fn challenges_parse_with_quoted_and_bare_values() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }
}

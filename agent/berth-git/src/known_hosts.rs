//! The SSH server's host key, checked against a known-hosts file in
//! OpenSSH's format (`git.knownHosts`): an unknown host or a changed key is
//! refused, so a node never sends its deploy key to, or takes its desired
//! state from, a server that is not the one it was given.
//!
//! Read: plain host patterns (`host`, `[host]:port`, `*` and `?` wildcards,
//! `!` negation), comma-separated, and `@revoked` lines. Hashed entries
//! (`|1|…`, `ssh-keygen -H`) and `@cert-authority` lines are not used; a
//! file with nothing else says so.

use std::path::Path;

use base64::Engine as _;

/// One usable line.
#[derive(Debug, Clone)]
struct Entry {
    patterns: Vec<String>,
    key: Vec<u8>,
    revoked: bool,
}

#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    /// Lines skipped because Berth does not read their form.
    skipped: usize,
}

/// Why a host key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read the known hosts file {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error(
        "{host} is not in the known hosts file (git.knownHosts){hint}: add its key, e.g. from `ssh-keyscan {scan}`, after checking it"
    )]
    Unknown {
        host: String,
        scan: String,
        hint: String,
    },
    #[error(
        "the host key of {host} is not the one in the known hosts file (git.knownHosts): it changed, or something is in between; nothing is sent"
    )]
    Changed { host: String },
    #[error("the host key of {host} is revoked in the known hosts file (git.knownHosts)")]
    Revoked { host: String },
    #[error(
        "SSH remote {url}: git.knownHosts is not set, so the server's host key cannot be checked"
    )]
    NotConfigured { url: String },
}

impl KnownHosts {
    pub fn load(path: &Path) -> Result<Self, HostKeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| HostKeyError::Unreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let mut first = words.next().unwrap_or("");
            let revoked = first == "@revoked";
            if first.starts_with('@') {
                if !revoked {
                    out.skipped += 1;
                    continue;
                }
                first = words.next().unwrap_or("");
            }
            let (Some(_kind), Some(key)) = (words.next(), words.next()) else {
                out.skipped += 1;
                continue;
            };
            if first.starts_with('|') {
                out.skipped += 1;
                continue;
            }
            let Ok(key) = base64::engine::general_purpose::STANDARD.decode(key) else {
                out.skipped += 1;
                continue;
            };
            out.entries.push(Entry {
                patterns: first.split(',').map(str::to_string).collect(),
                key,
                revoked,
            });
        }
        out
    }

    /// Checks `key` (the raw key blob the server presented) for `host` on
    /// `port`.
    pub fn check(&self, host: &str, port: u16, key: &[u8]) -> Result<(), HostKeyError> {
        let name = if port == 22 {
            host.to_string()
        } else {
            format!("[{host}]:{port}")
        };
        let listed: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| matches_host(&e.patterns, &name))
            .collect();
        if listed.iter().any(|e| e.revoked && e.key == key) {
            return Err(HostKeyError::Revoked { host: name });
        }
        if listed.iter().any(|e| !e.revoked && e.key == key) {
            return Ok(());
        }
        if listed.iter().any(|e| !e.revoked) {
            return Err(HostKeyError::Changed { host: name });
        }
        Err(HostKeyError::Unknown {
            scan: if port == 22 {
                host.to_string()
            } else {
                format!("-p {port} {host}")
            },
            host: name,
            hint: if self.skipped > 0 {
                " (hashed and @cert-authority lines are not read: list hosts in plain)".into()
            } else {
                String::new()
            },
        })
    }
}

/// OpenSSH's rule: a name matches when some pattern does and no negated
/// one does.
fn matches_host(patterns: &[String], name: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        if let Some(negated) = p.strip_prefix('!') {
            if glob(negated, name) {
                return false;
            }
        } else if glob(p, name) {
            matched = true;
        }
    }
    matched
}

/// A host pattern, case-insensitive as host names are.
fn glob(pattern: &str, name: &str) -> bool {
    berth_manifest::names::wildcard_match(&pattern.to_ascii_lowercase(), &name.to_ascii_lowercase())
}

/// The host and port of an SSH remote URL: `ssh://[user@]host[:port]/path`
/// or scp-like `user@host:path` (port 22). `None` for other schemes.
pub fn ssh_host(url: &str) -> Option<(String, u16)> {
    if let Some(rest) = url.strip_prefix("ssh://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        let hostport = authority.rsplit('@').next().unwrap_or(authority);
        if let Some(inner) = hostport.strip_prefix('[') {
            let (host, after) = inner.split_once(']')?;
            let port = after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(22);
            return Some((host.to_string(), port));
        }
        return Some(match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (hostport.to_string(), 22),
        });
    }
    if url.contains("://") || url.starts_with('/') {
        return None;
    }
    let (authority, _) = url.split_once(':')?;
    let host = authority.rsplit('@').next().unwrap_or(authority);
    Some((host.to_string(), 22))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const KEY_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIBXw8yK3ahBMn5kVo3AFiwAsW7VXM1oVSiGKZ8aFRwTK";

    fn blob(k: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(k)
            .expect("base64")
    }

    #[test]
    fn known_hosts_are_matched_by_name_port_and_key() {
        let hosts = KnownHosts::parse(&format!(
            "# fleet\n\
             git.example.com,10.0.0.5 ssh-ed25519 {KEY_A}\n\
             [127.0.0.1]:2222 ssh-ed25519 {KEY_B} test\n\
             *.internal,!evil.internal ssh-ed25519 {KEY_A}\n\
             @revoked old.example.com ssh-ed25519 {KEY_B}\n\
             |1|c2FsdA==|aGFzaA== ssh-ed25519 {KEY_A}\n"
        ));
        assert_eq!(hosts.check("git.example.com", 22, &blob(KEY_A)), Ok(()));
        assert_eq!(hosts.check("GIT.example.com", 22, &blob(KEY_A)), Ok(()));
        assert_eq!(hosts.check("127.0.0.1", 2222, &blob(KEY_B)), Ok(()));
        assert_eq!(hosts.check("git.internal", 22, &blob(KEY_A)), Ok(()));
        assert!(matches!(
            hosts.check("git.example.com", 22, &blob(KEY_B)),
            Err(HostKeyError::Changed { .. })
        ));
        assert!(matches!(
            hosts.check("127.0.0.1", 22, &blob(KEY_B)),
            Err(HostKeyError::Unknown { .. })
        ));
        assert!(matches!(
            hosts.check("evil.internal", 22, &blob(KEY_A)),
            Err(HostKeyError::Unknown { .. })
        ));
        assert!(matches!(
            hosts.check("old.example.com", 22, &blob(KEY_B)),
            Err(HostKeyError::Revoked { .. })
        ));
        let unknown = hosts
            .check("other", 2200, &blob(KEY_A))
            .expect_err("unknown");
        assert!(
            unknown.to_string().contains("ssh-keyscan -p 2200 other"),
            "{unknown}"
        );
        assert!(unknown.to_string().contains("hashed"), "{unknown}");
    }

    #[test]
    fn ssh_urls_give_their_host_and_port() {
        assert_eq!(
            ssh_host("ssh://git@h.example:2222/r.git"),
            Some(("h.example".into(), 2222))
        );
        assert_eq!(
            ssh_host("ssh://h.example/r.git"),
            Some(("h.example".into(), 22))
        );
        assert_eq!(
            ssh_host("ssh://git@[::1]:2200/r.git"),
            Some(("::1".into(), 2200))
        );
        assert_eq!(
            ssh_host("git@h.example:fleet/r.git"),
            Some(("h.example".into(), 22))
        );
        assert_eq!(ssh_host("https://h.example/r.git"), None);
        assert_eq!(ssh_host("/srv/r.git"), None);
        assert_eq!(ssh_host("file:///srv/r.git"), None);
    }
}

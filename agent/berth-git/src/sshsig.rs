//! Signed desired state: SSH signatures on commits (what `git commit -S`
//! writes with `gpg.format=ssh`), checked against an allowed-signers file in
//! the format `ssh-keygen -Y verify` and Git's `gpg.ssh.allowedSignersFile`
//! use. Written from OpenSSH's PROTOCOL.sshsig: the armoured blob holds the
//! key, the namespace (`git`), the hash algorithm and the signature over
//! `"SSHSIG" ‖ namespace ‖ reserved ‖ hash-algorithm ‖ H(commit)`.
//!
//! Ed25519 keys only: RSA would need the `rsa` crate, which carries an
//! unfixed timing advisory, and ECDSA keys are rare for signing commits.

use std::path::Path;

use base64::Engine as _;
use sha2::Digest as _;

use crate::{Mirror, Revision};

/// Who signed an accepted commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The principals of the allowed-signers line that matched.
    pub principals: String,
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Each names what was signed: `commit <id>`, `bundle <path>`.
    #[error("{0} is not signed")]
    Unsigned(String),
    #[error("{subject} has a signature Berth cannot read: {why}")]
    Malformed { subject: String, why: String },
    #[error("{subject} is signed by {fingerprint}, which is not in the allowed signers")]
    UnknownKey {
        subject: String,
        fingerprint: String,
    },
    #[error("{subject}: the signature by {fingerprint} does not match what was signed")]
    BadSignature {
        subject: String,
        fingerprint: String,
    },
    #[error("{file}:{line}: {why}")]
    AllowedSigners {
        file: String,
        line: usize,
        why: String,
    },
}

#[derive(Debug, Clone)]
struct AllowedKey {
    principals: String,
    /// The public key blob: string "ssh-ed25519", string key.
    blob: Vec<u8>,
    key: [u8; 32],
    /// `namespaces="…"`: when set, the signature's namespace (`git`,
    /// `berth-bundle`) must be among them.
    namespaces: Option<Vec<String>>,
}

/// The keys whose signatures the node accepts.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    keys: Vec<AllowedKey>,
}

/// The namespace `git commit -S` signs in.
pub const GIT_NAMESPACE: &str = "git";
/// The namespace update bundles are signed in (`ssh-keygen -Y sign -n
/// berth-bundle`): a commit signature can never pass for a bundle's.
pub const BUNDLE_NAMESPACE: &str = "berth-bundle";

impl AllowedSigners {
    pub fn load(path: &Path) -> Result<Self, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|e| SignatureError::AllowedSigners {
            file: path.display().to_string(),
            line: 0,
            why: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses `principals [options] keytype base64-key [comment]` lines.
    /// Blank lines and `#` comments are skipped; anything else that is not
    /// understood is an error naming the line, never silently dropped.
    pub fn parse(text: &str, file: &str) -> Result<Self, SignatureError> {
        let mut keys = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |why: String| SignatureError::AllowedSigners {
                file: file.to_string(),
                line: i + 1,
                why,
            };
            let words = split_words(line).map_err(&fail)?;
            let mut words = words.into_iter();
            let principals = words.next().ok_or_else(|| fail("no principals".into()))?;
            let mut next = words
                .next()
                .ok_or_else(|| fail("no key after the principals".into()))?;
            let mut namespaces = None;
            if !is_key_type(&next) {
                for option in split_options(&next) {
                    let (name, value) = option.split_once('=').unwrap_or((option, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "namespaces" => {
                            namespaces = Some(
                                value
                                    .trim_matches('"')
                                    .split(',')
                                    .map(str::to_string)
                                    .collect(),
                            );
                        }
                        other => {
                            return Err(fail(format!(
                                "option {other:?} is not supported (only namespaces=)"
                            )));
                        }
                    }
                }
                next = words
                    .next()
                    .ok_or_else(|| fail("no key type after the options".into()))?;
            }
            if next != "ssh-ed25519" {
                return Err(fail(format!(
                    "{next} keys are not supported; Berth checks ssh-ed25519 signatures"
                )));
            }
            let encoded = words
                .next()
                .ok_or_else(|| fail("no key after the key type".into()))?;
            let blob = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| fail(format!("the key is not base64: {e}")))?;
            let key = ed25519_key(&blob).map_err(fail)?;
            keys.push(AllowedKey {
                principals,
                blob,
                key,
                namespaces,
            });
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the armoured signature on `data`, made in `namespace`;
    /// `subject` names what was signed in errors (`commit 1a2b…`).
    pub fn verify(
        &self,
        namespace_wanted: &str,
        subject: &str,
        armoured: &str,
        data: &[u8],
    ) -> Result<Signer, SignatureError> {
        let malformed = |why: &str| SignatureError::Malformed {
            subject: subject.to_string(),
            why: why.to_string(),
        };
        let body: String = armoured
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN SSH SIGNATURE-----")
            .skip(1)
            .take_while(|l| *l != "-----END SSH SIGNATURE-----")
            .collect();
        if body.is_empty() {
            return Err(malformed(
                "not an SSH signature (only SSH signatures are checked)",
            ));
        }
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|_| malformed("the armour is not base64"))?;
        let mut r = Reader(&blob);
        if r.take(6) != Some(b"SSHSIG".as_slice()) {
            return Err(malformed("no SSHSIG magic"));
        }
        if r.u32() != Some(1) {
            return Err(malformed("unknown SSHSIG version"));
        }
        let public = r.string().ok_or_else(|| malformed("truncated key"))?;
        let namespace = r.string().ok_or_else(|| malformed("truncated namespace"))?;
        let reserved = r
            .string()
            .ok_or_else(|| malformed("truncated reserved field"))?;
        let hash = r.string().ok_or_else(|| malformed("truncated hash name"))?;
        let signature = r.string().ok_or_else(|| malformed("truncated signature"))?;
        if namespace != namespace_wanted.as_bytes() {
            return Err(malformed(&format!(
                "signed for namespace {:?}, not {namespace_wanted:?}",
                String::from_utf8_lossy(namespace)
            )));
        }
        let fingerprint = fingerprint(public);
        let allowed = self
            .keys
            .iter()
            .find(|k| k.blob == public)
            .filter(|k| {
                k.namespaces
                    .as_ref()
                    .is_none_or(|n| n.iter().any(|x| x == namespace_wanted))
            })
            .ok_or_else(|| SignatureError::UnknownKey {
                subject: subject.to_string(),
                fingerprint: fingerprint.clone(),
            })?;
        let digest: Vec<u8> = match hash {
            b"sha512" => sha2::Sha512::digest(data).to_vec(),
            b"sha256" => sha2::Sha256::digest(data).to_vec(),
            _ => return Err(malformed("unknown hash algorithm")),
        };
        let mut signed = b"SSHSIG".to_vec();
        for part in [namespace_wanted.as_bytes(), reserved, hash, &digest] {
            put_string(&mut signed, part);
        }
        let mut s = Reader(signature);
        if s.string() != Some(b"ssh-ed25519".as_slice()) {
            return Err(malformed("the signature is not ssh-ed25519"));
        }
        let raw: [u8; 64] = s
            .string()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("the Ed25519 signature is not 64 bytes"))?;
        let bad = || SignatureError::BadSignature {
            subject: subject.to_string(),
            fingerprint: fingerprint.clone(),
        };
        let key = ed25519_dalek::VerifyingKey::from_bytes(&allowed.key).map_err(|_| bad())?;
        key.verify_strict(&signed, &ed25519_dalek::Signature::from_bytes(&raw))
            .map_err(|_| bad())?;
        Ok(Signer {
            principals: allowed.principals.clone(),
            fingerprint,
        })
    }
}

impl Mirror {
    /// Checks the signature of a fetched commit against `allowed`.
    pub fn verify_commit(
        &self,
        revision: Revision,
        allowed: &AllowedSigners,
    ) -> Result<Signer, SignatureError> {
        let subject = format!("commit {revision}");
        let (signature, data) = self
            .repo
            .extract_signature(&revision.oid(), None)
            .map_err(|_| SignatureError::Unsigned(subject.clone()))?;
        let armoured = std::str::from_utf8(&signature).map_err(|_| SignatureError::Malformed {
            subject: subject.clone(),
            why: "the signature is not text".into(),
        })?;
        allowed.verify(GIT_NAMESPACE, &subject, armoured, &data)
    }
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-") || word.starts_with("sk-")
}

/// Splits on spaces outside double quotes (options may quote commas).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if !word.is_empty() {
        words.push(word);
    }
    Ok(words)
}

/// Splits an options word on commas outside double quotes.
fn split_options(word: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in word.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&word[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&word[start..]);
    parts
}

fn ed25519_key(blob: &[u8]) -> Result<[u8; 32], String> {
    let mut r = Reader(blob);
    if r.string() != Some(b"ssh-ed25519".as_slice()) {
        return Err("the key blob is not an ssh-ed25519 key".into());
    }
    r.string()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| "the Ed25519 key is not 32 bytes".to_string())
}

fn fingerprint(blob: &[u8]) -> String {
    let digest = sha2::Sha256::digest(blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// SSH wire format: big-endian u32 lengths before byte strings.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_signers_lines_are_parsed_or_refused_by_line() {
        let mut blob = Vec::new();
        put_string(&mut blob, b"ssh-ed25519");
        put_string(&mut blob, &[7u8; 32]);
        let key = base64::engine::general_purpose::STANDARD.encode(&blob);
        let ok = format!(
            "# admins\n\nalice@example.org ssh-ed25519 {key} alice\nbob@example.org namespaces=\"git,file\" ssh-ed25519 {key}\n"
        );
        let signers = AllowedSigners::parse(&ok, "signers").expect("parses");
        assert_eq!(signers.keys.len(), 2);
        assert_eq!(
            signers.keys[1].namespaces.as_deref(),
            Some(["git".to_string(), "file".to_string()].as_slice())
        );
        for (text, line, needle) in [
            ("a ssh-rsa AAAA", 1, "ssh-rsa keys are not supported"),
            ("\na cert-authority ssh-ed25519 AAAA", 2, "cert-authority"),
            ("a ssh-ed25519 !!!", 1, "not base64"),
            (
                "a ssh-ed25519 AAAAB3NzaC1yc2E=",
                1,
                "not an ssh-ed25519 key",
            ),
            ("a", 1, "no key"),
            ("a namespaces=\"git ssh-ed25519 x", 1, "unterminated quote"),
        ] {
            let e = AllowedSigners::parse(text, "signers").expect_err(text);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("signers:{line}:")) && msg.contains(needle),
                "{text:?}: {msg}"
            );
        }
    }

    #[test]
    fn garbage_signatures_are_malformed_not_panics() {
        let signers = AllowedSigners::default();
        for armour in [
            "",
            "-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----",
            "-----BEGIN SSH SIGNATURE-----\n!!!\n-----END SSH SIGNATURE-----",
            "-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----",
            "-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQAAAP8=\n-----END SSH SIGNATURE-----",
        ] {
            let e = signers
                .verify(GIT_NAMESPACE, "commit abc", armour, b"data")
                .expect_err(armour);
            assert!(
                matches!(e, SignatureError::Malformed { .. }),
                "{armour:?}: {e}"
            );
        }
    }
}

//! Kubernetes name rules. Berth uses names in unit names, slice names and
//! paths, so a name that passes here can never escape a path or a unit name.

/// A name that breaks its rule; the message says which rule and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

impl From<InvalidName> for String {
    fn from(e: InvalidName) -> Self {
        e.0
    }
}

/// A lowercase RFC 1123 label: namespaces, container names, port names.
pub fn dns1123_label(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name.len() > 63 {
        return Err(InvalidName(format!(
            "{name:?} must be 1 to 63 characters long (is {})",
            name.len()
        )));
    }
    if !label_chars_ok(name, |c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(InvalidName(format!(
            "{name:?} is not a lowercase RFC 1123 label: use lowercase letters, digits and '-', starting and ending with a letter or digit (e.g. 'my-name')"
        )));
    }
    Ok(())
}

/// A lowercase RFC 1123 subdomain: the name of most objects.
pub fn dns1123_subdomain(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name.len() > 253 {
        return Err(InvalidName(format!(
            "{name:?} must be 1 to 253 characters long (is {})",
            name.len()
        )));
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty() && label_chars_ok(label, |c| c.is_ascii_lowercase() || c.is_ascii_digit())
    });
    if !ok {
        return Err(InvalidName(format!(
            "{name:?} is not a lowercase RFC 1123 subdomain: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (e.g. 'example.com')"
        )));
    }
    Ok(())
}

/// An RFC 1035 label: Service names (they become DNS names and env var prefixes).
pub fn dns1035_label(name: &str) -> Result<(), InvalidName> {
    dns1123_label(name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(InvalidName(format!(
            "{name:?} must start with a lowercase letter (RFC 1035 label)"
        )));
    }
    Ok(())
}

fn label_chars_ok(label: &str, alnum: impl Fn(char) -> bool) -> bool {
    let first = label.chars().next();
    let last = label.chars().last();
    first.is_some_and(&alnum)
        && last.is_some_and(&alnum)
        && label.chars().all(|c| alnum(c) || c == '-')
}

/// A ConfigMap or Secret key: also a file name once mounted.
pub fn config_key(key: &str) -> Result<(), InvalidName> {
    if key.is_empty() || key.len() > 253 {
        return Err(InvalidName(format!(
            "key {key:?} must be 1 to 253 characters long"
        )));
    }
    if key == "." || key == ".." || key.starts_with("..") {
        return Err(InvalidName(format!(
            "key {key:?} must not be '.' or '..' or start with '..'"
        )));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(InvalidName(format!(
            "key {key:?} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// An environment variable name, as Kubernetes has accepted them for years.
pub fn env_var_name(name: &str) -> Result<(), InvalidName> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '-' || c == '.');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return Err(InvalidName(format!(
            "{name:?} is not a valid environment variable name: use letters, digits, '_', '-' and '.', not starting with a digit"
        )));
    }
    Ok(())
}

/// The stricter rule systemd applies to `Environment=` names (bash's): ASCII
/// letters, digits and `_`, not starting with a digit. Kubernetes also allows
/// `-` and `.`, which systemd would refuse at start, so the plan refuses them.
pub fn systemd_env_name(name: &str) -> Result<(), InvalidName> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "{name:?} cannot be passed to systemd: environment variable names may only hold letters, digits and '_', not starting with a digit"
        )))
    }
}

/// A label or annotation key: an optional DNS subdomain prefix and `/`, then a name.
pub fn qualified_name(key: &str) -> Result<(), InvalidName> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|e| InvalidName(format!("prefix of {key:?}: {e}")))?;
    }
    if name.is_empty()
        || name.len() > 63
        || !label_chars_ok(name, |c| c.is_ascii_alphanumeric()) && !name_with_dots(name)
    {
        return Err(InvalidName(format!(
            "{key:?} is not a qualified name: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, with an optional DNS prefix and '/'"
        )));
    }
    Ok(())
}

fn name_with_dots(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    name.chars().next().is_some_and(alnum)
        && name.chars().last().is_some_and(alnum)
        && name
            .chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
}

/// A label value: empty, or a qualified name's name part.
pub fn label_value(value: &str) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 || !name_with_dots(value) {
        return Err(InvalidName(format!(
            "label value {value:?} must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// Shell-style wildcards: `*` any run of characters, `?` one. As systemd
/// matches unit name patterns and OpenSSH host patterns.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_path_or_unit_are_refused() {
        for bad in [
            "../x", "a;b", "A", "-a", "a-", "a_b", "a/b", "", "a b", "a\nb", "é",
        ] {
            assert!(dns1123_label(bad).is_err(), "label {bad:?}");
            assert!(dns1123_subdomain(bad).is_err(), "subdomain {bad:?}");
        }
        assert!(dns1123_subdomain("..").is_err());
        assert!(dns1123_subdomain("a..b").is_err());
        let long = "a".repeat(300);
        assert!(dns1123_subdomain(&long).is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_label(&"a".repeat(63)).is_ok());
        assert!(dns1123_subdomain("web-0.example").is_ok());
        assert!(dns1035_label("0web").is_err());
        assert!(dns1035_label("web").is_ok());
    }

    #[test]
    fn config_keys_and_env_names_follow_kubernetes() {
        assert!(config_key("app.properties").is_ok());
        assert!(config_key("..data").is_err());
        assert!(config_key("a/b").is_err());
        assert!(env_var_name("DB_HOST").is_ok());
        assert!(env_var_name("1X").is_err());
        assert!(env_var_name("A=B").is_err());
        assert!(env_var_name("my.var").is_ok());
        assert!(systemd_env_name("my.var").is_err());
        assert!(systemd_env_name("MY-VAR").is_err());
        assert!(systemd_env_name("_OK_1").is_ok());
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("Bad Key").is_err());
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("-x").is_err());
    }
}

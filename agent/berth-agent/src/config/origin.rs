//! Where a setting came from, and the error that names it: the leaf every
//! part of the config imports.

use std::path::PathBuf;

/// Where a setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Credential(String),
    KernelCommandLine,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Credential(name) => write!(f, "credential {name}"),
            Origin::KernelCommandLine => f.write_str("kernel command line"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {field}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub field: String,
    pub message: String,
}

pub(crate) fn error(origin: &Origin, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        origin: origin.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

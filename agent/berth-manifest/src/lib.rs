//! Berth's manifest model: reads Kubernetes-shaped YAML from a directory,
//! decodes it into Kubernetes' own types (k8s-openapi), and validates it as
//! strictly as `kubectl apply --validate=strict` would, plus the rules Berth
//! needs because names become systemd unit names and paths.
//!
//! This crate never touches the host beyond reading the files it is given:
//! no systemd, no network, no root. Its output is a [`Catalog`] of accepted
//! objects and [`Diagnostic`]s that name file, line, object and field.

pub mod crd;
pub mod diag;
mod fastyaml;
pub mod load;
pub mod model;
pub mod names;
pub mod nodeimage;
pub mod objects;
pub mod probe;
pub mod quantity;
pub mod supported;
pub mod validate;
pub mod volumes;
pub mod yaml;

pub use diag::{Diagnostic, FieldIssue, FieldPath, ObjectRef, PathSegment, Severity, SourceRef};
pub use load::{
    Catalog, LoadError, LoadOptions, LoadedObject, ObjectSource, Rejected, SourceFile, accept_file,
    load_dir, load_sources, load_with_refusals,
};
pub use objects::{BuiltinKind, CustomObject, Object};
pub use quantity::{Quantity, QuantityError};

/// Re-exported so that downstream crates use the same Kubernetes version.
pub use k8s_openapi;

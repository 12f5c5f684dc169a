//! Pulling OCI images from registries into the node's image store.
//!
//! - [`reference`]: image names as Docker and Kubernetes read them;
//! - [`auth`]: `imagePullSecrets` and registry login challenges;
//! - [`client`]: the distribution API (manifests, indexes, resumable blobs),
//!   every byte checked against its digest;
//! - [`puller`]: pulls in the background, deduplicated, with back-off.

pub mod auth;
pub mod client;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod puller;
pub mod reference;

pub use auth::{Credential, parse_docker_config};
pub use client::{
    Artifact, BUNDLE_ARTIFACT_TYPE, BUNDLE_PART_TYPE, Client, HostConfig, Progress, PullError,
    Pulled, RegistryConfig,
};
pub use puller::{PullPhase, PullStatus, Puller};
pub use reference::{InvalidReference, Reference};

//! The typed objects Berth accepts, by `apiVersion` and `kind`.

use crate::model::{ConfigMapData, DeploymentObject, PodObject, SecretData, ServiceSpec};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// A validated object from Git.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(Box<PodObject>),
    Deployment(Box<DeploymentObject>),
    /// Berth's own types from here on (see [`crate::model`]).
    Service(Box<ServiceSpec>),
    ConfigMap(Box<ConfigMapData>),
    Secret(Box<SecretData>),
    Namespace(Box<Namespace>),
    PersistentVolume(Box<PersistentVolume>),
    PersistentVolumeClaim(Box<PersistentVolumeClaim>),
    StorageClass(Box<StorageClass>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    /// Berth's `berth.dev` kind: the OS version nodes should run.
    NodeImage(Box<crate::nodeimage::NodeImage>),
    /// An object of a kind that a CustomResourceDefinition in the same tree
    /// declares, validated against that definition's schema.
    Custom(Box<CustomObject>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomObject {
    pub api_version: String,
    pub kind: String,
    /// The object as written, with the schema's defaults applied.
    pub value: serde_json::Value,
}

/// The built-in kinds, by group, version and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinKind {
    Pod,
    Deployment,
    Service,
    ConfigMap,
    Secret,
    Namespace,
    PersistentVolume,
    PersistentVolumeClaim,
    StorageClass,
    CustomResourceDefinition,
}

impl BuiltinKind {
    pub const ALL: [BuiltinKind; 10] = [
        Self::Pod,
        Self::Deployment,
        Self::Service,
        Self::ConfigMap,
        Self::Secret,
        Self::Namespace,
        Self::PersistentVolume,
        Self::PersistentVolumeClaim,
        Self::StorageClass,
        Self::CustomResourceDefinition,
    ];

    pub fn api_version(self) -> &'static str {
        match self {
            Self::Deployment => "apps/v1",
            Self::StorageClass => "storage.k8s.io/v1",
            Self::CustomResourceDefinition => "apiextensions.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::Service => "Service",
            Self::ConfigMap => "ConfigMap",
            Self::Secret => "Secret",
            Self::Namespace => "Namespace",
            Self::PersistentVolume => "PersistentVolume",
            Self::PersistentVolumeClaim => "PersistentVolumeClaim",
            Self::StorageClass => "StorageClass",
            Self::CustomResourceDefinition => "CustomResourceDefinition",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Self::Namespace
                | Self::PersistentVolume
                | Self::StorageClass
                | Self::CustomResourceDefinition
        )
    }

    pub fn find(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }
}

/// The API group of an `apiVersion`: `apps/v1` → `apps`, `v1` → ``.
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

impl Object {
    pub fn kind(&self) -> &str {
        match self {
            Object::Pod(_) => "Pod",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::Namespace(_) => "Namespace",
            Object::PersistentVolume(_) => "PersistentVolume",
            Object::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
            Object::StorageClass(_) => "StorageClass",
            Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
            Object::NodeImage(_) => crate::nodeimage::KIND,
            Object::Custom(c) => &c.kind,
        }
    }
}

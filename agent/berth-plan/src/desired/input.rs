//! One container to resolve, with what its pod decided for it.

use berth_manifest::FieldPath;
use berth_manifest::model::Container;

use crate::resources::{ContainerResources, QosClass};
use crate::select::PodInstance;
use crate::units::UnitName;
use crate::volumes::PodVolume;

use super::model::RestartPolicy;

pub(super) struct ContainerInput<'a> {
    pub(super) instance: &'a PodInstance<'a>,
    pub(super) container: &'a Container,
    pub(super) is_init: bool,
    pub(super) path: &'a FieldPath,
    pub(super) resources: ContainerResources,
    pub(super) qos: QosClass,
    pub(super) restart_policy: RestartPolicy,
    pub(super) slice: &'a UnitName,
    pub(super) after: Vec<String>,
    pub(super) volumes: &'a [PodVolume],
}

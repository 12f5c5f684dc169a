//! Berth's planner: from a [`Catalog`](berth_manifest::Catalog) of validated
//! objects and a description of the node, compute which pods run here, the
//! systemd units and properties they need, and the ordered actions that take
//! the node from what runs to what Git wants, each with its reason.
//!
//! Everything here is pure: no systemd, no files, no clock. `observe` and
//! `apply` live in the host adapters; this crate only computes values.

pub mod actual;
pub mod desired;
pub mod expand;
pub mod images;
pub mod node;
pub mod pipeline;
pub mod plan;
pub mod resources;
pub mod security;
pub mod units;
pub mod volumes;

pub use actual::{ActiveState, ActualState, ActualUnit};
pub use desired::{ContainerUnit, DeclaredPort, DesiredPod, PullPolicy, PullSecret, SliceUnit};
pub use images::{ImageCatalog, ImageConfig};
pub use node::NodeInfo;
pub use pipeline::{NodePlan, plan_node, validate_pods};
pub use plan::{Action, Change, Plan, Verb};
pub use resources::QosClass;
pub use units::{PodId, Properties, PropertyValue, UnitName};

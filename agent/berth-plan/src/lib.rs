//! Berth's planner: from a [`Catalog`](berth_manifest::Catalog) of validated
//! objects and a description of the node, compute which pods run here, the
//! systemd units and properties they need, and the ordered actions that take
//! the node from what runs to what Git wants, each with its reason.
//!
//! Everything here is pure: no systemd, no files, no clock. `observe` and
//! `apply` live in the host adapters; this crate only computes values. It
//! is the one place where the node's decisions are taken: what starts,
//! stops, changes, waits, is pulled, and which difference is drift. The
//! agent applies the plan it is given and nothing else, so `berth plan
//! --actual` on the agent's snapshot prints exactly what the node does.

pub mod actual;
pub mod context;
pub mod desired;
pub mod drift;
pub mod ephemeral;
pub mod expand;
pub mod health;
pub mod images;
pub mod node;
pub mod osupdate;
pub mod pipeline;
pub mod plan;
pub mod podsecurity;
pub mod pressure;
pub mod reason;
pub mod resources;
pub mod rollout;
pub mod security;
pub mod select;
pub mod services;
pub mod units;
pub mod volumes;
pub mod waits;

pub use actual::{
    ActiveState, ActualState, ActualUnit, ImageFact, PodFacts, PullFact, PullPhase, Wiring,
};
pub use desired::{ContainerUnit, DeclaredPort, DesiredPod, PullPolicy, PullSecret, SliceUnit};
pub use images::{ImageCatalog, ImageConfig};
pub use node::NodeInfo;
pub use pipeline::{
    DesiredNode, NodePlan, desire, desire_with, plan_desired, plan_node, validate_pods,
};
pub use plan::{Action, Change, Held, Plan, Verb};
pub use reason::{FailureReason, HoldReason};
pub use resources::QosClass;
pub use units::{PodId, Properties, PropertyValue, UnitName};

//! The host side of pods. It owns everything that touches the machine for
//! a pod: systemd units over D-Bus ([`dbus`], with its in-memory twin
//! [`fake`] behind the [`systemd::Systemd`] trait), the local OCI image
//! store ([`images`]), container root filesystems ([`rootfs`]), the
//! `observe` and `apply` stages ([`reconcile`]) and pod status read from
//! units and cgroups ([`status`]).
//!
//! It must not decide anything: what to run and why comes from
//! `berth-plan`; this crate carries the plan out and reports what happened.

pub mod contract;
pub mod dbus;
pub mod fake;
pub mod parallel;
/// The image store, in its own crate (`berth-images`).
pub use berth_images as images;
pub mod reconcile;
pub mod rootfs;
pub mod status;
pub mod systemd;
pub mod usage;

pub use reconcile::{ApplyFailure, ApplyReport, FailureReason, Host, Observed, apply, observe};
pub use systemd::{KillWhom, Systemd, SystemdError, UnitDetails};

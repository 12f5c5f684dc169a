//! Over-the-air OS updates, A/B: a signed bundle ([`bundle`]) is written
//! into the node's other root slot and booted with systemd-boot's boot
//! counting ([`slots`]), so that a slot that does not come up healthy falls
//! back to the one before by itself.

pub mod bundle;
pub mod slots;

pub use bundle::{BundleError, Manifest, Verified};
pub use slots::{Entry, Layout, Slot, SlotError};

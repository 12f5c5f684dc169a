//! Over-the-air OS updates, A/B: a signed bundle ([`bundle`]) is written
//! into the node's other root slot and booted with systemd-boot's boot
//! counting ([`slots`]); on the new slot, a health gate ([`gate`]) decides
//! whether the boot is complete, and the update record on the shared /var
//! ([`record`]) tells the slot that boots next what became of it.

pub mod bundle;
pub mod gate;
pub mod install;
pub mod record;
pub mod slots;
pub mod status;

pub use bundle::{BundleError, Manifest, Verified};
pub use record::{Attempt, Outcome, UpdateRecord};
pub use slots::{Entry, Layout, Slot, SlotError};
pub use status::{OsStatus, UpdateStatus, os_status};

//! The agent's one clock, and how a revision is shown.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch: what status, drift and the planner's
/// snapshot are stamped with.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The first 12 hex digits of a revision, as logs and status show it.
pub(crate) fn short(rev: &str) -> String {
    rev.chars().take(12).collect()
}

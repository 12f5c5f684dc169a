//! Waiting between passes: the poll timer with jitter, wake-ups from
//! signals and unit changes, and the watchdog pinged meanwhile.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::notify::Notifier;

/// What wakes the loop besides its poll timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Fetch and reconcile now (`systemctl reload berth-agent`, SIGHUP).
    SyncNow,
    /// A Berth unit changed state: reconcile without fetching.
    UnitChanged,
    /// A probe result changed, or a kill's grace period ended: readiness
    /// reaches endpoints at once; a kill asks for a pass.
    Health,
    Shutdown,
}

/// Unit changes come in bursts (a stop, a restart job, a start); one
/// reconcile after the burst is enough.
const UNIT_CHANGE_DEBOUNCE: Duration = Duration::from_secs(1);

/// Waits for the timer or a wake-up, pinging the watchdog. Unit changes are
/// debounced; a shutdown or sync request wins over them.
pub(crate) fn wait_for_wake(
    total: Duration,
    notifier: &Notifier,
    wake: &Receiver<Wake>,
) -> Option<Wake> {
    let end = Instant::now() + total;
    loop {
        notifier.watchdog();
        let now = Instant::now();
        if now >= end {
            return None;
        }
        match wake.recv_timeout((end - now).min(notifier.ping_interval())) {
            Ok(Wake::UnitChanged) => {
                let settle = Instant::now() + UNIT_CHANGE_DEBOUNCE;
                let mut result = Wake::UnitChanged;
                while let Some(left) = settle.checked_duration_since(Instant::now()) {
                    match wake.recv_timeout(left) {
                        // The pass after the burst reads probe results too.
                        Ok(Wake::UnitChanged | Wake::Health) => {}
                        Ok(other) => {
                            result = other;
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                return Some(result);
            }
            Ok(other) => return Some(other),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep((end - Instant::now().min(end)).min(notifier.ping_interval()));
            }
        }
    }
}

/// ±10%, from the clock's nanoseconds: enough to keep a fleet from polling
/// in lockstep, without a random number crate.
pub(crate) fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let factor = 0.9 + f64::from(nanos % 1000) / 1000.0 * 0.2;
    d.mul_f64(factor)
}

//! The agent's lines.

/// The agent's lines, as `tracing` events: the binary decides where they go
/// (the journal with fields, the console, stderr). Lines about one pod
/// carry `BERTH_POD` and `BERTH_UNIT`; every line of a pass carries the
/// pass's `BERTH_REVISION` (a span).
#[derive(Debug, Clone, Copy, Default)]
pub struct Log;

impl Log {
    pub fn from_env() -> Self {
        Self
    }
    pub fn info(&self, message: &str) {
        tracing::info!("{message}");
    }
    pub fn warn(&self, message: &str) {
        tracing::warn!("{message}");
    }
    pub fn error(&self, message: &str) {
        tracing::error!("{message}");
    }
    /// A line about one pod (and one of its units, when there is one).
    pub fn pod(&self, level: Level, pod: &str, unit: &str, message: &str) {
        match level {
            Level::Info => tracing::info!(berth_pod = pod, berth_unit = unit, "{message}"),
            Level::Warn => tracing::warn!(berth_pod = pod, berth_unit = unit, "{message}"),
            Level::Error => tracing::error!(berth_pod = pod, berth_unit = unit, "{message}"),
        }
    }
}

/// How much a line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

//! The node agent. One loop: read the config, fetch the branch, load and
//! validate the tree, plan, apply, report; then wait for the next poll. A
//! failure is logged with its cause and retried with backoff; a bad commit
//! is reported once and the last good revision is kept until a new commit
//! arrives. Running pods never depend on this loop.
//!
//! The crate reads as the pass does (see `docs/design.md`): [`agent`] is
//! the loop, `intake` takes a fetched revision, `reconcile` observes,
//! prepares, plans and applies, [`publisher`] and [`report`] send status
//! and drift to Git. Host paths are passed in ([`AgentPaths`]), so tests
//! run it on temporary directories.

pub mod agent;
mod clock;
pub mod config;
pub mod drift;
pub mod events;
pub mod grpc;
pub mod hooks;
pub mod host;
pub mod images;
mod intake;
mod limits;
pub mod log;
pub mod metrics;
pub mod network;
pub mod notify;
pub mod osupdate;
pub mod pressure;
pub mod probe_io;
pub mod prober;
pub mod publisher;
mod reconcile;
pub mod report;
mod rollouts;
pub mod state;
pub mod storage;
pub mod wake;

pub use agent::{Agent, PassOutcome};
pub use host::{AgentPaths, Runtime};
pub use log::{Level, Log};
pub use wake::Wake;

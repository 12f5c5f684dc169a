//! A Git server that accepts and then stalls never holds the caller: the
//! fetch ends at the stall timeout with a clear error, and works again when
//! the server does. Its own test binary: the timeouts are process-wide
//! libgit2 settings, set here before anything else uses Git.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_git::{Liveness, Mirror, Remote};

mod support;
use support::{Server, Tmp};

#[test]
fn a_stalled_server_ends_the_fetch_at_the_timeout_and_a_moving_one_keeps_it_alive() {
    berth_git::set_network_timeouts(Duration::from_secs(2), Duration::from_secs(2));
    let server = Server::start("stall");
    let dir = Tmp::new("stall-m");
    let mut mirror = Mirror::open(&dir.0.join("mirror.git")).expect("mirror");
    let beats = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&beats);
    mirror.set_liveness(Liveness::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    let remote = Remote {
        url: server.url.clone(),
        branch: "main".into(),
    };

    server.stall(true);
    let started = Instant::now();
    let err = mirror
        .fetch(&remote, None)
        .expect_err("stalled")
        .to_string();
    let took = started.elapsed();
    eprintln!(
        "stalled fetch failed after {:.1} s: {err}",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(20),
        "the stall held the fetch {took:?}"
    );
    assert!(err.to_lowercase().contains("timed out"), "{err}");
    assert_eq!(
        beats.load(Ordering::SeqCst),
        0,
        "a stalled transfer is not alive"
    );

    // The server is back: the next fetch works, and its progress is seen.
    server.stall(false);
    mirror.fetch(&remote, None).expect("fetch after the stall");
    assert!(
        beats.load(Ordering::SeqCst) > 0,
        "progress was never reported"
    );
}

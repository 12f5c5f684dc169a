//! What several QEMU scenarios share that needs the agent's own types
//! (the library stays free of them).

use std::time::{Duration, Instant};

use berth_agent::report::NodeStatusDoc;
use berth_qemu_tests::GitHost;

/// Waits until node `node`'s status branch on the host holds a
/// `status.yaml` that `told` accepts; fails naming `what`, with the last
/// document read.
pub fn await_status_branch(
    git: &GitHost,
    node: &str,
    what: &str,
    timeout: Duration,
    told: impl Fn(&NodeStatusDoc) -> bool,
) {
    let end = Instant::now() + timeout;
    loop {
        let doc = berth_git::publish::read_branch_file(
            &git.dir.join("desired.git"),
            &format!("berth/status/{node}"),
            "status.yaml",
        )
        .ok()
        .flatten()
        .and_then(|f| f.content)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
        if NodeStatusDoc::from_yaml(&doc).is_ok_and(|d| told(&d)) {
            return;
        }
        assert!(
            Instant::now() < end,
            "the status branch does not tell {what}:\n{doc}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

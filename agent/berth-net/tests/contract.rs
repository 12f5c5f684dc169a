//! The network host contract on the real kernel: every case of
//! `berth_net::contract` run by [`KernelHost`] on a thread of its own that
//! has entered a fresh, empty network namespace (so the host's links and
//! rulesets are never touched). The same cases run on the fake in
//! `cargo test`. Needs root and fails loudly without it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use berth_net::{KernelHost, NetworkHost, contract, link};

#[test]
#[ignore = "privileged: needs root; scripts/test.sh runs it in tier 2"]
fn every_contract_case_passes_on_the_kernel() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the privileged networking tests need root (CI runs them as root)"
    );
    let mut failures = Vec::new();
    for (n, (name, case)) in contract::CASES.iter().enumerate() {
        // Each case gets a node of its own: a thread in a new namespace.
        let outcome = std::thread::spawn(move || {
            link::isolate_thread().expect("a network namespace of the test's own");
            let dir =
                std::env::temp_dir().join(format!("berth-net-contract-{n}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            let host = KernelHost::new(dir.join("netns"));
            let result = case(&host as &dyn NetworkHost);
            // Namespace names are bind mounts: unbind them before the
            // scratch directory goes.
            for ns in host.pod_namespaces() {
                let _ = host.remove_pod(&ns, &berth_net::host_if_name(&ns));
            }
            let _ = std::fs::remove_dir_all(&dir);
            result
        })
        .join()
        .expect("the case's thread");
        if let Err(e) = outcome {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(!contract::CASES.is_empty(), "no cases to run");
    assert!(failures.is_empty(), "{failures:#?}");
}

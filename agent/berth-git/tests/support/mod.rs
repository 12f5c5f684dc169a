//! What the Git tests share: scratch directories, the `git` command, and
//! a real Git server (`git daemon --inetd`) on loopback that can be made
//! to stall.

#![allow(dead_code, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("berth-git-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository `repo.git` under a served directory, with `main`
/// holding one manifest, and `git://127.0.0.1:<port>/repo.git` serving it.
pub struct Server {
    pub root: Tmp,
    pub url: String,
    /// While set, connections are accepted and then left without a byte:
    /// a server that stalls.
    stalled: Arc<AtomicBool>,
}

impl Server {
    pub fn start(tag: &str) -> Self {
        let root = Tmp::new(tag);
        let bare = root.0.join("repo.git");
        git(&root.0, &["init", "-q", "--bare", "-b", "main", "repo.git"]);
        let work = root.0.join("work");
        git(&root.0, &["init", "-q", "-b", "main", "work"]);
        std::fs::write(work.join("pod.yaml"), "kind: Pod\n").expect("write");
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "first"]);
        git(
            &work,
            &["push", "-q", bare.to_str().expect("utf-8"), "main"],
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let base = root.0.clone();
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = Arc::clone(&stalled);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                if stall.load(Ordering::SeqCst) {
                    // Held open, never answered, closed a minute later.
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_secs(60));
                        drop(conn);
                    });
                    continue;
                }
                let Ok(input) = conn.try_clone() else { return };
                let _ = Command::new("git")
                    .args(["daemon", "--inetd", "--export-all", "--enable=receive-pack"])
                    .arg(format!("--base-path={}", base.display()))
                    .arg(&base)
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(input)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(conn)))
                    .stderr(Stdio::null())
                    .spawn();
            }
        });
        Self {
            url: format!("git://127.0.0.1:{port}/repo.git"),
            root,
            stalled,
        }
    }
    /// Stalls every new connection, or serves them again.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
    pub fn bare(&self) -> PathBuf {
        self.root.0.join("repo.git")
    }
    pub fn rev(&self, refname: &str) -> Option<String> {
        let out = Command::new("git")
            .args(["rev-parse", "--verify", "-q", refname])
            .current_dir(self.bare())
            .output()
            .expect("git runs");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
    pub fn work(&self) -> PathBuf {
        self.root.0.join("work")
    }
}

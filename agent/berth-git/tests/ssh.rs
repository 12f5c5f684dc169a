//! SSH remotes against a real OpenSSH server on loopback (Debian's
//! openssh-server, started by the test with its own host key and config),
//! serving a bare repository: fetch and status push work when the server's
//! host key is in `git.knownHosts`, and an unknown or changed key, or no
//! known hosts at all, is refused before anything is sent.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_git::publish::PushUpdate;
use berth_git::{Credentials, FileChange, Mirror, Remote};

mod support;
use support::{Tmp, git};

const SSHD: &str = "/usr/sbin/sshd";

struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(path.with_extension("pub")).expect("public key")
}

fn start_sshd(dir: &Path) -> (Sshd, u16, String) {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: install Debian's openssh-server (scripts/deps.sh does)"
    );
    let host_public = keygen(&dir.join("host_key"));
    let client_public = keygen(&dir.join("client_key"));
    std::fs::write(dir.join("authorized_keys"), client_public).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {0}/host_key\nAuthorizedKeysFile {0}/authorized_keys\nPidFile {0}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n",
            dir.display()
        ),
    )
    .unwrap();
    // Its privilege separation directory, which Debian's unit makes.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd starts");
    let sshd = Sshd(child);
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "sshd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (sshd, port, host_public)
}

fn credentials(dir: &Path, known_hosts: Option<PathBuf>) -> Credentials {
    Credentials::SshKey {
        user: "root".into(),
        private_key: dir.join("client_key"),
        known_hosts,
    }
}

#[test]
#[ignore = "privileged: runs sshd on loopback as root; scripts/test.sh runs it in tier 2"]
fn an_ssh_remote_is_fetched_and_pushed_only_when_its_host_key_is_known() {
    let tmp = Tmp::new("ssh");
    let dir = &tmp.0;
    let (_sshd, port, host_public) = start_sshd(dir);
    git(dir, &["init", "-q", "--bare", "-b", "main", "repo.git"]);
    git(dir, &["init", "-q", "-b", "main", "work"]);
    std::fs::write(dir.join("work/pod.yaml"), "kind: Pod\n").unwrap();
    git(&dir.join("work"), &["add", "."]);
    git(&dir.join("work"), &["commit", "-q", "-m", "first"]);
    git(
        &dir.join("work"),
        &["push", "-q", dir.join("repo.git").to_str().unwrap(), "main"],
    );
    let head = git(&dir.join("work"), &["rev-parse", "HEAD"]);
    let remote = Remote {
        url: format!("ssh://root@127.0.0.1:{port}{}/repo.git", dir.display()),
        branch: "main".into(),
    };
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_public}")).unwrap();
    let mirror = Mirror::open(&dir.join("mirror.git")).unwrap();

    // Known: fetched, and the status branch pushed.
    let fetched = mirror
        .fetch(&remote, Some(&credentials(dir, Some(known.clone()))))
        .expect("fetch over SSH");
    assert_eq!(fetched.to_string(), head);
    mirror
        .commit(
            "refs/berth/out/status",
            None,
            None,
            &[FileChange {
                path: "status.yaml".into(),
                content: Some(b"phase: Running\n".to_vec()),
            }],
            "status of n1",
            ("berth on n1", "berth@n1.invalid"),
        )
        .expect("commit");
    mirror
        .push(
            &remote.url,
            Some(&credentials(dir, Some(known.clone()))),
            &[PushUpdate {
                local: Some("refs/berth/out/status".into()),
                remote: "refs/heads/berth/status/n1".into(),
            }],
        )
        .expect("push over SSH");
    git(
        &dir.join("repo.git"),
        &["rev-parse", "--verify", "refs/heads/berth/status/n1"],
    );

    // A changed key: another server, or someone in between.
    let other = keygen(&dir.join("other_key"));
    std::fs::write(&known, format!("[127.0.0.1]:{port} {other}")).unwrap();
    let err = mirror
        .fetch(&remote, Some(&credentials(dir, Some(known.clone()))))
        .expect_err("a changed key")
        .to_string();
    assert!(
        err.contains("is not the one in the known hosts file"),
        "{err}"
    );
    // An unknown host: the file lists only others.
    std::fs::write(&known, format!("git.example.com {host_public}")).unwrap();
    let err = mirror
        .fetch(&remote, Some(&credentials(dir, Some(known.clone()))))
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains(&format!(
            "[127.0.0.1]:{port} is not in the known hosts file"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("ssh-keyscan -p {port} 127.0.0.1")),
        "{err}"
    );
    // No known hosts at all: refused, not trusted on first use.
    let err = mirror
        .fetch(&remote, Some(&credentials(dir, None)))
        .expect_err("no known hosts")
        .to_string();
    assert!(err.contains("git.knownHosts is not set"), "{err}");
}

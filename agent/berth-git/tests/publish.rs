//! The node's branches against real Git servers: a bare repository served
//! by `git daemon --inetd` on loopback (so server-side hooks and
//! `receive.denyNonFastForwards` run, which libgit2's local transport would
//! skip), and commits signed by `ssh-keygen` through the `git` command.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_git::{
    AllowedSigners, FileChange, Mirror, PushError, PushUpdate, Remote, Revision, SignatureError,
};

mod support;
use support::{Server, Tmp, git};

fn mirror_for(server: &Server, tag: &str) -> (Tmp, Mirror, Revision) {
    let dir = Tmp::new(tag);
    let mirror = Mirror::open(&dir.0.join("mirror.git")).expect("mirror");
    let remote = Remote {
        url: server.url.clone(),
        branch: "main".into(),
    };
    let main = mirror.fetch(&remote, None).expect("fetch");
    (dir, mirror, main)
}

const AUTHOR: (&str, &str) = ("berth on n1", "berth@n1.invalid");

fn status_update() -> Vec<PushUpdate> {
    vec![PushUpdate {
        local: Some("refs/berth/out/status".into()),
        remote: "refs/heads/berth/status/n1".into(),
    }]
}

#[test]
fn status_and_drift_branches_are_written_pushed_read_and_deleted() {
    let server = Server::start("write");
    let (_dir, mirror, main) = mirror_for(&server, "write-m");
    let status = mirror
        .commit(
            "refs/berth/out/status",
            None,
            None,
            &[FileChange {
                path: "status.yaml".into(),
                content: Some(b"phase: Running\n".to_vec()),
            }],
            "status of n1",
            AUTHOR,
        )
        .expect("commit");
    let second = mirror
        .commit(
            "refs/berth/out/status",
            Some(status),
            None,
            &[FileChange {
                path: "status.yaml".into(),
                content: Some(b"phase: Failed\n".to_vec()),
            }],
            "status of n1",
            AUTHOR,
        )
        .expect("commit");
    assert_eq!(mirror.depth(second, 10), 2);
    // A drift commit sits on the applied desired commit and edits its files.
    let drift = mirror
        .commit(
            "refs/berth/out/drift",
            Some(main),
            Some(main),
            &[
                FileChange {
                    path: "pod.yaml".into(),
                    content: Some(b"kind: Pod # adopted\n".to_vec()),
                },
                FileChange {
                    path: "drift/n1/DRIFT.md".into(),
                    content: Some(b"# Drift\n".to_vec()),
                },
            ],
            "drift on n1",
            AUTHOR,
        )
        .expect("commit");
    let mut updates = status_update();
    updates.push(PushUpdate {
        local: Some("refs/berth/out/drift".into()),
        remote: "refs/heads/berth/drift/n1".into(),
    });
    mirror.push(&server.url, None, &updates).expect("push");
    assert_eq!(
        server.rev("refs/heads/berth/status/n1"),
        Some(second.to_string())
    );
    assert_eq!(
        server.rev("refs/heads/berth/drift/n1"),
        Some(drift.to_string())
    );
    // The drift commit's parent is the desired commit: its diff is the drift.
    let diff = git(
        &server.bare(),
        &["diff", "--stat", "main", "berth/drift/n1"],
    );
    assert!(
        diff.contains("pod.yaml") && diff.contains("drift/n1/DRIFT.md"),
        "{diff}"
    );

    // Any clone reads the branches, local or remote-tracking.
    let found =
        berth_git::publish::read_branch_file(&server.bare(), "berth/status/n1", "status.yaml")
            .expect("reads")
            .expect("branch exists");
    assert_eq!(found.revision, second);
    assert_eq!(
        found.content.as_deref(),
        Some(b"phase: Failed\n".as_slice())
    );
    let clone = server.root.0.join("clone");
    git(
        &server.root.0,
        &[
            "clone",
            "-q",
            server.bare().to_str().expect("utf-8"),
            "clone",
        ],
    );
    let found = berth_git::publish::read_branch_file(&clone, "berth/drift/n1", "drift/n1/DRIFT.md")
        .expect("reads")
        .expect("remote-tracking branch found");
    assert_eq!(found.content.as_deref(), Some(b"# Drift\n".as_slice()));
    assert!(
        berth_git::publish::read_branch_file(&clone, "berth/status/other", "status.yaml")
            .expect("reads")
            .is_none()
    );

    // Deleting the drift branch when the drift is gone.
    mirror
        .push(
            &server.url,
            None,
            &[PushUpdate {
                local: None,
                remote: "refs/heads/berth/drift/n1".into(),
            }],
        )
        .expect("delete");
    assert_eq!(server.rev("refs/heads/berth/drift/n1"), None);
    // Deleting it again (the node does not know whether a person did) is fine.
    mirror
        .push(
            &server.url,
            None,
            &[PushUpdate {
                local: None,
                remote: "refs/heads/berth/drift/n1".into(),
            }],
        )
        .expect("deleting an absent branch is not an error");

    // A branch deleted by hand is written again by the next push.
    git(&server.bare(), &["branch", "-D", "berth/status/n1"]);
    mirror
        .push(&server.url, None, &status_update())
        .expect("push");
    assert_eq!(
        server.rev("refs/heads/berth/status/n1"),
        Some(second.to_string())
    );
}

#[test]
fn pushes_the_server_refuses_are_reported_with_its_reason() {
    let server = Server::start("reject");
    let (_dir, mirror, _) = mirror_for(&server, "reject-m");
    let commit = |parent, text: &str| {
        mirror
            .commit(
                "refs/berth/out/status",
                parent,
                None,
                &[FileChange {
                    path: "status.yaml".into(),
                    content: Some(text.as_bytes().to_vec()),
                }],
                "status",
                AUTHOR,
            )
            .expect("commit")
    };
    // Branch protection by a hook.
    let hook = server.bare().join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\nwhile read old new ref; do case $ref in refs/heads/berth/status/*) echo \"status branches are protected\" >&2; exit 1;; esac; done\n",
    )
    .expect("hook");
    Command::new("chmod")
        .args(["+x", hook.to_str().expect("utf-8")])
        .status()
        .expect("chmod");
    let first = commit(None, "first");
    let err = mirror
        .push(&server.url, None, &status_update())
        .expect_err("the hook refuses");
    assert!(err.is_rejection(), "{err}");
    assert!(
        err.to_string().contains("refs/heads/berth/status/n1"),
        "{err}"
    );
    assert_eq!(server.rev("refs/heads/berth/status/n1"), None);

    // Non-fast-forward refused by the server's configuration.
    std::fs::remove_file(&hook).expect("remove hook");
    mirror
        .push(&server.url, None, &status_update())
        .expect("push");
    assert_eq!(
        server.rev("refs/heads/berth/status/n1"),
        Some(first.to_string())
    );
    git(
        &server.bare(),
        &["config", "receive.denyNonFastForwards", "true"],
    );
    commit(None, "second"); // a new root: not a descendant of what the server has
    let err = mirror
        .push(&server.url, None, &status_update())
        .expect_err("non-fast-forward refused");
    assert!(err.is_rejection(), "{err}");
    assert_eq!(
        server.rev("refs/heads/berth/status/n1"),
        Some(first.to_string())
    );

    // A server that is not there is a transport error, not a rejection.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let err = mirror
        .push(
            &format!("git://127.0.0.1:{port}/repo.git"),
            None,
            &status_update(),
        )
        .expect_err("nobody listens");
    assert!(matches!(err, PushError::Transport { .. }), "{err}");
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs (package openssh-client)");
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public.trim().to_string())
}

fn signed_commit(work: &Path, key: Option<&Path>, file: &str) -> String {
    std::fs::write(work.join(file), "kind: Pod\n").expect("write");
    git(work, &["add", "."]);
    let mut args = vec!["-c".to_string(), "gpg.format=ssh".to_string()];
    if let Some(k) = key {
        args.extend(["-c".into(), format!("user.signingkey={}", k.display())]);
    }
    args.extend(["commit".into(), "-q".into(), "-m".into(), file.into()]);
    if key.is_some() {
        args.push("-S".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    git(work, &args);
    git(work, &["rev-parse", "HEAD"])
}

#[test]
fn only_commits_signed_by_allowed_keys_are_accepted() {
    let server = Server::start("sign");
    let keys = Tmp::new("sign-keys");
    let (alice, alice_pub) = keygen(&keys.0, "alice");
    let (mallory, _) = keygen(&keys.0, "mallory");
    let allowed = AllowedSigners::parse(&format!("alice@example.org {alice_pub}\n"), "allowed")
        .expect("parses");
    let work = server.work();
    let good = signed_commit(&work, Some(&alice), "a.yaml");
    let unknown = signed_commit(&work, Some(&mallory), "b.yaml");
    let unsigned = signed_commit(&work, None, "c.yaml");
    // The good commit's signature over a changed message: a forgery.
    let raw = git(&work, &["cat-file", "commit", &good]);
    let forged_text = raw.replace("\n\na.yaml", "\n\nforged");
    std::fs::write(work.join("forged"), format!("{forged_text}\n")).expect("write");
    let forged = git(&work, &["hash-object", "-t", "commit", "-w", "forged"]);
    git(&work, &["branch", "forged", &forged]);
    git(
        &work,
        &[
            "push",
            "-q",
            "-f",
            server.bare().to_str().expect("utf-8"),
            "main",
            "forged",
        ],
    );

    let dir = Tmp::new("sign-m");
    let mirror = Mirror::open(&dir.0.join("mirror.git")).expect("mirror");
    for branch in ["main", "forged"] {
        mirror
            .fetch(
                &Remote {
                    url: server.url.clone(),
                    branch: branch.into(),
                },
                None,
            )
            .expect("fetch");
    }
    let rev = |hex: &str| Revision::parse(hex).expect("hex");
    let signer = mirror
        .verify_commit(rev(&good), &allowed)
        .expect("alice's commit is accepted");
    assert_eq!(signer.principals, "alice@example.org");
    assert!(signer.fingerprint.starts_with("SHA256:"));
    let fingerprint = Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(alice.with_extension("pub"))
        .output()
        .expect("ssh-keygen");
    assert!(
        String::from_utf8_lossy(&fingerprint.stdout).contains(&signer.fingerprint),
        "same fingerprint as ssh-keygen -l"
    );
    assert!(matches!(
        mirror.verify_commit(rev(&unknown), &allowed),
        Err(SignatureError::UnknownKey { .. })
    ));
    assert!(matches!(
        mirror.verify_commit(rev(&unsigned), &allowed),
        Err(SignatureError::Unsigned(_))
    ));
    assert!(matches!(
        mirror.verify_commit(rev(&forged), &allowed),
        Err(SignatureError::BadSignature { .. })
    ));
    // A key allowed only for another namespace does not count for Git.
    let file_only = AllowedSigners::parse(
        &format!("alice@example.org namespaces=\"file\" {alice_pub}\n"),
        "allowed",
    )
    .expect("parses");
    assert!(matches!(
        mirror.verify_commit(rev(&good), &file_only),
        Err(SignatureError::UnknownKey { .. })
    ));
}

#[test]
fn a_mirror_of_many_fetches_is_repacked_into_one_pack_without_losing_a_commit() {
    let server = Server::start("compact");
    let (_dir, mut mirror, first) = mirror_for(&server, "compact-m");
    let remote = Remote {
        url: server.url.clone(),
        branch: "main".into(),
    };
    let work = server.work();
    let bare = server.bare();
    let mut revisions = vec![first];
    for i in 0..6 {
        std::fs::write(work.join("pod.yaml"), format!("kind: Pod # {i}\n")).expect("write");
        git(&work, &["commit", "-q", "-am", &format!("change {i}")]);
        git(
            &work,
            &["push", "-q", bare.to_str().expect("utf-8"), "main"],
        );
        revisions.push(mirror.fetch(&remote, None).expect("fetch"));
    }
    assert!(mirror.pack_count() >= 6, "{} packs", mirror.pack_count());
    let replaced = mirror.compact(&[revisions[0]]).expect("compact");
    assert!(replaced >= 6);
    assert_eq!(mirror.pack_count(), 1);
    for r in &revisions {
        let (files, refused) = mirror
            .read_manifests(*r, ".", &Default::default())
            .expect("every commit still reads");
        assert_eq!((files.len(), refused.len()), (1, 0));
    }
    // Again, with nothing new: the pack it writes has the same name as the
    // one there, which must survive.
    mirror.compact(&[]).expect("compact again");
    assert_eq!(mirror.pack_count(), 1);
    assert!(
        mirror
            .read_manifests(revisions[6], ".", &Default::default())
            .is_ok()
    );
    // And fetching goes on as before.
    std::fs::write(work.join("pod.yaml"), "kind: Pod # after\n").expect("write");
    git(&work, &["commit", "-q", "-am", "after"]);
    git(
        &work,
        &["push", "-q", bare.to_str().expect("utf-8"), "main"],
    );
    let after = mirror.fetch(&remote, None).expect("fetch after compaction");
    assert!(
        mirror
            .read_manifests(after, ".", &Default::default())
            .is_ok()
    );
}

#[test]
fn push_options_reach_the_server_for_forges_that_open_merge_requests() {
    let server = Server::start("options");
    let (_dir, mirror, main) = mirror_for(&server, "options-m");
    git(
        &server.bare(),
        &["config", "receive.advertisePushOptions", "true"],
    );
    let seen = server.root.0.join("options-seen");
    let hook = server.bare().join("hooks/pre-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ni=0\nwhile [ $i -lt ${{GIT_PUSH_OPTION_COUNT:-0}} ]; do eval echo \\$GIT_PUSH_OPTION_$i >> {}; i=$((i+1)); done\ncat >/dev/null\n",
            seen.display()
        ),
    )
    .expect("hook");
    Command::new("chmod")
        .args(["+x", hook.to_str().expect("utf-8")])
        .status()
        .expect("chmod");
    mirror
        .commit(
            "refs/berth/out/drift",
            Some(main),
            Some(main),
            &[FileChange {
                path: "drift/n1/DRIFT.md".into(),
                content: Some(b"# Drift\n".to_vec()),
            }],
            "drift",
            AUTHOR,
        )
        .expect("commit");
    mirror
        .push_with_options(
            &server.url,
            None,
            &[PushUpdate {
                local: Some("refs/berth/out/drift".into()),
                remote: "refs/heads/berth/drift/n1".into(),
            }],
            &[
                "merge_request.create".to_string(),
                "merge_request.target=main".to_string(),
            ],
        )
        .expect("push");
    let got = std::fs::read_to_string(&seen).expect("the hook saw options");
    assert_eq!(got, "merge_request.create\nmerge_request.target=main\n");
}

#[test]
fn a_node_reads_a_commit_exactly_as_berth_validate_reads_a_checkout() {
    let server = Server::start("limits");
    let work = server.work();
    std::fs::create_dir_all(work.join("apps")).expect("dir");
    std::fs::write(work.join("apps/ok.yml"), "kind: ConfigMap\n").expect("write");
    std::fs::write(work.join("latin1.yaml"), b"kind: Pod # caf\xe9\n").expect("write");
    std::fs::write(work.join("big.yaml"), vec![b'#'; 9 << 20]).expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "odd files"]);
    git(
        &work,
        &["push", "-q", server.bare().to_str().expect("utf-8"), "main"],
    );
    let (_dir, mirror, head) = mirror_for(&server, "limits-m");
    let options = berth_manifest::LoadOptions::default();
    let (files, refused) = mirror.read_manifests(head, ".", &options).expect("reads");
    let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
    assert_eq!(names, ["apps/ok.yml", "pod.yaml"]);
    let from_commit: Vec<String> = refused.iter().map(ToString::to_string).collect();
    assert_eq!(from_commit.len(), 2, "{from_commit:?}");
    assert!(
        from_commit[0].contains("big.yaml")
            && from_commit[0].contains("larger than the 8388608-byte limit"),
        "{from_commit:?}"
    );
    assert!(
        from_commit[1].contains("latin1.yaml")
            && from_commit[1].contains("not UTF-8 text (invalid byte at offset 15)"),
        "{from_commit:?}"
    );
    // `berth validate` on a checkout of the same commit says the same.
    let checkout = berth_manifest::load_dir(&work, &options).expect("loads");
    let from_dir: Vec<String> = checkout
        .diagnostics
        .iter()
        .filter(|d| d.object.is_none())
        .map(ToString::to_string)
        .collect();
    let mut sorted = from_dir.clone();
    sorted.sort();
    assert_eq!(sorted, from_commit);
}

#[test]
fn a_fetch_bigger_than_the_limit_is_stopped_with_a_clear_error() {
    let server = Server::start("fetch-limit");
    let work = server.work();
    // Four MiB that do not compress.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(work.join("blob.bin"), noise).expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "big"]);
    git(
        &work,
        &["push", "-q", server.bare().to_str().expect("utf-8"), "main"],
    );
    let dir = Tmp::new("fetch-limit-m");
    let remote = Remote {
        url: server.url.clone(),
        branch: "main".into(),
    };
    let small = Mirror::open(&dir.0.join("mirror.git"))
        .expect("mirror")
        .with_fetch_limit(1 << 20);
    let err = small
        .fetch(&remote, None)
        .expect_err("over the limit")
        .to_string();
    assert!(
        err.contains("one fetch may bring at most 1048576 bytes"),
        "{err}"
    );
    // With the default limit the same fetch goes through.
    let mirror = Mirror::open(&dir.0.join("mirror.git")).expect("mirror");
    mirror
        .fetch(&remote, None)
        .expect("under the default limit");
}

#[test]
fn a_ref_torn_by_a_power_cut_is_dropped_when_the_mirror_opens_and_fetched_again() {
    let server = Server::start("torn-ref");
    let (dir, mirror, main) = mirror_for(&server, "torn-ref-m");
    drop(mirror);
    let path = dir.0.join("mirror.git");
    let tracking = path.join("refs/berth/fetched/main");
    let remote = Remote {
        url: server.url.clone(),
        branch: "main".into(),
    };
    // What ext4 can leave of a ref written without a sync: nothing, or
    // part of the id.
    for torn in [String::new(), main.to_string()[..17].to_string()] {
        std::fs::write(&tracking, &torn).expect("tear");
        let mirror = Mirror::open(&path).expect("opens");
        assert_eq!(
            mirror.fetch(&remote, None).expect("fetches"),
            main,
            "{torn:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&tracking).expect("ref").trim(),
            main.to_string()
        );
    }
}

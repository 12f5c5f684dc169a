//! `berth exec POD [-c CONTAINER] -- CMD`: runs a command in a running
//! container, like `kubectl exec`.
//!
//! Two steps, because a process that has threads may not change its mount
//! namespace: `berth exec` asks systemd (over D-Bus, which starts threads)
//! for the container's main process, then runs itself again as the hidden
//! `berth exec-enter PID -- CMD`, single-threaded, which takes everything
//! from that process: its cgroup, its namespaces (mount, PID, network, UTS,
//! IPC, cgroup), its root directory, its environment,
//! its user and group, its capability bounding set and `no_new_privs`.
//! The working directory is the unit's. The seccomp filter is not copied (no interface gives it back); the
//! command runs under the rest.
//!
//! A process ID can be reused the moment its process exits. `exec-enter`
//! therefore holds a pidfd of the process from the start, reads `/proc`
//! through a directory it opened while the pidfd shows the process alive,
//! checks that the process is in the unit's own cgroup, and checks it is
//! still alive after opening everything it joins: a container that exits
//! in between, and a process that took its number, are never entered.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use nix::sched::CloneFlags;

/// What `/proc/<pid>/status` says of a process's credentials.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub cap_bounding: u64,
    pub no_new_privs: bool,
}

/// Reads the lines of `/proc/<pid>/status` that matter here.
pub fn parse_status(text: &str) -> anyhow::Result<Creds> {
    let mut c = Creds::default();
    let mut seen = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let first = value.split_whitespace().next().unwrap_or("");
        match key {
            // Real, effective, saved, filesystem: the effective one.
            "Uid" => {
                c.uid = value.split_whitespace().nth(1).unwrap_or(first).parse()?;
                seen |= 1;
            }
            "Gid" => {
                c.gid = value.split_whitespace().nth(1).unwrap_or(first).parse()?;
                seen |= 2;
            }
            "CapBnd" => {
                c.cap_bounding = u64::from_str_radix(first, 16)?;
                seen |= 4;
            }
            "NoNewPrivs" => c.no_new_privs = first == "1",
            _ => {}
        }
    }
    if seen != 7 {
        bail!("the process status has no Uid, Gid or CapBnd line");
    }
    Ok(c)
}

/// `0::/berth.slice/.../berth-x.service` → the cgroup's path under /sys/fs/cgroup.
pub fn parse_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The first half: find the main process, then run `exec-enter` on it.
pub fn exec(unit: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    use berth_runtime::Systemd as _;
    if command.is_empty() {
        bail!("no command given: berth exec POD -- COMMAND [ARGS...]");
    }
    let systemd = berth_runtime::dbus::DbusSystemd::connect(crate::JOB_TIMEOUT, None, None)?;
    let Some(details) = systemd.unit(unit)? else {
        bail!("{unit} is not on this node");
    };
    let Some((pid, workdir)) = details.running_process() else {
        bail!(
            "container {unit} is not running ({:?}, {}); nothing to exec into",
            details.active_state,
            details.sub_state
        );
    };
    let me = std::env::current_exe().context("cannot find the berth binary")?;
    let status = std::process::Command::new(me)
        .arg("exec-enter")
        .arg(pid.to_string())
        .arg("--cgroup")
        .arg(&details.runtime.control_group)
        .arg("--workdir")
        .arg(workdir)
        .arg("--")
        .args(command)
        .status()
        .context("cannot run berth exec-enter")?;
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        _ => ExitCode::from(1),
    }
}

/// A process held by a pidfd, with its `/proc` directory opened while it
/// was known alive: what is read through it is this process's.
#[derive(Debug)]
pub struct Held {
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
    proc_dir: std::os::fd::OwnedFd,
    /// Its cgroup, checked to be the unit's.
    cgroup: String,
}

impl Held {
    /// Holds process `pid`, which must be in cgroup `expected` (the unit's).
    pub fn open(pid: u32, expected: &str) -> anyhow::Result<Self> {
        let id = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .with_context(|| format!("{pid} is not a process ID"))?;
        let pidfd = rustix::process::pidfd_open(id, rustix::process::PidfdFlags::empty())
            .with_context(|| format!("process {pid} is gone; is the container still running?"))?;
        let proc_dir = rustix::fs::open(
            format!("/proc/{pid}"),
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .with_context(|| format!("cannot open /proc/{pid}"))?;
        let mut held = Self {
            pid,
            pidfd,
            proc_dir,
            cgroup: String::new(),
        };
        held.check_alive()?;
        let text = held.read_string("cgroup")?;
        let cgroup = parse_cgroup(&text)
            .context("the process is in no cgroup v2 group")?
            .trim_end();
        if cgroup != expected.trim_end() {
            bail!(
                "process {pid} is not the container's (it is in cgroup {cgroup}, the container's unit is {expected}): it exited and its number was reused; try again"
            );
        }
        held.cgroup = cgroup.to_string();
        Ok(held)
    }

    /// Fails once the process has exited (its pidfd becomes readable).
    pub fn check_alive(&self) -> anyhow::Result<()> {
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        let ready = rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default()))
            .context("cannot poll the process's pidfd")?;
        if ready > 0 {
            bail!(
                "process {} exited while berth exec was joining it; try again",
                self.pid
            );
        }
        Ok(())
    }

    /// Opens a file or namespace under the process's `/proc` directory.
    pub fn open_file(&self, name: &str) -> anyhow::Result<File> {
        let fd = rustix::fs::openat(
            &self.proc_dir,
            name,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .with_context(|| format!("cannot open /proc/{}/{name}", self.pid))?;
        Ok(File::from(fd))
    }

    pub fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut out = Vec::new();
        self.open_file(name)?
            .read_to_end(&mut out)
            .with_context(|| format!("cannot read /proc/{}/{name}", self.pid))?;
        Ok(out)
    }

    pub fn read_string(&self, name: &str) -> anyhow::Result<String> {
        String::from_utf8(self.read(name)?)
            .with_context(|| format!("/proc/{}/{name} is not text", self.pid))
    }
}

/// The second half, single-threaded: join the process's cgroup and
/// namespaces and run the command as it runs.
pub fn enter(
    pid: u32,
    unit_cgroup: &str,
    workdir: &Path,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    let Some((program, args)) = command.split_first() else {
        bail!("no command given");
    };
    let process = Held::open(pid, unit_cgroup)?;
    let creds = parse_status(&process.read_string("status")?)?;
    let environ = process
        .read("environ")
        .context("cannot read its environment")?;
    let env: Vec<(String, String)> = environ
        .split(|b| *b == 0)
        .filter_map(|e| {
            let e = String::from_utf8_lossy(e);
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let namespaces = [
        ("ns/ipc", CloneFlags::CLONE_NEWIPC),
        ("ns/uts", CloneFlags::CLONE_NEWUTS),
        ("ns/net", CloneFlags::CLONE_NEWNET),
        ("ns/cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ns/pid", CloneFlags::CLONE_NEWPID),
        ("ns/mnt", CloneFlags::CLONE_NEWNS),
    ]
    .into_iter()
    .map(|(name, flag)| process.open_file(name).map(|f| (name, f, flag)))
    .collect::<anyhow::Result<Vec<_>>>()?;
    let root = rustix::fs::openat(
        &process.proc_dir,
        "root",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .with_context(|| format!("cannot open /proc/{pid}/root"))?;
    // Everything above belongs to the process as long as it is alive now.
    process.check_alive()?;

    // The cgroup first, while /sys/fs/cgroup is still the node's.
    let procs = Path::new("/sys/fs/cgroup")
        .join(process.cgroup.trim_start_matches('/'))
        .join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("cannot join the container's cgroup ({})", procs.display()))?;
    for (name, fd, flag) in &namespaces {
        // Namespaces it shares with the node are joined as well: a no-op.
        nix::sched::setns(fd.as_fd(), *flag)
            .with_context(|| format!("cannot enter {name} of process {pid}"))?;
    }
    nix::unistd::fchdir(root.as_fd()).context("cannot reach the container's root")?;
    nix::unistd::chroot(".").context("cannot enter the container's root")?;
    // The container's working directory (its unit's), else its root.
    if nix::unistd::chdir(workdir).is_err() {
        nix::unistd::chdir("/").context("cannot enter the container's root")?;
    }
    // Capabilities the container may not have, gone from ours (and so from
    // the command's), and no regaining of privileges if it may not.
    for bit in 0..64u32 {
        if creds.cap_bounding & (1 << bit) == 0 {
            let cap = rustix::thread::CapabilitySet::from_bits_retain(1 << bit);
            if rustix::thread::capability_is_in_bounding_set(cap).unwrap_or(false) {
                rustix::thread::remove_capability_from_bounding_set(cap)
                    .with_context(|| format!("cannot drop capability {bit}"))?;
            }
        }
    }
    if creds.no_new_privs {
        rustix::thread::set_no_new_privs(true).context("cannot set no_new_privs")?;
    }
    use std::os::unix::process::CommandExt;
    let status = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .uid(creds.uid)
        .gid(creds.gid)
        .status()
        .with_context(|| format!("cannot run {program:?} in the container"))?;
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_status_and_cgroup_lines_are_read() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t2000\t2000\t2000\t2000\nCapBnd:\t00000000a80425fb\nNoNewPrivs:\t1\n";
        assert_eq!(
            parse_status(status).unwrap(),
            Creds {
                uid: 1000,
                gid: 2000,
                cap_bounding: 0xa80425fb,
                no_new_privs: true
            }
        );
        assert!(parse_status("Name:\tsh\n").is_err());
        assert_eq!(
            parse_cgroup("0::/berth.slice/berth-besteffort.slice/x.service\n"),
            Some("/berth.slice/berth-besteffort.slice/x.service")
        );
        assert_eq!(parse_cgroup("1:name=systemd:/\n"), None);
    }

    #[test]
    fn a_process_is_held_only_while_it_lives_and_only_in_the_units_cgroup() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let own = parse_cgroup(&text)
            .expect("cgroup v2")
            .trim_end()
            .to_string();
        // Another unit's cgroup: the number is not that container's process.
        let err = Held::open(pid, "/berth.slice/other.service").expect_err("refused");
        assert!(
            err.to_string().contains("is not the container's"),
            "{err:#}"
        );
        let held = Held::open(pid, &own).expect("held");
        assert!(
            held.read_string("status")
                .expect("status")
                .contains("Name:\tsleep")
        );
        held.check_alive().expect("alive");
        child.kill().expect("kill");
        child.wait().expect("reaped");
        // Once it is gone, nothing read through the old handle is trusted,
        // and the number no longer opens.
        let err = held.check_alive().expect_err("exited");
        assert!(
            err.to_string().contains("exited while berth exec"),
            "{err:#}"
        );
        let err = Held::open(pid, &own).expect_err("gone");
        assert!(err.to_string().contains("is gone"), "{err:#}");
    }
}

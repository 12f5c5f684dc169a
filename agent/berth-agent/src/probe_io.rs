//! One run of a probe or hook action, on an epoll set of the prober's own.
//!
//! [`Engine`] keeps every run in flight on one thread without an async
//! runtime: a run is a small state machine woken by its file descriptors
//! (edge-triggered) or its deadline. An `httpGet`, `tcpSocket` or `grpc`
//! run is a non-blocking socket from the node to the pod's address; an
//! `exec` run is `berth exec-enter` (the container's cgroup, namespaces,
//! root, user and environment, as `berth exec`) in a process group of its
//! own, watched through a pidfd and one pipe for its combined output, and
//! killed whole at its timeout. What cannot be done without blocking (a
//! TLS handshake, a host name to look up) runs on a short-lived thread
//! whose answer comes back through the engine's eventfd.
//!
//! Why not async-io, which the agent has anyway (zbus, netlink): its
//! reactor is one per process, so the prober's sockets would be served
//! by whichever thread holds it (zbus's, or async-io's helper thread,
//! which polls with a backoff while any `block_on` runs): two threads
//! woken per socket event, and about twice the system calls per probe
//! (a timer registration writes an eventfd; a oneshot poller re-arms each
//! interest). Measured on the same probes: see docs/benchmarks.md.

use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_manifest::probe::{Action, HttpGet};
use berth_plan::health::Outcome;
use rustix::event::epoll;

use crate::grpc;
use crate::prober::ProbeTarget;

/// What the kubelet reads of an exec probe's output, and of a response.
const MAX_OUTPUT: usize = 10 * 1024;
/// Redirects followed on the probed host, as Go's HTTP client does.
const MAX_REDIRECTS: usize = 10;
/// The User-Agent the kubelet sends (`kube-probe/<major>.<minor>`).
const USER_AGENT: &str = "kube-probe/1.35";
/// The epoll token of the engine's eventfd; a run's tokens are its id
/// shifted left by two, plus which of its descriptors.
const NOTIFY: u64 = u64::MAX;
const SOCKET: u64 = 0;
const PIDFD: u64 = 1;
const OUTPUT: u64 = 2;

/// Wakes an engine's `poll` from another thread.
#[derive(Debug, Clone)]
pub struct Notifier(Arc<OwnedFd>);

impl Notifier {
    pub fn notify(&self) {
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// The answer of a hop run off the engine's thread.
type Answered = Arc<Mutex<Vec<(u64, Result<Vec<u8>, String>)>>>;

/// Runs in flight and the descriptors that drive them.
#[derive(Debug)]
pub struct Engine {
    epoll: OwnedFd,
    notifier: Notifier,
    answered: Answered,
    runs: HashMap<u64, Run>,
    /// Runs that ended as they began (a refused socket, no process).
    finished_early: Vec<(u64, Outcome)>,
    /// Run deadlines, soonest first (stale entries are skipped).
    deadlines: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    next_id: u64,
    exe: PathBuf,
}

#[derive(Debug)]
struct Run {
    deadline: Instant,
    timeout: Duration,
    state: State,
}

#[derive(Debug)]
enum State {
    Net(Net),
    /// A hop on a helper thread; its answer comes through `answered`.
    Away(Hop),
    Exec(Exec),
    /// Killed at its timeout, waiting to be reaped; its outcome is given.
    Reaping(Exec),
    /// `sleep` (hooks): succeeds at its deadline.
    Sleep,
}

/// What a connection is for, and what it has read.
#[derive(Debug)]
enum Hop {
    /// A connection only; `name` is `host:port` for a host name looked up.
    Tcp {
        name: Option<String>,
    },
    Http {
        get: HttpState,
    },
    Grpc {
        reader: grpc::Reader,
    },
}

#[derive(Debug)]
struct HttpState {
    https: bool,
    host: String,
    port: u16,
    path: String,
    headers: Vec<(String, String)>,
    pod_ip: Ipv4Addr,
    /// The URL first asked, once a redirect was followed.
    first: Option<String>,
    hops: usize,
}

impl HttpState {
    fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
    }

    /// The URL first asked, for the timeout's message.
    fn first_url(&self) -> String {
        self.first.clone().unwrap_or_else(|| self.url())
    }

    fn request(&self) -> Vec<u8> {
        let host_header = if (self.port == 80 && !self.https) || (self.port == 443 && self.https) {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        http_request(&host_header, &self.path, &self.headers).into_bytes()
    }
}

#[derive(Debug)]
struct Net {
    addr: SocketAddr,
    stream: TcpStream,
    connected: bool,
    out: Vec<u8>,
    sent: usize,
    input: Vec<u8>,
    hop: Hop,
}

#[derive(Debug)]
struct Exec {
    child: Child,
    /// Readable when the child has exited (held open while it is watched).
    _pidfd: OwnedFd,
    output: std::fs::File,
    text: Vec<u8>,
    shown: String,
}

/// What an event did to a run.
enum Step {
    Wait,
    Done(Outcome),
    /// A same-host redirect: the run goes on with a new request.
    Next(HttpState),
}

impl Engine {
    /// A new engine; `exe` is the berth binary (for `exec-enter`).
    pub fn new(exe: PathBuf) -> std::io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let eventfd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        epoll::add(
            &epoll,
            &eventfd,
            epoll::EventData::new_u64(NOTIFY),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )?;
        Ok(Self {
            epoll,
            notifier: Notifier(Arc::new(eventfd)),
            answered: Arc::default(),
            runs: HashMap::new(),
            finished_early: Vec::new(),
            deadlines: BinaryHeap::new(),
            next_id: 0,
            exe,
        })
    }

    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Starts a run of `action` against `target`; its outcome comes out of
    /// [`Engine::poll`] under the id returned, within `timeout`.
    pub fn start(&mut self, action: &Action, target: &ProbeTarget, timeout: Duration) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        // `sleep` (a hook) ends when it has slept, within the hook's time.
        let timeout = match action {
            Action::Sleep { seconds } => timeout.min(Duration::from_secs(*seconds)),
            _ => timeout,
        };
        let deadline = Instant::now() + timeout;
        self.deadlines.push(std::cmp::Reverse((deadline, id)));
        let state = match self.begin(id, action, target, deadline) {
            Ok(state) => state,
            Err(outcome) => {
                self.finished_early.push((id, outcome));
                return id;
            }
        };
        self.runs.insert(
            id,
            Run {
                deadline,
                timeout,
                state,
            },
        );
        id
    }

    fn begin(
        &mut self,
        id: u64,
        action: &Action,
        target: &ProbeTarget,
        deadline: Instant,
    ) -> Result<State, Outcome> {
        match action {
            Action::TcpSocket { host, port } => match host.as_deref().map(str::parse::<IpAddr>) {
                None => self.connect(
                    id,
                    SocketAddr::new(IpAddr::V4(target.address), *port),
                    Vec::new(),
                    Hop::Tcp { name: None },
                ),
                Some(Ok(ip)) => self.connect(
                    id,
                    SocketAddr::new(ip, *port),
                    Vec::new(),
                    Hop::Tcp { name: None },
                ),
                Some(Err(_)) => {
                    let host = host.clone().unwrap_or_default();
                    let hop = Hop::Tcp {
                        name: Some(format!("{host}:{port}")),
                    };
                    self.away(id, host, *port, false, None, deadline);
                    Ok(State::Away(hop))
                }
            },
            Action::HttpGet(get) => self.http(id, http_state(get, target.address), deadline),
            Action::Grpc { port, service } => {
                let addr = SocketAddr::new(IpAddr::V4(target.address), *port);
                self.connect(
                    id,
                    addr,
                    grpc::request(&addr.to_string(), service.as_deref()),
                    Hop::Grpc {
                        reader: grpc::Reader::default(),
                    },
                )
            }
            Action::Exec { command } => self.exec(id, command, target),
            Action::Sleep { .. } => Ok(State::Sleep),
        }
    }

    /// One HTTP request: on this thread for plain HTTP to an address, on a
    /// helper thread for HTTPS or a host name.
    fn http(&mut self, id: u64, get: HttpState, deadline: Instant) -> Result<State, Outcome> {
        let request = get.request();
        match get.host.parse::<IpAddr>() {
            Ok(ip) if !get.https => {
                let addr = SocketAddr::new(ip, get.port);
                self.connect(id, addr, request, Hop::Http { get })
            }
            _ => {
                self.away(
                    id,
                    get.host.clone(),
                    get.port,
                    get.https,
                    Some(request),
                    deadline,
                );
                Ok(State::Away(Hop::Http { get }))
            }
        }
    }

    fn connect(
        &mut self,
        id: u64,
        addr: SocketAddr,
        out: Vec<u8>,
        hop: Hop,
    ) -> Result<State, Outcome> {
        let fail = |e: std::io::Error| hop_failure(&hop, &format!("dial tcp {addr}: connect: {e}"));
        let family = match addr {
            SocketAddr::V4(_) => rustix::net::AddressFamily::INET,
            SocketAddr::V6(_) => rustix::net::AddressFamily::INET6,
        };
        let fd = match rustix::net::socket_with(
            family,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => return Err(fail(e.into())),
        };
        match rustix::net::connect(&fd, &addr) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return Err(fail(e.into())),
        }
        if let Err(e) = epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(id << 2 | SOCKET),
            epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET,
        ) {
            return Err(fail(e.into()));
        }
        Ok(State::Net(Net {
            addr,
            stream: TcpStream::from(fd),
            connected: false,
            out,
            sent: 0,
            input: Vec::new(),
            hop,
        }))
    }

    /// A hop that would block: on its own thread, with its own timeouts,
    /// answered through the eventfd. A late answer finds its run gone.
    fn away(
        &self,
        id: u64,
        host: String,
        port: u16,
        tls: bool,
        request: Option<Vec<u8>>,
        deadline: Instant,
    ) {
        let answered = Arc::clone(&self.answered);
        let notifier = self.notifier.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-probe-hop".into())
            .spawn(move || {
                let answer = blocking_hop(&host, port, tls, request.as_deref(), deadline);
                answered
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, answer));
                notifier.notify();
            });
        if let Err(e) = spawned {
            self.answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id, Err(format!("cannot start a thread: {e}"))));
            self.notifier.notify();
        }
    }

    fn exec(
        &mut self,
        id: u64,
        command: &[String],
        target: &ProbeTarget,
    ) -> Result<State, Outcome> {
        use std::os::unix::process::CommandExt as _;
        let cannot =
            |e: &dyn std::fmt::Display| Outcome::Failure(format!("cannot run the probe: {e}"));
        let (reader, writer) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| cannot(&e))?;
        let writer2 = writer.try_clone().map_err(|e| cannot(&e))?;
        let child = std::process::Command::new(&self.exe)
            .arg("exec-enter")
            .arg(target.main_pid.to_string())
            .arg("--cgroup")
            .arg(&target.control_group)
            .arg("--workdir")
            .arg(&target.workdir)
            .arg("--")
            .args(command)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .spawn()
            .map_err(|e| cannot(&e))?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        let pidfd = pid
            .ok_or(rustix::io::Errno::SRCH)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()));
        let watch = pidfd.and_then(|pidfd| {
            rustix::io::ioctl_fionbio(&reader, true)?;
            epoll::add(
                &self.epoll,
                &pidfd,
                epoll::EventData::new_u64(id << 2 | PIDFD),
                epoll::EventFlags::IN,
            )?;
            epoll::add(
                &self.epoll,
                &reader,
                epoll::EventData::new_u64(id << 2 | OUTPUT),
                epoll::EventFlags::IN | epoll::EventFlags::ET,
            )?;
            Ok(pidfd)
        });
        let mut child = child;
        match watch {
            Ok(pidfd) => Ok(State::Exec(Exec {
                child,
                _pidfd: pidfd,
                output: std::fs::File::from(reader),
                text: Vec::new(),
                shown: command.join(" "),
            })),
            Err(e) => {
                kill_group(&child);
                let _ = child.wait();
                Err(cannot(&e))
            }
        }
    }

    /// Ends a run whose outcome is no longer wanted.
    pub fn cancel(&mut self, id: u64) {
        if let Some(run) = self.runs.remove(&id) {
            match run.state {
                State::Exec(exec) | State::Reaping(exec) => self.reap_later(id, run.deadline, exec),
                // Its socket closes (and leaves the epoll set) as it drops.
                _ => {}
            }
        }
        self.finished_early.retain(|(i, _)| *i != id);
    }

    fn reap_later(&mut self, id: u64, deadline: Instant, exec: Exec) {
        kill_group(&exec.child);
        self.runs.insert(
            id,
            Run {
                deadline,
                timeout: Duration::ZERO,
                state: State::Reaping(exec),
            },
        );
    }

    /// Waits until an event, a notification or `until`, and returns the
    /// runs that finished (by id) and whether the eventfd was written.
    pub fn poll(&mut self, until: Option<Instant>) -> (Vec<(u64, Outcome)>, bool) {
        let mut done = std::mem::take(&mut self.finished_early);
        let now = Instant::now();
        let mut wake_at = until;
        while let Some(std::cmp::Reverse((at, id))) = self.deadlines.peek().copied() {
            if !self.runs.contains_key(&id) {
                self.deadlines.pop();
                continue;
            }
            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            break;
        }
        let mut notified = false;
        if done.is_empty() {
            let timeout = wake_at.map(|w| {
                let left = w.saturating_duration_since(now);
                rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            let mut events = [epoll::Event {
                flags: epoll::EventFlags::empty(),
                data: epoll::EventData::new_u64(0),
            }; 64];
            let n = epoll::wait(&self.epoll, &mut events[..], timeout.as_ref()).unwrap_or(0);
            for event in &events[..n] {
                let (token, flags) = (event.data.u64(), event.flags);
                if token == NOTIFY {
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(&*self.notifier.0, &mut buf);
                    notified = true;
                    continue;
                }
                let id = token >> 2;
                if let Some(outcome) = self.event(id, token & 3, flags) {
                    done.push((id, outcome));
                }
            }
        }
        let answers = std::mem::take(&mut *self.answered.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, answer) in answers {
            if let Some(outcome) = self.answer(id, answer) {
                done.push((id, outcome));
            }
        }
        let now = Instant::now();
        while let Some(std::cmp::Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(outcome) = self.expire(id, at) {
                done.push((id, outcome));
            }
        }
        (done, notified)
    }

    fn event(&mut self, id: u64, which: u64, flags: epoll::EventFlags) -> Option<Outcome> {
        let run = self.runs.get_mut(&id)?;
        let step = match (&mut run.state, which) {
            (State::Net(net), SOCKET) => net.advance(flags),
            (State::Exec(exec), OUTPUT) => {
                exec.drain();
                Step::Wait
            }
            (State::Exec(exec), PIDFD) => match exec.child.try_wait() {
                Ok(Some(status)) => {
                    exec.drain();
                    Step::Done(exec.judge(status))
                }
                Ok(None) => Step::Wait,
                Err(e) => Step::Done(Outcome::Failure(format!("cannot run the probe: {e}"))),
            },
            (State::Reaping(exec), PIDFD) => {
                if !matches!(exec.child.try_wait(), Ok(None)) {
                    self.runs.remove(&id);
                }
                return None;
            }
            _ => Step::Wait,
        };
        self.settle(id, step)
    }

    /// A helper thread's answer to run `id`.
    fn answer(&mut self, id: u64, answer: Result<Vec<u8>, String>) -> Option<Outcome> {
        let run = self.runs.get_mut(&id)?;
        let State::Away(hop) = &mut run.state else {
            return None;
        };
        let step = match (hop, answer) {
            (Hop::Tcp { .. }, Ok(_)) => Step::Done(Outcome::Success),
            (Hop::Tcp { .. }, Err(e)) => Step::Done(Outcome::Failure(e)),
            (Hop::Http { get }, answer) => http_step(get, answer),
            (Hop::Grpc { .. }, _) => Step::Done(Outcome::Failure("unexpected".into())),
        };
        self.settle(id, step)
    }

    fn settle(&mut self, id: u64, step: Step) -> Option<Outcome> {
        match step {
            Step::Wait => None,
            Step::Done(outcome) => {
                self.runs.remove(&id);
                Some(outcome)
            }
            Step::Next(get) => {
                let run = self.runs.remove(&id)?;
                match self.http(id, get, run.deadline) {
                    Ok(state) => {
                        self.runs.insert(id, Run { state, ..run });
                        None
                    }
                    Err(outcome) => Some(outcome),
                }
            }
        }
    }

    /// A deadline reached: the run fails with the kubelet's message (or,
    /// for `sleep`, succeeds).
    fn expire(&mut self, id: u64, at: Instant) -> Option<Outcome> {
        let run = self.runs.get(&id)?;
        if run.deadline != at {
            return None;
        }
        let run = self.runs.remove(&id)?;
        let secs = run.timeout.as_secs();
        let outcome = match run.state {
            State::Sleep => Outcome::Success,
            State::Net(Net { hop, addr, .. }) => timed_out(&hop, &addr.to_string(), secs),
            State::Away(hop) => timed_out(&hop, "", secs),
            State::Exec(exec) => {
                let message = format!("command \"{}\" timed out after {secs}s", exec.shown);
                self.reap_later(id, at, exec);
                Outcome::Failure(message)
            }
            State::Reaping(exec) => {
                // Still not gone: try again at the next deadline.
                let later = at + Duration::from_secs(1);
                self.deadlines.push(std::cmp::Reverse((later, id)));
                self.reap_later(id, later, exec);
                return None;
            }
        };
        Some(outcome)
    }
}

/// A run out of time, in its kind's words; `addr` where it connected.
fn timed_out(hop: &Hop, addr: &str, secs: u64) -> Outcome {
    Outcome::Failure(match hop {
        Hop::Tcp { name } => format!("dial tcp {}: i/o timeout", name.as_deref().unwrap_or(addr)),
        Hop::Http { get } => format!(
            "Get \"{}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            get.first_url()
        ),
        Hop::Grpc { .. } => {
            format!("timeout: health rpc did not complete within {secs}s")
        }
    })
}

impl Drop for Engine {
    /// Commands still running (or killed and not yet gone) are killed and
    /// reaped: an engine ends without leaving zombies behind.
    fn drop(&mut self) {
        for run in self.runs.values_mut() {
            if let State::Exec(exec) | State::Reaping(exec) = &mut run.state {
                kill_group(&exec.child);
                let _ = exec.child.wait();
            }
        }
    }
}

impl Net {
    fn advance(&mut self, flags: epoll::EventFlags) -> Step {
        if !self.connected {
            // Writable without an error: connected (SO_ERROR is read only
            // when the event says something went wrong).
            if flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP)
                || !flags.intersects(epoll::EventFlags::OUT)
            {
                match self.stream.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        let message = format!("dial tcp {}: connect: {e}", self.addr);
                        return self.failed(&message);
                    }
                    Ok(None) if !flags.intersects(epoll::EventFlags::OUT) => return Step::Wait,
                    Ok(None) => {}
                }
            }
            self.connected = true;
            if let Hop::Tcp { .. } = self.hop {
                return Step::Done(Outcome::Success);
            }
        }
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.failed(&format!("write: {e}")),
            }
        }
        let readable = epoll::EventFlags::IN
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::HUP
            | epoll::EventFlags::ERR;
        if !flags.intersects(readable) {
            return Step::Wait;
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return self.ended(),
                Ok(n) => {
                    if let Some(step) = self.received(&buf[..n]) {
                        return step;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.failed(&format!("read: {e}")),
            }
        }
    }

    fn received(&mut self, data: &[u8]) -> Option<Step> {
        match &mut self.hop {
            Hop::Tcp { .. } => Some(Step::Done(Outcome::Success)),
            Hop::Http { get } => {
                self.input.extend_from_slice(data);
                if let Some(end) = head_end(&self.input) {
                    self.input.truncate(end);
                    let head = std::mem::take(&mut self.input);
                    return Some(http_step(get, Ok(head)));
                }
                if self.input.len() > MAX_OUTPUT {
                    return Some(http_step(get, Err("response headers exceed 10 KiB".into())));
                }
                None
            }
            Hop::Grpc { reader, .. } => {
                let mut reply = Vec::new();
                let answer = reader.feed(data, &mut reply);
                if !reply.is_empty() {
                    // Acknowledgements, best effort: a server that sent all
                    // it has may be gone, and its answer is still to be read.
                    let _ = self.stream.write(&reply);
                }
                answer.map(|a| Step::Done(grpc::judge(a)))
            }
        }
    }

    /// The peer closed the connection.
    fn ended(&mut self) -> Step {
        match &mut self.hop {
            Hop::Tcp { .. } => Step::Done(Outcome::Success),
            Hop::Http { get } => {
                if self.input.is_empty() {
                    http_step(get, Err("EOF".into()))
                } else {
                    let head = std::mem::take(&mut self.input);
                    http_step(get, Ok(head))
                }
            }
            Hop::Grpc { .. } => Step::Done(grpc::judge(Err(
                "the connection ended: unexpected end of file".into(),
            ))),
        }
    }

    fn failed(&mut self, message: &str) -> Step {
        match &mut self.hop {
            Hop::Http { get } => http_step(get, Err(message.to_string())),
            hop => Step::Done(hop_failure(hop, message)),
        }
    }
}

/// A failure of a hop before any answer, in its kind's words.
fn hop_failure(hop: &Hop, message: &str) -> Outcome {
    match hop {
        Hop::Tcp { .. } => Outcome::Failure(message.to_string()),
        Hop::Http { get } => Outcome::Failure(format!("Get \"{}\": {message}", get.url())),
        Hop::Grpc { .. } => grpc::judge(Err(message.to_string())),
    }
}

impl Exec {
    /// Reads what the command wrote, keeping the first 10 KiB.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.output.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(self.text.len());
                    self.text.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn judge(&mut self, status: std::process::ExitStatus) -> Outcome {
        if status.success() {
            return Outcome::Success;
        }
        let text = String::from_utf8_lossy(&self.text).trim().to_string();
        Outcome::Failure(if text.is_empty() {
            format!(
                "command \"{}\" exited with {}",
                self.shown,
                status.code().unwrap_or(-1)
            )
        } else {
            text
        })
    }
}

fn kill_group(child: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

fn http_state(get: &HttpGet, pod_ip: Ipv4Addr) -> HttpState {
    HttpState {
        https: get.https,
        host: get.host.clone().unwrap_or_else(|| pod_ip.to_string()),
        port: get.port,
        path: get.path.clone(),
        headers: get.headers.clone(),
        pod_ip,
        first: None,
        hops: 0,
    }
}

/// Judges one response head (or the hop's error): 200–399 succeeds;
/// redirects are followed while they stay on the probed host (up to 10),
/// and one to another host ends the probe as a success, as the kubelet
/// does; anything else fails.
fn http_step(get: &mut HttpState, answer: Result<Vec<u8>, String>) -> Step {
    let failed = |get: &HttpState, e: &str| {
        Step::Done(Outcome::Failure(format!("Get \"{}\": {e}", get.url())))
    };
    let head = match answer {
        Ok(head) => String::from_utf8_lossy(&head).into_owned(),
        Err(e) => return failed(get, &e),
    };
    let (code, location) = match parse_head(&head) {
        Ok(x) => x,
        Err(e) => return failed(get, &e),
    };
    if (300..400).contains(&code)
        && let Some(loc) = location
    {
        return match redirect_target(&loc, get.https, &get.host, get.port) {
            Some((https, host, port, path)) if host == get.host => {
                if get.hops == MAX_REDIRECTS {
                    return Step::Done(Outcome::Failure(format!(
                        "Get \"{}\": stopped after {MAX_REDIRECTS} redirects",
                        get.first_url()
                    )));
                }
                Step::Next(HttpState {
                    https,
                    host,
                    port,
                    path,
                    headers: std::mem::take(&mut get.headers),
                    pod_ip: get.pod_ip,
                    first: Some(get.first_url()),
                    hops: get.hops + 1,
                })
            }
            // Another host: not followed; the redirect counts as success.
            _ => Step::Done(Outcome::Success),
        };
    }
    Step::Done(if (200..400).contains(&code) {
        Outcome::Success
    } else {
        Outcome::Failure(format!("HTTP probe failed with statuscode: {code}"))
    })
}

/// Where a response's head ends (before its blank line).
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

/// A hop with blocking sockets on a helper thread: a host name looked
/// up, a connection, TLS without certificate checks (as the kubelet's
/// prober), the request and the response's head. No request: a TCP
/// connection only (an empty answer).
fn blocking_hop(
    host: &str,
    port: u16,
    tls: bool,
    request: Option<&[u8]>,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    use std::net::ToSocketAddrs as _;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => format!("{host}:{port}")
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {host}: no address"))?,
    };
    let tcp = TcpStream::connect_timeout(&addr, left())
        .map_err(|e| format!("dial tcp {addr}: connect: {e}"))?;
    let Some(request) = request else {
        return Ok(Vec::new());
    };
    tcp.set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    if tls {
        let connector = native_tls::TlsConnector::builder()
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true)
            .build()
            .map_err(|e| e.to_string())?;
        let stream = connector
            .connect(host, tcp)
            .map_err(|e| format!("TLS handshake: {e}"))?;
        read_head(stream, request)
    } else {
        read_head(tcp, request)
    }
}

fn read_head<S: Read + Write>(mut stream: S, request: &[u8]) -> Result<Vec<u8>, String> {
    stream
        .write_all(request)
        .and_then(|()| stream.flush())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return if head.is_empty() {
                Err("EOF".into())
            } else {
                Ok(head)
            };
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > MAX_OUTPUT {
            return Err("response headers exceed 10 KiB".into());
        }
    }
}

/// One run of a probe (or hook) action against a container, within
/// `timeout`, on an engine of its own (hooks, tests).
pub fn run_probe(action: &Action, target: &ProbeTarget, timeout: Duration, exe: &Path) -> Outcome {
    let mut engine = match Engine::new(exe.to_path_buf()) {
        Ok(e) => e,
        Err(e) => return Outcome::Failure(format!("cannot run the probe: {e}")),
    };
    let id = engine.start(action, target, timeout);
    loop {
        let (done, _) = engine.poll(None);
        if let Some((_, outcome)) = done.into_iter().find(|(i, _)| *i == id) {
            return outcome;
        }
    }
}

/// The request the kubelet sends: its default headers, then the probe's
/// own (which replace a default of the same name).
pub fn http_request(host_header: &str, path: &str, headers: &[(String, String)]) -> String {
    let mut defaults = vec![
        ("Host".to_string(), host_header.to_string()),
        ("User-Agent".to_string(), USER_AGENT.to_string()),
        ("Accept".to_string(), "*/*".to_string()),
    ];
    defaults.retain(|(name, _)| !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
    let mut out = format!("GET {path} HTTP/1.1\r\n");
    for (name, value) in defaults.iter().chain(headers) {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// A response's status code and `Location`, from its head.
pub fn parse_head(head: &str) -> Result<(u16, Option<String>), String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| status.starts_with("HTTP/"))
        .ok_or_else(|| format!("malformed HTTP response: {status:?}"))?;
    let location = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("location")
            .then(|| value.trim().to_string())
    });
    Ok((code, location))
}

/// Where a redirect points: `(https, host, port, path)`, or `None` for a
/// URL the prober cannot follow.
pub fn redirect_target(
    location: &str,
    https: bool,
    host: &str,
    port: u16,
) -> Option<(bool, String, u16, String)> {
    if location.starts_with('/') {
        return Some((https, host.to_string(), port, location.to_string()));
    }
    let (scheme, rest) = location.split_once("://")?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (h, p) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.to_string(), p.parse().ok()?)
        }
        _ => (authority.to_string(), if https { 443 } else { 80 }),
    };
    Some((https, h.trim_matches(['[', ']']).to_string(), p, path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_request_is_the_kubelets_and_the_probes_headers_win() {
        let r = http_request(
            "10.0.0.5:8080",
            "/healthz",
            &[
                ("host".into(), "web.local".into()),
                ("X-Probe".into(), "1".into()),
            ],
        );
        assert_eq!(
            r,
            "GET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nhost: web.local\r\nX-Probe: 1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            parse_head("HTTP/1.1 302 Found\r\nLocation: /up").unwrap(),
            (302, Some("/up".into()))
        );
        assert_eq!(parse_head("HTTP/1.0 500 Oops").unwrap(), (500, None));
        assert!(parse_head("SSH-2.0-OpenSSH").is_err());
        assert_eq!(
            redirect_target("/next", false, "10.0.0.5", 8080),
            Some((false, "10.0.0.5".into(), 8080, "/next".into()))
        );
        assert_eq!(
            redirect_target("https://example.com/x", false, "10.0.0.5", 8080),
            Some((true, "example.com".into(), 443, "/x".into()))
        );
        assert_eq!(
            redirect_target("http://10.0.0.5:9090", false, "10.0.0.5", 8080),
            Some((false, "10.0.0.5".into(), 9090, "/".into()))
        );
        assert_eq!(redirect_target("ftp://x/", false, "h", 1), None);
    }
}

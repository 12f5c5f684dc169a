//! The prober: runs every running container's probes on one thread.
//!
//! Each probe of each container instance is a task on one local executor;
//! its timer is one entry of async-io's reactor (one timer structure for
//! every probe on the node, no thread per probe). `httpGet` and `tcpSocket`
//! probes (and `grpc`, see [`crate::grpc`]) are non-blocking sockets from
//! the node to the pod's address, in this process; `exec` runs `berth exec-enter` (the container's cgroup,
//! namespaces, root, user and environment, as `berth exec`), in a process
//! group of its own that is killed whole when the probe times out.
//!
//! Outcomes are counted by [`berth_plan::health`] (the kubelet's rules).
//! The prober decides nothing: a result that changes wakes the loop
//! ([`Wake::Health`]), which reprograms endpoints from readiness at once
//! and leaves kills to the planner, which reads the results as facts.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_io::{Async, Timer};
use berth_manifest::probe::{Action, HttpGet, Probe, ProbeKind, Probes};
use berth_plan::health::{ContainerHealth, Killing, Outcome};
use futures_lite::{AsyncReadExt, AsyncWriteExt, future};

use crate::wake::Wake;

/// What the kubelet reads of an exec probe's output, and of a response.
const MAX_OUTPUT: usize = 10 * 1024;
/// Redirects followed on the probed host, as Go's HTTP client does.
const MAX_REDIRECTS: usize = 10;
/// The User-Agent the kubelet sends (`kube-probe/<major>.<minor>`).
const USER_AGENT: &str = "kube-probe/1.35";

/// A running container and its probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    /// `namespace/name`.
    pub pod: String,
    pub container: String,
    /// The instance: when its process started (µs since the epoch).
    pub since_usec: u64,
    pub main_pid: u32,
    pub control_group: String,
    pub workdir: String,
    /// Where `httpGet` and `tcpSocket` go when they name no host.
    pub address: Ipv4Addr,
    pub probes: Probes,
}

type Key = (String, String);

#[derive(Debug, Default)]
struct Shared {
    health: BTreeMap<Key, ContainerHealth>,
}

enum Message {
    Targets(Vec<ProbeTarget>),
    /// Wake the loop after this long (a kill's grace period).
    WakeAfter(Duration),
}

/// The prober thread and the results it keeps.
#[derive(Debug)]
pub struct Prober {
    shared: Arc<Mutex<Shared>>,
    tx: async_channel::Sender<Message>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Prober {
    /// Starts the thread. `exe` is the berth binary (for `exec-enter`).
    pub fn start(exe: PathBuf, wake: Sender<Wake>) -> std::io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = async_channel::unbounded();
        let inner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("berth-prober".into())
            .spawn(move || run(&inner, &rx, &exe, &wake))?;
        Ok(Self {
            shared,
            tx,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Results kept from an earlier run of the agent: a container instance
    /// still running resumes from them.
    pub fn resume(&self, health: &BTreeMap<String, BTreeMap<String, ContainerHealth>>) {
        let mut s = self.lock();
        for (pod, containers) in health {
            for (container, h) in containers {
                s.health.insert((pod.clone(), container.clone()), h.clone());
            }
        }
    }

    /// The containers to probe now. A container instance already known
    /// keeps its results; a new instance (restarted) starts afresh.
    pub fn set_targets(&self, targets: Vec<ProbeTarget>) {
        {
            let mut s = self.lock();
            let mut next = BTreeMap::new();
            for t in &targets {
                let key = (t.pod.clone(), t.container.clone());
                let kept = s
                    .health
                    .remove(&key)
                    .filter(|h| h.since_usec == t.since_usec && same_probes(h, &t.probes));
                next.insert(
                    key,
                    kept.unwrap_or_else(|| ContainerHealth::new(&t.probes, t.since_usec)),
                );
            }
            s.health = next;
        }
        let _ = self.tx.try_send(Message::Targets(targets));
    }

    /// Every container's results, by pod and container.
    pub fn health(&self) -> BTreeMap<String, BTreeMap<String, ContainerHealth>> {
        let mut out: BTreeMap<String, BTreeMap<String, ContainerHealth>> = BTreeMap::new();
        for ((pod, container), h) in &self.lock().health {
            out.entry(pod.clone())
                .or_default()
                .insert(container.clone(), h.clone());
        }
        out
    }

    /// Records a kill begun on a container (SIGTERM sent), and wakes the
    /// loop when its grace period ends.
    pub fn killing(&self, pod: &str, container: &str, killing: Killing) {
        if let Some(h) = self
            .lock()
            .health
            .get_mut(&(pod.to_string(), container.to_string()))
        {
            h.killing = Some(killing);
        }
        let _ = self.tx.try_send(Message::WakeAfter(Duration::from_secs(
            killing.grace_seconds,
        )));
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.tx.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether results kept are for these probes (a changed probe starts over).
fn same_probes(h: &ContainerHealth, probes: &Probes) -> bool {
    ProbeKind::ALL
        .into_iter()
        .all(|k| h.get(k).is_some() == probes.get(k).is_some())
}

fn run(
    shared: &Arc<Mutex<Shared>>,
    rx: &async_channel::Receiver<Message>,
    exe: &Path,
    wake: &Sender<Wake>,
) {
    let ex = async_executor::LocalExecutor::new();
    // async-io's own block_on: this thread drives the reactor itself, so a
    // timer or socket event wakes no other thread.
    async_io::block_on(ex.run(async {
        // One task per probe of each container instance, by what it probes.
        let mut workers: HashMap<(ProbeTarget, ProbeKind), async_executor::Task<()>> =
            HashMap::new();
        while let Ok(message) = rx.recv().await {
            match message {
                Message::Targets(targets) => {
                    let mut next = HashMap::new();
                    for t in targets {
                        for kind in ProbeKind::ALL {
                            let Some(probe) = t.probes.get(kind).cloned() else {
                                continue;
                            };
                            let key = (t.clone(), kind);
                            let task = match workers.remove(&key) {
                                Some(task) => task,
                                None => ex.spawn(worker(
                                    Arc::clone(shared),
                                    t.clone(),
                                    kind,
                                    probe,
                                    exe.to_path_buf(),
                                    wake.clone(),
                                )),
                            };
                            next.insert(key, task);
                        }
                    }
                    // Dropping a task cancels it: containers gone or changed.
                    workers = next;
                }
                Message::WakeAfter(after) => {
                    let wake = wake.clone();
                    ex.spawn(async move {
                        Timer::after(after).await;
                        let _ = wake.send(Wake::Health);
                    })
                    .detach();
                }
            }
        }
    }));
}

/// Runs one probe of one container instance every period, from its
/// initial delay on, while the instance's results say it is due.
async fn worker(
    shared: Arc<Mutex<Shared>>,
    target: ProbeTarget,
    kind: ProbeKind,
    probe: Probe,
    exe: PathBuf,
    wake: Sender<Wake>,
) {
    let key = (target.pod.clone(), target.container.clone());
    let period = Duration::from_secs(u64::from(probe.period_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    // The first run at the end of the initial delay (or now, for an
    // instance found running), then every period; each probe of the node
    // shifted by its own fraction of a period (from a hash of what it
    // probes), so fifty containers started together are not probed in the
    // same instant.
    let delay_end = target
        .since_usec
        .saturating_add(u64::from(probe.initial_delay_seconds) * 1_000_000);
    let spread = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&target.pod, &target.container, kind).hash(&mut h);
        Duration::from_micros(h.finish() % (period.as_micros() as u64).max(1))
    };
    let mut next =
        Instant::now() + Duration::from_micros(delay_end.saturating_sub(now_usec())) + spread;
    loop {
        Timer::at(next).await;
        let due = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            match s.health.get(&key) {
                Some(h) if h.since_usec == target.since_usec => h.due(kind, &probe, now_usec()),
                // Another instance, or gone: its own worker takes over.
                _ => return,
            }
        };
        if due {
            let outcome = run_probe(&probe.action, &target, timeout, &exe).await;
            // A container whose process is gone is not probed: the
            // kubelet throws away the result of a probe it could not run.
            if !alive(target.main_pid) {
                return;
            }
            let changed = {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                match s.health.get_mut(&key) {
                    Some(h) if h.since_usec == target.since_usec => {
                        h.record(kind, &probe, &outcome)
                    }
                    _ => return,
                }
            };
            if changed {
                let _ = wake.send(Wake::Health);
            }
        }
        next += period;
        let now = Instant::now();
        if next < now {
            // A run longer than its period: the next one a period from now.
            next = now + period;
        }
    }
}

/// Whether the process still exists (not yet reaped).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// One run of a probe (or hook) action against a container, within `timeout`.
pub async fn run_probe(
    action: &Action,
    target: &ProbeTarget,
    timeout: Duration,
    exe: &Path,
) -> Outcome {
    match action {
        Action::TcpSocket { host, port } => {
            let ip = match resolve(host.as_deref(), target.address).await {
                Ok(ip) => ip,
                Err(e) => return Outcome::Failure(e),
            };
            let addr = SocketAddr::new(ip, *port);
            let connect = async {
                match Async::<TcpStream>::connect(addr).await {
                    Ok(_) => Outcome::Success,
                    Err(e) => Outcome::Failure(format!("dial tcp {addr}: connect: {e}")),
                }
            };
            within(timeout, connect, || format!("dial tcp {addr}: i/o timeout")).await
        }
        Action::HttpGet(get) => http_probe(get, target.address, timeout).await,
        Action::Exec { command } => exec_probe(command, target, timeout, exe).await,
        Action::Sleep { seconds } => {
            Timer::after(Duration::from_secs(*seconds)).await;
            Outcome::Success
        }
        Action::Grpc { port, service } => {
            let addr = SocketAddr::new(IpAddr::V4(target.address), *port);
            within(
                timeout,
                crate::grpc::check(addr, service.as_deref()),
                || {
                    format!(
                        "timeout: health rpc did not complete within {}s",
                        timeout.as_secs()
                    )
                },
            )
            .await
        }
    }
}

async fn within<F: std::future::Future<Output = Outcome>>(
    timeout: Duration,
    f: F,
    message: impl FnOnce() -> String,
) -> Outcome {
    future::or(f, async {
        Timer::after(timeout).await;
        Outcome::Failure(message())
    })
    .await
}

/// An IP as written, or a name looked up (off this thread: the resolver blocks).
async fn resolve(host: Option<&str>, default: Ipv4Addr) -> Result<IpAddr, String> {
    let Some(host) = host else {
        return Ok(IpAddr::V4(default));
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let name = format!("{host}:0");
    let host = host.to_string();
    blocking::unblock(move || {
        use std::net::ToSocketAddrs as _;
        name.to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .map(|a| a.ip())
            .next()
            .ok_or_else(|| format!("cannot resolve {host}: no address"))
    })
    .await
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

/// `httpGet`: 200–399 succeeds; redirects are followed while they stay
/// on the probed host (up to 10), and one to another host ends the probe
/// as a success with a warning, as the kubelet does; anything else fails.
async fn http_probe(get: &HttpGet, pod_ip: Ipv4Addr, timeout: Duration) -> Outcome {
    let mut https = get.https;
    let host = get.host.clone().unwrap_or_else(|| pod_ip.to_string());
    let mut port = get.port;
    let mut path = get.path.clone();
    let scheme = |https: bool| if https { "https" } else { "http" };
    let url = format!("{}://{}:{}{}", scheme(https), host, port, path);
    let run = async {
        for _ in 0..=MAX_REDIRECTS {
            let url = format!("{}://{host}:{port}{path}", scheme(https));
            let head = match http_get_head(&host, port, https, &path, &get.headers, pod_ip).await {
                Ok(head) => head,
                Err(e) => return Outcome::Failure(format!("Get \"{url}\": {e}")),
            };
            let (code, location) = match parse_head(&head) {
                Ok(x) => x,
                Err(e) => return Outcome::Failure(format!("Get \"{url}\": {e}")),
            };
            if (300..400).contains(&code)
                && let Some(loc) = location
            {
                match redirect_target(&loc, https, &host, port) {
                    Some((s, h, p, next_path)) if h == host => {
                        (https, port, path) = (s, p, next_path);
                        continue;
                    }
                    // Another host: not followed; the redirect counts as success.
                    _ => return Outcome::Success,
                }
            }
            return if (200..400).contains(&code) {
                Outcome::Success
            } else {
                Outcome::Failure(format!("HTTP probe failed with statuscode: {code}"))
            };
        }
        Outcome::Failure(format!(
            "Get \"{url}\": stopped after {MAX_REDIRECTS} redirects"
        ))
    };
    within(timeout, run, || {
        format!("Get \"{url}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)")
    })
    .await
}

/// One GET; returns the response's head (status line and headers). The
/// body is never read: an endless one costs nothing.
async fn http_get_head(
    host: &str,
    port: u16,
    https: bool,
    path: &str,
    headers: &[(String, String)],
    pod_ip: Ipv4Addr,
) -> Result<String, String> {
    let ip = resolve(Some(host), pod_ip).await?;
    let addr = SocketAddr::new(ip, port);
    let tcp = Async::<TcpStream>::connect(addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: connect: {e}"))?;
    let host_header = if (port == 80 && !https) || (port == 443 && https) {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let request = http_request(&host_header, path, headers);
    if https {
        // TLS without certificate checks, as the kubelet's prober; the
        // handshake and I/O on the blocking pool (rare: most probes are HTTP).
        let std_tcp = tcp.into_inner().map_err(|e| e.to_string())?;
        std_tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
        let name = host.to_string();
        let tls = blocking::unblock(move || {
            let connector = native_tls::TlsConnector::builder()
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true)
                .build()
                .map_err(|e| e.to_string())?;
            connector
                .connect(&name, std_tcp)
                .map_err(|e| format!("TLS handshake: {e}"))
        })
        .await?;
        exchange(blocking::Unblock::new(tls), &request).await
    } else {
        exchange(tcp, &request).await
    }
}

async fn exchange<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<String, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            if head.is_empty() {
                return Err("EOF".into());
            }
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            break;
        }
        if head.len() > MAX_OUTPUT {
            return Err("response headers exceed 10 KiB".into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `exec`: the command inside the container; exit 0 succeeds, anything
/// else fails with its output. At the timeout its process group is killed.
async fn exec_probe(
    command: &[String],
    target: &ProbeTarget,
    timeout: Duration,
    exe: &Path,
) -> Outcome {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("exec-enter")
        .arg(target.main_pid.to_string())
        .arg("--cgroup")
        .arg(&target.control_group)
        .arg("--workdir")
        .arg(&target.workdir)
        .arg("--")
        .args(command)
        .process_group(0);
    // Its stdio is set on the async command: it replaces the std one's.
    let mut cmd = async_process::Command::from(cmd);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failure(format!("cannot run the probe: {e}")),
    };
    let group = child.id();
    let shown = command.join(" ");
    let finished = future::or(async { Some(child.output().await) }, async {
        Timer::after(timeout).await;
        None
    })
    .await;
    match finished {
        None => {
            if let Some(pid) = rustix::process::Pid::from_raw(group as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            Outcome::Failure(format!(
                "command \"{shown}\" timed out after {}s",
                timeout.as_secs()
            ))
        }
        Some(Err(e)) => Outcome::Failure(format!("cannot run the probe: {e}")),
        Some(Ok(out)) if out.status.success() => Outcome::Success,
        Some(Ok(out)) => {
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            text.truncate(MAX_OUTPUT);
            let text = String::from_utf8_lossy(&text).trim().to_string();
            Outcome::Failure(if text.is_empty() {
                format!(
                    "command \"{shown}\" exited with {}",
                    out.status.code().unwrap_or(-1)
                )
            } else {
                text
            })
        }
    }
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

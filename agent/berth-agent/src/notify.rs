//! `sd_notify`: readiness, status text and watchdog pings to systemd, over
//! the datagram socket named by `$NOTIFY_SOCKET`. A no-op outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` once, at start.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    pub fn disabled() -> Self {
        Self {
            socket: None,
            watchdog: None,
        }
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            // Best effort: systemd being unreachable must not stop the node.
            let _ = socket.send_to_addr(message.as_bytes(), addr);
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// How often to ping: a third of the watchdog timeout.
    pub fn ping_interval(&self) -> Duration {
        self.watchdog
            .map_or(Duration::from_secs(10), |w| w / 3)
            .max(Duration::from_millis(100))
    }
}

//! Where the agent's `tracing` events go. Under systemd with the journal's
//! native socket: to the journal, one entry per line with its fields
//! (`BERTH_REVISION` from the pass, `BERTH_POD`, `BERTH_UNIT`, ...), so
//! `journalctl BERTH_POD=shop/api-0` shows what the agent did about a pod
//! beside the pod's own output; and a readable copy (`berth: …`) to
//! `$BERTH_LOG_CONSOLE` when set (the appliance's unit points it at
//! `/dev/console`). Elsewhere: the readable lines on stderr, with a `<N>`
//! priority prefix when stderr is a journal stream.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Berth's own lines from `info` up; other crates' (zbus logs every D-Bus
/// message at `trace`) from `warn` up only: on a serial console, a flood
/// of them would slow the node down.
fn wanted(meta: &Metadata<'_>) -> bool {
    let ours = meta.target().starts_with("berth");
    *meta.level() <= if ours { Level::INFO } else { Level::WARN }
}

/// The readable line of every event: its message, one line at a time.
struct ReadableLines {
    out: Mutex<Box<dyn std::io::Write + Send>>,
    /// `<N>` before each line: stderr is a journal stream, which reads it
    /// as the priority.
    priority_prefix: bool,
}

impl std::fmt::Debug for ReadableLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadableLines")
            .field("priority_prefix", &self.priority_prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S: Subscriber> Layer<S> for ReadableLines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut message = Message::default();
        event.record(&mut message);
        let mut text = String::new();
        for line in message.0.lines() {
            if self.priority_prefix {
                let _ = write!(text, "<{}>", priority(event.metadata().level()));
            }
            let _ = writeln!(text, "berth: {line}");
        }
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }
}

/// Sets the process-wide subscriber; says where lines go when it cannot.
pub fn init() {
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = if under_journal {
        tracing_journald::layer().ok().map(|l| {
            l.with_field_prefix(None)
                .with_syslog_identifier("berth".to_string())
        })
    } else {
        None
    };
    let readable = match (&journald, std::env::var_os("BERTH_LOG_CONSOLE")) {
        (Some(_), Some(console)) => std::fs::OpenOptions::new()
            .write(true)
            .open(&console)
            .ok()
            .map(|f| ReadableLines {
                out: Mutex::new(Box::new(f)),
                priority_prefix: false,
            }),
        (Some(_), None) => None,
        (None, _) => Some(ReadableLines {
            out: Mutex::new(Box::new(std::io::stderr())),
            priority_prefix: under_journal,
        }),
    };
    let subscriber = tracing_subscriber::registry()
        .with(journald.with_filter(filter_fn(wanted)))
        .with(readable.with_filter(filter_fn(wanted)));
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("berth: logging was set up twice; keeping the first");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_berths_lines_and_other_crates_warnings_reach_the_console() {
        let buffer = Buffer::default();
        let lines = ReadableLines {
            out: Mutex::new(Box::new(buffer.clone())),
            priority_prefix: true,
        };
        let subscriber = tracing_subscriber::registry().with(lines.with_filter(filter_fn(wanted)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "berth_agent::reconcile", berth_pod = "default/a", "plan: start a\nsecond line");
            tracing::debug!(target: "berth_agent::reconcile", "too chatty");
            tracing::trace!(target: "zbus::connection", "Sending message");
            tracing::info!(target: "zbus::connection", "connected");
            tracing::warn!(target: "zbus::connection", "the bus went away");
        });
        let text = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(
            text,
            "<6>berth: plan: start a\n<6>berth: second line\n<4>berth: the bus went away\n"
        );
    }
}

//! One JSON line per connection (tunnels, SNI passthrough, TCP forwards) or per request (HTTP
//! forwarding), on stdout, apart from the diagnostic log on stderr. Every decision is logged:
//! allowed, denied and failed alike.
//!
//! Lines are written by a thread of their own, fed through a bounded queue: a connection hands
//! its line over and goes on. When stdout cannot keep up (a stalled log shipper, a full pipe),
//! the queue fills and further lines are dropped and counted
//! (`egressfw_gateway_access_log_dropped_lines_total`); connections never wait for the log.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines that may wait for stdout by default (about 2 MiB of typical lines).
pub const DEFAULT_QUEUE_LINES: usize = 8192;

/// The outcome of one connection or request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    /// Allowed, but the upstream could not be reached (or failed mid-way).
    Error,
}

#[derive(Debug, Serialize)]
pub struct Record {
    /// RFC 3339, milliseconds, UTC.
    pub start: String,
    pub listener: &'static str,
    pub source: SocketAddr,
    pub namespace: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `host:port` as the client asked for it (CONNECT target, Host, forward target).
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    pub decision: Decision,
    pub reason: &'static str,
    /// The allow rule's pattern or CIDR that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    /// The parent proxy the connection went through (`upstreamProxy`); `upstream` is then the
    /// parent's address, and the destination was resolved by the parent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Arc<str>>,
    /// What the parent answered CONNECT when it refused (`parent_refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Arrived on a listener the node agent steers workloads' connections to (the client did not
    /// choose the gateway: its kernel carried the connection there).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub steered: bool,
    /// A connection of a namespace in audit mode that no rule allowed, let through and
    /// reported: what enforcing would have said (`not_allowed`). `reason` is then `audit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<&'static str>,
    /// The Admin `Pass` the connection went through when no namespace `Accept` took it up
    /// (refused as `not_allowed`, or audited): what the platform delegated and nothing used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed: Option<Arc<str>>,
    /// How a tunnel ended: `closed`, `idle_timeout` or `drain_deadline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<&'static str>,
    pub duration_ms: f64,
    #[serde(skip)]
    pub started: Instant,
}

impl Record {
    pub fn new(listener: &'static str, source: SocketAddr) -> Self {
        Self {
            start: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            listener,
            source,
            namespace: None,
            method: None,
            authority: None,
            sni: None,
            decision: Decision::Deny,
            reason: "incomplete",
            rule: None,
            upstream: None,
            via: None,
            parent_status: None,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            steered: false,
            audit: None,
            passed: None,
            end: None,
            duration_ms: 0.0,
            started: Instant::now(),
        }
    }

    pub fn deny(&mut self, reason: &'static str) {
        self.decision = Decision::Deny;
        self.reason = reason;
    }

    pub fn allow(&mut self, rule: Arc<str>) {
        self.decision = Decision::Allow;
        self.reason = "allowed";
        self.rule = Some(rule);
    }

    pub fn fail(&mut self, reason: &'static str) {
        self.decision = Decision::Error;
        self.reason = reason;
    }
}

enum Message {
    Line(Vec<u8>),
    /// Everything queued before it is written and flushed, then the sender is answered.
    Flush(mpsc::Sender<()>),
}

struct Writer {
    queue: SyncSender<Message>,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Lines dropped because the queue was full.
pub fn dropped_lines() -> &'static Counter {
    static DROPPED: OnceLock<Counter> = OnceLock::new();
    DROPPED.get_or_init(Counter::default)
}

/// Starts the writer thread with room for `queue_lines` waiting lines. Later calls (and the
/// first `write` without one) keep the writer that exists.
pub fn start(queue_lines: usize) {
    writer(queue_lines);
}

fn writer(queue_lines: usize) -> &'static Writer {
    WRITER.get_or_init(|| {
        let (queue, lines) = mpsc::sync_channel(queue_lines.max(1));
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || run(&lines))
            .expect("starting the access-log writer thread");
        Writer { queue }
    })
}

/// How long the writer lets lines gather after writing a batch. Under load a line ends every
/// few tens of microseconds; waking the writer for each would cost a thread switch per
/// connection. Sleeping instead of waiting on the queue means senders find no waiting
/// receiver, and hand their line over without a wake-up. A line waits at most this long.
const GATHER: Duration = Duration::from_millis(5);

fn run(lines: &Receiver<Message>) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // Waits while nothing happens; the first line after a quiet spell wakes the writer.
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        // Write what is queued, then flush once: one syscall per batch, not per line.
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = lines.try_recv().ok();
        }
        let _ = out.flush();
        std::thread::sleep(GATHER);
    }
}

/// Hands a record to the writer as one JSON line (one write per line, so lines never
/// interleave). Never waits: with the queue full the line is dropped and counted.
pub fn write(record: &mut Record) {
    record.duration_ms = (record.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let Ok(mut line) = serde_json::to_vec(&*record) else {
        return;
    };
    line.push(b'\n');
    if let Err(TrySendError::Full(_)) = writer(DEFAULT_QUEUE_LINES).queue.try_send(Message::Line(line)) {
        dropped_lines().inc();
    }
}

/// Waits (at most `limit`) until every line queued so far is written and flushed: at shutdown,
/// so the last connections' lines are not lost with the process.
pub fn flush(limit: Duration) {
    let Some(writer) = WRITER.get() else { return };
    let (done, answered) = mpsc::channel();
    let deadline = Instant::now() + limit;
    let mut message = Message::Flush(done);
    loop {
        match writer.queue.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                message = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = answered.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

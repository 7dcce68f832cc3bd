//! One JSON line per connection (tunnels, SNI passthrough, TCP forwards) or per request (HTTP
//! forwarding), on stdout, apart from the diagnostic log on stderr. Every decision is logged:
//! allowed, denied and failed alike.

use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use serde::Serialize;

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
    pub namespace: Option<String>,
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
    pub rule: Option<String>,
    pub upstream: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
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
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            end: None,
            duration_ms: 0.0,
            started: Instant::now(),
        }
    }

    pub fn deny(&mut self, reason: &'static str) {
        self.decision = Decision::Deny;
        self.reason = reason;
    }

    pub fn allow(&mut self, rule: String) {
        self.decision = Decision::Allow;
        self.reason = "allowed";
        self.rule = Some(rule);
    }

    pub fn fail(&mut self, reason: &'static str) {
        self.decision = Decision::Error;
        self.reason = reason;
    }
}

/// Writes records as JSON lines. One write per line, so lines from concurrent connections never
/// interleave.
pub fn write(record: &mut Record) {
    record.duration_ms = (record.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let Ok(mut line) = serde_json::to_vec(&*record) else {
        return;
    };
    line.push(b'\n');
    let _ = std::io::stdout().lock().write_all(&line);
}

//! The recent verdicts of one process, numbered, for `egress-agent observe`: the node agent's
//! kernel verdicts (refused, audited, would steer) and the gateway's decisions, in one shape so
//! a reader joins them per pod and orders them by time.
//!
//! Bounded: the last `capacity` events (older ones are gone, and a reader that asks for them is
//! told how many it missed). In memory only: `since` says when this process started numbering,
//! so a reader that sees it change knows the numbers started again.

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::response::IntoResponse as _;
use serde::{Deserialize, Serialize};

/// Events kept by default (a few hundred KiB).
pub const DEFAULT_CAPACITY: usize = 4096;
/// Events one answer carries at most (a shorter answer has everything there was).
pub const PAGE: usize = 1000;

/// Where a verdict was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The node agent's kernel programs (cgroup hooks, tc).
    Kernel,
    Gateway,
}

/// One verdict, as both processes report it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FeedEvent {
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339 with milliseconds, UTC: orders as text.
    pub time: String,
    pub source: Source,
    pub namespace: String,
    pub pod: String,
    /// The kernel: deny, audit, would_steer. The gateway: allow, deny, error, audit.
    pub verdict: String,
    pub reason: String,
    /// `host:port` (the gateway) or `address:port` (the kernel).
    pub destination: String,
    pub protocol: String,
    /// Which process said it (the node's name, the gateway replica's pod), filled by the reader.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporter: String,
    /// The kernel hook that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// The gateway: the rule that decided, how the connection came, the HTTP status and the
    /// bytes each way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub came: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
}

impl FeedEvent {
    /// A verdict made now: who, what, where; the details (hook, rule, bytes…) unset.
    pub fn new(
        source: Source,
        namespace: impl Into<String>,
        pod: impl Into<String>,
        verdict: impl Into<String>,
        reason: impl Into<String>,
        destination: impl Into<String>,
        protocol: impl Into<String>,
    ) -> Self {
        Self {
            seq: 0,
            time: now(),
            source,
            namespace: namespace.into(),
            pod: pod.into(),
            verdict: verdict.into(),
            reason: reason.into(),
            destination: destination.into(),
            protocol: protocol.into(),
            reporter: String::new(),
            hook: None,
            rule: None,
            came: None,
            status: None,
            bytes_up: None,
            bytes_down: None,
        }
    }
}

/// One answer of `GET /events?after=N`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// When this process started numbering.
    pub since: String,
    /// This process, among the processes that may answer at one address (the replicas behind
    /// a Service, a restarted one): numbers count within one instance only.
    #[serde(default)]
    pub instance: String,
    /// Ask `after` this next time.
    pub next: u64,
    /// Events after the one asked for that are no longer kept.
    pub missed: u64,
    pub events: Vec<FeedEvent>,
}

pub struct Feed {
    since: SystemTime,
    instance: String,
    capacity: usize,
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    /// Numbered without gaps: the event numbered `n` is at `n - front's number`. Shared, so a
    /// reader copies pointers under the lock and writes the JSON after it.
    events: VecDeque<Arc<FeedEvent>>,
    /// The number the next event gets (the first is 1).
    next: u64,
}

impl Feed {
    pub fn new(capacity: usize) -> Self {
        let since = SystemTime::now();
        // Distinct per process: the clock and the process id, hashed with a random key.
        let instance = {
            use std::hash::BuildHasher as _;
            let hash = std::collections::hash_map::RandomState::new().hash_one((since, std::process::id()));
            format!("{hash:016x}")
        };
        Self {
            since,
            instance,
            capacity: capacity.max(1),
            ring: Mutex::new(Ring { next: 1, ..Ring::default() }),
        }
    }

    pub fn push(&self, mut event: FeedEvent) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        event.seq = ring.next;
        ring.next += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(Arc::new(event));
    }

    /// The events numbered above `after` (at most a page).
    pub fn after(&self, after: u64) -> Page {
        let (shared, next, missed) = {
            let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let newest = ring.next - 1;
            let oldest = ring.events.front().map_or(ring.next, |e| e.seq);
            let missed = oldest.saturating_sub(after.saturating_add(1));
            // Numbers have no gaps: the first event above `after` is found, not searched.
            let skip = usize::try_from(after.saturating_add(1).saturating_sub(oldest)).unwrap_or(usize::MAX);
            let shared: Vec<Arc<FeedEvent>> = ring.events.iter().skip(skip).take(PAGE).cloned().collect();
            let next = shared.last().map_or(newest, |e| e.seq).max(after.min(newest));
            (shared, next, missed)
        };
        let events = shared.iter().map(|e| FeedEvent::clone(e)).collect();
        Page {
            since: crate::observation_table::rfc3339(self.since),
            instance: self.instance.clone(),
            next,
            missed,
            events,
        }
    }
}

/// Now, as the events spell time.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `GET /events?after=N`, answered only to clients `may_read` accepts (with its reason why not).
pub fn routes(
    feed: Arc<Feed>,
    may_read: impl Fn(IpAddr) -> Result<(), String> + Clone + Send + Sync + 'static,
) -> axum::Router {
    #[derive(serde::Deserialize)]
    struct Query {
        #[serde(default)]
        after: u64,
    }
    axum::Router::new().route(
        "/events",
        axum::routing::get(
            move |axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<std::net::SocketAddr>,
                  axum::extract::Query(q): axum::extract::Query<Query>| async move {
                if let Err(why) = may_read(client.ip()) {
                    return (http::StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
                }
                axum::Json(feed.after(q.after)).into_response()
            },
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(destination: &str) -> FeedEvent {
        FeedEvent::new(Source::Kernel, "team-a", "web", "deny", "not_allowed", destination, "tcp")
    }

    #[test]
    fn a_reader_gets_what_came_after_and_is_told_what_it_missed() {
        let feed = Feed::new(3);
        let empty = feed.after(0);
        assert_eq!((empty.next, empty.missed, empty.events.len()), (0, 0, 0));
        for i in 1..=5 {
            feed.push(event(&format!("192.0.2.{i}:443")));
        }
        let page = feed.after(0);
        assert_eq!(page.missed, 2, "1 and 2 are gone");
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(page.next, 5);
        let page = feed.after(4);
        assert_eq!((page.missed, page.events.len(), page.next), (0, 1, 5));
        let page = feed.after(5);
        assert_eq!((page.missed, page.events.len(), page.next), (0, 0, 5));
        // A reader that followed a process which restarted asks beyond its numbers.
        let page = feed.after(40);
        assert_eq!((page.events.len(), page.next), (0, 5));
        let page = feed.after(u64::MAX);
        assert_eq!((page.events.len(), page.next, page.missed), (0, 5, 0));
        assert_ne!(page.instance, Feed::new(3).after(0).instance, "two processes, two instances");
    }
}

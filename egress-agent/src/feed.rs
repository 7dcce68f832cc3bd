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
/// Events one answer carries at most.
const PAGE: usize = 1000;

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

/// One answer of `GET /events?after=N`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    /// When this process started numbering.
    pub since: String,
    /// Ask `after` this next time.
    pub next: u64,
    /// Events after the one asked for that are no longer kept.
    pub missed: u64,
    pub events: Vec<FeedEvent>,
}

pub struct Feed {
    since: SystemTime,
    capacity: usize,
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<FeedEvent>,
    /// The number the next event gets (the first is 1).
    next: u64,
}

impl Feed {
    pub fn new(capacity: usize) -> Self {
        Self {
            since: SystemTime::now(),
            capacity: capacity.max(1),
            ring: Mutex::new(Ring { next: 1, ..Ring::default() }),
        }
    }

    pub fn push(&self, mut event: FeedEvent) {
        let Ok(mut ring) = self.ring.lock() else { return };
        event.seq = ring.next;
        ring.next += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
    }

    /// The events numbered above `after` (at most a page).
    pub fn after(&self, after: u64) -> Page {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = ring.events.front().map_or(ring.next, |e| e.seq);
        let missed = oldest.saturating_sub(after + 1);
        let events: Vec<FeedEvent> =
            ring.events.iter().filter(|e| e.seq > after).take(PAGE).cloned().collect();
        let next = events.last().map_or(ring.next - 1, |e| e.seq).max(after.min(ring.next - 1));
        Page { since: crate::observation_table::rfc3339(self.since), next, missed, events }
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
        FeedEvent {
            seq: 0,
            time: now(),
            source: Source::Kernel,
            namespace: "team-a".into(),
            pod: "web".into(),
            verdict: "deny".into(),
            reason: "not_allowed".into(),
            destination: destination.into(),
            protocol: "tcp".into(),
            reporter: String::new(),
            hook: None,
            rule: None,
            came: None,
            status: None,
            bytes_up: None,
            bytes_down: None,
        }
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
    }
}

//! What the node's kernel programs refused or audited, per (namespace, workload, address, port,
//! protocol): traffic that went somewhere other than the gateway. Before a namespace enforces,
//! these are the workloads that need steering, proxy settings or a `networks` rule; `recommend`
//! lists them. Served on the agent's HTTP port as `/observations`, with the verdicts as they
//! come at `/events` (for `observe`).
//!
//! - Built from the verdict events, which the kernel rate-limits per CPU: the counts are of the
//!   events delivered (`egressfw_events_lost_total` says how many were not); the exact totals
//!   per pod and reason are `egressfw_denials_total`.
//! - Bounded and in memory, like the gateway's (see `observation_table`).
//! - Read only by clients on the node itself (loopback, the node's own addresses: the API
//!   server's pod proxy when it runs on this node, tools on the node) or in the ranges given
//!   with `--observation-readers` (the API server's addresses on other nodes). A pod's own
//!   address is never the node's, so a workload cannot read where the others go. Not covered:
//!   hostNetwork pods (they are the node), and pods whose traffic to other nodes the network
//!   plugin masquerades to their node's address, when that node is in the readers' ranges (give
//!   the API server's addresses, not the nodes' subnet). Without readers, `recommend` warns
//!   about each agent it cannot read and goes on.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::response::IntoResponse as _;
use egress_common::{
    event::{ACTION_AUDITED, VerdictEvent},
    verdict::{Hook, Reason},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    events,
    feed::{Feed, FeedEvent, Source},
    metrics::Owner,
    observation_table::{Counts, Keyed, Outcome, Table, rfc3339},
};

/// Entries kept (about 1.5 MiB at typical name lengths).
pub const CAPACITY: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: Arc<str>,
    workload: Arc<str>,
    address: IpAddr,
    port: u16,
    protocol: u8,
}

impl Keyed for Key {
    fn heap_bytes(&self) -> usize {
        self.namespace.len() + self.workload.len()
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// One entry, as `/observations` serves it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KernelObservation {
    pub namespace: String,
    pub workload: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Refused (enforce) and let through (audit), by the events delivered.
    #[serde(flatten)]
    pub counts: Counts,
    pub first_seen: String,
    pub last_seen: String,
    pub last_reason: String,
}

/// The whole table, as `/observations` serves it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelSnapshot {
    pub since: String,
    pub persistent: bool,
    pub capacity: usize,
    pub entries: usize,
    pub evicted: u64,
    /// Marks the answer as the kernel's (a gateway's has `observations`).
    pub kernel: Vec<KernelObservation>,
}

pub struct KernelObservations {
    since: SystemTime,
    table: Mutex<Table<Key>>,
    pub feed: Arc<Feed>,
    /// When each flow last went into the feed: an audited connection is reported at its
    /// connect and at every packet, and one bulk flow would push everything else out.
    fed: Mutex<HashMap<FeedKey, Instant>>,
}

/// Policy cgroup, action, reason, family, address, port, protocol.
type FeedKey = (u64, u8, u8, u8, [u8; 16], u16, u8);

/// A flow goes into the feed at most once this often.
const FEED_EVERY: Duration = Duration::from_secs(1);
/// Flows remembered for that; beyond, the memory starts again.
const FEED_FLOWS: usize = 4096;

impl Default for KernelObservations {
    fn default() -> Self {
        Self {
            since: SystemTime::now(),
            table: Mutex::default(),
            feed: Arc::new(Feed::new(crate::feed::DEFAULT_CAPACITY)),
            fed: Mutex::default(),
        }
    }
}

impl KernelObservations {
    /// Counts a verdict event of a pod's cgroup (events of cgroups no pod owns are left to the
    /// log) and adds it to the feed.
    pub fn record(&self, ev: &VerdictEvent, owner: Option<&Owner>) {
        let Some(owner) = owner.filter(|o| !o.namespace.is_empty()) else { return };
        let audited = ev.action == ACTION_AUDITED;
        let reason = Reason::from_u8(ev.reason).map_or("unknown", Reason::name);
        let address = events::address(ev.daddr, ev.family);
        let key = Key {
            namespace: owner.namespace.as_str().into(),
            workload: owner.workload.as_str().into(),
            address,
            port: ev.dport,
            protocol: ev.protocol,
        };
        let outcome = if audited { Outcome::Audited } else { Outcome::Denied };
        if let Ok(mut table) = self.table.lock() {
            table.count(key, outcome, reason, None, SystemTime::now(), CAPACITY);
        }
        if !self.feed_now((
            ev.policy_cgroup_id,
            ev.action,
            ev.reason,
            ev.family,
            ev.daddr,
            ev.dport,
            ev.protocol,
        )) {
            return;
        }
        let verdict = events::action_name(ev);
        let destination = SocketAddr::new(address, ev.dport).to_string();
        self.feed.push(FeedEvent {
            hook: Some(Hook::from_u8(ev.hook).map_or("unknown", Hook::name).into()),
            ..FeedEvent::new(
                Source::Kernel,
                &*owner.namespace,
                &*owner.pod,
                verdict,
                reason,
                destination,
                events::protocol_name(ev.protocol),
            )
        });
    }

    /// Whether the flow's verdict goes into the feed now (not within `FEED_EVERY` of the last).
    fn feed_now(&self, key: FeedKey) -> bool {
        let now = Instant::now();
        let mut fed = self.fed.lock().unwrap_or_else(|p| p.into_inner());
        if fed.get(&key).is_some_and(|at| now.duration_since(*at) < FEED_EVERY) {
            return false;
        }
        if fed.len() >= FEED_FLOWS {
            fed.clear();
        }
        fed.insert(key, now);
        true
    }

    /// The table (entries of `namespace` only, when given), most recently seen first.
    pub fn snapshot(&self, namespace: Option<&str>) -> KernelSnapshot {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<_> =
            table.iter().filter(|(k, _)| namespace.is_none_or(|n| &*k.namespace == n)).collect();
        entries.sort_by(|a, b| b.1.last.cmp(&a.1.last).then_with(|| a.0.address.cmp(&b.0.address)));
        KernelSnapshot {
            since: rfc3339(self.since),
            persistent: false,
            capacity: CAPACITY,
            entries: table.len(),
            evicted: table.evicted(),
            kernel: entries
                .into_iter()
                .map(|(k, s)| KernelObservation {
                    namespace: k.namespace.to_string(),
                    workload: k.workload.to_string(),
                    address: k.address,
                    port: k.port,
                    protocol: events::protocol_name(k.protocol),
                    counts: s.counts,
                    first_seen: rfc3339(s.first),
                    last_seen: rfc3339(s.last),
                    last_reason: s.reason.to_owned(),
                })
                .collect(),
        }
    }
}

/// Who may read the agent's observations and events.
#[derive(Clone, Debug, Default)]
pub struct Readers {
    /// Besides the node's own addresses (`--observation-readers`).
    pub ranges: Vec<IpNet>,
}

impl Readers {
    pub fn check(&self, client: IpAddr) -> Result<(), String> {
        let client = crate::gateway::ip_literal::normalize(client);
        if client.is_loopback() || self.ranges.iter().any(|r| r.contains(&client)) || is_local(client) {
            return Ok(());
        }
        Err(format!(
            "{client} is not an address of this node nor in --observation-readers: the agent's observations are read on the node, or through the API server's pod proxy from an address the agent trusts"
        ))
    }
}

/// Is `ip` one of this host's addresses? The kernel binds a socket only to its own addresses
/// (unless non-local binds are allowed, and then nothing is trusted this way).
fn is_local(ip: IpAddr) -> bool {
    let sysctl = if ip.is_ipv4() { "ipv4/ip_nonlocal_bind" } else { "ipv6/ip_nonlocal_bind" };
    let nonlocal =
        std::fs::read_to_string(format!("/proc/sys/net/{sysctl}")).map_or(true, |v| v.trim() != "0");
    !nonlocal && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// `GET /observations[?namespace=N]` and `GET /events?after=N` on the agent's HTTP port.
pub fn routes(observations: Arc<KernelObservations>, readers: Readers) -> axum::Router {
    #[derive(serde::Deserialize)]
    struct Query {
        namespace: Option<String>,
    }
    let check = readers.clone();
    let feed = observations.feed.clone();
    let table = axum::Router::new().route(
        "/observations",
        axum::routing::get(
            move |axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<SocketAddr>,
                  axum::extract::Query(q): axum::extract::Query<Query>| async move {
                if let Err(why) = check.check(client.ip()) {
                    return (http::StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
                }
                axum::Json(observations.snapshot(q.namespace.as_deref())).into_response()
            },
        ),
    );
    table.merge(crate::feed::routes(feed, move |ip| readers.check(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_itself_reads() {
        let readers = Readers::default();
        assert!(readers.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(readers.check("::1".parse().unwrap()).is_ok());
        let err = readers.check("192.0.2.77".parse().unwrap()).unwrap_err();
        assert!(err.contains("192.0.2.77"), "{err}");
        let readers = Readers { ranges: vec!["192.0.2.0/24".parse().unwrap()] };
        assert!(readers.check("192.0.2.77".parse().unwrap()).is_ok());
        assert!(readers.check("::ffff:192.0.2.77".parse().unwrap()).is_ok(), "IPv4-mapped");
    }

    #[test]
    fn verdicts_of_pods_are_counted_per_destination() {
        let obs = KernelObservations::default();
        let owner = Owner {
            namespace: "team-a".into(),
            pod: "web-1".into(),
            workload: "Deployment/web".into(),
            cgroup: String::new(),
        };
        let mut ev: VerdictEvent = unsafe { std::mem::zeroed() };
        ev.family = 4;
        ev.daddr[..4].copy_from_slice(&[192, 0, 2, 10]);
        ev.dport = 443;
        ev.protocol = 6;
        ev.reason = Reason::DenyDestination as u8;
        obs.record(&ev, Some(&owner));
        obs.record(&ev, Some(&owner));
        ev.action = ACTION_AUDITED;
        obs.record(&ev, Some(&owner));
        obs.record(&ev, None);
        let snap = obs.snapshot(Some("team-a"));
        assert_eq!(snap.kernel.len(), 1);
        let o = &snap.kernel[0];
        assert_eq!((o.address.to_string().as_str(), o.port, o.protocol.as_str()), ("192.0.2.10", 443, "tcp"));
        assert_eq!((o.counts.denied, o.counts.audited), (2, 1));
        let page = obs.feed.after(0);
        assert_eq!(page.events.len(), 2, "the same flow again within a second, and no pod's: not fed");
        assert_eq!(page.events[1].verdict, "audit");
        assert_eq!(page.events[0].destination, "192.0.2.10:443");
        assert!(obs.snapshot(Some("team-b")).kernel.is_empty());
    }
}

//! What the gateway has seen, per (namespace, workload, service account, host, port, how it
//! came): counts by outcome, first and last seen, and the rule that last decided. The raw
//! material for `egress-agent recommend` and `diff` (issue 27): which destinations each
//! namespace's workloads actually reach, and what the policies said.
//!
//! - Bounded: at most `capacity` entries. A new entry in a full table first evicts the tenth
//!   of the entries least recently seen (one sort per tenth, so a flood of distinct hosts costs
//!   O(log n) per connection, not a scan each), and the evictions are counted: a reader can
//!   tell a quiet destination from one the table forgot.
//! - In memory only: a restart starts an empty table, and the JSON says since when it counts.
//! - A connection from an address no namespace claims is not kept (it names no namespace a
//!   policy could be written for; the access log still has it).

use std::{
    collections::HashMap,
    mem::size_of,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};

use axum::response::IntoResponse as _;

use super::{
    access_log::{Decision, Record},
    identity::Identities,
    pod_index::Owner,
    target::{Target, parse_authority},
    tiers::Via,
};

/// Entries kept unless configured otherwise (about 2.5 MiB at typical name lengths).
pub const DEFAULT_CAPACITY: usize = 10_000;

/// How a connection reached the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Came {
    /// The client chose the gateway: an HTTP proxy request, CONNECT, or TLS to its SNI listener.
    Proxy,
    /// The node agent carried it there (the workload dialled the destination itself).
    Steered,
    /// A static TCP forward.
    Forward,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    namespace: Arc<str>,
    workload: Arc<str>,
    service_account: Arc<str>,
    host: Box<str>,
    port: u16,
    came: Came,
    /// How an `EgressPolicy` rule's `via` sees it (from the listener).
    via: Via,
}

/// Connections by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub allowed: u64,
    pub denied: u64,
    /// Let through in audit mode; enforcing would have refused them.
    pub audited: u64,
    /// Allowed, but the upstream failed.
    pub failed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.allowed + self.denied + self.audited + self.failed
    }

    pub fn add(&mut self, other: &Counts) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.audited += other.audited;
        self.failed += other.failed;
    }

    /// Let through, whatever became of it upstream.
    pub fn passed(&self) -> u64 {
        self.allowed + self.audited + self.failed
    }
}

#[derive(Clone, Debug)]
struct Seen {
    counts: Counts,
    first: SystemTime,
    last: SystemTime,
    /// The last decision's reason and rule.
    reason: &'static str,
    rule: Option<Arc<str>>,
}

/// One entry, as the admin endpoint serves it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    pub host: String,
    pub port: u16,
    pub came: Came,
    pub via: Via,
    #[serde(flatten)]
    pub counts: Counts,
    pub first_seen: String,
    pub last_seen: String,
    pub last_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rule: Option<String>,
}

/// The whole table, as the admin endpoint serves it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// When this process started counting: observations do not survive a restart.
    pub since: String,
    pub persistent: bool,
    pub capacity: usize,
    pub entries: usize,
    /// Entries forgotten to stay within `capacity`, since `since`.
    pub evicted: u64,
    /// The table's memory, estimated (keys, counts, names, map overhead).
    pub bytes: usize,
    pub observations: Vec<Observation>,
}

pub struct Observations {
    /// `limits.maxObservations`, as of the last connection (a reload changes it).
    capacity: AtomicUsize,
    since: SystemTime,
    table: Mutex<Table>,
    metrics: ObservationMetrics,
}

/// The table's size, as metrics (registered with the gateway's others).
#[derive(Clone, Default)]
pub struct ObservationMetrics {
    pub entries: Gauge,
    pub bytes: Gauge,
    pub evicted: Counter,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Seen>,
    evicted: u64,
    /// Bytes of the hosts' names held (the rest is per entry).
    name_bytes: usize,
    /// The most entries the map has had room for: its buckets, which removals do not give back
    /// (its `capacity()` shrinks as removed entries leave tombstones).
    peak_capacity: usize,
}

impl Observations {
    pub fn new(capacity: usize, metrics: ObservationMetrics) -> Self {
        Self {
            capacity: AtomicUsize::new(capacity.max(1)),
            since: SystemTime::now(),
            table: Mutex::default(),
            metrics,
        }
    }

    /// Counts a finished connection or request, in a table of at most `capacity` entries.
    pub fn record(&self, record: &Record, owner: Option<&Owner>, capacity: usize) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
        let Some(namespace) = record.namespace.clone() else { return };
        let Some((host, port)) = destination(record) else { return };
        let came = if record.steered {
            Came::Steered
        } else if record.listener == super::tcp_forward::LISTENER {
            Came::Forward
        } else {
            Came::Proxy
        };
        let unknown = || Arc::<str>::from("-");
        let key = Key {
            namespace,
            workload: owner.map_or_else(unknown, |o| o.workload.clone()),
            service_account: owner.map_or_else(unknown, |o| o.service_account.clone()),
            host: host.into(),
            port,
            came,
            via: super::decision::via_of(record.listener),
        };
        self.count(key, record, SystemTime::now());
    }

    fn count(&self, key: Key, record: &Record, now: SystemTime) {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let Ok(mut table) = self.table.lock() else { return };
        if !table.entries.contains_key(&key) && table.entries.len() >= capacity {
            // Down to nine tenths of the capacity (more when a reload lowered it).
            let excess = table.entries.len() + 1 - capacity;
            let evicted = table.evict_oldest(excess + capacity / 10);
            self.metrics.evicted.inc_by(evicted);
        }
        let host_len = key.host.len();
        let seen = table.entries.entry(key).or_insert_with(|| Seen {
            counts: Counts::default(),
            first: now,
            last: now,
            reason: "",
            rule: None,
        });
        let new = seen.counts.total() == 0;
        let counts = &mut seen.counts;
        match record.decision {
            Decision::Allow if record.audit.is_some() || record.reason == "audit" => counts.audited += 1,
            Decision::Allow => counts.allowed += 1,
            Decision::Deny => counts.denied += 1,
            Decision::Error => counts.failed += 1,
        }
        seen.last = now;
        seen.reason = record.reason;
        seen.rule = record.rule.clone();
        if new {
            table.name_bytes += host_len;
            table.peak_capacity = table.peak_capacity.max(table.entries.capacity());
        }
        self.metrics.entries.set(i64::try_from(table.entries.len()).unwrap_or(i64::MAX));
        self.metrics.bytes.set(i64::try_from(table.bytes()).unwrap_or(i64::MAX));
    }

    /// The table (entries of `namespace` only, when given), most recently seen first.
    pub fn snapshot(&self, namespace: Option<&str>) -> Snapshot {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut observations: Vec<(SystemTime, Observation)> = table
            .entries
            .iter()
            .filter(|(k, _)| namespace.is_none_or(|n| &*k.namespace == n))
            .map(|(k, s)| (s.last, observation(k, s)))
            .collect();
        observations.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.host.cmp(&b.1.host)));
        Snapshot {
            since: rfc3339(self.since),
            persistent: false,
            capacity: self.capacity.load(Ordering::Relaxed),
            entries: table.entries.len(),
            evicted: table.evicted,
            bytes: table.bytes(),
            observations: observations.into_iter().map(|(_, o)| o).collect(),
        }
    }

    /// Entries, evictions and estimated bytes, for the metrics.
    pub fn size(&self) -> (usize, u64, usize) {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (table.entries.len(), table.evicted, table.bytes())
    }
}

impl Table {
    /// Forgets the `n` entries least recently seen; how many went.
    fn evict_oldest(&mut self, n: usize) -> u64 {
        let mut by_age: Vec<(SystemTime, &Key)> = self.entries.iter().map(|(k, s)| (s.last, k)).collect();
        let n = n.min(by_age.len());
        if n < by_age.len() {
            by_age.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
        }
        // Only the keys that go are copied (the map stays borrowed until then).
        let doomed: Vec<Key> = by_age[..n].iter().map(|(_, k)| (*k).clone()).collect();
        let mut evicted = 0;
        for key in doomed {
            if self.entries.remove(&key).is_some() {
                self.name_bytes -= key.host.len();
                evicted += 1;
            }
        }
        self.evicted += evicted;
        evicted
    }

    fn bytes(&self) -> usize {
        // A hashbrown bucket holds the key and the value, plus a control byte; the table keeps
        // at most 7/8 of its buckets full.
        let per_entry = size_of::<Key>() + size_of::<Seen>() + 1;
        self.peak_capacity.max(self.entries.capacity()) * per_entry + self.name_bytes
    }
}

/// The host and port a record is about, as the gateway decided them: the authority it
/// checked, normalised. A record whose authority is not a valid host and port (a refused
/// request's raw Host header) is not kept: its text is the client's to choose, without limit.
fn destination(record: &Record) -> Option<(String, u16)> {
    let (target, port) = parse_authority(record.authority.as_deref()?).ok()?;
    let host = match target {
        Target::Name(name) => name.as_str().to_owned(),
        Target::Ip(ip) => ip.to_string(),
    };
    Some((host, port?))
}

fn observation(k: &Key, s: &Seen) -> Observation {
    Observation {
        namespace: k.namespace.to_string(),
        workload: k.workload.to_string(),
        service_account: k.service_account.to_string(),
        host: k.host.to_string(),
        port: k.port,
        came: k.came,
        via: k.via,
        counts: s.counts,
        first_seen: rfc3339(s.first),
        last_seen: rfc3339(s.last),
        last_reason: s.reason.to_owned(),
        last_rule: s.rule.as_deref().map(str::to_owned),
    }
}

/// `GET /observations[?namespace=N]` on the admin endpoint: the table as JSON. Refused (403)
/// to a client the gateway identifies as a workload (a pod, or a static source's namespace):
/// one namespace must not read what the others reach. The API server's pod proxy, which
/// `egress-agent recommend` goes through, and tools on the node are no workload.
pub fn routes(observations: Arc<Observations>, identities: Arc<Identities>) -> axum::Router {
    #[derive(serde::Deserialize)]
    struct Query {
        namespace: Option<String>,
    }
    axum::Router::new().route(
        "/observations",
        axum::routing::get(
            move |axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<std::net::SocketAddr>,
                  axum::extract::Query(q): axum::extract::Query<Query>| async move {
                if let Some(owner) = identities.identify(client.ip()) {
                    let refusal = format!(
                        "{client} is a workload of namespace {}: workloads may not read the gateway's observations\n",
                        owner.namespace
                    );
                    return (http::StatusCode::FORBIDDEN, refusal).into_response();
                }
                axum::Json(observations.snapshot(q.namespace.as_deref())).into_response()
            },
        ),
    )
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(namespace: &str, authority: &str, decision: Decision, reason: &'static str) -> Record {
        let mut r = Record::new("http_proxy", "10.0.0.5:40000".parse().unwrap());
        r.namespace = Some(namespace.into());
        r.authority = Some(authority.into());
        r.decision = decision;
        r.reason = reason;
        r
    }

    fn owner(workload: &str) -> Owner {
        Owner {
            namespace: "team-a".into(),
            labels: Arc::default(),
            workload: workload.into(),
            service_account: "builder".into(),
        }
    }

    #[test]
    fn counts_per_workload_and_destination_with_first_and_last_seen() {
        let table = Observations::new(100, ObservationMetrics::default());
        let web = owner("Deployment/web");
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let key = |host: &str, came| Key {
            namespace: "team-a".into(),
            workload: web.workload.clone(),
            service_account: web.service_account.clone(),
            host: host.into(),
            port: 443,
            came,
            via: Via::Connect,
        };
        table.count(
            key("api.github.com", Came::Proxy),
            &record("team-a", "api.github.com:443", Decision::Allow, "allowed"),
            at(10),
        );
        table.count(
            key("api.github.com", Came::Proxy),
            &record("team-a", "api.github.com:443", Decision::Deny, "not_allowed"),
            at(20),
        );
        let mut audited = record("team-a", "api.github.com:443", Decision::Allow, "audit");
        audited.audit = Some("not_allowed");
        table.count(key("api.github.com", Came::Proxy), &audited, at(30));
        table.count(
            key("api.github.com", Came::Steered),
            &record("team-a", "api.github.com:443", Decision::Error, "connect_failed"),
            at(40),
        );
        let snap = table.snapshot(Some("team-a"));
        assert_eq!(snap.entries, 2);
        let proxied = snap.observations.iter().find(|o| o.came == Came::Proxy).unwrap();
        assert_eq!(proxied.counts, Counts { allowed: 1, denied: 1, audited: 1, failed: 0 });
        assert_eq!(
            (proxied.first_seen.as_str(), proxied.last_seen.as_str()),
            ("1970-01-01T00:00:10Z", "1970-01-01T00:00:30Z")
        );
        assert_eq!(proxied.last_reason, "audit");
        assert_eq!(snap.observations[0].came, Came::Steered, "most recently seen first");
        assert!(table.snapshot(Some("team-b")).observations.is_empty());
        assert!(!snap.persistent);
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_seen_and_counts_them() {
        let table = Observations::new(100, ObservationMetrics::default());
        let r = record("team-a", "x:443", Decision::Allow, "allowed");
        let key = |i: usize| Key {
            namespace: "team-a".into(),
            workload: "-".into(),
            service_account: "-".into(),
            host: format!("host{i}.example.com").into(),
            port: 443,
            came: Came::Proxy,
            via: Via::Connect,
        };
        for i in 0..100 {
            table.count(key(i), &r, SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64));
        }
        // host0 is seen again: now the most recent.
        table.count(key(0), &r, SystemTime::UNIX_EPOCH + Duration::from_secs(1000));
        table.count(key(100), &r, SystemTime::UNIX_EPOCH + Duration::from_secs(1001));
        let snap = table.snapshot(None);
        assert_eq!(
            (snap.entries, snap.evicted),
            (90, 11),
            "a tenth more than the new entry needs goes at once"
        );
        let hosts: Vec<&str> = snap.observations.iter().map(|o| o.host.as_str()).collect();
        assert!(hosts.contains(&"host0.example.com") && hosts.contains(&"host100.example.com"));
        assert!(!hosts.contains(&"host1.example.com") && !hosts.contains(&"host11.example.com"));
        assert!(hosts.contains(&"host12.example.com"));
        // A flood of distinct hosts: the table stays within its capacity and its bytes.
        for i in 0..10_000 {
            table.count(key(1000 + i), &r, SystemTime::UNIX_EPOCH + Duration::from_secs(2000 + i as u64));
        }
        let (entries, evicted, bytes) = table.size();
        assert!(entries <= 100, "{entries}");
        assert_eq!(entries as u64 + evicted, 10_101);
        assert!(bytes < 100 * 1024, "{bytes} bytes for {entries} entries");
        assert_eq!(table.metrics.evicted.get(), evicted);
        assert_eq!(table.metrics.entries.get(), entries as i64);
    }

    #[test]
    fn the_destination_is_the_authority_the_gateway_decided() {
        let mut r = record("team-a", "API.GitHub.com:443", Decision::Allow, "allowed");
        assert_eq!(destination(&r), Some(("api.github.com".into(), 443)));
        r.authority = Some("[2001:db8::1]:8443".into());
        assert_eq!(destination(&r), Some(("2001:db8::1".into(), 8443)));
        // A CONNECT to an address is the address, whatever name its TLS hello carries.
        r.authority = Some("192.0.2.7:443".into());
        r.sni = Some("api.github.com".into());
        assert_eq!(destination(&r), Some(("192.0.2.7".into(), 443)));
        // What is no host and port (a refused request's raw Host header) is not kept.
        for raw in ["a\"b.example.com:443", "example.com", &format!("{}.com:443", "a".repeat(300))] {
            r.authority = Some(raw.into());
            assert_eq!(destination(&r), None, "{raw}");
        }
        r.authority = None;
        assert_eq!(destination(&r), None);
    }
}

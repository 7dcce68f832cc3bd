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
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};

use axum::response::IntoResponse as _;

pub use crate::observation_table::Counts;
use crate::{
    feed::{Feed, FeedEvent, Source},
    observation_table::{Keyed, Outcome, Seen, Table, rfc3339},
};

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

impl Came {
    fn of(record: &Record) -> Self {
        if record.steered {
            Came::Steered
        } else if record.listener == super::tcp_forward::LISTENER {
            Came::Forward
        } else {
            Came::Proxy
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Came::Proxy => "proxy",
            Came::Steered => "steered",
            Came::Forward => "forward",
        }
    }
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
    /// What refused it last: the rule, or the reason when no rule decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_denied_by: Option<String>,
}

/// The per-host series: label values and the value (see [`Observations::series`]).
pub struct Series {
    /// namespace, workload, host, port, denied_by; refusals.
    pub refused: Vec<([String; 5], u64)>,
    /// namespace, workload, host, port; when it first went through, Unix seconds.
    pub first_passed: Vec<([String; 4], u64)>,
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
    table: Mutex<Table<Key>>,
    metrics: ObservationMetrics,
}

/// The table's size, as metrics (registered with the gateway's others).
#[derive(Clone, Default)]
pub struct ObservationMetrics {
    pub entries: Gauge,
    pub bytes: Gauge,
    pub evicted: Counter,
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
        self.record_decided(record, destination(record).as_ref(), owner, capacity);
    }

    /// [`Self::record`], with the record's [`destination`] already parsed (the connection
    /// parses it once for this and for the feed).
    pub fn record_decided(
        &self,
        record: &Record,
        decided: Option<&(String, u16)>,
        owner: Option<&Owner>,
        capacity: usize,
    ) {
        self.capacity.store(capacity.max(1), Ordering::Relaxed);
        let Some(namespace) = record.namespace.clone() else { return };
        let Some((host, port)) = decided else { return };
        let came = Came::of(record);
        let unknown = || Arc::<str>::from("-");
        let key = Key {
            namespace,
            workload: owner.map_or_else(unknown, |o| o.workload.clone()),
            service_account: owner.map_or_else(unknown, |o| o.service_account.clone()),
            host: host.as_str().into(),
            port: *port,
            came,
            via: super::decision::via_of(record.listener),
        };
        self.count(key, record, SystemTime::now());
    }

    fn count(&self, key: Key, record: &Record, now: SystemTime) {
        let capacity = self.capacity.load(Ordering::Relaxed);
        let outcome = match record.decision {
            Decision::Allow if record.audit.is_some() || record.reason == "audit" => Outcome::Audited,
            Decision::Allow => Outcome::Allowed,
            Decision::Deny => Outcome::Denied,
            Decision::Error => Outcome::Failed,
        };
        let Ok(mut table) = self.table.lock() else { return };
        let evicted = table.count(key, outcome, record.reason, record.rule.clone(), now, capacity);
        self.metrics.evicted.inc_by(evicted);
        self.metrics.entries.set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        self.metrics.bytes.set(i64::try_from(table.bytes()).unwrap_or(i64::MAX));
    }

    /// The table (entries of `namespace` only, when given), most recently seen first.
    pub fn snapshot(&self, namespace: Option<&str>) -> Snapshot {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut observations: Vec<(SystemTime, Observation)> = table
            .iter()
            .filter(|(k, _)| namespace.is_none_or(|n| &*k.namespace == n))
            .map(|(k, s)| (s.last, observation(k, s)))
            .collect();
        observations.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.host.cmp(&b.1.host)));
        Snapshot {
            since: rfc3339(self.since),
            persistent: false,
            capacity: self.capacity.load(Ordering::Relaxed),
            entries: table.len(),
            evicted: table.evicted(),
            bytes: table.bytes(),
            observations: observations.into_iter().map(|(_, o)| o).collect(),
        }
    }

    /// The per-host series of the metrics (`observation_series`), over the whole table and
    /// one per label set (entries differ by more: the service account, how the connection
    /// came): the `n` with the most refusals (summed), and the `n` that first went through
    /// most recently (the earliest of their entries: new dependencies, not the names a client
    /// tried and was refused).
    pub fn series(&self, n: usize) -> Series {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut refused: HashMap<(&str, &str, &str, u16, String), u64> = HashMap::new();
        let mut passed: HashMap<(&str, &str, &str, u16), SystemTime> = HashMap::new();
        for (k, s) in table.iter() {
            if let Some(by) = s.denied_by() {
                *refused.entry((&k.namespace, &k.workload, &k.host, k.port, by)).or_default() +=
                    s.counts.denied;
            }
            if let Some(at) = s.first_passed {
                let earliest = passed.entry((&k.namespace, &k.workload, &k.host, k.port)).or_insert(at);
                *earliest = (*earliest).min(at);
            }
        }
        let mut refused: Vec<_> = refused.into_iter().collect();
        let mut passed: Vec<_> = passed.into_iter().collect();
        if refused.len() > n {
            refused.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            refused.truncate(n);
        }
        if passed.len() > n {
            passed.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            passed.truncate(n);
        }
        let seconds = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Series {
            refused: refused
                .into_iter()
                .map(|((ns, w, h, p, by), count)| ([ns.into(), w.into(), h.into(), p.to_string(), by], count))
                .collect(),
            first_passed: passed
                .into_iter()
                .map(|((ns, w, h, p), at)| ([ns.into(), w.into(), h.into(), p.to_string()], seconds(at)))
                .collect(),
        }
    }

    /// Entries, evictions and estimated bytes, for the metrics.
    pub fn size(&self) -> (usize, u64, usize) {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (table.len(), table.evicted(), table.bytes())
    }
}

impl Keyed for Key {
    fn heap_bytes(&self) -> usize {
        // The namespace, workload and service account are shared with the pod index.
        self.host.len()
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// The host and port a record is about, as the gateway decided them: the authority it
/// checked, normalised. A record whose authority is not a valid host and port (a refused
/// request's raw Host header) is not kept: its text is the client's to choose, without limit.
pub fn destination(record: &Record) -> Option<(String, u16)> {
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
        last_denied_by: s.denied_by(),
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
                if let Err(refusal) = not_a_workload(&identities, client.ip()) {
                    return (http::StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response();
                }
                axum::Json(observations.snapshot(q.namespace.as_deref())).into_response()
            },
        ),
    )
}

/// Workloads may not read what the others reach (see [`routes`]).
fn not_a_workload(identities: &Identities, client: std::net::IpAddr) -> Result<(), String> {
    identities.may_read_observations(client)
}

/// `GET /events?after=N` on the admin endpoint: the latest decisions, refused to workloads
/// like `/observations`.
pub fn feed_routes(feed: Arc<Feed>, identities: Arc<Identities>) -> axum::Router {
    crate::feed::routes(feed, move |ip| not_a_workload(&identities, ip))
}

/// A finished connection or request, as `observe` shows it (one of a known namespace).
pub fn feed_event(
    record: &Record,
    decided: Option<&(String, u16)>,
    owner: Option<&Owner>,
) -> Option<FeedEvent> {
    let namespace = record.namespace.as_deref()?;
    let verdict = match record.decision {
        Decision::Allow if record.reason == "audit" => "audit",
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::Error => "error",
    };
    let destination = match decided {
        Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
        Some((host, port)) => format!("{host}:{port}"),
        None => "-".into(),
    };
    // Audited: what enforcing would have said, and the Pass it went through (the "rule" of an
    // audited connection is only a marker).
    let (reason, rule) = match (verdict, record.audit) {
        ("audit", Some(would)) => (would, record.passed.as_deref()),
        _ => (record.reason, record.rule.as_deref()),
    };
    // Stamped now, when it ended (a tunnel's verdict is known from its start, its bytes only
    // now): the stream is in the order things are reported.
    let pod = owner.map_or("-", |o| &o.pod);
    Some(FeedEvent {
        rule: rule.map(str::to_owned),
        came: Some(Came::of(record).name().into()),
        status: record.status,
        bytes_up: Some(record.bytes_up),
        bytes_down: Some(record.bytes_down),
        ..FeedEvent::new(Source::Gateway, namespace, pod, verdict, reason, destination, "tcp")
    })
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
            pod: "web-1".into(),
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

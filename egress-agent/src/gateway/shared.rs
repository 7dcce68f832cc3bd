//! What every listener shares: the live configuration (swapped whole on reload, so a
//! connection sees one consistent policy per decision), client identities, metrics, the
//! connection cap, and the drain state. `dial` is the one path to an upstream: authorise,
//! resolve, check the addresses, connect to a checked address.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Instant,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    access_log::{self, Record},
    config::Limits,
    identity::Identities,
    ip_literal,
    metrics::GatewayMetrics,
    originate::Originator,
    policy::{Deny, Grant, Policy, Target},
};

/// Name lookups in flight at once (tokio's blocking pool has 512 threads).
const MAX_CONCURRENT_LOOKUPS: usize = 64;

/// The parts of the configuration a reload replaces.
pub struct Live {
    pub policy: Policy,
    pub limits: Limits,
    pub originator: Option<Originator>,
}

pub struct Shared {
    live: RwLock<Arc<Live>>,
    pub identities: Arc<Identities>,
    pub metrics: GatewayMetrics,
    active: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    /// getaddrinfo runs on tokio's blocking pool; this bounds how much of it lookups may hold,
    /// so slow names cannot starve everything else.
    lookups: tokio::sync::Semaphore,
    draining: AtomicBool,
    /// Woken when the last open connection ends (`idle`).
    no_connections: tokio::sync::Notify,
    /// Fires on SIGTERM: keep-alive connections close after their current request.
    pub drain: CancellationToken,
    /// Fires when the drain deadline passes: open tunnels and requests end.
    pub cancel: CancellationToken,
}

/// Why no upstream connection was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Deny(Deny),
    /// Allowed, but connecting failed.
    ConnectFailed,
    ConnectTimeout,
    /// Originating TLS to the upstream failed (certificate not valid for the name, or no TLS).
    TlsFailed,
    /// The client stopped sending its request body (`requestBodyTimeout`).
    RequestBodyTimeout,
    /// The upstream did not answer (`responseTimeout`).
    ResponseTimeout,
}

impl From<Deny> for Refusal {
    fn from(d: Deny) -> Self {
        Self::Deny(d)
    }
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Deny(d) => d.name(),
            Self::ConnectFailed => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::TlsFailed => "upstream_tls_failed",
            Self::RequestBodyTimeout => "request_body_timeout",
            Self::ResponseTimeout => "response_timeout",
        }
    }

    /// Puts the refusal into the access-log record.
    pub fn note(self, record: &mut Record) {
        match self {
            // The client's fault, like a slow request head: a denial.
            Self::Deny(_) | Self::RequestBodyTimeout => record.deny(self.reason()),
            Self::ConnectFailed | Self::ConnectTimeout | Self::TlsFailed | Self::ResponseTimeout => {
                record.fail(self.reason());
            }
        }
    }
}

/// A connection slot; frees itself on drop.
pub struct Admitted {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Admitted {
    fn release_source(&self) {
        let mut per = self.shared.per_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.source);
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.release_source();
        if self.shared.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.no_connections.notify_waiters();
        }
        self.shared.metrics.active_connections.dec();
    }
}

impl Shared {
    pub fn new(live: Live, identities: Arc<Identities>) -> Self {
        Self {
            live: RwLock::new(Arc::new(live)),
            identities,
            metrics: GatewayMetrics::new(),
            active: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            draining: AtomicBool::new(false),
            no_connections: tokio::sync::Notify::new(),
            drain: CancellationToken::new(),
            cancel: CancellationToken::new(),
        }
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().map(|l| l.clone()).unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    pub fn set_live(&self, live: Live) {
        match self.live.write() {
            Ok(mut l) => *l = Arc::new(live),
            Err(mut p) => **p.get_mut() = Arc::new(live),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Takes a connection slot, or says why not (cap reached, draining).
    /// Takes a connection slot, or says why not: draining, the gateway's cap, or the cap for one
    /// client address (so that one pod cannot take every slot).
    pub fn admit(self: &Arc<Self>, limits: &Limits, source: IpAddr) -> Result<Admitted, Deny> {
        if self.draining() {
            return Err(Deny::Draining);
        }
        let source = ip_literal::normalize(source);
        {
            let mut per = self.per_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = per.entry(source).or_insert(0);
            if *n >= limits.max_connections_per_source {
                return Err(Deny::SourceLimit);
            }
            *n += 1;
        }
        let admitted = Admitted { shared: self.clone(), source };
        if self.active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            admitted.release_source();
            std::mem::forget(admitted);
            return Err(Deny::TooManyConnections);
        }
        self.metrics.active_connections.inc();
        Ok(admitted)
    }

    /// Returns once no connection is open: woken by the last one to end, no polling.
    pub async fn idle(&self) {
        loop {
            let ended = self.no_connections.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the check and the wait is not missed.
            ended.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Logs and counts a finished connection or request.
    pub fn finish(&self, record: &mut Record) {
        access_log::write(record);
        self.metrics.record(record);
    }

    /// The client's namespace, noted in the record.
    pub fn identify(&self, source: SocketAddr, record: &mut Record) -> Option<String> {
        let ns = self.identities.namespace_of(source.ip());
        if let Some(ns) = &ns {
            tracing::Span::current().record("namespace", ns.as_str());
        }
        record.namespace.clone_from(&ns);
        ns
    }

    /// Authorises `target:port` for `namespace`, resolves it, keeps the addresses the policy
    /// allows and connects to the first that answers. The record gets the decision, the rule and
    /// the upstream address. The returned stream is connected to exactly a checked address; the
    /// grant says what else the granting rules allow.
    pub async fn dial(
        &self,
        live: &Live,
        namespace: Option<&str>,
        target: &Target,
        port: u16,
        record: &mut Record,
    ) -> Result<(TcpStream, Grant), Refusal> {
        tracing::Span::current().record("target", tracing::field::display(format_args!("{target}:{port}")));
        let grant = live.policy.authorize(namespace, target, port)?;
        let started = Instant::now();
        let connect_timeout = live.limits.connect_timeout;
        let resolved = match target {
            Target::Ip(ip) => vec![*ip],
            Target::Name(name) => {
                // As written, so /etc/hosts (hostAliases) applies. The Deployment sets ndots: 1,
                // so a name with a dot is tried as absolute first; whatever a search domain
                // might still produce is a cluster address, which the range check refuses.
                let lookup = async {
                    let _permit = self.lookups.acquire().await;
                    tokio::net::lookup_host((name.as_str(), port)).await
                };
                match tokio::time::timeout(connect_timeout, lookup).await {
                    Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                    Ok(Err(_)) => return Err(Deny::ResolveFailed.into()),
                    Err(_) => return Err(Refusal::ConnectTimeout),
                }
            }
        };
        let dialable = live.policy.dialable(&grant, target, &resolved)?;
        record.allow(grant.matched.clone());
        let connected = tokio::time::timeout(connect_timeout, connect_first(&dialable, port)).await;
        self.metrics.upstream_connect.observe(started.elapsed().as_secs_f64());
        match connected {
            Ok(Ok((stream, addr))) => {
                record.upstream = Some(addr);
                let _ = stream.set_nodelay(true);
                Ok((stream, grant))
            }
            Ok(Err(())) => Err(Refusal::ConnectFailed),
            Err(_) => Err(Refusal::ConnectTimeout),
        }
    }
}

/// The stream and the (checked) address it is connected to.
async fn connect_first(addrs: &[IpAddr], port: u16) -> Result<(TcpStream, SocketAddr), ()> {
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok((s, addr)),
            Err(e) => tracing::debug!(%ip, port, error = %e, "upstream connect failed"),
        }
    }
    Err(())
}

//! One client connection, walked through the steps every listener shares:
//!
//! ```text
//! accept, identify -> admit -> target -> authorise -> resolve, check, dial -> relay -> finish
//! ```
//!
//! - **accept, identify**: the source address names the client's namespace at once, so even a
//!   connection refused a slot is logged with it;
//! - **admit**: a slot under the gateway's caps (`slots`), or a refusal while draining;
//! - **target**: the one step a listener supplies (the CONNECT target, SNI, Host, a fixed
//!   upstream), in its own front (`http_proxy`, `tls_passthrough`, `tcp_forward`);
//! - **authorise, resolve, check, dial**: [`Connection::dial`], the one path to an upstream;
//! - **relay, finish**: [`Connection::relay`], then one access-log line and the metrics.
//!
//! A refusal at any step is said in the front's own protocol (an HTTP status, a TLS alert, a
//! close) and then written down by [`Connection::refuse`]. An HTTP request is a `Connection` of
//! its own from the target on (its own decision, upstream and log line), under its client
//! connection's slot ([`Connection::request`]).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::net::TcpStream;

use crate::k8s::desired::LABEL_MODE;

use super::{
    access_log::{self, Decision, Record},
    decision::{self, Outcome, Refused},
    observations,
    pod_index::Owner,
    policy::{Deny, Grant, Target},
    refusal::Refusal,
    relay::{self, Ended},
    slots::Slot,
    state::{Gateway, Live},
    tiers::{Client, Labels, Verdict, Via},
};

/// The rule an audited connection is counted under (not a host name: it cannot be a rule's).
const AUDIT_RULE: &str = "(audit)";

pub struct Connection {
    gateway: Arc<Gateway>,
    /// The configuration this connection decides by: a reload applies to the next one.
    pub live: Arc<Live>,
    pub source: SocketAddr,
    /// The client's namespace and pod labels; `None`: its address names no namespace.
    owner: Option<Owner>,
    /// How it came, as `EgressPolicy` rules name it.
    via: Via,
    /// What goes into the access log when the connection finishes.
    pub record: Record,
    /// Came in on a steering listener (see `Connection::steered`).
    steered: bool,
    slot: Option<Slot>,
}

/// An upstream connection to a checked address, and what the granting rules allow.
pub struct Dialed {
    pub stream: TcpStream,
    pub grant: Grant,
    /// Connected to the parent proxy rather than to the destination (see [`Hop`]).
    pub via_parent: bool,
}

/// What a connection to a destination the parent proxy covers is: a tunnel through it
/// (CONNECT), or, for plain HTTP requests, the parent itself, to send absolute-form requests to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Tunnel,
    Forward,
}

impl Connection {
    /// Accepted on `listener`: the client is identified at once.
    pub fn accept(gateway: Arc<Gateway>, source: SocketAddr, listener: &'static str) -> Self {
        let owner = gateway.identities.identify(source.ip());
        if let Some(o) = &owner {
            tracing::Span::current().record("namespace", &*o.namespace);
        }
        Self::identified(gateway, source, owner, listener)
    }

    fn identified(
        gateway: Arc<Gateway>,
        source: SocketAddr,
        owner: Option<Owner>,
        listener: &'static str,
    ) -> Self {
        let mut record = Record::new(listener, source);
        record.namespace = owner.as_ref().map(|o| o.namespace.clone());
        let via = decision::via_of(listener);
        Self { live: gateway.live(), gateway, source, owner, via, record, steered: false, slot: None }
    }

    /// A request of this HTTP connection (or of a tunnel's plain HTTP), decided, dialed and
    /// logged on its own under the latest configuration.
    pub fn request(&self, listener: &'static str) -> Self {
        let mut request = Self::identified(self.gateway.clone(), self.source, self.owner.clone(), listener);
        if self.steered {
            request.steered();
        }
        request
    }

    /// Marks a connection that arrived on a steering listener, and its requests.
    pub fn steered(&mut self) {
        self.steered = true;
        self.record.steered = true;
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Takes a slot under the caps, or says why not: draining, the gateway's cap, or the cap
    /// for one client address.
    pub fn admit(&mut self) -> Result<(), Deny> {
        if self.gateway.draining() {
            return Err(Deny::Draining);
        }
        self.slot = Some(self.gateway.slots.take(&self.live.limits, self.source.ip())?);
        Ok(())
    }

    /// The slot goes with a CONNECT tunnel, which outlives the HTTP connection it came on.
    pub fn take_slot(&mut self) -> Option<Slot> {
        self.slot.take()
    }

    pub fn hold(&mut self, slot: Option<Slot>) {
        self.slot = slot;
    }

    /// May this client reach `target:port`? The first step of [`Self::dial`]; on its own where
    /// a kept upstream connection may serve an allowed request. The gateway file's rules, then
    /// the policy resources as they are now (see `decision`); a resource's Deny names its rule
    /// in the record. In a namespace labelled `egressfw.io/mode=audit`, what no rule decides is
    /// let through and reported (`audit` in the record) rather than refused; an explicit Deny
    /// and the non-public ranges still hold.
    pub fn authorise(&mut self, target: &Target, port: u16) -> Result<Grant, Deny> {
        let resources = &self.gateway.resources;
        let tiers = resources.tiers();
        // The namespace's labels are looked up only when some policy could ask for them, or
        // for its mode when nothing decided.
        let labels_of = |o: &Owner| resources.namespace_labels(&o.namespace);
        let namespace_labels = self.owner.as_ref().filter(|_| !tiers.is_empty()).map(labels_of);
        let no_labels = Labels::new();
        let client = self.owner.as_ref().map(|o| Client {
            namespace: &o.namespace,
            namespace_labels: namespace_labels.as_deref().unwrap_or(&no_labels),
            pod_labels: &o.labels,
        });
        let outcome = decision::decide(&self.live.policy, &tiers, client.as_ref(), target, port, self.via);
        // An Admin Pass that nothing in the namespace took up: the log names it, so the
        // namespace's owner sees what the platform delegated and was not used.
        if let Outcome::Resources(Verdict::Undecided { passed: Some(pass) }) = &outcome {
            self.record.passed = Some(pass.label.clone());
        }
        match outcome.into_result() {
            Ok(grant) => Ok(grant),
            Err(Refused { deny: Deny::NotAllowed, .. })
                if namespace_labels
                    .or_else(|| self.owner.as_ref().map(labels_of))
                    .is_some_and(|l| l.get(LABEL_MODE).is_some_and(|mode| mode == "audit")) =>
            {
                self.record.audit = Some(Deny::NotAllowed.name());
                Ok(Grant::by_resource(AUDIT_RULE.into(), Vec::new()))
            }
            Err(Refused { deny, by }) => {
                self.record.rule = by;
                Err(deny)
            }
        }
    }

    /// Authorises `target:port`, resolves it, keeps the addresses the policy allows and
    /// connects to the first that answers. The record gets the decision, the rule and the
    /// upstream address. The stream is connected to exactly a checked address.
    pub async fn dial(&mut self, target: &Target, port: u16) -> Result<Dialed, Refusal> {
        self.dial_as(target, port, Hop::Tunnel).await
    }

    /// [`Self::dial`], where a destination the parent proxy covers is reached as `hop` says.
    pub async fn dial_as(&mut self, target: &Target, port: u16, hop: Hop) -> Result<Dialed, Refusal> {
        tracing::Span::current().record("target", tracing::field::display(format_args!("{target}:{port}")));
        let grant = self.authorise(target, port)?;
        if self.live.parent.as_ref().is_some_and(|p| p.covers(target)) {
            return self.through_parent(grant, target, port, hop).await;
        }
        let started = Instant::now();
        let resolved = self.resolve(target, port).await?;
        let dialable = self.live.policy.dialable(&grant, target, &resolved)?;
        self.record.allow(grant.matched.clone());
        let connect_timeout = self.live.limits.connect_timeout;
        let connected = tokio::time::timeout(connect_timeout, connect_first(&dialable, port)).await;
        self.gateway.metrics.upstream_connect.observe(started.elapsed().as_secs_f64());
        match connected {
            Ok(Ok((stream, addr))) => {
                self.record.upstream = Some(addr);
                let _ = stream.set_nodelay(true);
                Ok(Dialed { stream, grant, via_parent: false })
            }
            Ok(Err(())) => Err(Refusal::ConnectFailed),
            Err(_) => Err(Refusal::ConnectTimeout),
        }
    }

    /// An allowed destination the parent proxy covers. The parent resolves names, so only an
    /// IP literal can be checked against the ranges here; a name is handed on as it is.
    async fn through_parent(
        &mut self,
        grant: Grant,
        target: &Target,
        port: u16,
        hop: Hop,
    ) -> Result<Dialed, Refusal> {
        if let Target::Ip(ip) = target {
            self.live.policy.dialable(&grant, target, &[*ip])?;
        }
        self.record.allow(grant.matched.clone());
        let live = self.live.clone();
        let parent = live.parent.as_ref().expect("checked by the caller");
        self.record.via = Some(parent.shown.clone());
        let started = Instant::now();
        let reach = async {
            match hop {
                Hop::Tunnel => parent.tunnel(target, port).await,
                Hop::Forward => parent.connect().await,
            }
        };
        let connected = tokio::time::timeout(live.limits.connect_timeout, reach).await;
        self.gateway.metrics.upstream_connect.observe(started.elapsed().as_secs_f64());
        let (stream, addr) = connected.map_err(|_| Refusal::ConnectTimeout)??;
        self.record.upstream = Some(addr);
        Ok(Dialed { stream, grant, via_parent: true })
    }

    /// The addresses of an allowed target, from the gateway's own resolver.
    async fn resolve(&self, target: &Target, port: u16) -> Result<Vec<IpAddr>, Refusal> {
        let name = match target {
            Target::Ip(ip) => return Ok(vec![*ip]),
            Target::Name(name) => name,
        };
        // As written, so /etc/hosts (hostAliases) applies. The Deployment sets ndots: 1, so a
        // name with a dot is tried as absolute first; whatever a search domain might still
        // produce is a cluster address, which the range check refuses.
        let lookup = async {
            let _permit = self.gateway.lookups.acquire().await;
            tokio::net::lookup_host((name.as_str(), port)).await
        };
        match tokio::time::timeout(self.live.limits.connect_timeout, lookup).await {
            Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
            Ok(Err(_)) => Err(Deny::ResolveFailed.into()),
            Err(_) => Err(Refusal::ConnectTimeout),
        }
    }

    /// Relays an allowed connection to its end (`first_up`: bytes already read from the client,
    /// sent upstream first), then finishes it.
    pub async fn relay(mut self, client: TcpStream, upstream: TcpStream, first_up: Vec<u8>) {
        let gauge = self.gateway.metrics.tunnel_gauge(self.record.listener);
        gauge.inc();
        let idle = self.live.limits.idle_timeout;
        let (moved, ended) = relay::relay(&client, &upstream, first_up, idle, &self.gateway.cancel).await;
        gauge.dec();
        self.record.bytes_up = moved.up;
        self.record.bytes_down = moved.down;
        self.record.end = Some(match ended {
            Ended::Closed => "closed",
            Ended::Idle => "idle_timeout",
            Ended::Cancelled => "drain_deadline",
        });
        self.finish();
    }

    /// Writes down a refusal the front has already told the client about, and finishes.
    pub fn refuse(mut self, refusal: Refusal) {
        refusal.note(&mut self.record);
        self.finish();
    }

    /// The access-log line and the metrics; the slot (if this connection holds it) is freed.
    pub fn finish(mut self) {
        // An audited connection says so only if it went through; refused for another reason
        // (a non-public range, the upstream), it is that refusal.
        if self.record.audit.is_some() && self.record.decision == Decision::Allow {
            self.record.reason = "audit";
        } else {
            self.record.audit = None;
        }
        // Counted before the line is written: whoever has read the line finds it counted.
        let capacity = self.live.limits.max_observations;
        let decided = observations::destination(&self.record);
        let owner = self.owner.as_ref();
        self.gateway.observations.record_decided(&self.record, decided.as_ref(), owner, capacity);
        if let Some(event) = observations::feed_event(&self.record, decided.as_ref(), owner) {
            self.gateway.feed.push(event);
        }
        access_log::write(&mut self.record);
        self.gateway.metrics.record(&self.record);
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

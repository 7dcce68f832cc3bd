//! The running gateway: the live configuration (swapped whole on reload, so a connection sees
//! one consistent policy per decision), client identities, metrics, connection slots, and the
//! drain state. Every connection holds a reference to it.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, Ordering},
};

use tokio_util::sync::CancellationToken;

use super::{
    config::Limits, identity::Identities, metrics::GatewayMetrics, observations::Observations,
    originate::Originator, parent::Parent, policy::Policy, resources::Resources, slots::Slots,
};

/// Name lookups in flight at once (tokio's blocking pool has 512 threads).
const MAX_CONCURRENT_LOOKUPS: usize = 64;

/// The parts of the configuration a reload replaces.
pub struct Live {
    pub policy: Policy,
    pub limits: Limits,
    pub originator: Option<Originator>,
    /// `upstreamProxy`: the way out for the destinations it covers.
    /// Shared with the readiness checks, which reach covered upstreams through it.
    pub parent: Option<Arc<Parent>>,
}

pub struct Gateway {
    live: RwLock<Arc<Live>>,
    pub identities: Arc<Identities>,
    /// The policy resources, compiled (empty when the gateway does not watch them).
    pub resources: Arc<Resources>,
    pub metrics: GatewayMetrics,
    /// What each workload reached (admin `/observations`).
    pub observations: Arc<Observations>,
    /// The latest decisions, for `observe` (admin `/events`).
    pub feed: Arc<crate::feed::Feed>,
    pub slots: Arc<Slots>,
    /// getaddrinfo runs on tokio's blocking pool; this bounds how much of it lookups may hold,
    /// so slow names cannot starve everything else.
    pub lookups: tokio::sync::Semaphore,
    draining: AtomicBool,
    /// Fires on SIGTERM: keep-alive connections close after their current request.
    pub drain: CancellationToken,
    /// Fires when the drain deadline passes: open tunnels and requests end.
    pub cancel: CancellationToken,
}

impl Gateway {
    pub fn new(live: Live, identities: Arc<Identities>, resources: Arc<Resources>) -> Self {
        let mut metrics = GatewayMetrics::new();
        metrics.register_policy(&resources.gauges);
        let observations =
            Arc::new(Observations::new(live.limits.max_observations, metrics.observed.clone()));
        metrics.register_observations(observations.clone());
        Self {
            observations,
            feed: Arc::new(crate::feed::Feed::new(crate::feed::DEFAULT_CAPACITY)),
            live: RwLock::new(Arc::new(live)),
            identities,
            resources,
            slots: Arc::new(Slots::new(metrics.active_connections.clone())),
            metrics,
            lookups: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            draining: AtomicBool::new(false),
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

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

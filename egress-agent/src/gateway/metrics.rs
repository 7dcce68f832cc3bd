//! The gateway's Prometheus metrics. Label values are bounded by the configuration: allowed
//! traffic is labelled with the client's namespace and the rule pattern that matched (never the
//! raw requested name, which a client could vary without limit), denials with the namespace and
//! their reason. The hosts themselves appear only in the observation series
//! (`observation_series`), which are capped.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{
    access_log::{Decision, Record},
    observations::ObservationMetrics,
};

// Label sets are types over static strings and the policy's shared rule text: counting a
// connection allocates nothing (a label set is cloned only the first time it is seen).

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByRule {
    listener: &'static str,
    rule: Arc<str>,
    /// Empty for a client no namespace claims.
    namespace: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByReason {
    listener: &'static str,
    reason: &'static str,
    namespace: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByDirection {
    listener: &'static str,
    /// `up`: client to upstream.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByListener {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByResult {
    /// `applied` or `rejected`.
    pub result: &'static str,
}

/// The rule label of an allowed connection that somehow has no rule (never expected), and the
/// namespace label of a client no namespace claims.
fn empty() -> &'static Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(""))
}

pub struct GatewayMetrics {
    registry: Registry,
    connections: Family<ByRule, Counter>,
    denials: Family<ByReason, Counter>,
    errors: Family<ByReason, Counter>,
    bytes: Family<ByDirection, Counter>,
    active_tunnels: Family<ByListener, Gauge>,
    pub active_connections: Gauge,
    duration: Family<ByListener, Histogram>,
    pub upstream_connect: Histogram,
    pub reloads: Family<ByResult, Counter>,
    pub observed: ObservationMetrics,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egressfw_gateway");
        let connections = Family::default();
        registry.register(
            "connections",
            "Allowed connections (tunnels) and requests by listener, the rule pattern that allowed them, and the client's namespace",
            connections.clone(),
        );
        let denials = Family::default();
        registry.register(
            "denials",
            "Denied connections and requests by listener, reason and the client's namespace",
            denials.clone(),
        );
        let errors = Family::default();
        registry.register(
            "upstream_errors",
            "Allowed connections whose upstream failed, by listener, reason and the client's namespace",
            errors.clone(),
        );
        let bytes = Family::default();
        registry.register(
            "bytes",
            "Bytes relayed, by listener and direction (up: client to upstream)",
            bytes.clone(),
        );
        let active_tunnels = Family::default();
        registry.register("active_tunnels", "Open tunnels by listener", active_tunnels.clone());
        let active_connections = Gauge::default();
        registry.register("active_connections", "Open client connections", active_connections.clone());
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "duration_seconds",
            "Connection (tunnel) or request duration by listener",
            duration.clone(),
        );
        // 100 µs .. ~13 s.
        let upstream_connect = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "upstream_connect_seconds",
            "Time to resolve and connect to an upstream",
            upstream_connect.clone(),
        );
        let reloads = Family::default();
        registry.register("config_reloads", "Configuration reloads by result", reloads.clone());
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because stdout did not keep up (the queue was full)",
            super::access_log::dropped_lines().clone(),
        );
        let observed = ObservationMetrics::default();
        registry.register(
            "observations",
            "Entries of the table of what each workload reached (admin /observations)",
            observed.entries.clone(),
        );
        registry.register(
            "observations_bytes",
            "Memory of the observations table, estimated",
            observed.bytes.clone(),
        );
        registry.register(
            "observations_evicted",
            "Observations forgotten to stay within limits.maxObservations (least recently seen first)",
            observed.evicted.clone(),
        );
        Self {
            registry,
            observed,
            connections,
            denials,
            errors,
            bytes,
            active_tunnels,
            active_connections,
            duration,
            upstream_connect,
            reloads,
        }
    }

    /// Counts a finished connection or request.
    pub fn record(&self, r: &Record) {
        let listener = r.listener;
        let namespace = r.namespace.as_ref().unwrap_or_else(|| empty()).clone();
        match r.decision {
            Decision::Allow => {
                let rule = r.rule.as_ref().unwrap_or_else(|| empty()).clone();
                self.connections.get_or_create(&ByRule { listener, rule, namespace }).inc();
            }
            Decision::Deny => {
                self.denials.get_or_create(&ByReason { listener, reason: r.reason, namespace }).inc();
            }
            Decision::Error => {
                self.errors.get_or_create(&ByReason { listener, reason: r.reason, namespace }).inc();
            }
        }
        for (direction, n) in [("up", r.bytes_up), ("down", r.bytes_down)] {
            if n > 0 {
                self.bytes.get_or_create(&ByDirection { listener, direction }).inc_by(n);
            }
        }
        self.duration.get_or_create(&ByListener { listener }).observe(r.started.elapsed().as_secs_f64());
    }

    /// Registers the capped per-host series of the observations table.
    pub fn register_observations(&mut self, observations: Arc<super::observations::Observations>) {
        self.registry
            .register_collector(Box::new(super::observation_series::ObservationSeries(observations)));
    }

    /// Registers the policy resources' gauges (they belong to `Resources`, made before this).
    pub fn register_policy(&mut self, gauges: &super::resources::PolicyGauges) {
        self.registry.register(
            "policy_objects_refused",
            "Policy objects this replica refuses (an earlier good generation stays in force; see their Accepted condition)",
            gauges.refused.clone(),
        );
        self.registry.register(
            "policy_resources_synced",
            "1 once the policy resources are listed and applied; 0 while decisions do not take them into account",
            gauges.synced.clone(),
        );
    }

    pub fn tunnel_gauge(&self, listener: &'static str) -> Gauge {
        self.active_tunnels.get_or_create(&ByListener { listener }).clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// 1 ms .. ~9 h: requests are milliseconds, tunnels can live for hours.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

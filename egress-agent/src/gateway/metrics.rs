//! The gateway's Prometheus metrics. Label values are bounded by the configuration: allowed
//! traffic is labelled with the rule pattern that matched (never the raw requested name, which
//! a client could vary without limit), denials with their reason.

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::access_log::{Decision, Record};

type Labels = Vec<(&'static str, String)>;

pub struct GatewayMetrics {
    registry: Registry,
    connections: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    pub active_tunnels: Family<Labels, Gauge>,
    pub active_connections: Gauge,
    duration: Family<Labels, Histogram>,
    pub upstream_connect: Histogram,
    pub reloads: Family<Labels, Counter>,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egressfw_gateway");
        let connections = Family::default();
        registry.register(
            "connections",
            "Allowed connections (tunnels) and requests by listener and the rule pattern that allowed them",
            connections.clone(),
        );
        let denials = Family::default();
        registry.register(
            "denials",
            "Denied connections and requests by listener and reason",
            denials.clone(),
        );
        let errors = Family::default();
        registry.register(
            "upstream_errors",
            "Allowed connections whose upstream failed, by listener and reason",
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
        Self {
            registry,
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
        let listener = ("listener", r.listener.to_owned());
        match r.decision {
            Decision::Allow => {
                let rule = r.rule.clone().unwrap_or_default();
                self.connections.get_or_create(&vec![listener.clone(), ("rule", rule)]).inc();
            }
            Decision::Deny => {
                self.denials.get_or_create(&vec![listener.clone(), ("reason", r.reason.to_owned())]).inc();
            }
            Decision::Error => {
                self.errors.get_or_create(&vec![listener.clone(), ("reason", r.reason.to_owned())]).inc();
            }
        }
        if r.bytes_up > 0 {
            self.bytes.get_or_create(&vec![listener.clone(), ("direction", "up".into())]).inc_by(r.bytes_up);
        }
        if r.bytes_down > 0 {
            self.bytes
                .get_or_create(&vec![listener.clone(), ("direction", "down".into())])
                .inc_by(r.bytes_down);
        }
        self.duration.get_or_create(&vec![listener]).observe(r.started.elapsed().as_secs_f64());
    }

    pub fn tunnel_gauge(&self, listener: &'static str) -> Gauge {
        self.active_tunnels.get_or_create(&vec![("listener", listener.to_owned())]).clone()
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

//! Per-host series from the observations table, for the dashboard's "top denied" and "first
//! seen" panels. A host is a label value a client chooses, so these are capped: the `SERIES`
//! entries with the most denials, and the `SERIES` first seen most recently, per replica (the
//! table itself is bounded by `limits.maxObservations`). Gauges, not counters: an entry the
//! table forgets leaves its series.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use super::observations::{Observation, Observations};

/// Series per family and replica.
pub const SERIES: usize = 100;

#[derive(Debug)]
pub struct ObservationSeries(pub Arc<Observations>);

impl std::fmt::Debug for Observations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observations")
    }
}

impl Collector for ObservationSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (denied, newest) = self.0.top(SERIES);
        let labels = |o: &Observation| {
            [
                ("namespace", o.namespace.clone()),
                ("workload", o.workload.clone()),
                ("host", o.host.clone()),
                ("port", o.port.to_string()),
                ("reason", o.last_reason.clone()),
                ("rule", o.last_rule.clone().unwrap_or_default()),
            ]
        };
        let mut family = encoder.encode_descriptor(
            "observed_denied",
            "Connections refused per namespace, workload and destination, with the last reason and rule (the entries of the observations table with the most, at most 100 per replica)",
            None,
            MetricType::Gauge,
        )?;
        for o in &denied {
            let value = i64::try_from(o.counts.denied).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(family.encode_family(&labels(o))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "observed_first_seen_seconds",
            "When a namespace's workload was first seen reaching a destination, Unix time (the 100 entries first seen most recently, per replica)",
            None,
            MetricType::Gauge,
        )?;
        for o in &newest {
            let Ok(first) = humantime::parse_rfc3339(&o.first_seen) else { continue };
            let seconds = first.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let labels = &labels(o)[..4];
            ConstGauge::new(i64::try_from(seconds).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

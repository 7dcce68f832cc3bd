//! Per-host series from the observations table, for the dashboard's "top denied" and "first
//! seen" panels. A host is a label value a client chooses, so these are capped: the `SERIES`
//! label sets with the most denials, and the `SERIES` first seen most recently, per replica (the
//! table itself is bounded by `limits.maxObservations`), and only what went through is "first
//! seen" (a client trying one name after another is not a new dependency). Gauges, not
//! counters: an entry the table forgets leaves its series.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use super::observations::Observations;

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
        let series = self.0.series(SERIES);
        gauges(
            &mut encoder,
            "observed_denied",
            "Connections refused per namespace, workload and destination, and what refused them last (a rule, or the reason when none decided); the 100 with the most, per replica",
            &series.refused,
        )?;
        gauges(
            &mut encoder,
            "observed_first_seen_seconds",
            "When a namespace's workload first reached a destination (allowed or audited), Unix time; the 100 first seen most recently, per replica",
            &series.first_passed,
        )
    }
}

/// One gauge family: a series per row, labelled `namespace`, `workload`, `host`, `port` and
/// (with five values) `denied_by`.
fn gauges<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[([String; N], u64)],
) -> Result<(), std::fmt::Error> {
    const NAMES: [&str; 5] = ["namespace", "workload", "host", "port", "denied_by"];
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (values, value) in rows {
        let labels: Vec<(&str, &str)> =
            NAMES.iter().copied().zip(values.iter().map(String::as_str)).collect();
        ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{
        access_log::{Decision, Record},
        observations::ObservationMetrics,
    };

    #[test]
    fn one_series_per_label_set_and_only_what_went_through_is_first_seen() {
        let observations = Arc::new(Observations::new(100, ObservationMetrics::default()));
        let record = |authority: &str, decision, reason, steered| {
            let mut r = Record::new("http_proxy", "10.0.0.5:40000".parse().unwrap());
            r.namespace = Some("team-a".into());
            r.authority = Some(authority.into());
            r.decision = decision;
            r.reason = reason;
            r.steered = steered;
            r
        };
        // The same destination refused as proxied and as steered: two entries, one series.
        for steered in [false, true] {
            observations.record(
                &record("x.example.com:443", Decision::Deny, "not_allowed", steered),
                None,
                100,
            );
        }
        observations.record(&record("ok.example.com:443", Decision::Allow, "allowed", false), None, 100);
        let mut registry = prometheus_client::registry::Registry::with_prefix("egressfw_gateway");
        registry.register_collector(Box::new(ObservationSeries(observations)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let denied: Vec<&str> =
            text.lines().filter(|l| l.starts_with("egressfw_gateway_observed_denied{")).collect();
        assert_eq!(
            denied,
            [
                "egressfw_gateway_observed_denied{namespace=\"team-a\",workload=\"-\",host=\"x.example.com\",port=\"443\",denied_by=\"not_allowed\"} 2"
            ],
            "{text}"
        );
        let first: Vec<&str> =
            text.lines().filter(|l| l.starts_with("egressfw_gateway_observed_first_seen_seconds{")).collect();
        assert_eq!(first.len(), 1, "{text}");
        assert!(first[0].contains("host=\"ok.example.com\""), "only what went through: {text}");
    }
}

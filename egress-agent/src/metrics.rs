//! Prometheus metrics. Verdict counts and map occupancy are read from the pinned kernel maps at
//! scrape time (the kernel is the source of truth and keeps counting while the agent is away);
//! the agent's own timings are ordinary registered metrics.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use egress_common::verdict::Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::kernel::{bpffs::PinLayout, maps::KernelMaps};

/// Who owns a policy cgroup, for labels and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
    /// What runs the pod (`Deployment/web`).
    pub workload: String,
    pub cgroup: String,
}

/// Policy cgroup id -> owner; rewritten by the agent after every reconcile.
pub type OwnerIndex = Arc<RwLock<HashMap<u64, Owner>>>;

pub struct Metrics {
    pub registry: Registry,
    /// Time from the watch event (or cgroup creation) that caused a change to the map write.
    pub apply_latency: Histogram,
    pub reconciles: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub pods: Family<Vec<(&'static str, &'static str)>, Gauge>,
    /// Pods whose namespace's label names a gateway that does not admit it, by namespace and
    /// the gateway it names.
    pub gateway_refused_pods: Family<Vec<(&'static str, String)>, Gauge>,
    pub pending_pods: Gauge,
    pub gate_attached: Gauge,
    /// Times another tc program was found ahead of ours and ours was moved back to the head.
    pub tc_moved_to_head: Counter,
}

impl Metrics {
    pub fn new(pins: PinLayout, owners: OwnerIndex) -> Self {
        let mut registry = Registry::with_prefix("egressfw");
        // 100 µs .. ~6.5 s: the target is well under 100 ms.
        let apply_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register(
            "policy_apply_seconds",
            "Time from a watch event or pod cgroup creation to the kernel map write it caused",
            apply_latency.clone(),
        );
        let reconciles = Family::default();
        registry.register("reconciles", "Reconcile passes by result", reconciles.clone());
        let pods = Family::default();
        registry.register("pods", "Pods on this node by policy mode and state", pods.clone());
        let gateway_refused_pods = Family::default();
        registry.register(
            "gateway_refused_pods",
            "Pods on this node whose namespace selects a gateway (label egressfw.io/gateway) that does not admit it (allowedNamespaces); they use the default gateway",
            gateway_refused_pods.clone(),
        );
        let pending_pods = Gauge::default();
        registry.register(
            "pending_pods",
            "Pods of enforced namespaces whose cgroup does not exist yet",
            pending_pods.clone(),
        );
        let gate_attached = Gauge::default();
        registry.register(
            "pod_start_gate_attached",
            "1 while the pod-start gate denies unregistered pod cgroups",
            gate_attached.clone(),
        );
        let tc_moved_to_head = Counter::default();
        registry.register(
            "tc_moved_to_head",
            "Times another tc program was found ahead of ours on a pod's interface (it could pass or redirect frames before they are judged) and ours was moved back to the head",
            tc_moved_to_head.clone(),
        );
        registry.register_collector(Box::new(KernelCollector { pins, owners }));
        Self {
            registry,
            apply_latency,
            reconciles,
            pods,
            gateway_refused_pods,
            pending_pods,
            gate_attached,
            tc_moved_to_head,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct KernelCollector {
    pins: PinLayout,
    owners: OwnerIndex,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Opened per scrape: the maps are pinned, so this works even while the agent reloads.
        let Ok(maps) = KernelMaps::from_pins(&self.pins) else { return Ok(()) };
        let owners = self.owners.read().map(|o| o.clone()).unwrap_or_default();
        if let Ok(counts) = maps.cgroup_counters() {
            let mut family = encoder.encode_descriptor(
                "denials",
                "Denials by pod and reason (applied: dropped or refused; audited: let through by audit mode)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for ((cgroup_id, reason), c) in counts {
                let owner = owners.get(&cgroup_id).cloned().unwrap_or_default();
                let reason = Reason::from_u8(reason).map_or("unknown", Reason::name);
                for (action, value) in [("applied", c.applied), ("audited", c.audited)] {
                    if value == 0 {
                        continue;
                    }
                    let labels = [
                        ("namespace", owner.namespace.as_str()),
                        ("pod", owner.pod.as_str()),
                        ("reason", reason),
                        ("action", action),
                    ];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        if let Ok(counts) = maps.counters() {
            let mut family = encoder.encode_descriptor(
                "node_verdicts",
                "Verdicts on this node by reason, every pod together (allowed traffic is counted only here)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for reason in egress_common::verdict::ALL_REASONS {
                let c = counts.get(reason as usize).copied().unwrap_or_default();
                for (action, value) in [("applied", c.applied), ("audited", c.audited)] {
                    let labels = [("reason", reason.name()), ("action", action)];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let policies = maps.policies().map(|p| p.len()).unwrap_or(0);
        let (v4, v6) = maps.allow_entry_counts().unwrap_or((0, 0));
        let counters = maps.cgroup_counters.keys().count();
        let mut family = encoder.encode_descriptor(
            "map_entries",
            "Entries in the pinned kernel maps",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, n) in [("policy", policies), ("allow_v4", v4), ("allow_v6", v6), ("counters", counters)] {
            ConstGauge::new(n as i64).encode(family.encode_family(&[("map", map)])?)?;
        }
        if let Ok(marks) = maps.passive_marks() {
            let mut family = encoder.encode_descriptor(
                "passive_marks",
                "Accepted TCP connections whose replies the packet program lets through: marks made, released at close, and evicted while in use (LRU pressure: those connections lost their replies)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (event, n) in [
                ("marked", marks.marked),
                ("released", marks.released),
                ("evicted_in_use", marks.evicted_in_use),
            ] {
                ConstCounter::new(n).encode(family.encode_family(&[("event", event)])?)?;
            }
        }
        if let Ok((suppressed, ring_full)) = maps.event_losses() {
            let mut family = encoder.encode_descriptor(
                "events_lost",
                "Verdict events not delivered: kernel rate limit, or ring buffer full",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (why, n) in [("rate_limit", suppressed), ("ring_full", ring_full)] {
                ConstCounter::new(n).encode(family.encode_family(&[("cause", why)])?)?;
            }
        }
        Ok(())
    }
}

//! The part of a recommendation no policy rule can cover: what the node agents' kernel programs
//! saw a namespace's workloads send elsewhere than the gateway (the agents' observations). In
//! an `audit` namespace it went through; under `enforce` it is refused, so these workloads need
//! steering, their proxy settings, or a `networks` rule before the switch.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    time::SystemTime,
};

use crate::{kernel_observations::KernelObservation, observation_table::Counts};

/// One address, port and protocol, over every node and workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectFlow {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub workloads: BTreeSet<String>,
    /// The kernel's reasons (`deny_destination`, `allow_steered`…).
    pub reasons: BTreeSet<String>,
    pub counts: Counts,
    pub last_seen: String,
}

/// The kernel observations of `namespace` (seen since `since`), merged per destination.
pub fn direct_flows(
    kernel: &[KernelObservation],
    namespace: &str,
    since: Option<SystemTime>,
) -> Vec<DirectFlow> {
    let since = since.map(|t| humantime::format_rfc3339_seconds(t).to_string());
    let mut by_destination: BTreeMap<(IpAddr, u16, String), DirectFlow> = BTreeMap::new();
    for o in kernel.iter().filter(|o| o.namespace == namespace) {
        if since.as_ref().is_some_and(|s| o.last_seen < *s) {
            continue;
        }
        let flow =
            by_destination.entry((o.address, o.port, o.protocol.clone())).or_insert_with(|| DirectFlow {
                address: o.address,
                port: o.port,
                protocol: o.protocol.clone(),
                workloads: BTreeSet::new(),
                reasons: BTreeSet::new(),
                counts: Counts::default(),
                last_seen: String::new(),
            });
        flow.workloads.insert(o.workload.clone());
        flow.reasons.insert(o.last_reason.clone());
        flow.counts.add(&o.counts);
        if o.last_seen > flow.last_seen {
            flow.last_seen.clone_from(&o.last_seen);
        }
    }
    by_destination.into_values().collect()
}

/// Comment lines naming them, or nothing.
pub fn section(flows: &[DirectFlow]) -> String {
    if flows.is_empty() {
        return String::new();
    }
    let mut text = String::from(
        "# Sent elsewhere than the gateway, as the node agents' kernel programs saw it (no rule here\n# covers it: under enforce it is refused; the workload needs steering, its proxy settings,\n# or a networks rule):\n",
    );
    for f in flows {
        let target = std::net::SocketAddr::new(f.address, f.port);
        let _ = writeln!(
            text,
            "#   {target}/{}: {} audited, {} refused (packets and connects; {}) from {}; last seen {}",
            f.protocol,
            f.counts.audited,
            f.counts.denied,
            f.reasons.iter().cloned().collect::<Vec<_>>().join(", "),
            f.workloads.iter().cloned().collect::<Vec<_>>().join(", "),
            f.last_seen
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(workload: &str, address: &str, audited: u64, last: &str) -> KernelObservation {
        KernelObservation {
            namespace: "team-a".into(),
            workload: workload.into(),
            address: address.parse().unwrap(),
            port: 443,
            protocol: "tcp".into(),
            counts: Counts { audited, ..Counts::default() },
            first_seen: "2026-12-01T00:00:00Z".into(),
            last_seen: last.into(),
            last_reason: "deny_destination".into(),
        }
    }

    #[test]
    fn one_line_per_destination_over_nodes_and_workloads() {
        let mut other = seen("Deployment/web", "192.0.2.10", 1, "2026-12-04T00:00:00Z");
        other.namespace = "team-b".into();
        let kernel = [
            seen("Deployment/web", "192.0.2.10", 2, "2026-12-02T00:00:00Z"),
            seen("Deployment/batch", "192.0.2.10", 1, "2026-12-03T00:00:00Z"),
            seen("Deployment/web", "2001:db8::5", 1, "2026-11-01T00:00:00Z"),
            other,
        ];
        let flows = direct_flows(&kernel, "team-a", None);
        assert_eq!(flows.len(), 2);
        let text = section(&flows);
        assert!(
            text.contains("#   192.0.2.10:443/tcp: 3 audited, 0 refused (packets and connects; deny_destination) from Deployment/batch, Deployment/web; last seen 2026-12-03T00:00:00Z"),
            "{text}"
        );
        assert!(text.contains("[2001:db8::5]:443/tcp"), "{text}");
        let since = humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(direct_flows(&kernel, "team-a", Some(since)).len(), 1, "the old one is left out");
        assert_eq!(section(&[]), "");
    }
}

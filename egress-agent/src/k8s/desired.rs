//! What each pod on this node may reach, computed from the watched objects. Pure: no kernel, no
//! API calls, so every label and endpoint case is unit-tested.
//!
//! Both the Services' ClusterIPs (seen by the socket hooks and, with kube-proxy, by the packet
//! hook too) and their backend pod IPs (what socket-level load balancers rewrite to before the
//! packet hook, and what a hostNetwork pod's packets carry after kube-proxy's OUTPUT DNAT) are
//! allowed: ClusterIPs on the Service ports, backends on the matching target ports.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::config::{AgentConfig, ServiceRef};
use crate::policy::{
    Mode, Protocol,
    config::{ExtraSpec, PolicySpec, PortRange, SteerSpec},
};

pub const LABEL_MODE: &str = "egressfw.io/mode";
pub const LABEL_GATEWAY: &str = "egressfw.io/gateway";
/// `off` turns the gateway's transparent steering off for the namespace's pods.
pub const LABEL_STEERING: &str = "egressfw.io/steering";
/// Static pods' cgroups are named by this hash, not by the mirror pod's API UID.
const ANNOTATION_CONFIG_HASH: &str = "kubernetes.io/config.hash";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Who made an EndpointSlice. The service-name label alone is anyone's to set who may create
/// EndpointSlices in the Service's namespace; the EndpointSlice controller's value says the
/// addresses are the Service's selected pods.
const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
const DNS_PORT: u16 = 53;

/// The objects the decision depends on, as the reflectors hold them.
#[derive(Default)]
pub struct World<'a> {
    pub namespaces: Vec<&'a Namespace>,
    pub pods: Vec<&'a Pod>,
    pub services: Vec<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
}

/// One pod's policy, still without its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// The UID its cgroup is named by.
    pub cgroup_uid: String,
    /// metadata.uid (differs from `cgroup_uid` for static pods): what the CNI runtime reports.
    pub api_uid: Option<String>,
    pub namespace: String,
    pub name: String,
    /// What runs the pod (`Deployment/web`), for the agent's observations.
    pub workload: String,
    /// Being deleted: a missing cgroup means it is gone, not that it is about to start.
    pub terminating: bool,
    pub mode: Mode,
    pub gateway: String,
    /// The gateway's steering applies (not turned off by the namespace's label).
    pub steering: bool,
    /// Shared by every pod of one gateway (and steering choice).
    pub allowed: Arc<Allowed>,
    /// Configuration problems that narrowed this pod's policy (logged and shown by the agent).
    pub problems: Vec<String>,
    /// The gateway the namespace's label names but may not use (it got the default gateway).
    pub refused_gateway: Option<String>,
    /// The pod's own addresses (status.podIPs), for the tc layer on its veth. Empty for
    /// hostNetwork pods: their addresses are the node's, and they have no veth.
    pub addresses: Vec<IpAddr>,
}

/// The destinations of one gateway + DNS + extras, as the standalone policy spells them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub gateways: Vec<(IpAddr, Vec<PortRange>)>,
    pub dns: Vec<IpAddr>,
    pub extra: Vec<ExtraSpec>,
    pub steer: BTreeMap<u16, SteerSpec>,
}

impl Allowed {
    pub fn into_spec(self, cgroup: String, mode: Mode) -> PolicySpec {
        PolicySpec {
            cgroup,
            mode,
            gateways: self.gateways,
            dns: self.dns,
            extra: self.extra,
            interfaces: Vec::new(),
            steer: self.steer,
        }
    }
}

/// Mode of a namespace from its label. A value that is not understood counts as `enforce`: a
/// typo must never silently turn enforcement off.
pub fn namespace_mode(ns: Option<&Namespace>) -> (Mode, Option<String>) {
    let label = ns.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(LABEL_MODE));
    match label.map(String::as_str) {
        None | Some("off") => (Mode::Pass, None),
        Some("enforce") => (Mode::Enforce, None),
        Some("audit") => (Mode::Audit, None),
        Some(other) => (
            Mode::Enforce,
            Some(format!("label {LABEL_MODE}={other:?} is not one of enforce, audit, off; enforcing")),
        ),
    }
}

/// Whether the gateway's steering applies to a namespace's pods: on unless labelled `off`. A
/// value that is not understood keeps it on (steering only ever leads to the gateway) and is
/// reported.
pub fn namespace_steering(ns: Option<&Namespace>) -> (bool, Option<String>) {
    let label = ns.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(LABEL_STEERING));
    match label.map(String::as_str) {
        None | Some("on") => (true, None),
        Some("off") => (false, None),
        Some(other) => {
            (true, Some(format!("label {LABEL_STEERING}={other:?} is not one of on, off; steering stays on")))
        }
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// Policies for every live pod of the world, by cgroup UID.
pub fn pod_policies(world: &World<'_>, config: &AgentConfig) -> BTreeMap<String, PodPolicy> {
    let namespaces: BTreeMap<&str, &Namespace> =
        world.namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, *n))).collect();
    let mut per_gateway: BTreeMap<(String, bool), (Arc<Allowed>, Vec<String>)> = BTreeMap::new();
    let nothing = Arc::new(Allowed::default());
    let mut out = BTreeMap::new();
    for pod in world.pods.iter().filter(|p| !is_terminal(p)) {
        let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
            continue;
        };
        let annotations = pod.metadata.annotations.as_ref();
        let Some(uid) =
            annotations.and_then(|a| a.get(ANNOTATION_CONFIG_HASH)).or(pod.metadata.uid.as_ref()).cloned()
        else {
            continue;
        };
        let (mode, gateway, steering, allowed, problems, refused_gateway) = match namespaces.get(ns).copied()
        {
            Some(namespace) => {
                let (mode, label_problem) = namespace_mode(Some(namespace));
                let mut problems: Vec<String> = label_problem.into_iter().collect();
                let (gateway, refused) = namespace_gateway(namespace, config);
                problems.extend(refused.as_ref().map(|r| {
                    format!(
                        "namespace {ns} selects gateway {r:?} (label {LABEL_GATEWAY}), which does not admit it (allowedNamespaces in the agent configuration): its pods use the default gateway {:?}",
                        config.default_gateway
                    )
                }));
                let (steering, steering_problem) = namespace_steering(Some(namespace));
                problems.extend(steering_problem);
                let allowed = if mode == Mode::Pass {
                    nothing.clone()
                } else {
                    let key = (gateway.clone(), steering);
                    let (allowed, gw_problems) = per_gateway.entry(key).or_insert_with(|| {
                        let (a, p) = allowed_for(world, config, &gateway, steering);
                        (Arc::new(a), p)
                    });
                    problems.extend(gw_problems.iter().cloned());
                    allowed.clone()
                };
                (mode, gateway, steering, allowed, problems, refused)
            }
            // The namespace watch lags behind the pod watch (as after a relist): the pod is held
            // like a gated pod, nothing but loopback, never passed. The CNI plugin treats a
            // namespace it was not told about the same way. The Namespace's arrival gives the
            // pod its real policy on the next pass.
            None => (
                Mode::Enforce,
                config.default_gateway.clone(),
                false,
                nothing.clone(),
                vec![format!(
                    "namespace {ns} (of pod {ns}/{name}) is not known to the agent yet: the pod is held, nothing but loopback, until it is"
                )],
                None,
            ),
        };
        out.insert(
            uid.clone(),
            PodPolicy {
                cgroup_uid: uid,
                api_uid: pod.metadata.uid.clone(),
                namespace: ns.to_owned(),
                name: name.to_owned(),
                workload: crate::gateway::pod_index::workload_of(pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                mode,
                gateway,
                steering,
                allowed,
                problems,
                refused_gateway,
                addresses: pod_addresses(pod),
            },
        );
    }
    out
}

/// The gateway a namespace's pods use: the one its label names if that gateway admits it, else
/// the default gateway (and the name it asked for, to report). A name the configuration does not
/// know is kept: its pods get DNS only (see `allowed_for`).
fn namespace_gateway(namespace: &Namespace, config: &AgentConfig) -> (String, Option<String>) {
    let name = namespace.metadata.name.as_deref().unwrap_or_default();
    let no_labels = BTreeMap::new();
    let labels = namespace.metadata.labels.as_ref().unwrap_or(&no_labels);
    match labels.get(LABEL_GATEWAY) {
        None => (config.default_gateway.clone(), None),
        Some(asked) => match config.gateways.get(asked) {
            Some(g) if !g.admits(name, labels) => (config.default_gateway.clone(), Some(asked.clone())),
            _ => (asked.clone(), None),
        },
    }
}

/// A pod's IPs from its status; none for hostNetwork pods or unparsable entries.
fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut out: Vec<IpAddr> =
        listed.chain(status.pod_ip.as_deref()).filter_map(|s| s.parse().ok()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What a pod using gateway `name` may reach. Missing pieces narrow the policy (fail closed) and
/// are reported.
pub fn allowed_for(
    world: &World<'_>,
    config: &AgentConfig,
    name: &str,
    steering: bool,
) -> (Allowed, Vec<String>) {
    let mut allowed = Allowed { extra: config.extra.clone(), ..Allowed::default() };
    let mut problems = Vec::new();
    match config.gateways.get(name) {
        None => problems.push(format!(
            "gateway {name:?} (label {LABEL_GATEWAY}) is not in the agent configuration; only DNS is allowed"
        )),
        Some(gw) => {
            for member in &gw.services {
                let Some(svc) = find_service(world, &member.service) else {
                    problems.push(format!("gateway Service {} not found; it is not allowed", member.service));
                    continue;
                };
                let (front, back) =
                    service_targets(world, svc, &member.service, &member.ports, &mut problems);
                if front.is_empty() && back.is_empty() {
                    problems
                        .push(format!("gateway Service {} has no address or matching port", member.service));
                }
                allowed.gateways.extend(front.into_iter().chain(back));
            }
            allowed.gateways.extend(gw.addresses.iter().map(|a| (a.address, a.ports.clone())));
            // Steering goes to the gateway's one Service (the configuration checks there is one).
            let steered_service = gw.services.first().filter(|_| steering && !gw.steer.is_empty());
            if let Some(member) = steered_service {
                let svc = find_service(world, &member.service);
                for (port, to) in &gw.steer {
                    match svc.and_then(|svc| steer_target(svc, *to)) {
                        Some(target) => {
                            allowed.steer.insert(*port, target);
                        }
                        None => problems.push(format!(
                            "gateway Service {} has no ClusterIP with port {to}; port {port} is not steered",
                            member.service
                        )),
                    }
                }
            }
        }
    }
    if let Some(addr) = config.dns.node_local {
        allowed.dns.push(addr);
    }
    match find_service(world, &config.dns.service) {
        None if config.dns.node_local.is_none() => {
            problems.push(format!("DNS Service {} not found; DNS is not allowed", config.dns.service));
        }
        None => {}
        Some(svc) => {
            let dns_port = [PortRange { first: DNS_PORT, last: DNS_PORT }];
            let (front, back) = service_targets(world, svc, &config.dns.service, &dns_port, &mut problems);
            allowed.dns.extend(front.into_iter().map(|(ip, _)| ip));
            for (ip, ports) in back {
                if ports.iter().all(|p| p.first == DNS_PORT && p.last == DNS_PORT) {
                    allowed.dns.push(ip);
                } else {
                    // A DNS backend listening elsewhere (e.g. 5353): that port, UDP and TCP.
                    for protocol in [Protocol::Udp, Protocol::Tcp] {
                        allowed.extra.push(ExtraSpec { cidr: ip.into(), protocol, ports: ports.clone() });
                    }
                }
            }
        }
    }
    allowed.dns.sort_unstable();
    allowed.dns.dedup();
    (allowed, problems)
}

/// Where a steered port goes: the Service's ClusterIPs (one per family) on Service port `to`.
/// Through the ClusterIP, not a backend: kube-proxy or a socket-level load balancer spreads the
/// steered connections over the gateway's pods as it does for any client.
fn steer_target(svc: &Service, to: u16) -> Option<SteerSpec> {
    let spec = svc.spec.as_ref()?;
    if !spec.ports.iter().flatten().any(|p| p.port == i32::from(to)) {
        return None;
    }
    let ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let address = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let address6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    (address.is_some() || address6.is_some()).then_some(SteerSpec { address, address6, port: to })
}

/// Addresses with the ports allowed on each.
type Targets = Vec<(IpAddr, Vec<PortRange>)>;

fn find_service<'a>(world: &World<'a>, r: &ServiceRef) -> Option<&'a Service> {
    world.services.iter().copied().find(|s| {
        s.metadata.namespace.as_deref() == Some(&r.namespace) && s.metadata.name.as_deref() == Some(&r.name)
    })
}

/// (ClusterIP, Service ports) and (backend IP, target ports) for the Service ports in `wanted`
/// (empty: all of them). Target ports come from the EndpointSlices the EndpointSlice controller
/// made for the Service, matched by port name; others are reported in `problems` and skipped.
fn service_targets(
    world: &World<'_>,
    svc: &Service,
    r: &ServiceRef,
    wanted: &[PortRange],
    problems: &mut Vec<String>,
) -> (Targets, Targets) {
    let Some(spec) = svc.spec.as_ref() else { return (Vec::new(), Vec::new()) };
    let selected: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| {
            wanted.is_empty()
                || u16::try_from(p.port).is_ok_and(|n| wanted.iter().any(|w| w.first <= n && n <= w.last))
        })
        .collect();
    let front_ports: Vec<PortRange> = selected
        .iter()
        .filter_map(|p| u16::try_from(p.port).ok())
        .map(|n| PortRange { first: n, last: n })
        .collect();
    let cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let front = if front_ports.is_empty() {
        Vec::new()
    } else {
        cluster_ips.into_iter().map(|ip| (ip, front_ports.clone())).collect()
    };
    let names: Vec<&str> = selected.iter().map(|p| p.name.as_deref().unwrap_or("")).collect();
    let mut back: BTreeMap<IpAddr, Vec<PortRange>> = BTreeMap::new();
    let label = |s: &EndpointSlice, key: &str| s.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    for slice in world.slices.iter().filter(|s| {
        s.metadata.namespace.as_deref() == Some(&r.namespace)
            && label(s, LABEL_SERVICE_NAME).as_deref() == Some(r.name.as_str())
    }) {
        let manager = label(slice, LABEL_MANAGED_BY);
        if manager.as_deref() != Some(SLICE_CONTROLLER) {
            problems.push(format!(
                "EndpointSlice {}/{} names Service {r} but is managed by {}, not the EndpointSlice controller ({LABEL_MANAGED_BY}={SLICE_CONTROLLER}): its addresses are not allowed",
                r.namespace,
                slice.metadata.name.as_deref().unwrap_or_default(),
                manager.map_or_else(|| "nobody named".to_string(), |m| format!("{m:?}")),
            ));
            continue;
        }
        let ports: Vec<PortRange> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| names.contains(&p.name.as_deref().unwrap_or("")))
            .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()))
            .map(|n| PortRange { first: n, last: n })
            .collect();
        if ports.is_empty() {
            continue;
        }
        for ep in &slice.endpoints {
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let entry = back.entry(ip).or_default();
                entry.extend(ports.iter().copied());
                entry.sort_unstable();
                entry.dedup();
            }
        }
    }
    (front, back.into_iter().collect())
}

#[cfg(test)]
mod tests;

//! From the objects the API server stored to the form `decide` uses. The CRD's schema and CEL
//! rules already refused most bad input; this refuses what they cannot check (label selectors'
//! operators, labels longer than DNS allows, CIDRs with host bits, an object written before the
//! CRD had a rule), with a message naming the rule and the value. A refused object takes no
//! part in decisions; the caller reports it (`Accepted=False`) and keeps the others.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net};
use kube::{ResourceExt as _, core::Selector};

use super::{
    Action, ClusterPolicy, ClusterTier, NamespacePolicy, NamespaceTier, Rule, RuleRef, Stage, Tiers, Via,
    index::DestinationIndex,
};
use crate::{
    crd::{
        ClusterEgressPolicy, EgressPolicy,
        cluster_egress_policy::{ClusterAction, Tier},
        destination::{Destination, PortSpec, Protocol},
    },
    gateway::host::HostPattern,
    policy::config::{ParseError, PortRange, parse_cidr},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// An object that takes no part, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `ClusterEgressPolicy/name` or `EgressPolicy/namespace/name`.
    pub object: String,
    pub reason: String,
}

impl Tiers {
    /// Whether a `ClusterEgressPolicy` compiles, and if not why.
    pub fn check_cluster(object: &ClusterEgressPolicy) -> Result<(), String> {
        cluster_policy(object).map(drop)
    }

    /// Whether an `EgressPolicy` compiles, and if not why.
    pub fn check_namespaced(object: &EgressPolicy) -> Result<(), String> {
        namespace_policy(&object.namespace().unwrap_or_default(), object).map(drop)
    }

    /// Compiles every object; the ones that cannot be used are returned with their reason.
    pub fn build(cluster: &[ClusterEgressPolicy], namespaced: &[EgressPolicy]) -> (Self, Vec<Rejection>) {
        let mut rejected = Vec::new();
        let (mut admin, mut baseline) = (Vec::new(), Vec::new());
        for object in cluster {
            match cluster_policy(object) {
                Ok(p) if object.spec.tier == Tier::Admin => admin.push(p),
                Ok(p) => baseline.push(p),
                Err(reason) => {
                    rejected.push(Rejection {
                        object: format!("ClusterEgressPolicy/{}", object.name_any()),
                        reason,
                    });
                }
            }
        }
        let mut by_namespace: BTreeMap<Box<str>, Vec<NamespacePolicy>> = BTreeMap::new();
        for object in namespaced {
            let namespace = object.namespace().unwrap_or_default();
            match namespace_policy(&namespace, object) {
                Ok(p) => by_namespace.entry(namespace.into()).or_default().push(p),
                Err(reason) => rejected.push(Rejection {
                    object: format!("EgressPolicy/{namespace}/{}", object.name_any()),
                    reason,
                }),
            }
        }
        let namespaces = by_namespace
            .into_iter()
            .map(|(ns, mut policies)| {
                policies.sort_by(|a, b| a.name.cmp(&b.name));
                let index = DestinationIndex::new(policies.iter().map(|p| p.rules.as_slice()));
                (ns, NamespaceTier { policies, index })
            })
            .collect();
        let tiers = Self { admin: ClusterTier::new(admin), baseline: ClusterTier::new(baseline), namespaces };
        (tiers, rejected)
    }
}

fn cluster_policy(object: &ClusterEgressPolicy) -> Result<ClusterPolicy, String> {
    let spec = &object.spec;
    let namespaces = selector(&spec.subject.namespaces).map_err(|e| format!("subject.namespaces: {e}"))?;
    let pods =
        spec.subject.pods.as_ref().map(selector).transpose().map_err(|e| format!("subject.pods: {e}"))?;
    let rules = spec
        .egress
        .iter()
        .map(|r| {
            let action = match r.action {
                ClusterAction::Accept => Action::Accept,
                ClusterAction::Deny => Action::Deny,
                ClusterAction::Pass if spec.tier == Tier::Admin => Action::Pass,
                ClusterAction::Pass => {
                    return Err(format!("rule {:?}: Pass exists only in the Admin tier", r.name));
                }
            };
            let by = RuleRef::new(spec.tier.into(), &object.name_any(), &r.name);
            rule(by, action, &r.to, r.ports.as_deref(), None)
        })
        .collect::<Result<_, _>>()?;
    Ok(ClusterPolicy { name: object.name_any().into(), priority: spec.priority, namespaces, pods, rules })
}

fn namespace_policy(namespace: &str, object: &EgressPolicy) -> Result<NamespacePolicy, String> {
    let pods = selector(&object.spec.pod_selector).map_err(|e| format!("podSelector: {e}"))?;
    let name = format!("{namespace}/{}", object.name_any());
    let rules = object
        .spec
        .egress
        .iter()
        // `NamespaceAction` has only Accept.
        .map(|r| {
            rule(
                RuleRef::new(Stage::Namespace, &name, &r.name),
                Action::Accept,
                &r.to,
                r.ports.as_deref(),
                r.via,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(NamespacePolicy { name: name.into(), pods, rules })
}

fn selector(s: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(s.clone()).map_err(|e| e.0)
}

fn rule(
    by: RuleRef,
    action: Action,
    to: &[Destination],
    ports: Option<&[PortSpec]>,
    via: Option<Via>,
) -> Result<Rule, String> {
    let name = by.label.rsplit('#').next().unwrap_or_default().to_owned();
    let at = |what: &str| format!("rule {name:?} {what}");
    let mut names = Vec::new();
    let mut networks = Vec::new();
    for destination in to {
        for n in destination.domain_names.iter().flatten() {
            names.push(HostPattern::parse(&n.0).map_err(|e| format!("{}: {e}", at("domainNames")))?);
        }
        for n in destination.networks.iter().flatten() {
            let net = parse_cidr(&n.0, &at("networks")).map_err(|e| match e {
                ParseError::Invalid { at, message } => format!("{at}: {message}"),
                ParseError::Syntax(e) => e.to_string(),
            })?;
            networks.push(unmapped(net));
        }
    }
    let ports = ports
        .map(|specs| {
            specs
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| {
                    let last = p.end_port.unwrap_or(p.port);
                    if last < p.port {
                        return Err(format!("{}: endPort {last} is below port {}", at("ports"), p.port));
                    }
                    Ok(PortRange { first: p.port, last })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(Rule { by, action, names, networks, ports, via })
}

/// Targets carry IPv4-mapped IPv6 addresses as the IPv4 they are, so networks written in the
/// mapped form must be too, or a Deny on `::ffff:10.0.0.0/104` would miss 10.1.2.3.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32")),
            None => net,
        },
        _ => net,
    }
}

impl From<Tier> for Stage {
    fn from(t: Tier) -> Self {
        match t {
            Tier::Admin => Self::Admin,
            Tier::Baseline => Self::Baseline,
        }
    }
}

//! The evaluation order written as plainly as it reads, straight from the objects: every
//! policy sorted and every rule scanned, selectors and patterns interpreted from their text.
//! No index, no compiled form, none of `decide`'s code: the property tests hold `decide` to it.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt as _;

use super::{Client, RuleRef, Stage, Verdict, Via};
use crate::crd::{
    ClusterEgressPolicy, EgressPolicy,
    cluster_egress_policy::{ClusterAction, Tier},
    destination::{Destination, PortSpec, Protocol},
};

/// A destination as the reference sees it: the lower-case name asked for, or an address.
#[derive(Clone, Debug)]
pub enum Asked {
    Name(String),
    Ip(IpAddr),
}

fn selects(s: &LabelSelector, labels: &super::Labels) -> bool {
    let equal = s.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            other => panic!("the generator made operator {other}"),
        }
    });
    equal && expressions
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        // `*.example.com`: `.example.com` must end the name, with a label before it.
        Some(dot_parent) => name.len() > dot_parent.len() && name.ends_with(dot_parent),
        None => pattern == name,
    }
}

fn reaches(to: &[Destination], asked: &Asked) -> bool {
    to.iter().any(|d| match asked {
        Asked::Name(n) => d.domain_names.iter().flatten().any(|p| name_matches(&p.0, n)),
        Asked::Ip(ip) => d.networks.iter().flatten().any(|c| c.0.parse::<IpNet>().unwrap().contains(ip)),
    })
}

fn on_port(ports: Option<&[PortSpec]>, port: u16) -> bool {
    ports.is_none_or(|ps| {
        ps.iter()
            .any(|p| p.protocol == Protocol::Tcp && (p.port..=p.end_port.unwrap_or(p.port)).contains(&port))
    })
}

fn networks(to: &[Destination]) -> Vec<IpNet> {
    to.iter().flat_map(|d| d.networks.iter().flatten()).map(|c| c.0.parse().unwrap()).collect()
}

fn sorted(mut v: Vec<IpNet>) -> Vec<IpNet> {
    v.sort_unstable();
    v.dedup();
    v
}

/// The first rule of the tier that matches, as (policy, rule index).
fn first_in_tier<'a>(
    cluster: &'a [ClusterEgressPolicy],
    tier: Tier,
    client: &Client,
    asked: &Asked,
    port: u16,
) -> Option<(&'a ClusterEgressPolicy, usize)> {
    let mut policies: Vec<&ClusterEgressPolicy> = cluster.iter().filter(|p| p.spec.tier == tier).collect();
    policies.sort_by_key(|p| (p.spec.priority, p.name_any()));
    for p in policies {
        let subject = &p.spec.subject;
        if !selects(&subject.namespaces, client.namespace_labels)
            || !subject.pods.as_ref().is_none_or(|s| selects(s, client.pod_labels))
        {
            continue;
        }
        for (i, r) in p.spec.egress.iter().enumerate() {
            if reaches(&r.to, asked) && on_port(r.ports.as_deref(), port) {
                return Some((p, i));
            }
        }
    }
    None
}

fn cluster_ref(stage: Stage, p: &ClusterEgressPolicy, i: usize) -> RuleRef {
    RuleRef::new(stage, &p.name_any(), &p.spec.egress[i].name)
}

pub fn decide(
    cluster: &[ClusterEgressPolicy],
    namespaced: &[EgressPolicy],
    client: &Client,
    asked: &Asked,
    port: u16,
    via: Via,
) -> Verdict {
    let mut passed = None;
    if let Some((p, i)) = first_in_tier(cluster, Tier::Admin, client, asked, port) {
        let rule = &p.spec.egress[i];
        let by = cluster_ref(Stage::Admin, p, i);
        match rule.action {
            ClusterAction::Accept => {
                return Verdict::Accept { by, passed: None, exceptions: sorted(networks(&rule.to)) };
            }
            ClusterAction::Deny => return Verdict::Deny { by },
            ClusterAction::Pass => {
                let delegated = networks(&rule.to);
                let mut own: Vec<&EgressPolicy> = namespaced
                    .iter()
                    .filter(|p| p.namespace().as_deref() == Some(client.namespace))
                    .collect();
                own.sort_by_key(|p| p.name_any());
                let mut first = None;
                let mut exceptions = Vec::new();
                for p in own {
                    if !selects(&p.spec.pod_selector, client.pod_labels) {
                        continue;
                    }
                    for r in &p.spec.egress {
                        if reaches(&r.to, asked)
                            && on_port(r.ports.as_deref(), port)
                            && r.via.is_none_or(|v| v == via)
                        {
                            first.get_or_insert_with(|| {
                                RuleRef::new(
                                    Stage::Namespace,
                                    &format!("{}/{}", client.namespace, p.name_any()),
                                    &r.name,
                                )
                            });
                            exceptions.extend(
                                networks(&r.to)
                                    .into_iter()
                                    .filter(|n| delegated.iter().any(|d| d.contains(n))),
                            );
                        }
                    }
                }
                if let Some(by_ns) = first {
                    return Verdict::Accept { by: by_ns, passed: Some(by), exceptions: sorted(exceptions) };
                }
                passed = Some(by);
            }
        }
    }
    if let Some((p, i)) = first_in_tier(cluster, Tier::Baseline, client, asked, port) {
        let rule = &p.spec.egress[i];
        let by = cluster_ref(Stage::Baseline, p, i);
        return match rule.action {
            ClusterAction::Deny => Verdict::Deny { by },
            _ => Verdict::Accept { by, passed, exceptions: sorted(networks(&rule.to)) },
        };
    }
    Verdict::Undecided { passed }
}

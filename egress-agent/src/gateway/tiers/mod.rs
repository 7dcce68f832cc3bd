//! The policy resources (`ClusterEgressPolicy`, `EgressPolicy`) as the gateway evaluates them,
//! per connection:
//!
//! 1. the Admin tier, policies by priority (then name), rules in order: the first rule whose
//!    subject, destination and port match decides. Accept and Deny are final; Pass delegates;
//! 2. only after a Pass: the union of the Accept rules of the client namespace's `EgressPolicy`
//!    objects that select the pod (and allow the way the connection came). Pass is the bound:
//!    a namespace's rule counts only for what an Admin rule passed to it, never for what the
//!    Admin tier did not mention, so a cluster without Pass rules gives namespaces nothing;
//! 3. the Baseline tier, as the Admin tier but without Pass, where nothing above decided;
//! 4. nothing decided: the caller's default (deny).
//!
//! Names match the name the client asked for (CONNECT, SNI, Host), never an address learned
//! from DNS; networks match address targets (a steered connection without a name). A rule's
//! networks also open those non-public ranges for the names it accepts (as `cidrs` do in the
//! gateway file); a namespace rule opens only ranges the Pass that delegated to it also names.
//!
//! `compile` turns objects into this form (refusing what the API server could not check),
//! `index` finds the rules that can match a destination without scanning the others, and
//! `cluster_tier` the cluster policies whose subject can select a namespace without checking
//! the others.

mod bounds;
mod cluster_tier;
mod compile;
mod index;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, sync::Arc};

use ipnet::IpNet;
use kube::core::{Selector, SelectorExt as _};

pub use crate::crd::egress_policy::Via;
pub use compile::Rejection;

use super::target::Target;
use crate::policy::config::PortRange;
use cluster_tier::ClusterTier;
use index::{DestinationIndex, Hit};

pub type Labels = BTreeMap<String, String>;

/// The Admin `ClusterEgressPolicy` "platform" (priority 10, every namespace) with `rules`
/// (YAML flow-style list items, one per line), for tests.
#[cfg(test)]
pub(crate) fn platform_policy(rules: &[&str]) -> crate::crd::ClusterEgressPolicy {
    let rules: String = rules.iter().map(|r| format!("    - {r}\n")).collect();
    serde_yaml::from_str(&format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {{name: platform}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{}}}}\n  egress:\n{rules}"
    ))
    .expect("a valid ClusterEgressPolicy")
}

/// A namespace's labels as selectors see them: with `kubernetes.io/metadata.name`, which the API
/// server sets on every namespace (and a namespace known only by name has nothing else).
pub fn namespace_labels(mut labels: Labels, namespace: &str) -> Labels {
    labels.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| namespace.into());
    labels
}

/// Who is asking, as far as the policies care.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub namespace: &'a str,
    /// The namespace's labels, `kubernetes.io/metadata.name` included.
    pub namespace_labels: &'a Labels,
    /// The pod's labels; empty for a client known only by a static CIDR.
    pub pod_labels: &'a Labels,
}

/// Where in the order a rule sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Admin,
    Namespace,
    Baseline,
}

/// The rule that decided (or passed): named in logs, metrics and `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub stage: Stage,
    /// `ClusterEgressPolicy/name#rule` or `EgressPolicy/namespace/name#rule`, made once per rule
    /// (a decision hands out a reference to it).
    pub label: Arc<str>,
}

impl RuleRef {
    /// `policy`: `name` for a `ClusterEgressPolicy`, `namespace/name` for an `EgressPolicy`.
    pub fn new(stage: Stage, policy: &str, rule: &str) -> Self {
        let kind = match stage {
            Stage::Admin | Stage::Baseline => "ClusterEgressPolicy",
            Stage::Namespace => "EgressPolicy",
        };
        Self { stage, label: format!("{kind}/{policy}#{rule}").into() }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept {
        by: RuleRef,
        /// The Admin Pass this went through, when a namespace's rule accepted.
        passed: Option<RuleRef>,
        /// Non-public ranges the accepting rules open for this connection (sorted, no repeats).
        exceptions: Vec<IpNet>,
    },
    Deny {
        by: RuleRef,
    },
    /// No rule decided (perhaps after a Pass nothing in the namespace took up).
    Undecided {
        passed: Option<RuleRef>,
    },
}

/// One rule, checked and normalised.
#[derive(Debug)]
struct Rule {
    /// Who decided, when this rule does.
    by: RuleRef,
    action: Action,
    names: Vec<super::host::HostPattern>,
    networks: Vec<IpNet>,
    /// TCP ports; `None` is every port. `Some(empty)`: only UDP was named, which the gateway
    /// never carries, so the rule never matches here.
    ports: Option<Vec<PortRange>>,
    /// Namespace rules: the only way the connection may have come.
    via: Option<Via>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Accept,
    Deny,
    Pass,
}

impl Rule {
    fn matches(&self, target: &Target, port: u16, via: Via) -> bool {
        let destination = match target {
            Target::Name(h) => self.names.iter().any(|p| p.matches(h)),
            Target::Ip(ip) => self.networks.iter().any(|n| n.contains(ip)),
        };
        destination
            && self.ports.as_ref().is_none_or(|ps| ps.iter().any(|r| (r.first..=r.last).contains(&port)))
            && self.via.is_none_or(|v| v == via)
    }
}

#[derive(Debug)]
struct ClusterPolicy {
    name: Arc<str>,
    priority: u16,
    namespaces: Selector,
    pods: Option<Selector>,
    rules: Vec<Rule>,
}

impl ClusterPolicy {
    fn selects(&self, client: &Client) -> bool {
        self.namespaces.matches(client.namespace_labels)
            && self.pods.as_ref().is_none_or(|p| p.matches(client.pod_labels))
    }
}

#[derive(Debug)]
struct NamespacePolicy {
    /// `namespace/name`.
    name: Arc<str>,
    pods: Selector,
    rules: Vec<Rule>,
}

/// One namespace's `EgressPolicy` objects, by name, and their index.
#[derive(Debug, Default)]
struct NamespaceTier {
    policies: Vec<NamespacePolicy>,
    index: DestinationIndex,
}

/// Every policy resource, compiled for per-connection decisions.
#[derive(Debug, Default)]
pub struct Tiers {
    admin: ClusterTier,
    baseline: ClusterTier,
    namespaces: BTreeMap<Box<str>, NamespaceTier>,
}

fn sorted(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    nets.sort_unstable();
    nets.dedup();
    nets
}

impl Tiers {
    /// Whether there is no policy at all (the gateway file's rules alone decide).
    pub fn is_empty(&self) -> bool {
        self.admin.policies.is_empty() && self.baseline.policies.is_empty() && self.namespaces.is_empty()
    }

    /// The decision for a connection from `client` to `target:port` that came `via`.
    pub fn decide(&self, client: &Client, target: &Target, port: u16, via: Via) -> Verdict {
        let mut passed = None;
        if let Some(rule) = self.admin.first_match(client, target, port, via) {
            let by = rule.by.clone();
            match rule.action {
                Action::Accept => {
                    return Verdict::Accept { by, passed: None, exceptions: sorted(rule.networks.clone()) };
                }
                Action::Deny => return Verdict::Deny { by },
                Action::Pass => {
                    if let Some(accept) = self.namespace_accept(client, target, port, via, rule, &by) {
                        return accept;
                    }
                    passed = Some(by);
                }
            }
        }
        if let Some(rule) = self.baseline.first_match(client, target, port, via) {
            let by = rule.by.clone();
            return match rule.action {
                Action::Deny => Verdict::Deny { by },
                // Pass is refused in the Baseline tier when compiled.
                Action::Accept | Action::Pass => {
                    Verdict::Accept { by, passed, exceptions: sorted(rule.networks.clone()) }
                }
            };
        }
        Verdict::Undecided { passed }
    }

    /// The namespace's Accepts for a connection an Admin `pass` delegated: named by the first
    /// matching rule (policies by name, rules in order), with the ranges of every matching rule
    /// that the Pass also names.
    fn namespace_accept(
        &self,
        client: &Client,
        target: &Target,
        port: u16,
        via: Via,
        pass: &Rule,
        pass_ref: &RuleRef,
    ) -> Option<Verdict> {
        let tier = self.namespaces.get(client.namespace)?;
        let mut first: Option<Hit> = None;
        let mut exceptions = Vec::new();
        for hit in tier.index.candidates(target) {
            let policy = &tier.policies[hit.policy as usize];
            let rule = &policy.rules[hit.rule as usize];
            if !rule.matches(target, port, via) || !policy.pods.matches(client.pod_labels) {
                continue;
            }
            first = Some(first.map_or(hit, |f| f.min(hit)));
            exceptions.extend(rule.networks.iter().filter(|n| pass.networks.iter().any(|p| p.contains(*n))));
        }
        let Hit { policy, rule } = first?;
        let by = tier.policies[policy as usize].rules[rule as usize].by.clone();
        Some(Verdict::Accept { by, passed: Some(pass_ref.clone()), exceptions: sorted(exceptions) })
    }
}

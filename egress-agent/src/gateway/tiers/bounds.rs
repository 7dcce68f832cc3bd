//! Which of a namespace's rules cannot take effect, and why: what it names that no Admin `Pass`
//! for that namespace delegates, or that an Admin `Accept` or `Deny` decides before any `Pass`
//! is reached. Reported in the `EgressPolicy`'s status (`PartiallyEffective`, reason
//! `OutsideAdminBounds`), since bounds change after the namespace's policies exist.
//!
//! Per destination of the rule (each name pattern, each network), the Admin rules are walked in
//! evaluation order; the first whose policy selects the namespace and which covers the whole
//! destination on every port the rule names decides: a `Pass` puts it in bounds, an `Accept` or
//! `Deny` keeps it from taking effect. An Admin rule that covers it only in part decides
//! nothing here (the rule takes effect for some connections). Pod selectors of Admin subjects
//! are not known at this point and are taken to select the namespace's pods.

use std::fmt;

use ipnet::IpNet;
use kube::core::SelectorExt as _;

use super::{Action, ClusterPolicy, Labels, Rule, Tiers};
use crate::{gateway::host::HostPattern, policy::config::PortRange};

/// One thing a namespace's rule names.
enum Destination<'a> {
    Name(&'a HostPattern),
    Network(&'a IpNet),
}

impl fmt::Display for Destination<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(HostPattern::Exact(h)) => write!(f, "{h}"),
            Self::Name(HostPattern::Subdomains(h)) => write!(f, "*.{h}"),
            Self::Network(n) => write!(f, "{n}"),
        }
    }
}

impl Tiers {
    /// What keeps the rules of `namespace`'s `EgressPolicy` named `name` from taking effect,
    /// one line per rule and destination; empty when every rule is within the bounds.
    pub fn outside_bounds(&self, namespace: &str, namespace_labels: &Labels, name: &str) -> Vec<String> {
        let Some(tier) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        let full = format!("{namespace}/{name}");
        let Some(policy) = tier.policies.iter().find(|p| *p.name == *full) else {
            return Vec::new();
        };
        let admin: Vec<&ClusterPolicy> =
            self.admin.policies.iter().filter(|p| p.namespaces.matches(namespace_labels)).collect();
        let mut found = Vec::new();
        for rule in &policy.rules {
            let rule_name = rule.by.label.rsplit('#').next().unwrap_or_default();
            let destinations = rule
                .names
                .iter()
                .map(Destination::Name)
                .chain(rule.networks.iter().map(Destination::Network));
            for destination in destinations {
                let first = admin.iter().flat_map(|p| &p.rules).find(|a| {
                    covers(a, &destination) && ports_cover(a.ports.as_deref(), rule.ports.as_deref())
                });
                // A Pass for this destination on fewer ports than the rule names.
                let some_ports = || {
                    admin
                        .iter()
                        .flat_map(|p| &p.rules)
                        .find(|a| a.action == Action::Pass && covers(a, &destination))
                };
                match (first, some_ports()) {
                    (Some(a), _) if a.action == Action::Pass => {}
                    (Some(a), _) => found.push(format!(
                        "rule {rule_name:?}: {destination} is decided first by {} ({:?})",
                        a.by, a.action
                    )),
                    (None, Some(pass)) => found.push(format!(
                        "rule {rule_name:?}: {destination} is delegated only on ports {} (by {})",
                        show_ports(pass.ports.as_deref()),
                        pass.by
                    )),
                    (None, None) => found.push(format!(
                        "rule {rule_name:?}: {destination} is not delegated to namespace {namespace} by any Admin Pass"
                    )),
                }
            }
        }
        found
    }
}

/// Whether every connection to `destination` matches the Admin rule's destinations.
fn covers(admin: &Rule, destination: &Destination) -> bool {
    match destination {
        Destination::Name(pattern) => admin.names.iter().any(|a| name_covers(a, pattern)),
        Destination::Network(net) => admin.networks.iter().any(|a| a.contains(*net)),
    }
}

/// Whether every name `inner` matches is matched by `outer`.
fn name_covers(outer: &HostPattern, inner: &HostPattern) -> bool {
    match (outer, inner) {
        (HostPattern::Exact(o), HostPattern::Exact(i)) => o == i,
        (HostPattern::Subdomains(_), HostPattern::Exact(i)) => outer.matches(i),
        // `*.a.example.com` is inside `*.example.com`, and so is `*.example.com` itself.
        (HostPattern::Subdomains(o), HostPattern::Subdomains(i)) => o == i || outer.matches(i),
        (HostPattern::Exact(_), HostPattern::Subdomains(_)) => false,
    }
}

fn show_ports(ports: Option<&[PortRange]>) -> String {
    let Some(ports) = ports else { return "any".into() };
    let shown: Vec<String> = ports
        .iter()
        .map(|p| if p.first == p.last { p.first.to_string() } else { format!("{}-{}", p.first, p.last) })
        .collect();
    shown.join(", ")
}

/// Whether `outer` (`None`: every port) takes in every port of `inner`.
fn ports_cover(outer: Option<&[PortRange]>, inner: Option<&[PortRange]>) -> bool {
    match (outer, inner) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(outer), Some(inner)) => inner.iter().all(|range| range_covered(outer, range)),
    }
}

/// Whether the union of `outer` takes in all of `range`: walks from its first port, each step
/// past the end of an outer range that holds the current port.
fn range_covered(outer: &[PortRange], range: &PortRange) -> bool {
    let mut next = u32::from(range.first);
    while next <= u32::from(range.last) {
        match outer.iter().find(|o| (u32::from(o.first)..=u32::from(o.last)).contains(&next)) {
            Some(o) => next = u32::from(o.last) + 1,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterEgressPolicy, EgressPolicy};

    fn tiers() -> Tiers {
        let cluster: Vec<ClusterEgressPolicy> = [
            r"
metadata: {name: platform}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - {name: paste, action: Deny, to: [{domainNames: [pastebin.com]}]}
    - {name: github, action: Pass, to: [{domainNames: ['*.github.com']}], ports: [{port: 443}, {port: 8443, endPort: 8450}]}
    - {name: lan, action: Pass, to: [{networks: [10.20.0.0/16]}]}
",
            r"
metadata: {name: early}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: team-a}}}
  egress:
    - {name: status, action: Accept, to: [{domainNames: [status.github.com]}]}
",
        ]
        .iter()
        .map(|y| serde_yaml::from_str(&format!("apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\n{y}")).unwrap())
        .collect();
        let own = |namespace: &str| -> EgressPolicy {
            serde_yaml::from_str(&format!(
                r"
apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata: {{name: ci, namespace: {namespace}}}
spec:
  podSelector: {{}}
  egress:
    - {{name: api, action: Accept, to: [{{domainNames: [api.github.com, '*.api.github.com']}}], ports: [{{port: 443}}]}}
    - {{name: any-port, action: Accept, to: [{{domainNames: [api.github.com]}}]}}
    - {{name: range, action: Accept, to: [{{domainNames: [api.github.com]}}], ports: [{{port: 8443, endPort: 8451}}]}}
    - {{name: status, action: Accept, to: [{{domainNames: [status.github.com]}}], ports: [{{port: 443}}]}}
    - {{name: paste, action: Accept, to: [{{domainNames: [pastebin.com]}}]}}
    - {{name: nets, action: Accept, to: [{{networks: [10.20.1.0/24, 10.0.0.0/8]}}]}}
    - {{name: apex, action: Accept, to: [{{domainNames: [github.com]}}], ports: [{{port: 443}}]}}
"
            ))
            .unwrap()
        };
        let (tiers, rejected) = Tiers::build(&cluster, &[own("team-a"), own("team-b")]);
        assert!(rejected.is_empty(), "{rejected:?}");
        tiers
    }

    fn labels(namespace: &str) -> Labels {
        [("kubernetes.io/metadata.name".to_owned(), namespace.to_owned())].into()
    }

    #[test]
    fn each_rule_outside_the_bounds_is_named_with_the_reason() {
        let tiers = tiers();
        let not_delegated = |rule: &str, what: &str, ns: &str| {
            format!("rule {rule:?}: {what} is not delegated to namespace {ns} by any Admin Pass")
        };
        let only_on = |rule: &str| {
            format!(
                "rule {rule:?}: api.github.com is delegated only on ports 443, 8443-8450 (by ClusterEgressPolicy/platform#github)"
            )
        };
        assert_eq!(
            tiers.outside_bounds("team-a", &labels("team-a"), "ci"),
            [
                only_on("any-port"),
                only_on("range"),
                "rule \"status\": status.github.com is decided first by ClusterEgressPolicy/early#status (Accept)".into(),
                "rule \"paste\": pastebin.com is decided first by ClusterEgressPolicy/platform#paste (Deny)".into(),
                not_delegated("nets", "10.0.0.0/8", "team-a"),
                not_delegated("apex", "github.com", "team-a"),
            ]
        );
        // The early Accept selects team-a only: team-b's status rule is delegated.
        let team_b = tiers.outside_bounds("team-b", &labels("team-b"), "ci");
        assert!(!team_b.iter().any(|l| l.contains("\"status\"")), "{team_b:?}");
        assert_eq!(team_b.len(), 5);
        // No such policy, or no such namespace: nothing to report.
        assert!(tiers.outside_bounds("team-a", &labels("team-a"), "other").is_empty());
        assert!(tiers.outside_bounds("team-c", &labels("team-c"), "ci").is_empty());
    }

    #[test]
    fn port_ranges_are_covered_by_their_union() {
        let r = |first, last| PortRange { first, last };
        assert!(range_covered(&[r(1, 10), r(11, 20)], &r(5, 15)));
        assert!(!range_covered(&[r(1, 10), r(12, 20)], &r(5, 15)));
        assert!(range_covered(&[r(1, 65535)], &r(65535, 65535)));
        assert!(ports_cover(None, None));
        assert!(!ports_cover(Some(&[r(443, 443)]), None));
    }
}

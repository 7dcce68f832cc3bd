//! `egress-agent diff`: what a proposed change to the policy objects would do to the traffic a
//! namespace was seen sending. Every observed flow (workload, host, port, how it came) is
//! decided twice, the way the gateway decides (`decision::decide`: the gateway file's rules if
//! given, then the policy resources): with the objects as they are, and with the proposed ones
//! applied over them (same kind, namespace and name replaced, others added). The flows whose
//! answer changes are what the change does; proposed rules no flow is decided by are unused.
//!
//! A workload's pods are judged with the labels of one of its pods (from the cluster or the
//! files); a workload whose pods are not known is judged with no pod labels, and the row says
//! so.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    decision::{self, Outcome},
    observations::Observation,
    policy::{Policy, Target},
    tiers::{Client, Labels, Tiers, Verdict},
};
use crate::crd::{ClusterEgressPolicy, EgressPolicy};

/// The policy objects a side of the diff decides by.
pub struct Objects<'a> {
    pub cluster: &'a [ClusterEgressPolicy],
    pub namespaced: &'a [EgressPolicy],
}

/// One side's answer for a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub allowed: bool,
    /// The rule that decided, or why nothing allowed it.
    pub by: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub workload: String,
    pub host: String,
    pub port: u16,
    pub via: super::tiers::Via,
    /// Connections seen.
    pub seen: u64,
    pub current: Answer,
    pub proposed: Answer,
    /// The workload's pod labels were not known (judged with none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub labels_unknown: bool,
}

impl Row {
    pub fn change(&self) -> &'static str {
        match (self.current.allowed, self.proposed.allowed) {
            (true, false) => "newly denied",
            (false, true) => "newly allowed",
            _ => "",
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diff {
    pub rows: Vec<Row>,
    pub newly_denied: usize,
    pub newly_allowed: usize,
    /// Rules of the proposed objects that decide none of the flows.
    pub unused_rules: Vec<String>,
    /// Objects, with the proposal applied, that the gateway would refuse (and why).
    pub refused: Vec<String>,
}

/// The proposed objects applied over the current ones.
pub fn applied<K: kube::Resource + Clone>(current: &[K], proposed: &[K]) -> Vec<K> {
    let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
    let replaced: BTreeSet<_> = proposed.iter().map(key).collect();
    current.iter().filter(|o| !replaced.contains(&key(o))).chain(proposed).cloned().collect()
}

/// Every flow of `namespace` in `observations`, decided by both sides.
pub fn diff(
    observations: &[Observation],
    namespace: &str,
    file: &Policy,
    current: &Objects,
    proposed: &Objects,
    namespace_labels: &Labels,
    workload_labels: &BTreeMap<String, Labels>,
) -> Diff {
    let (now, _) = Tiers::build(current.cluster, current.namespaced);
    let (then, rejected) = Tiers::build(proposed.cluster, proposed.namespaced);
    let refused: Vec<String> = rejected.into_iter().map(|r| format!("{}: {}", r.object, r.reason)).collect();
    // One row per workload and destination, over every replica.
    let mut flows: BTreeMap<(String, String, u16, super::tiers::Via), u64> = BTreeMap::new();
    for o in observations.iter().filter(|o| o.namespace == namespace) {
        *flows.entry((o.workload.clone(), o.host.clone(), o.port, o.via)).or_default() += o.counts.total();
    }
    let none = Labels::new();
    let mut used = BTreeSet::new();
    let rows: Vec<Row> = flows
        .into_iter()
        .filter_map(|((workload, host, port, via), seen)| {
            let target = Target::parse(&host).ok()?;
            let pod_labels = workload_labels.get(&workload);
            let client = Client { namespace, namespace_labels, pod_labels: pod_labels.unwrap_or(&none) };
            let answer =
                |tiers: &Tiers| answer(decision::decide(file, tiers, Some(&client), &target, port, via));
            let (proposed, deciding) = answer(&then);
            used.extend(deciding);
            // A client known by its address only has no pod, and no labels to know.
            let labels_unknown = pod_labels.is_none() && workload != "-";
            Some(Row { current: answer(&now).0, proposed, workload, host, port, via, seen, labels_unknown })
        })
        .collect();
    let proposed_rules = proposed_rule_labels(proposed, current);
    Diff {
        newly_denied: rows.iter().filter(|r| r.change() == "newly denied").count(),
        newly_allowed: rows.iter().filter(|r| r.change() == "newly allowed").count(),
        unused_rules: proposed_rules.into_iter().filter(|r| !used.contains(r)).collect(),
        rows,
        refused,
    }
}

/// The labels of the rules in the proposed objects that differ from the current ones (as
/// decisions name them).
fn proposed_rule_labels(proposed: &Objects, current: &Objects) -> Vec<String> {
    let mut labels = Vec::new();
    let same_as = |a: &kube::core::ObjectMeta, b: &kube::core::ObjectMeta| {
        a.namespace == b.namespace && a.name == b.name
    };
    for p in proposed
        .namespaced
        .iter()
        .filter(|p| !current.namespaced.iter().any(|c| same_as(&c.metadata, &p.metadata) && c.spec == p.spec))
    {
        let name = format!(
            "EgressPolicy/{}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default()
        );
        labels.extend(p.spec.egress.iter().map(|r| format!("{name}#{}", r.name)));
    }
    for p in proposed
        .cluster
        .iter()
        .filter(|p| !current.cluster.iter().any(|c| same_as(&c.metadata, &p.metadata) && c.spec == p.spec))
    {
        let name = format!("ClusterEgressPolicy/{}", p.metadata.name.as_deref().unwrap_or_default());
        labels.extend(p.spec.egress.iter().map(|r| format!("{name}#{}", r.name)));
    }
    labels
}

/// A side's answer, and the rules that took part (the deciding one, and the Admin Pass it went
/// through): a proposed Pass that delegates is used even when it decides nothing itself.
fn answer(outcome: Outcome) -> (Answer, Vec<String>) {
    let (allowed, by, passed) = match outcome {
        Outcome::File(Ok(grant)) => (true, format!("gateway file: {}", grant.matched), None),
        Outcome::File(Err(deny)) => (false, format!("nothing allows it ({})", deny.name()), None),
        Outcome::Resources(Verdict::Accept { by, passed, .. }) => (true, by.label.to_string(), passed),
        Outcome::Resources(Verdict::Deny { by }) => (false, by.label.to_string(), None),
        Outcome::Resources(Verdict::Undecided { passed: Some(pass) }) => {
            let by = format!("nothing allows it (not_allowed; passed by {})", pass.label);
            (false, by, Some(pass))
        }
        Outcome::Resources(Verdict::Undecided { passed: None }) => {
            (false, "nothing allows it (not_allowed)".into(), None)
        }
    };
    let mut rules = vec![by.clone()];
    rules.extend(passed.map(|p| p.label.to_string()));
    (Answer { allowed, by }, rules)
}

/// The rows and the summary as a table, changed rows first.
pub fn table(d: &Diff) -> String {
    let mut rows: Vec<&Row> = d.rows.iter().collect();
    // Newly denied first: what would break.
    let rank = |r: &Row| match r.change() {
        "newly denied" => 0,
        "newly allowed" => 1,
        _ => 2,
    };
    rows.sort_by_key(|r| (rank(r), r.workload.clone(), r.host.clone(), r.port));
    let show = |a: &Answer| if a.allowed { "allowed" } else { "denied" };
    let lines: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let workload = if r.labels_unknown {
                format!("{} (labels unknown)", r.workload)
            } else {
                r.workload.clone()
            };
            [
                workload,
                format!("{}:{}", r.host, r.port),
                r.seen.to_string(),
                show(&r.current).into(),
                format!("{}{}", show(&r.proposed), if r.change().is_empty() { "" } else { " *" }),
                // A rule's name is the tenant's text.
                crate::printable::printable(&r.proposed.by).into_owned(),
            ]
        })
        .collect();
    let head =
        ["WORKLOAD", "DESTINATION", "SEEN", "CURRENT", "PROPOSED", "DECIDED BY (PROPOSED)"].map(String::from);
    let widths: Vec<usize> =
        (0..6).map(|i| std::iter::once(&head).chain(&lines).map(|l| l[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for line in std::iter::once(&head).chain(&lines) {
        let cells: Vec<String> = line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "\n{} flows: {} newly denied, {} newly allowed, {} unchanged (* changed).\n",
        d.rows.len(),
        d.newly_denied,
        d.newly_allowed,
        d.rows.len() - d.newly_denied - d.newly_allowed
    ));
    if !d.unused_rules.is_empty() {
        let unused = d.unused_rules.join(", ");
        out.push_str(&format!(
            "Proposed rules no flow is decided by: {}.\n",
            crate::printable::printable(&unused)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{
        observations::{Came, Counts},
        tiers,
        tiers::Via,
    };

    fn seen(workload: &str, host: &str) -> Observation {
        Observation {
            namespace: "team-a".into(),
            workload: workload.into(),
            service_account: "default".into(),
            host: host.into(),
            port: 443,
            came: Came::Proxy,
            via: Via::Connect,
            counts: Counts { allowed: 2, audited: 1, ..Counts::default() },
            first_seen: "2026-12-01T00:00:00Z".into(),
            last_seen: "2026-12-05T00:00:00Z".into(),
            last_reason: "allowed".into(),
            last_rule: None,
            last_denied_by: None,
        }
    }

    fn objects<K: serde::de::DeserializeOwned>(yaml: &str) -> Vec<K> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    fn team(rules: &str) -> String {
        format!(
            "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: own, namespace: team-a}}\nspec:\n  podSelector: {{matchLabels: {{app: ci}}}}\n  egress:\n{rules}"
        )
    }

    #[test]
    fn each_flow_is_decided_now_and_with_the_proposal() {
        let cluster = vec![tiers::platform_policy(&[
            "{name: delegate, action: Pass, to: [{domainNames: ['*.example.com']}]}",
        ])];
        let current: Vec<EgressPolicy> = objects(&team(
            "    - {name: a, action: Accept, to: [{domainNames: [a.example.com, b.example.com]}]}\n",
        ));
        // b is dropped, c is added, d is a rule nothing uses.
        let proposed: Vec<EgressPolicy> = objects(&team(
            "    - {name: a, action: Accept, to: [{domainNames: [a.example.com]}]}\n    - {name: c, action: Accept, to: [{domainNames: [c.example.com]}]}\n    - {name: d, action: Accept, to: [{domainNames: [d.example.com]}]}\n",
        ));
        let observations = vec![
            seen("Deployment/ci", "a.example.com"),
            seen("Deployment/ci", "b.example.com"),
            seen("Deployment/ci", "c.example.com"),
            seen("Deployment/web", "a.example.com"),
        ];
        let labels = tiers::namespace_labels(Labels::new(), "team-a");
        let workloads: BTreeMap<String, Labels> = [
            ("Deployment/ci".to_owned(), [("app".to_owned(), "ci".to_owned())].into()),
            ("Deployment/web".to_owned(), [("app".to_owned(), "web".to_owned())].into()),
        ]
        .into();
        let now = Objects { cluster: &cluster, namespaced: &current };
        let with = applied(&current, &proposed);
        let then = Objects { cluster: &cluster, namespaced: &with };
        let d = diff(&observations, "team-a", &Policy::default(), &now, &then, &labels, &workloads);
        let summary: Vec<String> = d
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} -> {} by {}",
                    r.workload, r.host, r.current.allowed, r.proposed.allowed, r.proposed.by
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                "Deployment/ci a.example.com true -> true by EgressPolicy/team-a/own#a",
                "Deployment/ci b.example.com true -> false by nothing allows it (not_allowed; passed by ClusterEgressPolicy/platform#delegate)",
                "Deployment/ci c.example.com false -> true by EgressPolicy/team-a/own#c",
                "Deployment/web a.example.com false -> false by nothing allows it (not_allowed; passed by ClusterEgressPolicy/platform#delegate)",
            ]
        );
        assert_eq!((d.newly_denied, d.newly_allowed), (1, 1));
        assert_eq!(d.unused_rules, ["EgressPolicy/team-a/own#d"]);
        assert_eq!(d.rows[0].seen, 3);
        let text = table(&d);
        let first = text.lines().nth(1).unwrap();
        assert!(
            first.starts_with("Deployment/ci")
                && first.contains("b.example.com:443")
                && first.contains("denied *"),
            "{text}"
        );
        assert!(text.contains("4 flows: 1 newly denied, 1 newly allowed, 2 unchanged"), "{text}");
        assert!(text.contains("Proposed rules no flow is decided by: EgressPolicy/team-a/own#d."), "{text}");

        // A workload whose pods are unknown is judged with no labels, and says so.
        let d = diff(&observations, "team-a", &Policy::default(), &now, &then, &labels, &BTreeMap::new());
        assert!(d.rows.iter().all(|r| r.labels_unknown && !r.proposed.allowed));
        assert!(table(&d).contains("Deployment/ci (labels unknown)"));
    }
}

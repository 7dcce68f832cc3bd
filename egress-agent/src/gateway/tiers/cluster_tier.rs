//! The cluster policies of one tier, indexed by destination and by subject, so a decision
//! looks only at the rules that can match both: as many policies may name one destination, each
//! for other namespaces (a platform delegating `*.github.com` team by team), and checking every
//! such policy's subject would cost as much as there are teams.
//!
//! A policy whose namespace selector requires a label (`key: value` in `matchLabels`, or
//! `key In (values)`) can only select a namespace that carries it: it is indexed under that
//! label's values, and a decision looks only under the labels its namespace carries. A policy
//! without such a requirement (`{}`, `NotIn`, `Exists` alone) is indexed for every namespace.
//! Either way a candidate is only a candidate: its whole subject and rule are still checked.

use std::collections::{BTreeSet, HashMap};

use kube::core::{Expression, Selector};

use super::{Client, ClusterPolicy, DestinationIndex, Hit, Rule, Via};
use crate::gateway::target::Target;

#[derive(Debug, Default)]
pub(super) struct ClusterTier {
    /// In evaluation order: priority, then name.
    pub(super) policies: Vec<ClusterPolicy>,
    /// The policies whose subject does not require a label.
    anywhere: DestinationIndex,
    /// The others, under each value of the label they require: key, then value.
    by_label: HashMap<Box<str>, HashMap<Box<str>, DestinationIndex>>,
}

impl ClusterTier {
    pub(super) fn new(mut policies: Vec<ClusterPolicy>) -> Self {
        policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let mut tier = Self::default();
        for (p, policy) in policies.iter().enumerate() {
            match required_label(&policy.namespaces) {
                None => tier.anywhere.add_policy(p, &policy.rules),
                Some((key, values)) => {
                    let by_value = tier.by_label.entry(key.into()).or_default();
                    for value in values {
                        by_value.entry(value.into()).or_default().add_policy(p, &policy.rules);
                    }
                }
            }
        }
        tier.policies = policies;
        tier
    }

    /// The first rule, in evaluation order, that decides for this client and destination.
    pub(super) fn first_match(&self, client: &Client, target: &Target, port: u16, via: Via) -> Option<&Rule> {
        let labels = client.namespace_labels;
        let labelled =
            self.by_label.iter().filter_map(|(key, by_value)| by_value.get(labels.get(&**key)?.as_str()));
        std::iter::once(&self.anywhere)
            .chain(labelled)
            .filter(|index| !index.is_empty())
            .flat_map(|index| index.candidates(target))
            .filter(|hit| {
                let policy = &self.policies[hit.policy as usize];
                policy.rules[hit.rule as usize].matches(target, port, via) && policy.selects(client)
            })
            .min()
            .map(|Hit { policy, rule }| &self.policies[policy as usize].rules[rule as usize])
    }
}

/// A label every namespace the selector selects must carry, with the values it may have: the
/// requirement naming the fewest values (`key: value` names one). `None` when it requires none.
fn required_label(selector: &Selector) -> Option<(String, BTreeSet<String>)> {
    selector
        .clone()
        .into_iter()
        .filter_map(|expression| match expression {
            Expression::Equal(key, value) => Some((key, BTreeSet::from([value]))),
            Expression::In(key, values) => Some((key, values)),
            _ => None,
        })
        .min_by_key(|(_, values)| values.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: &str) -> Selector {
        let s: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_yaml::from_str(yaml).unwrap();
        Selector::try_from(s).unwrap()
    }

    #[test]
    fn a_subject_is_indexed_under_the_label_it_requires_with_the_fewest_values() {
        let values = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
        assert_eq!(
            required_label(&selector("{matchLabels: {team: a}}")),
            Some(("team".into(), values(&["a"])))
        );
        assert_eq!(
            required_label(&selector(
                "{matchExpressions: [{key: env, operator: In, values: [dev, prod]}, {key: team, operator: In, values: [a]}]}"
            )),
            Some(("team".into(), values(&["a"])))
        );
        assert_eq!(
            required_label(&selector("{matchExpressions: [{key: env, operator: In, values: [dev, prod]}]}")),
            Some(("env".into(), values(&["dev", "prod"])))
        );
        for anywhere in [
            "{}",
            "{matchExpressions: [{key: team, operator: NotIn, values: [a]}]}",
            "{matchExpressions: [{key: team, operator: Exists}]}",
            "{matchExpressions: [{key: team, operator: DoesNotExist}]}",
        ] {
            assert_eq!(required_label(&selector(anywhere)), None, "{anywhere}");
        }
    }
}

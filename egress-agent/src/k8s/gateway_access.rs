//! Who may select a gateway with the `egressfw.io/gateway` label. The label sits on the
//! namespace, which its owner may be able to edit; the agent configuration, which only the
//! platform team writes, says which namespaces each gateway admits:
//!
//! ```yaml
//! gateways:
//!   - name: corporate
//!     addresses: [{address: 10.20.0.5, ports: [3128]}]
//!     allowedNamespaces:
//!       names: [legacy-billing]                        # these namespaces,
//!       selector:                                      # and those with these labels
//!         matchLabels: {egressfw.io/corporate-proxy: allowed}
//! ```
//!
//! Every gateway but the default one must say (`selector: {}` admits every namespace, as in
//! Kubernetes); the default gateway admits every namespace, since it is where a namespace lands
//! whose label names a gateway it may not use. The labels a selector reads are only as
//! trustworthy as the namespaces' labels: `deploy/base/admission/` keeps namespace owners from
//! changing `egressfw.io/*` labels, and a selector should use such a label.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::core::{Selector, SelectorExt as _};
use serde::Deserialize;

use super::config::is_dns_label;
use crate::policy::config::{ParseError, invalid};

/// The namespaces a gateway admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceAccess {
    pub names: BTreeSet<String>,
    pub selector: Option<Selector>,
}

impl NamespaceAccess {
    pub fn admits(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.names.contains(name) || self.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    selector: Option<RawSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<RawRequirement>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

/// `at` names the gateway's `allowedNamespaces`.
pub fn parse(raw: &RawAccess, at: &str) -> Result<NamespaceAccess, ParseError> {
    let mut names = BTreeSet::new();
    for (i, name) in raw.names.iter().enumerate() {
        if !is_dns_label(name) {
            return Err(invalid(format!("{at}.names[{i}]"), format!("{name:?} is not a namespace name")));
        }
        if !names.insert(name.clone()) {
            return Err(invalid(format!("{at}.names[{i}]"), format!("namespace {name:?} is listed twice")));
        }
    }
    let selector = raw.selector.as_ref().map(|s| parse_selector(s, &format!("{at}.selector"))).transpose()?;
    if names.is_empty() && selector.is_none() {
        return Err(invalid(at, "give names, a selector, or both (`selector: {}` admits every namespace)"));
    }
    Ok(NamespaceAccess { names, selector })
}

/// A label selector as Kubernetes spells and checks it: `In`/`NotIn` need values, `Exists` and
/// `DoesNotExist` take none.
fn parse_selector(raw: &RawSelector, at: &str) -> Result<Selector, ParseError> {
    let mut requirements = Vec::new();
    for (i, r) in raw.match_expressions.iter().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        match (r.operator.as_str(), r.values.is_empty()) {
            ("In" | "NotIn", true) => {
                return Err(invalid(at, format!("operator {} needs values", r.operator)));
            }
            ("Exists" | "DoesNotExist", false) => {
                return Err(invalid(at, format!("operator {} takes no values", r.operator)));
            }
            ("In" | "NotIn" | "Exists" | "DoesNotExist", _) => {}
            (other, _) => {
                return Err(invalid(
                    at,
                    format!("operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                ));
            }
        }
        requirements.push(LabelSelectorRequirement {
            key: r.key.clone(),
            operator: r.operator.clone(),
            values: (!r.values.is_empty()).then(|| r.values.clone()),
        });
    }
    let selector = LabelSelector {
        match_labels: (!raw.match_labels.is_empty()).then(|| raw.match_labels.clone()),
        match_expressions: (!requirements.is_empty()).then_some(requirements),
    };
    Selector::try_from(selector).map_err(|e| invalid(at, e.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(yaml: &str) -> Result<NamespaceAccess, String> {
        let raw: RawAccess = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        parse(&raw, "gateways[1].allowedNamespaces").map_err(|e| match e {
            ParseError::Invalid { at, message } => format!("{at}: {message}"),
            ParseError::Syntax(e) => e.to_string(),
        })
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_namespace_is_admitted_by_name_or_by_its_labels() {
        let a = access(
            "names: [legacy]\nselector:\n  matchLabels: {team: partners}\n  matchExpressions:\n    - {key: tier, operator: NotIn, values: [test]}\n",
        )
        .unwrap();
        assert!(a.admits("legacy", &labels(&[])), "by name");
        assert!(a.admits("shop", &labels(&[("team", "partners")])), "by labels");
        assert!(!a.admits("shop", &labels(&[("team", "partners"), ("tier", "test")])), "an expression fails");
        assert!(!a.admits("shop", &labels(&[("team", "shop")])), "neither");
        let every = access("selector: {}\n").unwrap();
        assert!(every.admits("anything", &labels(&[])), "an empty selector admits every namespace");
    }

    #[test]
    fn bad_access_is_refused_naming_the_value() {
        for (yaml, expected) in [
            ("{}\n", "gateways[1].allowedNamespaces: give names, a selector, or both"),
            ("names: [Shop]\n", "names[0]: \"Shop\" is not a namespace name"),
            ("names: [a, a]\n", "names[1]: namespace \"a\" is listed twice"),
            (
                "selector: {matchExpressions: [{key: team, operator: In}]}\n",
                "selector.matchExpressions[0]: operator In needs values",
            ),
            (
                "selector: {matchExpressions: [{key: team, operator: Exists, values: [x]}]}\n",
                "operator Exists takes no values",
            ),
            (
                "selector: {matchExpressions: [{key: team, operator: Equals, values: [x]}]}\n",
                "operator \"Equals\" is not one of In, NotIn, Exists, DoesNotExist",
            ),
            ("namespaces: [a]\n", "unknown field `namespaces`"),
        ] {
            let e = access(yaml).expect_err(yaml);
            assert!(e.contains(expected), "{yaml}: {e}");
        }
    }
}

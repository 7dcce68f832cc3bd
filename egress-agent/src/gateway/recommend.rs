//! `egress-agent recommend`: an `EgressPolicy` for a namespace, from what its workloads were
//! seen reaching through the gateway (the replicas' observations), with the evidence for every
//! rule, ready to review and apply.
//!
//! - One rule per registrable domain and port. A domain's names become `*.domain` only when at
//!   least `wildcard_at` distinct names under it were seen (the apex stays a name of its own:
//!   the wildcard never matches it); registrable domains come from the public-suffix list
//!   (`psl`), so a wildcard never spans a public suffix (`*.co.uk` cannot come out). The names
//!   seen are always listed in the rule's comment.
//! - Left out, and listed: destinations seen by address only (a steered connection without a
//!   name, a CONNECT to an address): the policy takes names; these need a `networks` rule or a
//!   name. And destinations the Admin tier denies anyway, or that it already allows.
//! - Rules the Admin tier does not delegate to the namespace are kept: they are what the
//!   namespace needs, and the platform team decides whether to pass them. What the status would
//!   say about them once applied (the gateway's own bounds check) is listed.
//! - The CRD's bounds hold: at most 32 rules per object (more objects otherwise), 16 names per
//!   destination, 8 destinations per rule.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    time::SystemTime,
};

use super::{
    observations::{Came, Counts, Observation},
    policy::Target,
    tiers::{Client, Labels, Stage, Tiers, Verdict, Via},
};
use crate::crd::{ClusterEgressPolicy, EgressPolicy};

/// Distinct names under one registrable domain that make a wildcard, by default.
pub const DEFAULT_WILDCARD_AT: usize = 3;
const MAX_RULES: usize = 32;
const MAX_DESTINATIONS: usize = 8;
const MAX_NAMES: usize = 16;

/// What to recommend for.
pub struct Ask<'a> {
    pub namespace: &'a str,
    /// Only what was seen since then.
    pub since: Option<SystemTime>,
    pub wildcard_at: usize,
    /// The objects' name (`-2`, `-3`… when the rules need more than one).
    pub name: &'a str,
}

/// Everything seen for one host and port, over every replica and workload.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flow {
    pub host: String,
    pub port: u16,
    pub workloads: BTreeSet<String>,
    pub came: BTreeSet<Came>,
    pub counts: Counts,
    pub first_seen: String,
    pub last_seen: String,
}

impl Flow {
    fn hits(&self) -> u64 {
        self.counts.total()
    }

    fn add(&mut self, o: &Observation) {
        self.workloads.insert(o.workload.clone());
        self.came.insert(o.came);
        self.counts.add(&o.counts);
        // RFC 3339 in UTC, all in one format: they order as text.
        if self.first_seen.is_empty() || o.first_seen < self.first_seen {
            self.first_seen.clone_from(&o.first_seen);
        }
        if o.last_seen > self.last_seen {
            self.last_seen.clone_from(&o.last_seen);
        }
    }
}

/// The recommendation: the YAML to apply, and what was left out.
#[derive(Debug)]
pub struct Recommendation {
    pub yaml: String,
    pub rules: usize,
    /// Seen by address only.
    pub unnamed: Vec<Flow>,
    /// Names `domainNames` cannot hold (one label, an underscore: the CRD refuses them).
    pub unfit: Vec<Flow>,
    /// Decided by the Admin tier whatever the namespace writes: the flow and the verdict's words.
    pub decided_above: Vec<(Flow, String)>,
    /// What the status would report as `PartiallyEffective` once applied (rules the Admin
    /// tier does not delegate to the namespace, or delegates on other ports).
    pub outside_bounds: Vec<String>,
}

/// The flows of `ask.namespace` in `observations` (from any number of replicas), merged.
pub fn flows(observations: &[Observation], ask: &Ask) -> Vec<Flow> {
    let since = ask.since.map(|t| humantime::format_rfc3339_seconds(t).to_string());
    let mut by_destination: BTreeMap<(String, u16), Flow> = BTreeMap::new();
    for o in observations.iter().filter(|o| o.namespace == ask.namespace) {
        if since.as_ref().is_some_and(|s| o.last_seen < *s) {
            continue;
        }
        by_destination
            .entry((o.host.clone(), o.port))
            .or_insert_with(|| Flow { host: o.host.clone(), port: o.port, ..Flow::default() })
            .add(o);
    }
    by_destination.into_values().collect()
}

/// The Admin tier's decision on a flow, if it takes one whatever the namespace writes: for a
/// client of the namespace with no pod labels (an Admin subject that selects pods is read as
/// selecting none of them).
fn decided_above(tiers: &Tiers, namespace: &str, labels: &Labels, flow: &Flow) -> Option<String> {
    let target = Target::parse(&flow.host).ok()?;
    let none = Labels::new();
    let client = Client { namespace, namespace_labels: labels, pod_labels: &none };
    match tiers.decide(&client, &target, flow.port, Via::Connect) {
        Verdict::Deny { by } if by.stage == Stage::Admin => Some(format!("denied by {}", by.label)),
        Verdict::Accept { by, .. } if by.stage == Stage::Admin => Some(format!("allowed by {}", by.label)),
        _ => None,
    }
}

/// The policy for `flows`, given the policy objects as they are and the namespace's labels as
/// selectors see them.
pub fn recommend(
    flows: Vec<Flow>,
    ask: &Ask,
    cluster: &[ClusterEgressPolicy],
    namespaced: &[EgressPolicy],
    labels: &Labels,
) -> Recommendation {
    let (now, _) = Tiers::build(cluster, namespaced);
    let mut unnamed = Vec::new();
    let mut above = Vec::new();
    let mut groups: BTreeMap<(String, u16), Vec<Flow>> = BTreeMap::new();
    let mut unfit = Vec::new();
    for flow in flows {
        if flow.host.parse::<IpAddr>().is_ok() {
            unnamed.push(flow);
        } else if !fits_domain_names(&flow.host) {
            unfit.push(flow);
        } else if let Some(words) = decided_above(&now, ask.namespace, labels, &flow) {
            above.push((flow, words));
        } else {
            let domain = psl::domain_str(&flow.host).unwrap_or(&flow.host).to_owned();
            groups.entry((domain, flow.port)).or_default().push(flow);
        }
    }
    let rules: Vec<String> =
        groups.iter().flat_map(|((domain, port), flows)| rule(domain, *port, flows, ask)).collect();
    let mut yaml = String::new();
    for (i, chunk) in rules.chunks(MAX_RULES).enumerate() {
        let name = if i == 0 { ask.name.to_owned() } else { format!("{}-{}", ask.name, i + 1) };
        let _ = write!(
            yaml,
            "---\napiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n  namespace: {}\nspec:\n  podSelector: {{}}\n  egress:\n{}",
            ask.namespace,
            chunk.concat()
        );
    }
    // What the status would report once applied: the gateway's own bounds check, on the
    // objects as written (an existing object of the same name is replaced, as apply would).
    let proposed: Vec<EgressPolicy> = serde_yaml::Deserializer::from_str(&yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .collect();
    let proposed_names: BTreeSet<Option<String>> = proposed.iter().map(|p| p.metadata.name.clone()).collect();
    let mut with: Vec<EgressPolicy> = namespaced
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() != Some(ask.namespace)
                || !proposed_names.contains(&p.metadata.name)
        })
        .cloned()
        .collect();
    with.extend(proposed.iter().cloned());
    let (then, _) = Tiers::build(cluster, &with);
    let outside_bounds = proposed
        .iter()
        .flat_map(|p| {
            then.outside_bounds(ask.namespace, labels, p.metadata.name.as_deref().unwrap_or_default())
        })
        .collect();
    Recommendation { yaml, rules: rules.len(), unnamed, unfit, decided_above: above, outside_bounds }
}

/// The rules for one registrable domain on one port (one, unless its names need more
/// destinations than a rule holds), each with its evidence as comments.
fn rule(domain: &str, port: u16, flows: &[Flow], ask: &Ask) -> Vec<String> {
    let below: BTreeSet<&str> =
        flows.iter().map(|f| f.host.as_str()).filter(|h| h.ends_with(&format!(".{domain}"))).collect();
    let mut names: Vec<String> = Vec::new();
    // Only under a suffix the public-suffix list knows: `svc.cluster.local` has a registrable
    // domain by the list's default rule (`cluster.local`), and `*.cluster.local` would be every
    // Service of every namespace.
    let known = psl::suffix(domain.as_bytes()).is_some_and(|s| s.is_known());
    if known && below.len() >= ask.wildcard_at.max(1) {
        names.push(format!("*.{domain}"));
        names.extend(flows.iter().map(|f| &f.host).filter(|h| *h == domain).cloned());
    } else {
        names.extend(flows.iter().map(|f| f.host.clone()));
    }
    names.sort();
    names.dedup();
    let mut counts = Counts::default();
    flows.iter().for_each(|f| counts.add(&f.counts));
    let workloads: BTreeSet<&str> =
        flows.iter().flat_map(|f| f.workloads.iter().map(String::as_str)).collect();
    let first = flows.iter().map(|f| f.first_seen.as_str()).min().unwrap_or_default();
    let last = flows.iter().map(|f| f.last_seen.as_str()).max().unwrap_or_default();
    let hosts: Vec<String> = flows.iter().map(|f| format!("{} ({})", f.host, f.hits())).collect();
    // Rule names hold at most 100 characters (the CRD), with room for a `-N` suffix.
    let mut base = domain.replace('.', "-");
    base.truncate(90);
    let base = format!("{}-{port}", base.trim_end_matches('-'));
    let destinations: Vec<&[String]> = names.chunks(MAX_NAMES).collect();
    destinations
        .chunks(MAX_DESTINATIONS)
        .enumerate()
        .map(|(i, chunk)| {
            let mut text = String::new();
            let hits = counts.total();
            let _ = writeln!(
                text,
                "    # {hits} connection{} ({} allowed, {} audited, {} denied, {} failed) from {}",
                if hits == 1 { "" } else { "s" },
                counts.allowed,
                counts.audited,
                counts.denied,
                counts.failed,
                workloads.iter().copied().collect::<Vec<_>>().join(", ")
            );
            let _ = writeln!(text, "    # first seen {first}, last seen {last}; hosts seen: {}", hosts.join(", "));
            if counts.passed() == 0 {
                let _ = writeln!(text, "    # only ever refused: today nothing depends on it; keep it only if the workload needs it");
            }
            let name = if i == 0 { base.clone() } else { format!("{base}-{}", i + 1) };
            let _ = writeln!(text, "    - name: {name}\n      action: Accept\n      to:");
            for names in chunk {
                // JSON strings are YAML double-quoted scalars (the names are checked already).
                let quoted: Vec<String> =
                    names.iter().map(|n| serde_json::to_string(n).unwrap_or_default()).collect();
                let _ = writeln!(text, "        - domainNames: [{}]", quoted.join(", "));
            }
            let _ = writeln!(text, "      ports:\n        - {{protocol: TCP, port: {port}}}");
            text
        })
        .collect()
}

/// Whether `domainNames` can hold `host`: what the CRD's pattern takes (lowercase labels of
/// letters, digits and inner hyphens, at least two).
fn fits_domain_names(host: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253 && host.split('.').count() >= 2 && host.split('.').all(label)
}

/// What was left out of the policy, as YAML comments after it.
pub fn left_out(r: &Recommendation) -> String {
    let mut text = String::new();
    let line = |f: &Flow| {
        format!(
            "{}:{} ({} connection{} from {}; last seen {})",
            f.host,
            f.port,
            f.hits(),
            if f.hits() == 1 { "" } else { "s" },
            f.workloads.iter().cloned().collect::<Vec<_>>().join(", "),
            f.last_seen
        )
    };
    if !r.unnamed.is_empty() {
        text.push_str("# Seen by address only (no name to write a rule for; a networks rule, or the workload's\n# proxy settings, would be needed):\n");
        for f in &r.unnamed {
            let _ = writeln!(text, "#   {}", line(f));
        }
    }
    if !r.unfit.is_empty() {
        text.push_str("# Names an EgressPolicy cannot hold (one label, or characters its schema refuses):\n");
        for f in &r.unfit {
            let _ = writeln!(text, "#   {}", line(f));
        }
    }
    if !r.outside_bounds.is_empty() {
        text.push_str(
            "# Outside what the Admin tier delegates to this namespace (its status would say\n# PartiallyEffective; the platform team decides whether to pass them):\n",
        );
        for words in &r.outside_bounds {
            let _ = writeln!(text, "#   {words}");
        }
    }
    if !r.decided_above.is_empty() {
        text.push_str("# Decided by the Admin tier whatever this namespace writes:\n");
        for (f, words) in &r.decided_above {
            let _ = writeln!(text, "#   {}: {words}", line(f));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::tiers;

    fn seen(host: &str, port: u16, workload: &str, allowed: u64, audited: u64, last: &str) -> Observation {
        Observation {
            namespace: "team-a".into(),
            workload: workload.into(),
            service_account: "default".into(),
            host: host.into(),
            port,
            came: Came::Proxy,
            via: Via::Connect,
            counts: Counts { allowed, audited, ..Counts::default() },
            first_seen: "2026-12-01T00:00:00Z".into(),
            last_seen: last.into(),
            last_reason: "allowed".into(),
            last_rule: None,
            last_denied_by: None,
        }
    }

    fn ask() -> Ask<'static> {
        Ask { namespace: "team-a", since: None, wildcard_at: 3, name: "recommended" }
    }

    fn platform() -> ClusterEgressPolicy {
        tiers::platform_policy(&[
            "{name: no-paste, action: Deny, to: [{domainNames: [pastebin.com]}]}",
            "{name: github, action: Pass, to: [{domainNames: ['*.github.com', github.com]}]}",
        ])
    }

    #[test]
    fn the_policy_names_what_was_seen_with_wildcards_only_for_siblings_under_one_domain() {
        let last = "2026-12-05T00:00:00Z";
        let observations = vec![
            seen("api.github.com", 443, "Deployment/ci", 10, 0, last),
            seen("api.github.com", 443, "Deployment/web", 1, 2, last),
            seen("codeload.github.com", 443, "Deployment/ci", 3, 0, last),
            seen("objects.github.com", 443, "Deployment/ci", 1, 0, last),
            seen("github.com", 443, "Deployment/ci", 1, 0, last),
            seen("a.example.co.uk", 443, "Deployment/ci", 1, 0, last),
            seen("b.other.co.uk", 443, "Deployment/ci", 1, 0, last),
            seen("c.third.co.uk", 443, "Deployment/ci", 1, 0, last),
            seen("pastebin.com", 443, "Deployment/web", 0, 1, last),
            seen("192.0.2.7", 443, "Pod/debug", 0, 4, last),
            seen("old.example.org", 443, "Deployment/ci", 1, 0, "2026-11-01T00:00:00Z"),
            seen("vault", 8200, "Deployment/ci", 1, 0, last),
            seen("under_score.example.com", 443, "Deployment/ci", 1, 0, last),
            seen("a.ns.svc.cluster.local", 443, "Deployment/ci", 1, 0, last),
            seen("b.ns.svc.cluster.local", 443, "Deployment/ci", 1, 0, last),
            seen("c.ns.svc.cluster.local", 443, "Deployment/ci", 1, 0, last),
        ];
        let mut ask = ask();
        ask.since = Some(humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap());
        let flows = flows(&observations, &ask);
        assert_eq!(flows.iter().filter(|f| f.host == "api.github.com").count(), 1, "merged over workloads");
        let r = recommend(flows, &ask, &[platform()], &[], &tiers::namespace_labels(Labels::new(), "team-a"));
        // Three names under github.com: a wildcard, and the apex named on its own.
        assert!(r.yaml.contains(r#"- domainNames: ["*.github.com", "github.com"]"#), "{}", r.yaml);
        // Three names under three registrable domains of one public suffix: no wildcard.
        for host in ["a.example.co.uk", "b.other.co.uk", "c.third.co.uk"] {
            assert!(r.yaml.contains(&format!(r#"- domainNames: ["{host}"]"#)), "{host}: {}", r.yaml);
        }
        assert!(!r.yaml.contains("*.co.uk") && !r.yaml.contains("old.example.org"), "{}", r.yaml);
        // No wildcard under a suffix the list does not know, however many names were seen.
        assert!(
            !r.yaml.contains("*.cluster.local") && r.yaml.contains("\"a.ns.svc.cluster.local\""),
            "{}",
            r.yaml
        );
        assert_eq!(
            r.unfit.iter().map(|f| f.host.as_str()).collect::<Vec<_>>(),
            ["under_score.example.com", "vault"]
        );
        assert!(
            r.yaml.contains("# 18 connections (16 allowed, 2 audited, 0 denied, 0 failed) from Deployment/ci, Deployment/web"),
            "{}",
            r.yaml
        );
        assert!(r.yaml.contains(
            "hosts seen: api.github.com (13), codeload.github.com (3), github.com (1), objects.github.com (1)"
        ));
        // The .co.uk names are not delegated: the status would say so once applied.
        assert_eq!(r.outside_bounds.len(), 6, "{:?}", r.outside_bounds);
        assert!(
            r.outside_bounds
                .iter()
                .any(|m| m.contains("a.example.co.uk is not delegated to namespace team-a")),
            "{:?}",
            r.outside_bounds
        );
        assert_eq!(r.unnamed.iter().map(|f| f.host.as_str()).collect::<Vec<_>>(), ["192.0.2.7"]);
        assert_eq!(r.decided_above.len(), 1);
        assert_eq!(r.decided_above[0].1, "denied by ClusterEgressPolicy/platform#no-paste");
        let out = left_out(&r);
        assert!(out.contains("#   192.0.2.7:443 (4 connections from Pod/debug;"), "{out}");

        // What comes out is an EgressPolicy the gateway accepts, and it allows what was seen.
        let policy: EgressPolicy = serde_yaml::from_str(r.yaml.trim_start_matches("---\n")).unwrap();
        Tiers::check_namespaced(&policy).unwrap();
        let (tiers, rejected) = Tiers::build(
            &[serde_yaml::from_str(
                "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: all}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  egress:\n    - {name: all, action: Pass, to: [{domainNames: ['*.com', '*.uk']}]}\n",
            )
            .unwrap()],
            &[policy],
        );
        assert!(rejected.is_empty());
        let labels = tiers::namespace_labels(Labels::new(), "team-a");
        let none = Labels::new();
        let client = Client { namespace: "team-a", namespace_labels: &labels, pod_labels: &none };
        for host in ["api.github.com", "github.com", "codeload.github.com", "b.other.co.uk"] {
            let verdict = tiers.decide(&client, &Target::parse(host).unwrap(), 443, Via::Connect);
            assert!(matches!(verdict, Verdict::Accept { .. }), "{host}: {verdict:?}");
        }
    }

    #[test]
    fn more_rules_than_an_object_holds_make_more_objects() {
        let observations: Vec<Observation> = (0..40)
            .map(|i| seen(&format!("h.d{i}.example"), 443, "Deployment/ci", 1, 0, "2026-12-05T00:00:00Z"))
            .collect();
        let r = recommend(flows(&observations, &ask()), &ask(), &[], &[], &Labels::new());
        assert_eq!(r.rules, 40);
        let objects: Vec<EgressPolicy> = serde_yaml::Deserializer::from_str(&r.yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(objects.iter().map(|o| o.spec.egress.len()).collect::<Vec<_>>(), [32, 8]);
        assert_eq!(objects[1].metadata.name.as_deref(), Some("recommended-2"));
        for o in &objects {
            Tiers::check_namespaced(o).unwrap();
        }
    }
}

//! The allow rules indexed for one decision: by namespace, then by host name (exact names in a
//! map, `*.parent` patterns in a map keyed by the parent, looked up once per label of the asked
//! name), so a request looks only at the rules that can match it. The cost of a decision stays
//! flat from ten rules to tens of thousands across many namespaces, where a scan of every rule
//! grew with the whole configuration (`cargo xtask bench gateway-rules`).
//!
//! The outcome is exactly the scan's: the first rule (in configuration order) that matches
//! names the grant, by its first matching pattern or CIDR; every matching rule adds its CIDRs
//! and its HTTP/2 permission.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::gateway::{
    config::{Namespaces, Rule},
    host::{HostName, HostPattern},
};

/// A rule's pattern or CIDR: its position in the configuration, which orders the matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    pub rule: u32,
    pub pattern: u32,
}

type Map<V> = HashMap<Box<str>, V>;

/// The patterns one name is found under; nearly always one, kept inline (no second cache miss).
#[derive(Debug)]
struct Hits {
    first: Hit,
    more: Vec<Hit>,
}

impl Hits {
    fn push(slot: &mut Option<Self>, hit: Hit) {
        match slot {
            Some(h) => h.more.push(hit),
            None => *slot = Some(Self { first: hit, more: Vec::new() }),
        }
    }

    fn iter(&self) -> impl Iterator<Item = Hit> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }
}

/// The rules one namespace (or every namespace) may use.
#[derive(Debug, Default)]
struct Bucket {
    exact: Map<Option<Hits>>,
    /// `*.example.com` under `example.com`.
    subdomains: Map<Option<Hits>>,
    /// Rules with CIDRs, in order (an address target is checked against these only).
    with_cidrs: Vec<u32>,
}

impl Bucket {
    fn add(&mut self, r: u32, rule: &Rule) {
        for (p, pattern) in rule.hosts.iter().enumerate() {
            let hit = Hit { rule: r, pattern: u32::try_from(p).expect("fewer than 2^32 patterns") };
            let (map, key) = match pattern {
                HostPattern::Exact(h) => (&mut self.exact, h),
                HostPattern::Subdomains(h) => (&mut self.subdomains, h),
            };
            Hits::push(map.entry(key.as_str().into()).or_default(), hit);
        }
        if !rule.cidrs.is_empty() {
            self.with_cidrs.push(r);
        }
    }
}

#[derive(Debug, Default)]
pub struct RuleIndex {
    by_namespace: Map<Bucket>,
    any_namespace: Bucket,
    /// The text of every pattern and CIDR, made once: a grant hands out a reference to it
    /// (metric label and access-log field) instead of formatting one per request.
    labels: Vec<Box<[Arc<str>]>>,
}

impl RuleIndex {
    pub fn new(rules: &[Rule]) -> Self {
        let mut index = Self::default();
        for (r, rule) in rules.iter().enumerate() {
            let r = u32::try_from(r).expect("fewer than 2^32 rules");
            match &rule.namespaces {
                Namespaces::Any => index.any_namespace.add(r, rule),
                Namespaces::Named(set) => {
                    for ns in set {
                        index.by_namespace.entry(ns.as_str().into()).or_default().add(r, rule);
                    }
                }
            }
            let mut labels: Vec<Arc<str>> = rule.hosts.iter().map(|p| Arc::from(pattern_text(p))).collect();
            labels.extend(rule.cidrs.iter().map(|c| Arc::from(c.to_string())));
            index.labels.push(labels.into_boxed_slice());
        }
        index
    }

    /// The buckets that apply to `namespace`.
    fn buckets<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Bucket> {
        self.by_namespace.get(namespace).into_iter().chain(std::iter::once(&self.any_namespace))
    }

    /// Every pattern of the namespace's rules that matches `host`, in no particular order.
    pub fn host_hits<'a>(&'a self, namespace: &'a str, host: &'a HostName) -> impl Iterator<Item = Hit> + 'a {
        let name = host.as_str();
        // `a.b.example.com` is below `b.example.com`, `example.com` and `com`.
        let parents = name.match_indices('.').map(move |(i, _)| &name[i + 1..]);
        self.buckets(namespace).flat_map(move |b| {
            let exact = b.exact.get(name).into_iter().flatten().flat_map(Hits::iter);
            let below = parents.clone().filter_map(|p| b.subdomains.get(p)).flatten().flat_map(Hits::iter);
            exact.chain(below)
        })
    }

    /// Every CIDR of the namespace's rules that contains `ip`.
    pub fn address_hits<'a>(
        &'a self,
        namespace: &'a str,
        rules: &'a [Rule],
        ip: IpAddr,
    ) -> impl Iterator<Item = Hit> + 'a {
        self.buckets(namespace).flat_map(move |b| {
            b.with_cidrs.iter().flat_map(move |&r| {
                let rule = &rules[r as usize];
                let first = rule.hosts.len();
                rule.cidrs.iter().enumerate().filter(move |(_, c)| c.contains(&ip)).map(move |(i, _)| Hit {
                    rule: r,
                    pattern: u32::try_from(first + i).expect("fewer than 2^32 patterns"),
                })
            })
        })
    }

    /// The pattern or CIDR a hit stands for, as written.
    pub fn label(&self, hit: Hit) -> &Arc<str> {
        &self.labels[hit.rule as usize][hit.pattern as usize]
    }
}

fn pattern_text(p: &HostPattern) -> String {
    match p {
        HostPattern::Exact(h) => h.to_string(),
        HostPattern::Subdomains(h) => format!("*.{h}"),
    }
}

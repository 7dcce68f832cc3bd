//! The rules of a group of policies indexed by destination, so a decision looks only at rules
//! that can match: exact names in a map, `*.parent` patterns in a map keyed by the parent
//! (looked up once per label of the asked name), and networks in a map keyed by the network
//! (an address is looked up once per prefix length in use). The cost of a decision stays flat
//! as rules about other hosts and networks are added.
//! A candidate is only a candidate: the caller checks the whole rule.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;

use super::Rule;
use crate::gateway::{host::HostPattern, target::Target};

/// A rule by its place: policy (in evaluation order), then rule within it. Ordered as the
/// policies are evaluated, so the smallest matching hit is the one that decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    pub policy: u32,
    pub rule: u32,
}

#[derive(Debug, Default)]
pub struct DestinationIndex {
    exact: HashMap<Box<str>, Vec<Hit>>,
    /// `*.example.com` under `example.com`.
    subdomains: HashMap<Box<str>, Vec<Hit>>,
    /// By network, host bits cleared.
    networks: HashMap<IpNet, Vec<Hit>>,
    /// The prefix lengths in `networks`, per family.
    v4_lengths: BTreeSet<u8>,
    v6_lengths: BTreeSet<u8>,
}

impl DestinationIndex {
    /// Indexes the rules of each policy, the policies in evaluation order.
    pub fn new<'a>(policies: impl Iterator<Item = &'a [Rule]>) -> Self {
        let mut index = Self::default();
        for (p, rules) in policies.enumerate() {
            index.add_policy(p, rules);
        }
        index
    }

    /// Indexes the rules of the policy at place `p` in evaluation order.
    pub fn add_policy(&mut self, p: usize, rules: &[Rule]) {
        for (r, rule) in rules.iter().enumerate() {
            self.add(Hit { policy: to_u32(p), rule: to_u32(r) }, rule);
        }
    }

    fn add(&mut self, hit: Hit, rule: &Rule) {
        for pattern in &rule.names {
            let (map, key) = match pattern {
                HostPattern::Exact(h) => (&mut self.exact, h),
                HostPattern::Subdomains(h) => (&mut self.subdomains, h),
            };
            let hits = map.entry(key.as_str().into()).or_default();
            // A rule naming `a.example.com` twice is one candidate.
            if hits.last() != Some(&hit) {
                hits.push(hit);
            }
        }
        for network in &rule.networks {
            match network {
                IpNet::V4(_) => self.v4_lengths.insert(network.prefix_len()),
                IpNet::V6(_) => self.v6_lengths.insert(network.prefix_len()),
            };
            let hits = self.networks.entry(network.trunc()).or_default();
            if hits.last() != Some(&hit) {
                hits.push(hit);
            }
        }
    }

    /// Whether it holds no rule (a decision then skips it).
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.subdomains.is_empty() && self.networks.is_empty()
    }

    /// The rules that may match `target` (a rule can come more than once).
    pub fn candidates<'a>(&'a self, target: &'a Target) -> Box<dyn Iterator<Item = Hit> + 'a> {
        match target {
            Target::Name(host) => {
                let name = host.as_str();
                // `a.b.example.com` is below `b.example.com`, `example.com` and `com`.
                let parents = name.match_indices('.').map(move |(i, _)| &name[i + 1..]);
                let exact = self.exact.get(name).into_iter().flatten();
                let below = parents.filter_map(|p| self.subdomains.get(p)).flatten();
                Box::new(exact.chain(below).copied())
            }
            Target::Ip(ip) => {
                let ip = *ip;
                let lengths = match ip {
                    IpAddr::V4(_) => &self.v4_lengths,
                    IpAddr::V6(_) => &self.v6_lengths,
                };
                let containing =
                    lengths.iter().filter_map(move |&len| IpNet::new(ip, len).ok().map(|n| n.trunc()));
                Box::new(containing.filter_map(|n| self.networks.get(&n)).flatten().copied())
            }
        }
    }
}

fn to_u32(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 policies and rules")
}

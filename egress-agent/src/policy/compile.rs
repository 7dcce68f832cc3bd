//! Turns a validated policy into allow-trie entries.
//!
//! Each entry's value holds the rules of its own prefix plus those of every shorter prefix that
//! contains it, so the kernel's single longest-prefix lookup sees every rule that applies to a
//! destination (see `egress_common::policy::AllowRules`). Computed in O(n log n) with one sorted
//! pass and a stack of enclosing prefixes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use egress_common::{
    addr::Destination,
    policy::{
        AllowRules, MAX_RULES_PER_PREFIX, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PortRule,
    },
    steer::{STEER_V4, STEER_V6, SteerTarget},
    verdict::Reason,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    Protocol,
    config::{PolicySpec, PortRange, SteerSpec},
};

/// Entries for one policy: prefix -> rules. Ordered, so two compilations compare equal exactly
/// when they would produce the same kernel state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledRules {
    pub v4: BTreeMap<Ipv4Net, AllowRules>,
    pub v6: BTreeMap<Ipv6Net, AllowRules>,
    /// Steered original ports and their targets, written under the same policy id.
    pub steer: BTreeMap<u16, SteerTarget>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cgroup {cgroup:?}: prefix {prefix} would carry {count} rules (its own plus those of the CIDRs containing it); the kernel limit is {MAX_RULES_PER_PREFIX}. Merge ports into ranges or CIDRs"
)]
pub struct TooManyRules {
    pub cgroup: String,
    pub prefix: IpNet,
    pub count: usize,
}

const DNS_PORT: PortRange = PortRange { first: 53, last: 53 };
const ALL_PORTS: PortRange = PortRange { first: 0, last: u16::MAX };

pub fn compile(spec: &PolicySpec) -> Result<CompiledRules, TooManyRules> {
    let mut own: Vec<(IpNet, PortRuleSpec)> = Vec::new();
    for (addr, ports) in &spec.gateways {
        for p in ports {
            own.push((host_net(*addr), PortRuleSpec::new(Protocol::Tcp, *p, Reason::AllowGateway)));
        }
    }
    for addr in &spec.dns {
        for proto in [Protocol::Udp, Protocol::Tcp] {
            own.push((host_net(*addr), PortRuleSpec::new(proto, DNS_PORT, Reason::AllowDns)));
        }
    }
    for e in &spec.extra {
        let net = normalize_net(e.cidr);
        if e.ports.is_empty() {
            own.push((net, PortRuleSpec::new(e.protocol, ALL_PORTS, Reason::AllowExtraCidr)));
        }
        for p in &e.ports {
            own.push((net, PortRuleSpec::new(e.protocol, *p, Reason::AllowExtraCidr)));
        }
    }
    let mut v4: BTreeMap<Ipv4Net, Vec<PortRuleSpec>> = BTreeMap::new();
    let mut v6: BTreeMap<Ipv6Net, Vec<PortRuleSpec>> = BTreeMap::new();
    for (net, rule) in own {
        match net {
            IpNet::V4(n) => v4.entry(n).or_default().push(rule),
            IpNet::V6(n) => v6.entry(n).or_default().push(rule),
        }
    }
    Ok(CompiledRules {
        v4: merge_covering(v4, &spec.cgroup, PROTO_ICMP, |a, b| a.contains(b), IpNet::V4)?,
        v6: merge_covering(v6, &spec.cgroup, PROTO_ICMPV6, |a, b| a.contains(b), IpNet::V6)?,
        steer: spec.steer.iter().map(|(port, s)| (*port, steer_target(s))).collect(),
    })
}

fn steer_target(s: &SteerSpec) -> SteerTarget {
    let mut t = SteerTarget { port: s.port, ..SteerTarget::default() };
    if let Some(a) = s.address {
        t.addr4 = a.octets();
        t.families |= STEER_V4;
    }
    if let Some(a) = s.address6 {
        t.addr6 = a.octets();
        t.families |= STEER_V6;
    }
    t
}

/// A rule before it is lowered to the family's protocol numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortRuleSpec {
    protocol: ProtocolKey,
    ports: PortRange,
    reason: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ProtocolKey {
    Any,
    Tcp,
    Udp,
    Icmp,
    Number(u8),
}

impl PortRuleSpec {
    fn new(protocol: Protocol, ports: PortRange, reason: Reason) -> Self {
        let protocol = match protocol {
            Protocol::Any => ProtocolKey::Any,
            Protocol::Tcp => ProtocolKey::Tcp,
            Protocol::Udp => ProtocolKey::Udp,
            Protocol::Icmp => ProtocolKey::Icmp,
            Protocol::Number(n) => ProtocolKey::Number(n),
        };
        Self { protocol, ports, reason: reason as u8 }
    }

    fn lower(self, icmp: u8) -> PortRule {
        PortRule {
            protocol: match self.protocol {
                ProtocolKey::Any => PROTO_ANY,
                ProtocolKey::Tcp => PROTO_TCP,
                ProtocolKey::Udp => PROTO_UDP,
                ProtocolKey::Icmp => icmp,
                ProtocolKey::Number(n) => n,
            },
            reason: self.reason,
            reserved: [0; 2],
            port_first: self.ports.first,
            port_last: self.ports.last,
        }
    }
}

fn host_net(addr: IpAddr) -> IpNet {
    normalize_net(IpNet::from(addr))
}

/// `::ffff:a.b.c.d/n` (n >= 96) is the IPv4 prefix `a.b.c.d/(n-96)`: the kernel sends those as
/// IPv4 and the programs judge them as IPv4.
fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Destination::V4(a) = Destination::V6(n.network().octets()).normalize()
    {
        let v4 = Ipv4Net::new(Ipv4Addr::from(a), n.prefix_len() - 96).expect("length <= 32");
        return IpNet::V4(v4);
    }
    net
}

/// One sorted pass (ipnet orders nets by address, then prefix length): a prefix's enclosing prefixes come before it (smaller or equal network
/// address, shorter length), and CIDRs either nest or are disjoint, so a stack holds exactly the
/// chain of prefixes containing the current one.
fn merge_covering<N: Copy + Ord>(
    own: BTreeMap<N, Vec<PortRuleSpec>>,
    cgroup: &str,
    icmp: u8,
    contains: impl Fn(&N, &N) -> bool,
    to_ipnet: impl Fn(N) -> IpNet,
) -> Result<BTreeMap<N, AllowRules>, TooManyRules> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(N, Vec<PortRuleSpec>)> = Vec::new();
    for (net, mut rules) in own {
        while stack.last().is_some_and(|(outer, _)| !contains(outer, &net)) {
            stack.pop();
        }
        if let Some((_, inherited)) = stack.last() {
            rules.extend_from_slice(inherited);
        }
        rules.sort();
        rules.dedup();
        if rules.len() > MAX_RULES_PER_PREFIX {
            return Err(TooManyRules {
                cgroup: cgroup.to_string(),
                prefix: to_ipnet(net),
                count: rules.len(),
            });
        }
        let mut value = AllowRules::EMPTY;
        for (slot, r) in value.rules.iter_mut().zip(&rules) {
            *slot = r.lower(icmp);
        }
        value.count = rules.len() as u32;
        out.insert(net, value);
        stack.push((net, rules));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

//! The verdict for one destination, as a pure function over an allow-table lookup.
//!
//! The kernel programs call [`judge`] with a lookup backed by their LPM tries; the unit tests call
//! it with an in-memory table. Keep it free of anything that cannot run in both places.

use crate::{
    addr::Destination,
    policy::{AllowRules, MAX_RULES_PER_PREFIX, PROTO_ANY, PROTO_UDP},
    verdict::Reason,
};

/// The allow tables of one policy.
pub trait AllowLookup {
    fn rules_v4(&self, policy_id: u32, addr: [u8; 4]) -> Option<&AllowRules>;
    fn rules_v6(&self, policy_id: u32, addr: [u8; 16]) -> Option<&AllowRules>;
}

/// Where the destination was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// connect()/sendmsg(): the address the program passed. The kernel routes the unspecified
    /// address to the local host, so it counts as loopback here.
    Syscall,
    /// A packet on its way out: judged exactly by the header bytes the network will act on.
    Packet {
        /// The packet leaves through the loopback device, so it cannot leave the network
        /// namespace (this includes traffic to the workload's own addresses).
        via_loopback: bool,
        /// IPv4 options or an IPv6 routing header are present.
        source_routed: bool,
    },
}

/// What is known about the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub dst: Destination,
    /// IP protocol number (the final one after IPv6 extension headers).
    pub protocol: u8,
    /// Destination port for TCP/UDP/SCTP, host byte order. Meaningful only when `port_known`.
    pub dport: u16,
    /// False when the protocol has no ports, or the transport header is not in this packet.
    /// (A plain flag rather than an `Option`: LLVM may read an `Option`'s undefined payload on
    /// the `None` path, which the BPF verifier rejects as an uninitialised register.)
    pub port_known: bool,
    /// A non-first fragment: there is no transport header to check.
    pub later_fragment: bool,
    pub origin: Origin,
}

/// Judges `flow` against policy `policy_id`. The caller applies the mode (enforce or audit).
#[inline(always)]
pub fn judge<L: AllowLookup>(lookup: &L, policy_id: u32, flow: &Flow) -> Reason {
    let dst = flow.dst.normalize();
    match flow.origin {
        Origin::Syscall => {
            if dst.is_loopback() || dst.is_unspecified() {
                return Reason::AllowLoopback;
            }
        }
        Origin::Packet { via_loopback, source_routed } => {
            if via_loopback {
                return Reason::AllowLoopback;
            }
            // A loopback address on a real device: never legitimate, and a hand-made header
            // could make a lenient next hop act on it.
            if dst.is_loopback() {
                return Reason::DenyLoopbackSpoof;
            }
            if source_routed {
                return Reason::DenySourceRoute;
            }
        }
    }
    let rules = match dst {
        Destination::V4(a) => lookup.rules_v4(policy_id, a),
        Destination::V6(a) => lookup.rules_v6(policy_id, a),
    };
    let Some(rules) = rules else {
        return Reason::DenyDestination;
    };
    let encapsulated = is_encapsulation(flow);
    match matching_rule(rules, flow, encapsulated) {
        Some(reason) => reason,
        None if flow.later_fragment => Reason::DenyFragment,
        None if encapsulated => Reason::DenyEncapsulation,
        None => Reason::DenyPort,
    }
}

/// Whether the flow carries another packet or frame that a tunnel device at the destination
/// would take out and forward on its own: IP-in-IP (4), IPv6-in-IP (41), GRE (47), L2TPv3 (115),
/// MPLS-in-IP (137), or UDP to a well-known tunnel port: L2TP (1701), VXLAN (4789, and 8472,
/// Linux's default and flannel's), VXLAN-GPE (4790), Geneve (6081). The inner packet would go
/// past both layers, so only a rule that names the protocol (and, for UDP, the port) covers one;
/// a rule for any protocol, or for UDP on every port, does not.
#[inline(always)]
pub fn is_encapsulation(flow: &Flow) -> bool {
    matches!(flow.protocol, 4 | 41 | 47 | 115 | 137)
        || (flow.protocol == PROTO_UDP
            && flow.port_known
            && matches!(flow.dport, 1701 | 4789 | 4790 | 6081 | 8472))
}

/// The reason of the first rule that permits the flow's protocol and port.
///
/// An index loop bounded by the array's constant length, with the rule count checked inside:
/// a slice iterator over `as_slice()` counts a remaining length down to zero, which Linux 6.1's
/// verifier cannot bound, so it rejects the read past the last rule it imagines.
#[inline(always)]
fn matching_rule(rules: &AllowRules, flow: &Flow, encapsulated: bool) -> Option<Reason> {
    let count = rules.count as usize;
    let mut i = 0;
    while i < MAX_RULES_PER_PREFIX {
        if i >= count {
            break;
        }
        let rule = &rules.rules[i];
        i += 1;
        if rule.protocol != PROTO_ANY && rule.protocol != flow.protocol {
            continue;
        }
        // See `is_encapsulation`: only a rule that names the tunnel covers it.
        if encapsulated && (rule.protocol == PROTO_ANY || (rule.protocol == PROTO_UDP && rule.any_port())) {
            continue;
        }
        let port_ok = rule.any_port()
            || (flow.port_known && rule.port_first <= flow.dport && flow.dport <= rule.port_last);
        if port_ok {
            // Only userspace writes rules, with allow reasons; anything else is treated as no match.
            if let Some(reason) = Reason::from_u8(rule.reason).filter(|r| r.is_allow()) {
                return Some(reason);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;

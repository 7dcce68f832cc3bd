//! The tc layer: programs on the host side of each enforced pod's veth judge every frame the pod
//! sends, whichever socket (or no socket: AF_PACKET) produced it. Frames are tied to a policy
//! through the interface they arrive on and their source address, which must be one the agent
//! bound to that interface.

/// Value of the interface map and the source maps: the enforced cgroup whose policy judges the
/// frames. The policy itself (id and mode) is read from the policy map, so a policy change
/// reaches the tc layer in the same single map update as the socket hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyBinding {
    /// Cgroup id (host order) of the pod's entry in the policy map.
    pub policy_cgroup_id: u64,
}

/// Key of the IPv4 source map: a pod address together with the one interface (host-order
/// ifindex, in the agent's network namespace) it may be sent from. Keying by both makes the
/// source check and the policy binding of an allowed frame a single lookup; the interface map
/// (keyed by ifindex alone) is only read for frames that miss, to tell a spoofed source on an
/// enforced interface from an interface nobody bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceKey4 {
    pub ifindex: u32,
    /// Network order.
    pub addr: [u8; 4],
}

/// Key of the IPv6 source map (see [`SourceKey4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceKey6 {
    pub ifindex: u32,
    /// Network order.
    pub addr: [u8; 16],
}

/// Key of the inbound-connection map: a TCP connection someone opened towards a pod, recorded
/// from its SYN on the way into the pod. The pod's packets of that connection are replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// The pod's address, network order; IPv4 in the first 4 bytes, the rest zero.
    pub pod_addr: [u8; 16],
    /// The peer's address, same layout.
    pub peer_addr: [u8; 16],
    /// The pod's port, host order.
    pub pod_port: u16,
    /// The peer's port, host order.
    pub peer_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub reserved: [u8; 3],
}

pub const ETH_HEADER_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// ICMPv6 messages a host's kernel sends on its own to keep the link working: multicast
/// listener query/report/done (130-132), router solicitation (133), neighbour solicitation and
/// advertisement (135, 136), and MLDv2 reports (143). Never what only a router sends: a router
/// advertisement (134) from a pod would make the node (or its neighbours) route through the
/// pod, and a redirect (137) would move their next hop to it.
pub const fn is_link_control_icmp6(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=133 | 135 | 136 | 143)
}

/// Neighbour solicitation and advertisement (135, 136): what a host sends to resolve, or
/// answer for, one unicast address.
pub const fn is_neighbour_discovery_icmp6(icmp_type: u8) -> bool {
    matches!(icmp_type, 135 | 136)
}

/// fe80::/10.
pub const fn is_link_local_v6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// Destinations no router forwards: link-local unicast, and multicast of link scope (ffx2::/16).
pub const fn is_link_scoped_v6(a: &[u8; 16]) -> bool {
    is_link_local_v6(a) || (a[0] == 0xff && a[1] & 0x0f == 0x02)
}

/// Whether an ICMPv6 control message (see [`is_link_control_icmp6`]) passes the tc layer before
/// the policy is consulted: sent to a link-scoped destination, from the pod's own address, a
/// link-local address or the unspecified one (duplicate address detection). Such a packet cannot
/// leave the pod's link. (Unicast neighbour discovery towards an address the policy allows, such
/// as an on-link gateway, is let through by the caller once the policy has matched the address.)
pub fn is_link_scoped_control_v6(src: &[u8; 16], dst: &[u8; 16], source_bound: bool) -> bool {
    let own_or_link_source = source_bound || is_link_local_v6(src) || *src == [0; 16];
    own_or_link_source && is_link_scoped_v6(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn control_messages_to_link_scoped_destinations_pass_from_own_link_local_or_unspecified_sources() {
        for dst in ["ff02::1:ff00:3", "ff02::16", "ff02::2", "fe80::1", "ff12::1"] {
            assert!(is_link_scoped_control_v6(&v6("fe80::1"), &v6(dst), false), "{dst}");
            assert!(is_link_scoped_control_v6(&v6("::"), &v6(dst), false), "{dst}");
            assert!(is_link_scoped_control_v6(&v6("fd00::2"), &v6(dst), true), "{dst}");
        }
        for t in [130, 131, 132, 133, 135, 136, 143] {
            assert!(is_link_control_icmp6(t), "type {t}");
        }
    }

    #[test]
    fn anything_routable_or_spoofed_is_not() {
        // A routable destination, site- or global-scope multicast, a foreign routable source.
        assert!(!is_link_scoped_control_v6(&v6("fe80::1"), &v6("2001:db8::1"), false));
        assert!(!is_link_scoped_control_v6(&v6("fd00::2"), &v6("fd00::5"), true));
        assert!(!is_link_scoped_control_v6(&v6("fe80::1"), &v6("ff05::2"), false));
        assert!(!is_link_scoped_control_v6(&v6("fe80::1"), &v6("ff0e::1"), false));
        assert!(!is_link_scoped_control_v6(&v6("fd00::99"), &v6("ff02::1"), false));
        assert!(!is_link_scoped_control_v6(&v6("fec0::1"), &v6("ff02::1"), false));
        // Echo and the rest are not control messages; router advertisements and redirects are
        // a router's, never a pod's.
        for t in [1, 2, 3, 128, 129, 134, 137, 138, 255] {
            assert!(!is_link_control_icmp6(t), "type {t}");
        }
        assert!(is_neighbour_discovery_icmp6(135) && is_neighbour_discovery_icmp6(136));
        for t in [130, 133, 134, 137, 143] {
            assert!(!is_neighbour_discovery_icmp6(t), "type {t}");
        }
    }
}

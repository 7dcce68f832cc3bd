//! tc ingress on the host side of an enforced pod's veth: every frame the pod sends, whatever
//! produced it. The socket hooks cannot see frames from packet sockets (AF_PACKET, which
//! CAP_NET_RAW allows) or from sockets created outside the pod's cgroup and used inside its
//! network namespace; this program judges them all by the same policy, found through the
//! interface and the frame's source address, and drops frames whose source address is not one
//! of the pod's.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::classifier,
    programs::{TcContext, sk_buff::SkBuff},
};
use egress_common::{
    addr::Destination,
    decide::judge,
    policy::{PROTO_ICMPV6, PROTO_TCP},
    tc::{
        ETH_HEADER_LEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, InboundKey, PolicyBinding, SourceKey4, SourceKey6,
        is_link_control_icmp6, is_link_local_v6, is_link_scoped_control_v6, is_neighbour_discovery_icmp6,
    },
    verdict::{Hook, Reason},
};

use crate::{
    governing::{self, Governing},
    lookup::KernelAllowTables,
    maps::{EGRESS_INBOUND_V1, EGRESS_POLICY_V1, EGRESS_TCIF_V1, EGRESS_TCSRC4_V2, EGRESS_TCSRC6_V2},
    packet::{Packet, head, parse},
    report::{Verdict, count_allowed, packet_event, settle},
};

/// ICMPv6 type of a neighbour advertisement (RFC 4861).
const ICMP6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// Allowed: hand the frame to the next program (tcx: TCX_NEXT; clsact: TC_ACT_UNSPEC), so a CNI
/// attached after us still sees it. Denials end processing with TC_ACT_SHOT.
pub const TC_NEXT: i32 = -1;

#[classifier]
pub fn egress_tc_from_pod(ctx: TcContext) -> i32 {
    crate::stamp::build_stamp();
    if try_from_pod(&ctx.skb) { TC_NEXT } else { TC_ACT_SHOT as i32 }
}

#[inline(always)]
fn try_from_pod(skb: &SkBuff) -> bool {
    // SAFETY: reading a context field tc programs may read.
    let ifindex = unsafe { (*skb.skb).ingress_ifindex };
    let mut judged = Governing::NONE;
    let reason = judge_frame(skb, ifindex, &mut judged);
    if reason.is_allow() {
        count_allowed(reason);
        return true;
    }
    report(skb, reason, &judged)
}

/// Counts a denial and sends its event; true lets the frame through (audit mode). Not inlined,
/// so the event is built in a frame of its own: on the stack next to `judge_frame`'s, the two
/// would pass the 512-byte limit for a call chain (Linux 6.1 rounds every frame up to 32 bytes).
/// The packet is read again for the event, only when one is sent, so the allowed path never
/// spends anything on describing it.
#[inline(never)]
fn report(skb: &SkBuff, reason: Reason, judged: &Governing) -> bool {
    settle(reason, judged, |action| {
        let ethertype = ethertype(skb);
        // No socket here (cgroup id 0): the frame may not have come from one. Frames that are
        // not IP are described by their reason alone.
        let is_ip = ethertype == ETH_P_IP || ethertype == ETH_P_IPV6;
        let verdict = Verdict {
            hook: Hook::TcFromPod,
            reason,
            action,
            cgroup_id: 0,
            policy_cgroup_id: judged.policy_cgroup_id,
        };
        packet_event::<ETH_HEADER_LEN>(skb, &verdict, is_ip)
    })
}

/// The frame's Ethertype; 0 for a frame too short to have one.
#[inline(always)]
fn ethertype(skb: &SkBuff) -> u16 {
    head::<12, 2>(skb).map_or(0, u16::from_be_bytes)
}

/// The verdict for one frame; fills `judged` with the policy. Not inlined: the packet lives in
/// this function's own stack frame, so the event and the counters' frames do not add up with
/// it, and a parse failure returns before anything of the packet is used (an unused error
/// payload would spill an uninitialised register, which the verifier rejects).
///
/// The common case, an IP packet from one of the interface's own addresses, finds its policy
/// with one lookup keyed by (interface, source) and a second in the policy map. Everything
/// else goes by the interface alone ([`by_interface`]).
#[inline(never)]
fn judge_frame(skb: &SkBuff, ifindex: u32, judged: &mut Governing) -> Reason {
    let ethertype = ethertype(skb);
    // SAFETY: reading a context field tc programs may read.
    if unsafe { (*skb.skb).vlan_present } != 0 {
        // The tag may sit in the skb's metadata rather than the frame: a VLAN the node would
        // switch onward, which the policy cannot judge.
        return by_interface(ifindex, Reason::DenyNotIp, judged);
    }
    match ethertype {
        ETH_P_ARP => return by_interface(ifindex, judge_arp(skb, ifindex), judged),
        ETH_P_IP | ETH_P_IPV6 => {}
        _ => return by_interface(ifindex, Reason::DenyNotIp, judged),
    }
    let Ok(p) = parse::<ETH_HEADER_LEN>(skb) else {
        return by_interface(ifindex, Reason::DenyMalformed, judged);
    };
    judge_packet(skb, ifindex, ethertype, &p, judged)
}

/// ARP from the pod: the node and the pod's neighbours on a bridge take its sender address as
/// "this IPv4 address is at this MAC", so only the interface's own addresses may be claimed, or
/// none (a probe, sender 0.0.0.0, which no neighbour learns from). Anything but IPv4 over
/// Ethernet is malformed: it is all the pod's kernel sends, and all the node's reads.
#[inline(always)]
fn judge_arp(skb: &SkBuff, ifindex: u32) -> Reason {
    // Hardware type, protocol type, their lengths, the operation, the sender's MAC and IPv4.
    let Ok(h) = head::<ETH_HEADER_LEN, 18>(skb) else { return Reason::DenyMalformed };
    let ipv4_over_ethernet = h[0] == 0 && h[1] == 1 && h[2] == 0x08 && h[3] == 0 && h[4] == 6 && h[5] == 4;
    if !ipv4_over_ethernet {
        return Reason::DenyMalformed;
    }
    let addr = [h[14], h[15], h[16], h[17]];
    if addr == [0; 4] {
        return Reason::AllowLinkControl;
    }
    // SAFETY: the value is plain data and only read.
    match unsafe { EGRESS_TCSRC4_V2.get(&SourceKey4 { ifindex, addr }) } {
        Some(_) => Reason::AllowLinkControl,
        None => Reason::DenySpoofedSource,
    }
}

/// Whether an ICMPv6 packet is a neighbour advertisement for an address that is not the pod's:
/// the IPv6 form of the ARP lie ([`judge_arp`]), which makes neighbours send that address's
/// traffic to the pod. The target must be one of the interface's addresses or a link-local
/// one (the pod's own, which the node does not know; link-local addresses are not pod or Service
/// addresses). A truncated advertisement counts as a lie. Not inlined: its frame stays off the
/// chain of the common path.
#[inline(never)]
fn advertises_another_address(skb: &SkBuff, p: &Packet, ifindex: u32) -> bool {
    // A later fragment has no ICMPv6 header to read (and nodes drop fragmented neighbour
    // discovery, RFC 6980): its first byte of payload is not a type.
    if p.later_fragment || icmp6_type(skb, p) != ICMP6_NEIGHBOUR_ADVERTISEMENT {
        return false;
    }
    // Type, code, checksum, flags and reserved: the target follows 8 bytes in.
    let Ok(addr) = skb.load::<[u8; 16]>(ETH_HEADER_LEN + p.l4_offset + 8) else { return true };
    if is_link_local_v6(&addr) {
        return false;
    }
    // SAFETY: the value is plain data and only read.
    unsafe { EGRESS_TCSRC6_V2.get(&SourceKey6 { ifindex, addr }) }.is_none()
}

/// The verdict for an IP packet; see [`judge_frame`].
#[inline(always)]
fn judge_packet(skb: &SkBuff, ifindex: u32, ethertype: u16, p: &Packet, judged: &mut Governing) -> Reason {
    // The host's stack reads the version the Ethertype names; a header of the other version
    // would be judged as one thing and handled as another.
    if matches!(p.src, Destination::V4(_)) != (ethertype == ETH_P_IP) {
        return by_interface(ifindex, Reason::DenyMalformed, judged);
    }
    if p.protocol == PROTO_ICMPV6 && advertises_another_address(skb, p, ifindex) {
        return by_interface(ifindex, Reason::DenySpoofedSource, judged);
    }
    // SAFETY: the values are plain data and only read.
    let source = unsafe {
        match p.src {
            Destination::V4(addr) => EGRESS_TCSRC4_V2.get(&SourceKey4 { ifindex, addr }),
            Destination::V6(addr) => EGRESS_TCSRC6_V2.get(&SourceKey6 { ifindex, addr }),
        }
    };
    let Some(source) = source else {
        // Not one of the interface's addresses: only the link's own control messages pass.
        let reason =
            if is_link_control(skb, p, false) { Reason::AllowLinkControl } else { Reason::DenySpoofedSource };
        return by_interface(ifindex, reason, judged);
    };
    under_policy(source.policy_cgroup_id, judged, |policy_id| judge_ip(skb, p, policy_id))
}

/// The verdict for a frame that did not come from one of the interface's own addresses (or has
/// none): `reason`, under the policy the interface is bound to.
#[inline(always)]
fn by_interface(ifindex: u32, reason: Reason, judged: &mut Governing) -> Reason {
    // SAFETY: the value is plain data and only read.
    let binding: Option<&PolicyBinding> = unsafe { EGRESS_TCIF_V1.get(&ifindex) };
    under_policy(binding.map_or(0, |b| b.policy_cgroup_id), judged, |_| reason)
}

/// `verdict(policy id)` under the policy of `policy_cgroup_id` (see `governing`), recorded in
/// `judged`. No policy here is an interface attached but not bound, or bound to a removed policy.
#[inline(always)]
fn under_policy(
    policy_cgroup_id: u64,
    judged: &mut Governing,
    verdict: impl FnOnce(u32) -> Reason,
) -> Reason {
    // SAFETY: the value is plain data and only read.
    let policy = unsafe { EGRESS_POLICY_V1.get(&policy_cgroup_id) };
    governing::under_policy(policy_cgroup_id, policy, judged, verdict)
}

/// Neighbour discovery and multicast listener messages the pod's kernel sends by itself to a
/// link-scoped destination, from `source_bound` (one of the interface's addresses), a
/// link-local address or the unspecified one.
#[inline(always)]
fn is_link_control(skb: &SkBuff, p: &Packet, source_bound: bool) -> bool {
    match (p.src, p.dst) {
        (Destination::V6(src), Destination::V6(dst)) if p.protocol == PROTO_ICMPV6 => {
            is_neighbour_message(skb, p) && is_link_scoped_control_v6(&src, &dst, source_bound)
        }
        _ => false,
    }
}

/// The verdict for an IP packet from one of the interface's own addresses, under its policy.
#[inline(always)]
fn judge_ip(skb: &SkBuff, p: &Packet, policy_id: u32) -> Reason {
    if is_link_control(skb, p, true) {
        return Reason::AllowLinkControl;
    }
    // Nothing from the veth is on loopback: a loopback destination here is a spoof.
    let reason = judge(&KernelAllowTables, policy_id, &p.flow(false));
    if reason.is_allow() {
        return reason;
    }
    // Unicast neighbour solicitation or advertisement towards an address the policy allows (an
    // on-link gateway): the pod may reach that address anyway. Nothing else of the control set.
    if reason == Reason::DenyPort
        && p.protocol == PROTO_ICMPV6
        && is_neighbour_discovery_icmp6(icmp6_type(skb, p))
    {
        return Reason::AllowLinkControl;
    }
    if p.protocol == PROTO_TCP && p.port_known && is_inbound_reply(p) {
        return Reason::AllowReply;
    }
    reason
}

/// Whether an ICMPv6 packet is one of the link's control messages a host sends (see
/// [`is_link_control_icmp6`]), whatever its destination.
#[inline(always)]
fn is_neighbour_message(skb: &SkBuff, p: &Packet) -> bool {
    is_link_control_icmp6(icmp6_type(skb, p))
}

/// The ICMPv6 type of an ICMPv6 packet; 0 (no control message) when it cannot be read.
#[inline(always)]
fn icmp6_type(skb: &SkBuff, p: &Packet) -> u8 {
    skb.load::<u8>(ETH_HEADER_LEN + p.l4_offset).unwrap_or(0)
}

/// Whether the packet belongs to a TCP connection a peer opened towards the pod.
#[inline(always)]
fn is_inbound_reply(p: &Packet) -> bool {
    let key = InboundKey {
        pod_addr: p.src.to_event_bytes(),
        peer_addr: p.dst.to_event_bytes(),
        pod_port: p.sport,
        peer_port: p.dport,
        family: p.src.family(),
        reserved: [0; 3],
    };
    // SAFETY: the value is plain data and only read.
    unsafe { EGRESS_INBOUND_V1.get(&key) }.is_some()
}

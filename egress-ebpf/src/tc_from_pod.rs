//! tc ingress on the host side of an enforced pod's veth: every frame the pod sends, whatever
//! produced it. The socket hooks cannot see frames from packet sockets (AF_PACKET, which
//! CAP_NET_RAW allows) or from sockets created outside the pod's cgroup and used inside its
//! network namespace; this program judges them all by the same policy, found through the
//! interface, and drops frames whose source address is not the pod's.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::classifier,
    programs::{TcContext, sk_buff::SkBuff},
};
use egress_common::{
    addr::Destination,
    decide::judge,
    event::VerdictEvent,
    policy::{MODE_ENFORCE, MODE_PASS, PROTO_ICMPV6, PROTO_TCP},
    tc::{
        ETH_HEADER_LEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, InboundKey, is_link_control_icmp6,
        is_link_scoped_control_v6,
    },
    verdict::{Hook, Reason},
};

use crate::{
    lookup::KernelAllowTables,
    maps::{EGRESS_INBOUND_V1, EGRESS_POLICY_V1, EGRESS_TCIF_V1, EGRESS_TCSRC4_V1, EGRESS_TCSRC6_V1},
    packet::{Packet, head, parse},
    report::{count_allowed, settle},
};

/// Allowed: hand the frame to the next program (tcx: TCX_NEXT; clsact: TC_ACT_UNSPEC), so a CNI
/// attached after us still sees it. Denials end processing with TC_ACT_SHOT.
pub const TC_NEXT: i32 = -1;

#[classifier]
pub fn egress_tc_from_pod(ctx: TcContext) -> i32 {
    if try_from_pod(&ctx.skb) { TC_NEXT } else { TC_ACT_SHOT as i32 }
}

/// What an event reports about a packet; zero for frames without an IP header.
struct Seen {
    dst: Destination,
    src: Destination,
    protocol: u8,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn try_from_pod(skb: &SkBuff) -> bool {
    // SAFETY: reading a context field tc programs may read.
    let ifindex = unsafe { (*skb.skb).ingress_ifindex };
    // SAFETY: the values are plain data and only read.
    let binding = unsafe { EGRESS_TCIF_V1.get(&ifindex) };
    let policy_cgroup_id = binding.map_or(0, |b| b.policy_cgroup_id);
    let mut seen =
        Seen { dst: Destination::V4([0; 4]), src: Destination::V4([0; 4]), protocol: 0, sport: 0, dport: 0 };
    // SAFETY: as above.
    let (reason, mode) = match unsafe { EGRESS_POLICY_V1.get(&policy_cgroup_id) } {
        // Attached but unbound, or bound to a removed policy: the agent detaches before it
        // unbinds, so this is an interrupted change. Fail closed.
        None => (Reason::DenyNoPolicy, MODE_ENFORCE),
        Some(p) if p.mode == MODE_PASS => {
            count_allowed(Reason::AllowUnenforced);
            return true;
        }
        Some(p) => (judge_frame(skb, ifindex, p.policy_id, &mut seen), p.mode),
    };
    report(reason, mode, policy_cgroup_id, &seen)
}

/// Counts the verdict and sends its event; true lets the frame through. Not inlined, so the
/// event is built in a frame of its own: on the stack next to `judge_frame`'s, the two would
/// pass the 512-byte limit for a call chain (Linux 6.1 rounds every frame up to 32 bytes).
#[inline(never)]
fn report(reason: Reason, mode: u32, policy_cgroup_id: u64, seen: &Seen) -> bool {
    settle(reason, mode, policy_cgroup_id, |action| VerdictEvent {
        // SAFETY: plain helper call.
        timestamp_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        // No socket here: the frame may not have come from one.
        cgroup_id: 0,
        policy_cgroup_id,
        daddr: seen.dst.to_event_bytes(),
        saddr: seen.src.to_event_bytes(),
        dport: seen.dport,
        sport: seen.sport,
        reason: reason as u8,
        family: seen.dst.family(),
        protocol: seen.protocol,
        hook: Hook::TcFromPod as u8,
        action,
        reserved: [0; 7],
    })
}

/// The verdict for one frame; fills `seen` when it has an IP header. Not inlined: the packet
/// lives in this function's own stack frame, so the event and the counters' frames do not add
/// up with it, and a parse failure returns before anything of the packet is used (an unused
/// error payload would spill an uninitialised register, which the verifier rejects).
#[inline(never)]
fn judge_frame(skb: &SkBuff, ifindex: u32, policy_id: u32, seen: &mut Seen) -> Reason {
    let ethertype = head::<0, ETH_HEADER_LEN>(skb).map_or(0, |e| u16::from_be_bytes([e[12], e[13]]));
    // SAFETY: reading a context field tc programs may read.
    if unsafe { (*skb.skb).vlan_present } != 0 {
        // The tag may sit in the skb's metadata rather than the frame: a VLAN the node would
        // switch onward, which the policy cannot judge.
        return Reason::DenyNotIp;
    }
    match ethertype {
        ETH_P_ARP => return Reason::AllowLinkControl,
        ETH_P_IP | ETH_P_IPV6 => {}
        _ => return Reason::DenyNotIp,
    }
    let Ok(p) = parse::<ETH_HEADER_LEN>(skb) else {
        return Reason::DenyMalformed;
    };
    seen.dst = p.dst.normalize();
    seen.src = p.src;
    seen.protocol = p.protocol;
    seen.sport = p.sport;
    seen.dport = p.dport;
    judge_ip(skb, &p, ethertype, ifindex, policy_id)
}

/// The verdict for an IP packet from the pod's interface.
#[inline(always)]
fn judge_ip(skb: &SkBuff, p: &Packet, ethertype: u16, ifindex: u32, policy_id: u32) -> Reason {
    // The host's stack reads the version the Ethertype names; a header of the other version
    // would be judged as one thing and handled as another.
    let v4_header = matches!(p.src, Destination::V4(_));
    if v4_header != (ethertype == ETH_P_IP) {
        return Reason::DenyMalformed;
    }
    let bound_here = match p.src {
        // SAFETY: the values are plain data and only read.
        Destination::V4(a) => unsafe { EGRESS_TCSRC4_V1.get(&a) }.is_some_and(|b| b.ifindex == ifindex),
        Destination::V6(a) => unsafe { EGRESS_TCSRC6_V1.get(&a) }.is_some_and(|b| b.ifindex == ifindex),
    };
    // Neighbour discovery and multicast listener messages the pod's kernel sends by itself.
    let control = match (p.src, p.dst) {
        (Destination::V6(src), Destination::V6(dst)) if p.protocol == PROTO_ICMPV6 => {
            let icmp_type = skb.load::<u8>(ETH_HEADER_LEN + p.l4_offset).unwrap_or(0);
            if is_link_control_icmp6(icmp_type) && is_link_scoped_control_v6(&src, &dst, bound_here) {
                return Reason::AllowLinkControl;
            }
            is_link_control_icmp6(icmp_type)
        }
        _ => false,
    };
    if !bound_here {
        return Reason::DenySpoofedSource;
    }
    // Nothing from the veth is on loopback: a loopback destination here is a spoof.
    let flow = p.flow(false);
    let reason = judge(&KernelAllowTables, policy_id, &flow);
    // Unicast neighbour discovery towards an address the policy allows (an on-link gateway):
    // the pod may reach that address anyway.
    if control && reason == Reason::DenyPort {
        return Reason::AllowLinkControl;
    }
    if !reason.is_allow() && p.protocol == PROTO_TCP && p.port_known && is_inbound_reply(p) {
        return Reason::AllowReply;
    }
    reason
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

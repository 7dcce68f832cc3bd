//! tc egress on the host side of an enforced pod's veth: frames going into the pod. Records the
//! TCP connections a peer opens towards the pod (a SYN without ACK), so `tc_from_pod` can let the
//! pod's side of those connections through: kubelet probes and Service clients keep working,
//! while the pod still cannot open anything itself. Never drops.

use aya_ebpf::{
    macros::classifier,
    programs::{TcContext, sk_buff::SkBuff},
};
use egress_common::{
    policy::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
    tc::{ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, InboundKey},
};

use crate::{
    maps::EGRESS_INBOUND_V1,
    packet::{head, parse},
    tc_from_pod::TC_NEXT,
};

const TCP_FLAGS_OFFSET: usize = 13;
const IPV4_PROTOCOL: usize = ETH_HEADER_LEN + 9;
const IPV6_NEXT_HEADER: usize = ETH_HEADER_LEN + 6;
/// The byte before the flags and the flags, behind a 20-byte IPv4 header (no options) or the
/// 40-byte IPv6 header. Two bytes: LLVM turns a 1-byte bounds check into a form the verifier
/// rejects.
const TCP_FLAGS_IPV4: usize = ETH_HEADER_LEN + 20 + TCP_FLAGS_OFFSET - 1;
const TCP_FLAGS_IPV6: usize = ETH_HEADER_LEN + 40 + TCP_FLAGS_OFFSET - 1;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn egress_tc_to_pod(ctx: TcContext) -> i32 {
    crate::stamp::build_stamp();
    record_inbound(&ctx.skb);
    TC_NEXT
}

#[inline(always)]
fn record_inbound(skb: &SkBuff) {
    if !may_open_connection(skb) {
        return;
    }
    let Ok(p) = parse::<ETH_HEADER_LEN>(skb) else { return };
    if p.protocol != PROTO_TCP || !p.port_known {
        return;
    }
    let Ok(flags) = skb.load::<u8>(ETH_HEADER_LEN + p.l4_offset + TCP_FLAGS_OFFSET) else { return };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let key = InboundKey {
        pod_addr: p.dst.to_event_bytes(),
        peer_addr: p.src.to_event_bytes(),
        pod_port: p.dport,
        peer_port: p.sport,
        family: p.dst.family(),
        reserved: [0; 3],
    };
    // Full map: LRU evicts the oldest entry; a lost entry only drops that connection's replies.
    let _ = EGRESS_INBOUND_V1.insert(&key, &1, 0);
}

/// The cheap first look: false for every frame that is certainly not a TCP SYN without ACK,
/// read at fixed offsets (no header walk), which is nearly all of them. True sends the frame to
/// the full parse, which has the last word; so this only ever skips frames, and an unusual
/// header (IPv4 options, IPv6 extension headers) just takes the slow path. A later fragment
/// whose payload looks like a SYN also goes on and is dropped there (its port is not known).
#[inline(always)]
fn may_open_connection(skb: &SkBuff) -> bool {
    let Ok(h) = head::<0, { IPV4_PROTOCOL + 1 }>(skb) else { return false };
    match u16::from_be_bytes([h[12], h[13]]) {
        ETH_P_IP if h[IPV4_PROTOCOL] != PROTO_TCP => false,
        ETH_P_IP if h[ETH_HEADER_LEN] & 0x0f == 5 => is_syn(head::<TCP_FLAGS_IPV4, 2>(skb)),
        ETH_P_IPV6 if h[IPV6_NEXT_HEADER] == PROTO_TCP => is_syn(head::<TCP_FLAGS_IPV6, 2>(skb)),
        ETH_P_IPV6 => !matches!(h[IPV6_NEXT_HEADER], PROTO_UDP | PROTO_ICMPV6),
        ETH_P_IP => true,
        _ => false,
    }
}

#[inline(always)]
fn is_syn(flags: Result<[u8; 2], ()>) -> bool {
    flags.is_ok_and(|f| f[1] & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

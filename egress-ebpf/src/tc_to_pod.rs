//! tc egress on the host side of an enforced pod's veth: frames going into the pod. Records the
//! TCP connections a peer opens towards the pod (a SYN without ACK), so `tc_from_pod` can let the
//! pod's side of those connections through: kubelet probes and Service clients keep working,
//! while the pod still cannot open anything itself. Never drops.

use aya_ebpf::{
    macros::classifier,
    programs::{TcContext, sk_buff::SkBuff},
};
use egress_common::{
    policy::PROTO_TCP,
    tc::{ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, InboundKey},
};

use crate::{
    maps::EGRESS_INBOUND_V1,
    packet::{head, parse},
    tc_from_pod::TC_NEXT,
};

const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn egress_tc_to_pod(ctx: TcContext) -> i32 {
    record_inbound(&ctx.skb);
    TC_NEXT
}

#[inline(always)]
fn record_inbound(skb: &SkBuff) {
    let Ok(eth) = head::<0, ETH_HEADER_LEN>(skb) else { return };
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
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

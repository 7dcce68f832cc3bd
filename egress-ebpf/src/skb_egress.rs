//! cgroup_skb/egress: the per-packet backstop. Sees every packet leaving a socket of an enforced
//! cgroup (TCP, UDP, ICMP, raw IP, anything), after the kernel has built the header, and judges
//! the header bytes themselves.

use aya_ebpf::{
    bindings::BPF_TCP_LISTEN,
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{
    decide::judge,
    policy::PROTO_TCP,
    verdict::{Hook, Reason},
};

use crate::{
    governing::{Governing, under_policy},
    lookup::{KernelAllowTables, find_policy},
    maps::EGRESS_PASSIVE_V1,
    packet::parse,
    report::{Verdict, packet_event, settle},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

/// Every netns numbers its loopback device 1 (LOOPBACK_IFINDEX in include/net/flow.h).
const LOOPBACK_IFINDEX: u32 = 1;

/// TCP flags byte: SYN and ACK, and the flags a SYN-ACK must not carry with them.
const TCP_SYN_ACK: u8 = 0x12;
const TCP_SYN_ACK_MASK: u8 = 0x17; // FIN, SYN, RST, ACK

/// Whether a TCP packet (`l4_offset`: its TCP header) belongs to a connection the workload
/// accepted: a SYN-ACK sent for a listening TCP socket, or a packet of a socket that
/// `egress_sockops` marked when the connection was accepted. (The kernel runs cgroup programs
/// with the full socket as the packet's socket, so a SYN-ACK shows the listener itself, in
/// TCP_LISTEN.) Both the socket's protocol and the segment's flags are checked: an SCTP
/// one-to-many socket is in the same state value after listen() while it sends INIT and DATA
/// to any peer, and a listener sends nothing but SYN-ACKs.
/// Not inlined: a separate BPF function keeps the packet program's register allocation as it
/// was (inlined, LLVM spilled an uninitialised register the verifier rejects).
#[inline(never)]
fn is_accepted_connection(ctx: &SkBuffContext, l4_offset: usize) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's socket pointer, which the verifier allows for cgroup_skb.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // The protocol is not in the socket's common part: the full socket has it. (cgroup programs
    // run with the full socket, so this finds it; a miss gets no exemption.)
    // SAFETY: plain helper call on the context's socket pointer.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    // SAFETY: fields of a full socket, which the verifier allows reading.
    let (protocol, state) = unsafe { ((*full).protocol, (*full).state) };
    if protocol != u32::from(PROTO_TCP) {
        return false;
    }
    if state == BPF_TCP_LISTEN {
        let flags = ctx.skb.load::<u8>(l4_offset + 13).unwrap_or(0);
        return flags & TCP_SYN_ACK_MASK == TCP_SYN_ACK;
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // SAFETY: the value is plain data and only read.
    unsafe { EGRESS_PASSIVE_V1.get(&cookie) }.is_some()
}

#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    crate::stamp::build_stamp();
    if try_egress(&ctx) { PASS } else { DROP }
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: ctx comes from the kernel; the helper only reads the skb's socket cgroup.
    let found = find_policy(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) });
    let mut governing = Governing::NONE;
    let reason = under_policy(
        found.as_ref().map_or(0, |f| f.cgroup_id),
        found.as_ref().map(|f| &f.policy),
        &mut governing,
        |policy_id| judge_packet(ctx, policy_id),
    );
    settle(reason, &governing, |action| {
        // SAFETY: plain helper call on the program's context.
        let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(skb.cast()) };
        let policy_cgroup_id = governing.policy_cgroup_id;
        let verdict = Verdict { hook: Hook::SkbEgress, reason, action, cgroup_id, policy_cgroup_id };
        packet_event::<0>(&ctx.skb, &verdict, true)
    })
}

/// The verdict for the packet under policy `policy_id`. Not inlined: Linux 6.1's verifier gives
/// up on the inlined version (more than a million instructions processed: the rule loop's states
/// multiply with the caller's), and the packet lives in this function's own frame. The call
/// costs about a tenth of a run (docs/BENCHMARKS.md).
#[inline(never)]
fn judge_packet(ctx: &SkBuffContext, policy_id: u32) -> Reason {
    let Ok(p) = parse::<0>(&ctx.skb) else {
        return Reason::DenyMalformed;
    };
    // SAFETY: reading a context field the verifier allows for cgroup_skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let reason = judge(&KernelAllowTables, policy_id, &p.flow(ifindex == LOOPBACK_IFINDEX));
    // Checked only on the way to a denial, so allowed traffic pays nothing for it. Only TCP
    // with its header in this packet (a later fragment has none to check).
    if !reason.is_allow()
        && p.protocol == PROTO_TCP
        && p.port_known
        && is_accepted_connection(ctx, p.l4_offset)
    {
        return Reason::AllowReply;
    }
    reason
}

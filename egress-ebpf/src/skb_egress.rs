//! cgroup_skb/egress: the per-packet backstop. Sees every packet leaving a socket of an enforced
//! cgroup (TCP, UDP, ICMP, raw IP, anything), after the kernel has built the header, and judges
//! the header bytes themselves.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_TCP_LISTEN},
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{
    addr::Destination,
    decide::judge,
    event::VerdictEvent,
    policy::{MODE_ENFORCE, MODE_PASS},
    verdict::{Hook, Reason},
};

use crate::{
    lookup::{KernelAllowTables, find_policy},
    maps::EGRESS_PASSIVE_V1,
    packet::parse,
    report::{count_allowed, settle},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

/// Every netns numbers its loopback device 1 (LOOPBACK_IFINDEX in include/net/flow.h).
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether the packet belongs to a TCP connection the workload accepted: a SYN-ACK sent for a
/// listening socket, or a packet of a socket that `egress_sockops` marked when the connection
/// was accepted. (The kernel runs cgroup programs with the full socket as the packet's socket,
/// so a SYN-ACK shows the listener itself, in TCP_LISTEN; a listener sends nothing else.)
/// Not inlined: a separate BPF function keeps the packet program's register allocation as it
/// was (inlined, LLVM spilled an uninitialised register the verifier rejects).
#[inline(never)]
fn is_accepted_connection(skb: *mut __sk_buff) -> bool {
    // SAFETY: reading the context's socket pointer, which the verifier allows for cgroup_skb.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `state` lies in the socket's common part, readable for any socket kind.
    if unsafe { (*sk).state } == BPF_TCP_LISTEN {
        return true;
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // SAFETY: the value is plain data and only read.
    unsafe { EGRESS_PASSIVE_V1.get(&cookie) }.is_some()
}

#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    if try_egress(&ctx) { PASS } else { DROP }
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: ctx comes from the kernel; the helper only reads the skb's socket cgroup.
    let found = find_policy(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) });
    let (policy_cgroup_id, policy_id, mode) = match &found {
        Some(f) => (f.cgroup_id, f.policy.policy_id, f.policy.mode),
        // Attached here but no policy: the policy was removed under a live link. Fail closed.
        None => (0, 0, MODE_ENFORCE),
    };
    if mode == MODE_PASS {
        // A registered, unenforced pod under the pod-start gate: no need to look at the packet.
        count_allowed(Reason::AllowUnenforced);
        return true;
    }
    let packet = parse::<0>(&ctx.skb);
    let reason = match (&found, &packet) {
        (None, _) => Reason::DenyNoPolicy,
        (Some(_), Err(())) => Reason::DenyMalformed,
        (Some(_), Ok(p)) => {
            // SAFETY: reading a context field the verifier allows for cgroup_skb.
            let ifindex = unsafe { (*skb).ifindex };
            let flow = p.flow(ifindex == LOOPBACK_IFINDEX);
            judge(&KernelAllowTables, policy_id, &flow)
        }
    };
    // Checked only on the way to a denial, so allowed traffic pays nothing for it.
    let reason = if found.is_some() && !reason.is_allow() && is_accepted_connection(skb) {
        Reason::AllowReply
    } else {
        reason
    };
    settle(reason, mode, policy_cgroup_id, |action| {
        let (dst, src, protocol, sport, dport) = match &packet {
            Ok(p) => (p.dst.normalize(), p.src, p.protocol, p.sport, p.dport),
            Err(()) => (Destination::V4([0; 4]), Destination::V4([0; 4]), 0, 0, 0),
        };
        VerdictEvent {
            // SAFETY: plain helper calls.
            timestamp_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
            cgroup_id: unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(skb.cast()) },
            policy_cgroup_id,
            daddr: dst.to_event_bytes(),
            saddr: src.to_event_bytes(),
            dport,
            sport,
            reason: reason as u8,
            family: dst.family(),
            protocol,
            hook: Hook::SkbEgress as u8,
            action,
            reserved: [0; 7],
        }
    })
}

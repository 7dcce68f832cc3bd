//! cgroup sock_addr hooks: judge the address passed to connect() and to sendmsg() on unconnected
//! UDP, and refuse it with EPERM. This is the fail-fast layer; the packet program is the backstop.
//!
//! The policy is found through the calling task's cgroup. A socket created inside an enforced
//! cgroup but used by a task outside every policy still runs these hooks (they follow the
//! socket's cgroup) and finds no policy: denied.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, generated::bpf_get_current_ancestor_cgroup_id},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{
    addr::Destination,
    decide::{Flow, Origin, judge},
    event::VerdictEvent,
    verdict::Hook,
};

use crate::{
    governing::{Governing, under_policy},
    lookup::{KernelAllowTables, find_policy},
    report::settle,
};

const ALLOW: i32 = 1;
/// Makes connect()/sendmsg() fail with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    check(&ctx, Hook::Connect4, destination_v4(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    check(&ctx, Hook::Sendmsg4, destination_v4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    check(&ctx, Hook::Connect6, destination_v6(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    check(&ctx, Hook::Sendmsg6, destination_v6(&ctx))
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    unsafe { &*ctx.sock_addr }
}

#[inline(always)]
fn destination_v4(ctx: &SockAddrContext) -> Destination {
    // user_ip4 holds the address in network byte order; its in-memory bytes are the octets.
    Destination::V4(sock_addr(ctx).user_ip4.to_ne_bytes())
}

#[inline(always)]
fn destination_v6(ctx: &SockAddrContext) -> Destination {
    let words = sock_addr(ctx).user_ip6;
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = words[i].to_ne_bytes();
        a[i * 4] = w[0];
        a[i * 4 + 1] = w[1];
        a[i * 4 + 2] = w[2];
        a[i * 4 + 3] = w[3];
        i += 1;
    }
    Destination::V6(a)
}

#[inline(always)]
fn check(ctx: &SockAddrContext, hook: Hook, dst: Destination) -> i32 {
    let sa = sock_addr(ctx);
    // The port sits in network byte order in the low 16 bits of user_port.
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol as u8;
    // SAFETY: plain helper call.
    let found = find_policy(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
    let mut governing = Governing::NONE;
    let reason = under_policy(
        found.as_ref().map_or(0, |f| f.cgroup_id),
        found.as_ref().map(|f| &f.policy),
        &mut governing,
        |policy_id| {
            let flow = Flow {
                dst,
                protocol,
                dport: port,
                port_known: true,
                later_fragment: false,
                origin: Origin::Syscall,
            };
            judge(&KernelAllowTables, policy_id, &flow)
        },
    );
    // The event is written out here rather than through `report::Verdict::event`: on Linux 6.1
    // the extra copy pushes this program past the 512-byte stack of a call chain.
    let pass = settle(reason, &governing, |action| {
        let judged = dst.normalize();
        VerdictEvent {
            // SAFETY: plain helper calls.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            policy_cgroup_id: governing.policy_cgroup_id,
            daddr: judged.to_event_bytes(),
            saddr: [0; 16],
            dport: port,
            sport: 0,
            reason: reason as u8,
            family: judged.family(),
            protocol,
            hook: hook as u8,
            action,
            reserved: [0; 7],
        }
    });
    if pass { ALLOW } else { REFUSE }
}

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
    policy::MODE_ENFORCE,
    verdict::{Hook, Reason},
};

use crate::{
    governing::{Governing, under_policy},
    lookup::{KernelAllowTables, find_policy},
    report::{count_allowed, settle},
    steer,
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

/// getpeername() on an IPv4 socket: a steered one shows the address it connected to. Must
/// return 1 (the kernel allows nothing else for this hook).
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    steer::restore4(ctx.sock_addr);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    crate::stamp::build_stamp();
    steer::restore6(ctx.sock_addr);
    ALLOW
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
    // Known per program (this function is inlined into each): only TCP connects are steered.
    let socket_v6 = matches!(hook, Hook::Connect6 | Hook::Sendmsg6);
    let may_steer = matches!(hook, Hook::Connect4 | Hook::Connect6) && sa.protocol == steer::TCP;
    // SAFETY: plain helper call.
    let found = find_policy(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
    let policy_id = found.as_ref().map_or(0, |f| f.policy.policy_id);
    let mut governing = Governing::NONE;
    let reason = under_policy(
        found.as_ref().map_or(0, |f| f.cgroup_id),
        found.as_ref().map(|f| &f.policy),
        &mut governing,
        move |policy_id| {
            let flow = Flow {
                dst,
                protocol,
                dport: port,
                port_known: true,
                later_fragment: false,
                origin: Origin::Syscall,
            };
            let reason = judge(&KernelAllowTables, policy_id, &flow);
            let refused = matches!(reason, Reason::DenyDestination | Reason::DenyPort);
            if refused && may_steer && steer::steers(policy_id, port, socket_v6) {
                return Reason::AllowSteered;
            }
            reason
        },
    );
    if reason == Reason::AllowSteered && governing.mode == MODE_ENFORCE {
        // Counted like any allow; audit mode (below) reports it and does not rewrite.
        count_allowed(reason);
        // On `hook`, which stays a constant in each program: `socket_v6` went into the judging
        // closure, whose call the compiler does not see through, and a run-time choice would
        // put the IPv4 rewrite in the IPv6 program, where the verifier refuses its fields.
        let carried = match hook {
            Hook::Connect4 => steer::apply4(ctx.sock_addr, policy_id, port),
            Hook::Connect6 => steer::apply6(ctx.sock_addr, policy_id, port),
            // Never steered (`may_steer`); no rewrite is even compiled into these programs.
            _ => false,
        };
        return if carried { ALLOW } else { REFUSE };
    }
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

//! sockops: remembers the TCP connections an enforced workload accepted, so the packet program
//! lets their packets (replies to whoever connected in: kubelet probes, Service clients) pass.
//!
//! Only the kernel creates an accepted socket, from a SYN that came in; its packets can go only
//! to that peer. A workload cannot turn an outgoing connection into one (connect() is judged by
//! the socket-address programs, and the mark is dropped when the socket closes).
//!
//! The marks share one node-wide LRU map, so anything marked needlessly could push out marks
//! other pods need: connections over loopback (127/8, ::1, or the pod's own address) are never
//! marked, since the packet program allows loopback traffic anyway and a pod can open as many
//! of those as it likes. Marks made, released at close, and found gone at close (evicted) are
//! counted, so eviction pressure shows as a metric.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use egress_common::maps::{PASSIVE_STAT_LOST, PASSIVE_STAT_MARKED, PASSIVE_STAT_RELEASED};

use crate::maps::{EGRESS_PASSIVE_STATS_V1, EGRESS_PASSIVE_V1};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    crate::stamp::build_stamp();
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if !is_loopback_connection(&ctx) => {
            // SAFETY: plain helper call on the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // A full map (LRU) evicts the least recently used mark; a connection whose mark is
            // evicted loses its replies, it does not gain anything.
            let _ = EGRESS_PASSIVE_V1.insert(&cookie, &1, 0);
            count(PASSIVE_STAT_MARKED);
            // Ask for state changes on this socket, to drop the mark when it closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state for BPF_SOCK_OPS_STATE_CB. Only marked sockets asked
            // for state changes, so a mark missing here was evicted.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // SAFETY: plain helper call.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                let stat = if EGRESS_PASSIVE_V1.remove(&cookie).is_ok() {
                    PASSIVE_STAT_RELEASED
                } else {
                    PASSIVE_STAT_LOST
                };
                count(stat);
            }
        }
        _ => {}
    }
    1
}

/// Whether the connection runs over loopback: a loopback peer, or the socket's own address as
/// the peer (the kernel routes that through the loopback device too).
#[inline(always)]
fn is_loopback_connection(ctx: &SockOpsContext) -> bool {
    match ctx.family() {
        AF_INET => {
            // Network order in memory, so the first byte is the first octet.
            let remote = ctx.remote_ip4();
            remote.to_ne_bytes()[0] == 127 || remote == ctx.local_ip4()
        }
        AF_INET6 => {
            let remote = ip6_words(ctx, true);
            let r = |i: usize| remote[i].to_ne_bytes();
            let loopback6 = remote[0] == 0 && remote[1] == 0 && remote[2] == 0 && r(3) == [0, 0, 0, 1];
            let mapped_loopback =
                remote[0] == 0 && remote[1] == 0 && r(2) == [0, 0, 0xff, 0xff] && r(3)[0] == 127;
            loopback6 || mapped_loopback || remote == ip6_words(ctx, false)
        }
        _ => false,
    }
}

/// The remote or local IPv6 address, read one 32-bit word at a time: the context allows only
/// 4-byte reads of these fields, and LLVM would merge plain reads into 8-byte ones.
#[inline(always)]
fn ip6_words(ctx: &SockOpsContext, remote: bool) -> [u32; 4] {
    let ops = ctx.ops;
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        // SAFETY: reading a context field the verifier allows (4 bytes at a time).
        *word = unsafe {
            if remote {
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[i])
            } else {
                core::ptr::read_volatile(&raw const (*ops).local_ip6[i])
            }
        };
    }
    out
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = EGRESS_PASSIVE_STATS_V1.get_ptr_mut(stat) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        unsafe { *c += 1 };
    }
}

//! sockops: remembers the TCP connections an enforced workload accepted, so the packet program
//! lets their packets (replies to whoever connected in: kubelet probes, Service clients) pass.
//!
//! Only the kernel creates an accepted socket, from a SYN that came in; its packets can go only
//! to that peer. A workload cannot turn an outgoing connection into one (connect() is judged by
//! the socket-address programs, and the mark is dropped when the socket closes).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::maps::EGRESS_PASSIVE_V1;

#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // SAFETY: plain helper call on the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // A full map (LRU) evicts the least recently used mark; a connection whose mark is
            // evicted loses its replies, it does not gain anything.
            let _ = EGRESS_PASSIVE_V1.insert(&cookie, &1, 0);
            // Ask for state changes on this socket, to drop the mark when it closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args[1] is the new state for BPF_SOCK_OPS_STATE_CB.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // SAFETY: plain helper call.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                let _ = EGRESS_PASSIVE_V1.remove(&cookie);
            }
        }
        _ => {}
    }
    1
}

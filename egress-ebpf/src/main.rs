//! egressfw kernel programs.
//!
//! - `egress_skb` (cgroup_skb/egress): a verdict for every packet that leaves a socket of an
//!   enforced cgroup, whatever its protocol: the backstop that raw sockets cannot bypass.
//! - `egress_connect4/6`, `egress_sendmsg4/6` (cgroup sock_addr): refuse a disallowed destination
//!   at the syscall with EPERM, so applications fail fast instead of timing out.
//! - `egress_sockops` (sockops): marks the TCP connections the workload accepted, whose packets
//!   (replies to kubelet probes and to Service clients) the packet program then lets through.
//! - `egress_tc_from_pod` / `egress_tc_to_pod` (tc on the host side of a pod's veth): judge every
//!   frame the pod sends, from any socket or none, by the same policy, and drop spoofed sources.
//!
//! The cgroup programs are attached to each enforced (workload) cgroup; the kernel runs them for that
//! cgroup and every descendant, including cgroups created later. Each program finds its policy by
//! looking up the socket's ancestors at the levels where policies live; finding none inside an
//! attached subtree denies (fail closed).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly for the build stamp (`stamp`): one instruction, no stack.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod governing;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod report;
#[cfg(target_arch = "bpf")]
mod skb_egress;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sock_ops;
#[cfg(target_arch = "bpf")]
mod stamp;
#[cfg(target_arch = "bpf")]
mod steer;
#[cfg(target_arch = "bpf")]
mod steered_storage;
#[cfg(target_arch = "bpf")]
mod tc_from_pod;
#[cfg(target_arch = "bpf")]
mod tc_to_pod;

/// Host builds (`cargo clippy --workspace`) get an empty binary; the real one targets bpfel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_skb_ancestor_cgroup_id` and friends are GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

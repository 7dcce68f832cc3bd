//! Transparent steering in the connect hooks (see `egress_common::steer`): a TCP connect() the
//! policy refuses, to a port the policy steers, is rewritten to the gateway's steering listener,
//! and the original destination is kept with the socket for getpeername (`steered_storage`). Each step is a
//! function of its own (not inlined), so its stack frame is not added to the judging chain's:
//! the connect programs are near Linux 6.1's 512-byte limit for a call chain.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::bindings::bpf_sock_addr;
use egress_common::{
    addr::Destination,
    steer::{SteerKey, SteeredPeer},
};

use crate::maps::{EGRESS_STEER_V1, EGRESS_STEERED_V2};

/// IPPROTO_TCP as `bpf_sock_addr::protocol` holds it. Compared whole, so a socket of another
/// protocol whose number shares the low byte (MPTCP is 262) never counts as TCP. An MPTCP
/// socket's connect() runs the hook for its first subflow, a TCP socket: that is what is
/// steered, and [`keep_for_mptcp`] gives the MPTCP socket the record getpeername reads.
pub const TCP: u32 = 6;

/// Whether the policy steers `port` for a socket of this family (a target it can reach).
#[inline(never)]
pub fn steers(policy_id: u32, port: u16, socket_v6: bool) -> bool {
    let key = SteerKey { policy_id, port, reserved: 0 };
    // SAFETY: the value is plain data and only read.
    unsafe { EGRESS_STEER_V1.get(&key) }.is_some_and(|t| t.address_for(socket_v6).is_some())
}

/// Carries an IPv4 connect to the gateway: records where it was going, then rewrites the
/// address and port. False (the connect is refused) when the entry went away since `steers`,
/// or the record cannot be kept: steering fails closed. One function per family, each writing
/// only its own context fields: the verifier takes a context write only at a fixed offset, and
/// one shared function let the compiler pick the field's offset at run time.
#[inline(never)]
pub fn apply4(sa: *mut bpf_sock_addr, policy_id: u32, port: u16) -> bool {
    let Some((to, to_port)) = target(policy_id, port, false) else { return false };
    let Destination::V4(a) = to else { return false };
    let Some(peer) = EGRESS_STEERED_V2.get(sa, true) else { return false };
    // SAFETY: the kernel passes a valid context for the program's lifetime; connect hooks may
    // read and write these fields, as whole 4-byte words.
    unsafe {
        let from = (*sa).user_ip4.to_ne_bytes();
        // Filled in whole: a socket connected before (and failed) already has a record.
        *peer = SteeredPeer { port, to_port, family: 4, ..SteeredPeer::default() };
        peer.addr[..4].copy_from_slice(&from);
        peer.to[..4].copy_from_slice(&a);
        if !keep_for_mptcp(sa, peer) {
            return false;
        }
        write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(a));
        // The port sits in network byte order in the low 16 bits.
        write_volatile(&raw mut (*sa).user_port, u32::from(to_port.to_be()));
    }
    true
}

/// [`apply4`] for an IPv6 socket.
#[inline(never)]
pub fn apply6(sa: *mut bpf_sock_addr, policy_id: u32, port: u16) -> bool {
    let Some((to, to_port)) = target(policy_id, port, true) else { return false };
    let Destination::V6(a) = to else { return false };
    let Some(peer) = EGRESS_STEERED_V2.get(sa, true) else { return false };
    // SAFETY: as in `apply4`.
    unsafe {
        *peer = SteeredPeer { to: a, port, to_port, family: 6, ..SteeredPeer::default() };
        let mut i = 0;
        while i < 4 {
            let w = (*sa).user_ip6[i].to_ne_bytes();
            peer.addr[i * 4] = w[0];
            peer.addr[i * 4 + 1] = w[1];
            peer.addr[i * 4 + 2] = w[2];
            peer.addr[i * 4 + 3] = w[3];
            i += 1;
        }
        if !keep_for_mptcp(sa, peer) {
            return false;
        }
        write_volatile(&raw mut (*sa).user_ip6[0], u32::from_ne_bytes([a[0], a[1], a[2], a[3]]));
        write_volatile(&raw mut (*sa).user_ip6[1], u32::from_ne_bytes([a[4], a[5], a[6], a[7]]));
        write_volatile(&raw mut (*sa).user_ip6[2], u32::from_ne_bytes([a[8], a[9], a[10], a[11]]));
        write_volatile(&raw mut (*sa).user_ip6[3], u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
        write_volatile(&raw mut (*sa).user_port, u32::from(to_port.to_be()));
    }
    true
}

/// Set to 1 by the agent at load time where the connect hooks may call `bpf_skc_to_mptcp_sock`
/// (Linux 5.19+, with MPTCP in the kernel's BTF); elsewhere it stays 0 and the call is never
/// verified, so the programs load on older kernels (where a steered MPTCP socket reports the
/// gateway as its peer). A read-only global: the verifier sees its value.
#[unsafe(no_mangle)]
static MPTCP_OWNER_LOOKUP: u8 = 0;

/// When the socket being connected is the first subflow of an MPTCP socket, the same record on
/// the MPTCP socket: the application holds that one and asks it for its peer, whose address the
/// kernel copies from the subflow (the gateway). False when the record cannot be kept: the
/// connect is refused rather than carried with a peer the application would misread.
#[inline(always)]
fn keep_for_mptcp(sa: *mut bpf_sock_addr, peer: &SteeredPeer) -> bool {
    // SAFETY: a read of a global the loader sets; volatile, so the compiler keeps the read and
    // the verifier, which knows the frozen value, drops the branch it never takes.
    if unsafe { read_volatile(&raw const MPTCP_OWNER_LOOKUP) } == 0 {
        return true;
    }
    match EGRESS_STEERED_V2.get_mptcp_owner(sa) {
        Ok(Some(owner)) => {
            *owner = *peer;
            true
        }
        Ok(None) => true,
        Err(()) => false,
    }
}

/// The steering entry's address for this socket family, and its port.
#[inline(always)]
fn target(policy_id: u32, port: u16, socket_v6: bool) -> Option<(Destination, u16)> {
    let key = SteerKey { policy_id, port, reserved: 0 };
    // SAFETY: the value is plain data and only read.
    let target = unsafe { EGRESS_STEER_V1.get(&key) }?;
    Some((target.address_for(socket_v6)?, target.port))
}

/// getpeername() of a steered IPv4 socket: the address and port it connected to, as it passed
/// them. Left alone: sockets never steered (no record), and sockets connected elsewhere since
/// (a failed steered connect, then a connect the policy allows, on the same socket): the peer
/// the kernel reports must be the one the socket was carried to.
#[inline(always)]
pub fn restore4(sa: *mut bpf_sock_addr) {
    let Some(peer) = EGRESS_STEERED_V2.get(sa, false) else { return };
    // SAFETY: getpeername hooks may read and write these fields, as whole 4-byte words.
    unsafe {
        let now = (*sa).user_ip4.to_ne_bytes();
        let now_port = u16::from_be((*sa).user_port as u16);
        if peer.family != 4
            || now != [peer.to[0], peer.to[1], peer.to[2], peer.to[3]]
            || now_port != peer.to_port
        {
            return;
        }
        let a = peer.addr;
        write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes([a[0], a[1], a[2], a[3]]));
        write_volatile(&raw mut (*sa).user_port, u32::from(peer.port.to_be()));
    }
}

/// [`restore4`] for an IPv6 socket.
#[inline(always)]
pub fn restore6(sa: *mut bpf_sock_addr) {
    let Some(peer) = EGRESS_STEERED_V2.get(sa, false) else { return };
    // SAFETY: as in `restore4`.
    unsafe {
        let t = peer.to;
        let now_port = u16::from_be((*sa).user_port as u16);
        let same = (*sa).user_ip6[0] == u32::from_ne_bytes([t[0], t[1], t[2], t[3]])
            && (*sa).user_ip6[1] == u32::from_ne_bytes([t[4], t[5], t[6], t[7]])
            && (*sa).user_ip6[2] == u32::from_ne_bytes([t[8], t[9], t[10], t[11]])
            && (*sa).user_ip6[3] == u32::from_ne_bytes([t[12], t[13], t[14], t[15]]);
        if peer.family != 6 || !same || now_port != peer.to_port {
            return;
        }
        let a = peer.addr;
        write_volatile(&raw mut (*sa).user_ip6[0], u32::from_ne_bytes([a[0], a[1], a[2], a[3]]));
        write_volatile(&raw mut (*sa).user_ip6[1], u32::from_ne_bytes([a[4], a[5], a[6], a[7]]));
        write_volatile(&raw mut (*sa).user_ip6[2], u32::from_ne_bytes([a[8], a[9], a[10], a[11]]));
        write_volatile(&raw mut (*sa).user_ip6[3], u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
        write_volatile(&raw mut (*sa).user_port, u32::from(peer.port.to_be()));
    }
}

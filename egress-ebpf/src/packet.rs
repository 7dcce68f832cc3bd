//! Reads what the policy needs from an outgoing packet. In cgroup_skb programs the data starts
//! at the network header; in tc programs at the Ethernet header, so every reader takes the
//! network header's offset `L3` (a constant, which the verifier needs for direct reads). Fixed-offset headers are read directly from the linear packet data
//! when it holds them (the common case: no helper call), otherwise with `bpf_skb_load_bytes`;
//! both bounds-check against the real packet, so a truncated or hand-made header fails to parse
//! instead of being misread.

use aya_ebpf::programs::sk_buff::SkBuff;
use egress_common::{
    addr::Destination,
    decide::{Flow, Origin},
};

pub struct Packet {
    pub dst: Destination,
    pub src: Destination,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    /// See `egress_common::decide::Flow::port_known`.
    pub port_known: bool,
    pub later_fragment: bool,
    pub source_routed: bool,
    /// Offset of the transport header from the network header.
    pub l4_offset: usize,
}

impl Packet {
    /// What the policy judges, for a packet that does (`via_loopback`) or does not stay on the
    /// loopback device.
    #[inline(always)]
    pub fn flow(&self, via_loopback: bool) -> Flow {
        Flow {
            dst: self.dst,
            protocol: self.protocol,
            dport: self.dport,
            port_known: self.port_known,
            later_fragment: self.later_fragment,
            origin: Origin::Packet { via_loopback, source_routed: self.source_routed },
        }
    }
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// IPv6 extension headers followed before giving up (and denying as malformed). Real traffic
/// carries at most two or three; the bound keeps the verifier happy.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// `N` bytes at offset `AT` of the packet. Direct packet access needs the loader to be
/// bpf-capable (CAP_BPF or root), which the agent is.
#[inline(always)]
pub fn head<const AT: usize, const N: usize>(ctx: &SkBuff) -> Result<[u8; N], ()> {
    let skb = ctx.skb;
    // SAFETY: reading context fields; the access below is bounds-checked against data_end,
    // which is what the verifier requires before any packet read.
    unsafe {
        let start = (*skb).data as usize;
        let end = (*skb).data_end as usize;
        if start + AT + N <= end {
            return Ok(core::ptr::read_unaligned((start + AT) as *const [u8; N]));
        }
    }
    ctx.load::<[u8; N]>(AT).map_err(|_| ())
}

/// `Err(())` means the packet cannot be parsed: the caller denies it as malformed.
#[inline(always)]
pub fn parse<const L3: usize>(ctx: &SkBuff) -> Result<Packet, ()> {
    // Every IPv4 or IPv6 packet has at least 20 bytes of header; fewer is malformed. (A 1-byte
    // read would be simpler, but LLVM turns `data + 1 <= data_end` into `data < data_end`,
    // which the verifier does not accept as a bounds check.)
    let h: [u8; 20] = head::<L3, 20>(ctx)?;
    match h[0] >> 4 {
        4 => parse_v4::<L3>(ctx, &h),
        6 => parse_v6::<L3>(ctx),
        _ => Err(()),
    }
}

#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE)
}

/// (source port, destination port, known) at `offset`. Unknown if the header is cut short (a
/// tiny first fragment), which then matches no port-restricted rule. Every output is written on
/// every path so the verifier never sees an uninitialised register.
///
/// Direct reads need an offset the verifier can bound: IPv4's is at most 60 (IHL is 4 bits), and
/// IPv6 without extension headers has the constant 40. Any other IPv6 offset goes through the
/// helper. (Comparing a variable IPv6 offset against 60 instead made LLVM emit `61 > offset`,
/// whose impossible branch Linux 6.1's verifier does not prune; it then rejects the program.)
#[inline(always)]
fn ports_at<const L3: usize, const V4: bool>(ctx: &SkBuff, offset: usize, wanted: bool) -> (u16, u16, bool) {
    if !wanted {
        return (0, 0, false);
    }
    // SAFETY: reading context fields, then reads bounds-checked against data_end.
    unsafe {
        let skb = ctx.skb;
        let start = (*skb).data as usize;
        let end = (*skb).data_end as usize;
        let direct = if V4 {
            (offset <= 60 && start + L3 + offset + 4 <= end).then_some(offset)
        } else {
            (offset == 40 && start + L3 + 40 + 4 <= end).then_some(40)
        };
        if let Some(at) = direct {
            let p = core::ptr::read_unaligned((start + L3 + at) as *const [u8; 4]);
            return (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), true);
        }
    }
    match ctx.load::<[u8; 4]>(L3 + offset) {
        Ok(p) => (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]), true),
        Err(_) => (0, 0, false),
    }
}

#[inline(always)]
fn parse_v4<const L3: usize>(ctx: &SkBuff, h: &[u8; 20]) -> Result<Packet, ()> {
    let ihl = usize::from(h[0] & 0x0f);
    if ihl < 5 {
        return Err(());
    }
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let later_fragment = frag_offset != 0;
    let protocol = h[9];
    let (sport, dport, port_known) =
        ports_at::<L3, true>(ctx, ihl * 4, has_ports(protocol) && !later_fragment);
    Ok(Packet {
        src: Destination::V4([h[12], h[13], h[14], h[15]]),
        dst: Destination::V4([h[16], h[17], h[18], h[19]]),
        protocol,
        sport,
        dport,
        port_known,
        later_fragment,
        // Any IPv4 option: LSRR/SSRR would let a router forward past the checked destination.
        source_routed: ihl > 5,
        l4_offset: ihl * 4,
    })
}

#[inline(always)]
fn parse_v6<const L3: usize>(ctx: &SkBuff) -> Result<Packet, ()> {
    let h: [u8; 40] = head::<L3, 40>(ctx)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut offset = 40usize;
    let mut later_fragment = false;
    let mut source_routed = false;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING => {
                // Segment routing (type 4) or any other routing header sends the packet on past
                // its destination address: deny rather than guess what the next hops do.
                source_routed |= next == IPPROTO_ROUTING;
                let e: [u8; 2] = ctx.load(L3 + offset).map_err(|_| ())?;
                next = e[0];
                offset += (usize::from(e[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let e: [u8; 4] = ctx.load(L3 + offset).map_err(|_| ())?;
                next = e[0];
                offset += 8;
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    later_fragment = true;
                    done = true;
                    break;
                }
            }
            IPPROTO_AH => {
                let e: [u8; 2] = ctx.load(L3 + offset).map_err(|_| ())?;
                next = e[0];
                offset += (usize::from(e[1]) + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(());
    }
    let (sport, dport, port_known) = ports_at::<L3, false>(ctx, offset, has_ports(next) && !later_fragment);
    Ok(Packet {
        src: Destination::V6(src),
        dst: Destination::V6(dst),
        protocol: next,
        sport,
        dport,
        port_known,
        later_fragment,
        source_routed,
        l4_offset: offset,
    })
}

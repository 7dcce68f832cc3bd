//! Hand-made Ethernet frames, sent from inside a pod through a packet socket (AF_PACKET), the
//! way a workload with CAP_NET_RAW can: no socket hook ever sees them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Output,
};

use crate::netns::NetNs;

/// The MAC address of `dev` in `ns`.
pub fn mac(ns: &NetNs, dev: &str) -> [u8; 6] {
    let out = ns.run(None, "ip", &["-j", "link", "show", dev]);
    parse_mac(&out.stdout, dev)
}

/// The MAC address of `dev` in the test's own network namespace.
pub fn mac_root(dev: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip").args(["-j", "link", "show", dev]).output().expect("ip");
    parse_mac(&out.stdout, dev)
}

fn parse_mac(json: &[u8], dev: &str) -> [u8; 6] {
    let v: serde_json::Value =
        serde_json::from_slice(json).unwrap_or_else(|e| panic!("ip -j link show {dev}: {e}"));
    let text = v[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {dev}: {v}"));
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    out
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying a UDP datagram from `src` to `dst` (same family), checksums right.
pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let sport: u16 = 40_000;
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let (ethertype, header) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 17], &udp_len.to_be_bytes()[..]].concat();
            let c = checksum(&[&pseudo, &udp]);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            (0x0800u16, ip)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let pseudo =
                [&s.octets()[..], &d.octets()[..], &u32::from(udp_len).to_be_bytes()[..], &[0, 0, 0, 17]]
                    .concat();
            let c = checksum(&[&pseudo, &udp]);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&udp_len.to_be_bytes());
            ip.extend_from_slice(&[17, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            (0x86dd, ip)
        }
        _ => panic!("{src} and {dst} are of different families"),
    };
    let mut frame = ethernet(src_mac, dst_mac, ethertype);
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&udp);
    frame
}

/// An Ethernet frame carrying ICMPv6 `message` (type, code, two checksum bytes left zero, then
/// the body) from `src` to `dst` with hop limit 255, as neighbour discovery requires; the
/// checksum is filled in.
pub fn icmp6(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let mut icmp = message.to_vec();
    let len = icmp.len() as u32;
    let pseudo = [&src.octets()[..], &dst.octets()[..], &len.to_be_bytes()[..], &[0, 0, 0, 58]].concat();
    let c = checksum(&[&pseudo, &icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut frame = ethernet(src_mac, dst_mac, 0x86dd);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(len as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// An ARP request (`op` 1) or reply (2) for IPv4 over Ethernet, broadcast unless `dst_mac` says
/// otherwise: "`spa` is at `sha`", asking for (or telling) `tpa`.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<u8> {
    let mut frame = ethernet(sha, dst_mac, 0x0806);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&tpa.octets());
    // Padded to Ethernet's minimum payload, as a NIC would.
    frame.resize(60, 0);
    frame
}

/// The Ethernet address an IPv6 multicast group maps to (33:33 and its last four bytes).
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The link-local IPv6 address of `dev` in `ns`.
pub fn link_local(ns: &NetNs, dev: &str) -> Ipv6Addr {
    let out = ns.run(None, "ip", &["-j", "-6", "addr", "show", "dev", dev, "scope", "link"]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ip -j -6 addr show {dev}: {e}"));
    // iproute2 may list an empty object before the address.
    v[0]["addr_info"]
        .as_array()
        .and_then(|infos| infos.iter().find_map(|i| i["local"].as_str()))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on {dev} in {}: {v}", ns.name))
}

/// An Ethernet header.
pub fn ethernet(src_mac: [u8; 6], dst_mac: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// A client (for `Lab::in_pod` and friends) that sends `frame` out of eth0 through a packet
/// socket.
pub fn packet_socket_client(frame: &[u8]) -> (&'static str, Vec<String>) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0)); s.send(bytes.fromhex('{hex}'))"
    );
    ("python3", vec!["-c".into(), script])
}

/// Sends `frame` out of the pod's eth0 through a packet socket, from a process in `cgroup`.
pub fn send(pod: &NetNs, cgroup: &Path, frame: &[u8]) -> Output {
    let (program, args) = packet_socket_client(frame);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pod.run(Some(cgroup), program, &args);
    assert!(
        out.status.success(),
        "sending a packet-socket frame failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The index of interface `dev` in the calling thread's network namespace.
pub fn ifindex(dev: &str) -> u32 {
    let name = std::ffi::CString::new(dev).expect("interface name");
    // SAFETY: plain libc call on a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {dev}: {}", std::io::Error::last_os_error());
    index
}

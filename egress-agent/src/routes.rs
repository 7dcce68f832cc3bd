//! Finds a pod's host-side interface the way the node's own stack would: the route to the pod's
//! IP (rtnetlink RTM_GETROUTE, like `ip route get`). Routed CNIs (Calico, Cilium, kindnet, the
//! cloud VPC CNIs) install a host route per pod through the pod's veth. Bridged CNIs route the
//! pod network through the bridge; the route then names the bridge, which is reported as such
//! rather than guessed at.

use std::{
    ffi::CStr,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::interfaces::ifname;

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// Why no interface was found for a pod address (each names what the operator can check).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no route to pod address {0} on this node")]
    NoRoute(IpAddr),
    #[error(
        "the route to pod address {addr} goes through {device}, which is a {driver:?} device, not the pod's veth (bridged CNIs are not supported by the tc layer yet; the socket hooks still enforce)"
    )]
    NotVeth { addr: IpAddr, device: String, driver: String },
    #[error(
        "the route to pod address {addr} is this network namespace's default route (through {device}): the agent is not in the node's network namespace (run it with hostNetwork: true); the tc layer is not applied"
    )]
    DefaultRoute { addr: IpAddr, device: String },
    #[error("looking up the route to {addr}: {error}")]
    Netlink { addr: IpAddr, error: String },
}

/// The host-side veth that the route to `addr` leaves through.
pub fn pod_interface(addr: IpAddr) -> Result<String, RouteError> {
    let netlink = |e: io::Error| RouteError::Netlink { addr, error: e.to_string() };
    let oif = route_oif(addr).map_err(netlink)?.ok_or(RouteError::NoRoute(addr))?;
    let device = ifname(oif).ok_or(RouteError::NoRoute(addr))?;
    // Inside a pod's own network namespace every address routes through its eth0, a veth: the
    // pod's interface would be the agent's own. A node routes each pod through its own veth,
    // never through the default route.
    if route_oif(somewhere_else(addr)).map_err(netlink)? == Some(oif) {
        return Err(RouteError::DefaultRoute { addr, device });
    }
    let driver = driver_of(&device).map_err(netlink)?;
    if driver != "veth" {
        return Err(RouteError::NotVeth { addr, device, driver });
    }
    Ok(device)
}

/// An address of the same family that no pod has (documentation ranges, RFC 5737 and 3849):
/// where it routes is where the default route goes. Only looked up, never sent to.
fn somewhere_else(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    }
}

/// RTM_GETROUTE for one destination; the output interface of the answer.
fn route_oif(addr: IpAddr) -> io::Result<Option<u32>> {
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let attr_len = 4 + bytes.len();
    let total = NLMSG_HDRLEN + RTMSG_LEN + attr_len;
    let mut req = Vec::with_capacity(total);
    req.extend_from_slice(&(total as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    req.extend_from_slice(&[family, (bytes.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&bytes);

    // SAFETY: plain socket call; the fd is owned at once.
    let raw =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    crate::netlink_wait::bound_receives(&fd)?;
    // SAFETY: sending from a buffer of the stated size (to the kernel: no address needed).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: receiving into a buffer of the stated size.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_route_reply(&buf[..n as usize])
}

/// The RTA_OIF of the first RTM_NEWROUTE in a reply; `None` for "no route" errors.
fn parse_route_reply(buf: &[u8]) -> io::Result<Option<u32>> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink route reply");
    if buf.len() < NLMSG_HDRLEN {
        return Err(bad());
    }
    let len = (u32_at(buf, 0) as usize).min(buf.len());
    match u16_at(buf, 4) {
        NLMSG_ERROR => {
            let errno =
                buf.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            match errno {
                Some(e) if e == -libc::ENETUNREACH || e == -libc::EHOSTUNREACH || e == -libc::ESRCH => {
                    Ok(None)
                }
                Some(e) => Err(io::Error::from_raw_os_error(-e)),
                None => Err(bad()),
            }
        }
        RTM_NEWROUTE => {
            let mut at = NLMSG_HDRLEN + RTMSG_LEN;
            while at + 4 <= len {
                let attr_len = u16_at(buf, at) as usize;
                if attr_len < 4 || at + attr_len > len {
                    return Err(bad());
                }
                if u16_at(buf, at + 2) == RTA_OIF && attr_len >= 8 {
                    return Ok(Some(u32_at(buf, at + 4)));
                }
                at += attr_len.next_multiple_of(4);
            }
            Ok(None)
        }
        _ => Err(bad()),
    }
}

/// The driver of a network device (ETHTOOL_GDRVINFO): "veth", "bridge", ...
fn driver_of(device: &str) -> io::Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// struct ethtool_drvinfo: cmd, then driver[32], version[32], ... (196 bytes in all).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160] };
    // SAFETY: zeroed ifreq is valid; name and data are set below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(device.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: plain socket call; closed below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live ethtool_drvinfo.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let name = CStr::from_bytes_until_nul(&info.driver).map_err(|_| io::Error::other("driver name"))?;
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(body);
        b
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    #[test]
    fn the_output_interface_is_read_past_other_attributes() {
        let mut body = vec![0u8; RTMSG_LEN];
        body.extend(attr(RTA_DST, &[10, 0, 0, 7]));
        body.extend(attr(15, &[1, 2, 3])); // padded attribute before it
        body.extend(attr(RTA_OIF, &42u32.to_ne_bytes()));
        assert_eq!(parse_route_reply(&reply(RTM_NEWROUTE, &body)).unwrap(), Some(42));
    }

    #[test]
    fn unreachable_is_no_route_and_other_errors_are_errors() {
        let err = |e: i32| reply(NLMSG_ERROR, &e.to_ne_bytes());
        assert_eq!(parse_route_reply(&err(-libc::ENETUNREACH)).unwrap(), None);
        assert_eq!(parse_route_reply(&err(-libc::EPERM)).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn truncated_or_overlong_attributes_are_rejected() {
        let mut body = vec![0u8; RTMSG_LEN];
        body.extend_from_slice(&200u16.to_ne_bytes());
        body.extend_from_slice(&RTA_OIF.to_ne_bytes());
        assert!(parse_route_reply(&reply(RTM_NEWROUTE, &body)).is_err());
        assert!(parse_route_reply(&[1, 2, 3]).is_err());
    }

    #[test]
    fn loopback_is_not_a_veth() {
        assert_ne!(driver_of("lo").unwrap_or_default(), "veth");
    }
}

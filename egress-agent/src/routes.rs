//! Finds a pod's host-side interface the way the node's own stack would: the route to the pod's
//! IP (rtnetlink RTM_GETROUTE, like `ip route get`). Routed CNIs (Calico, Cilium, kindnet, the
//! cloud VPC CNIs) install a host route per pod through the pod's veth. Bridged CNIs route the
//! pod network through the bridge; the route then names the bridge, which is reported as such
//! rather than guessed at. The device's kind comes from rtnetlink too (IFLA_INFO_KIND).

use std::{io, net::IpAddr};

use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

use crate::kernel::{rtnetlink, veth_peer::link_by_index};

/// Why no interface was found for a pod address (each names what the operator can check).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no route to pod address {0} on this node")]
    NoRoute(IpAddr),
    #[error(
        "the route to pod address {addr} goes through {device}, which is a {kind} device, not the pod's veth (a bridged CNI's pod is covered only through the CNI plugin's record; the socket hooks still enforce)"
    )]
    NotVeth { addr: IpAddr, device: String, kind: String },
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
    let device = link_by_index(oif).map_err(|_| RouteError::NoRoute(addr))?;
    if device.kind != "veth" {
        // Physical and loopback devices report no kind.
        let kind = if device.kind.is_empty() { "physical or loopback".to_string() } else { device.kind };
        return Err(RouteError::NotVeth { addr, device: device.name, kind });
    }
    // Inside a pod's own network namespace every address routes through its eth0, a veth: the
    // pod's interface would be the agent's own. A node routes each pod through its own veth,
    // never through the default route.
    if route_oif(somewhere_else(addr)).map_err(netlink)? == Some(oif) {
        return Err(RouteError::DefaultRoute { addr, device: device.name });
    }
    Ok(device.name)
}

/// An address of the same family that no pod has (documentation ranges, RFC 5737 and 3849):
/// where it routes is where the default route goes. Only looked up, never sent to.
fn somewhere_else(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    }
}

/// RTM_GETROUTE for one destination: the output interface of the answer, `None` when there is
/// no route.
fn route_oif(addr: IpAddr) -> io::Result<Option<u32>> {
    let mut request = RouteMessage::default();
    (request.header.address_family, request.header.destination_prefix_length) = match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    request.attributes.push(RouteAttribute::Destination(RouteAddress::from(addr)));
    match rtnetlink::request(RouteNetlinkMessage::GetRoute(request), false) {
        Ok(answers) => Ok(output_interface(&answers)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ESRCH)) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The RTA_OIF of the first route in an answer.
fn output_interface(answers: &[RouteNetlinkMessage]) -> Option<u32> {
    answers.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewRoute(r) => r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_interface_is_read_past_other_attributes() {
        let mut route = RouteMessage::default();
        route.attributes.push(RouteAttribute::Destination(RouteAddress::from(IpAddr::from([10, 0, 0, 7]))));
        route.attributes.push(RouteAttribute::Table(254));
        route.attributes.push(RouteAttribute::Oif(42));
        assert_eq!(output_interface(&[RouteNetlinkMessage::NewRoute(route)]), Some(42));
        assert_eq!(output_interface(&[]), None);
    }

    #[test]
    fn loopback_routes_through_lo_which_is_not_a_veth() {
        // The kernel's own answers, no ioctl: a lookup that fails fails the test.
        let oif =
            route_oif(IpAddr::from([127, 0, 0, 1])).expect("a route lookup").expect("a route to loopback");
        let lo = link_by_index(oif).expect("the loopback link");
        assert_eq!(lo.name, "lo");
        assert_ne!(lo.kind, "veth");
        assert!(matches!(pod_interface(IpAddr::from([127, 0, 0, 1])), Err(RouteError::NotVeth { .. })));
    }
}

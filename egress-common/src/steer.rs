//! Transparent steering: a TCP connect() that the policy does not allow, to a port the policy
//! steers, is carried to the egress gateway instead of refused. The kernel's connect hooks
//! rewrite the destination to the gateway's steering listener (the name travels in the
//! connection itself: SNI for TLS, Host for HTTP), keep the original destination in the
//! socket's own storage (freed with the socket), and the getpeername hooks give it back, so the
//! application sees the address it asked for. Nothing new is opened: a steered connection goes to an address the policy already
//! allows (the gateway), and every packet is judged as before.

use crate::addr::Destination;

/// Key of the steering table: one policy's steered original port. Written with the policy's
/// allow entries under its policy id, so a change is switched in with the policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SteerKey {
    pub policy_id: u32,
    /// The port the application connected to, host byte order.
    pub port: u16,
    pub reserved: u16,
}

/// `SteerTarget::families`: the target has an IPv4 address.
pub const STEER_V4: u8 = 1;
/// `SteerTarget::families`: the target has an IPv6 address.
pub const STEER_V6: u8 = 2;

/// Where connections to a steered port go instead: the gateway's steering listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SteerTarget {
    /// Network byte order; meaningful when `families` has [`STEER_V6`].
    pub addr6: [u8; 16],
    /// Network byte order; meaningful when `families` has [`STEER_V4`].
    pub addr4: [u8; 4],
    /// The listener's port, host byte order.
    pub port: u16,
    pub families: u8,
    pub reserved: u8,
}

/// What a steered socket asked for, kept with the socket: given back by getpeername while the
/// socket is still connected where it was carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeredPeer {
    /// As the application passed it to connect(): 4 bytes (IPv4 socket) or 16 (IPv6 socket),
    /// network byte order, the rest zero.
    pub addr: [u8; 16],
    /// Where the connect was carried, in the same form.
    pub to: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// Host byte order.
    pub to_port: u16,
    /// 4 or 6: the socket's family; 0 in a record not filled in.
    pub family: u8,
    pub reserved: [u8; 3],
}

impl SteerTarget {
    /// The address a socket of this family is carried to: an IPv4 socket to the IPv4 address;
    /// an IPv6 socket to the IPv6 address, or where the gateway has none, to the IPv4-mapped
    /// form of its IPv4 address (an IPv6-only socket then fails as it would on a path without
    /// IPv6). `None`: nothing this socket can reach, and the connect stays refused.
    #[inline(always)]
    pub fn address_for(&self, socket_v6: bool) -> Option<Destination> {
        let v4 = self.families & STEER_V4 != 0;
        let v6 = self.families & STEER_V6 != 0;
        match (socket_v6, v4, v6) {
            (false, true, _) => Some(Destination::V4(self.addr4)),
            (false, false, _) => None,
            (true, _, true) => Some(Destination::V6(self.addr6)),
            (true, true, false) => {
                let a = self.addr4;
                Some(Destination::V6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]))
            }
            (true, false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(addr4: Option<[u8; 4]>, addr6: Option<[u8; 16]>) -> SteerTarget {
        let mut t = SteerTarget { port: 8443, ..SteerTarget::default() };
        if let Some(a) = addr4 {
            t.addr4 = a;
            t.families |= STEER_V4;
        }
        if let Some(a) = addr6 {
            t.addr6 = a;
            t.families |= STEER_V6;
        }
        t
    }

    #[test]
    fn each_socket_family_goes_to_an_address_it_can_reach() {
        let gw4 = [10, 231, 0, 3];
        let gw6 = [0xfd, 0, 0, 0x31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 231, 0, 3];
        let both = target(Some(gw4), Some(gw6));
        assert_eq!(both.address_for(false), Some(Destination::V4(gw4)));
        assert_eq!(both.address_for(true), Some(Destination::V6(gw6)));
        let only4 = target(Some(gw4), None);
        assert_eq!(only4.address_for(false), Some(Destination::V4(gw4)));
        assert_eq!(only4.address_for(true), Some(Destination::V6(mapped)));
        // The mapped form is the same gateway to the policy.
        assert_eq!(Destination::V6(mapped).normalize(), Destination::V4(gw4));
        let only6 = target(None, Some(gw6));
        assert_eq!(only6.address_for(false), None, "an IPv4 socket cannot reach an IPv6 gateway");
        assert_eq!(only6.address_for(true), Some(Destination::V6(gw6)));
        assert_eq!(target(None, None).address_for(true), None);
    }
}

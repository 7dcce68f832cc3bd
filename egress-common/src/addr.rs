//! Destination addresses as the policy judges them.
//!
//! An IPv6 address that embeds an IPv4 address is judged as that IPv4 address: otherwise
//! `::ffff:10.0.0.9` (which the kernel sends as a plain IPv4 packet) would escape a rule written
//! for `10.0.0.9`, or fall into the wrong one.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Network byte order.
    V4([u8; 4]),
    /// Network byte order.
    V6([u8; 16]),
}

impl Destination {
    /// Maps IPv6 forms that carry an IPv4 address to that address:
    /// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` (deprecated, but still
    /// accepted by some stacks) and the NAT64 well-known prefix `64:ff9b::a.b.c.d`.
    /// `::` and `::1` stay IPv6.
    #[inline(always)]
    pub fn normalize(self) -> Self {
        let Self::V6(a) = self else { return self };
        let v4 = [a[12], a[13], a[14], a[15]];
        let zero_0_10 = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0;
        let mapped = zero_0_10 && a[10] == 0xff && a[11] == 0xff;
        let compatible = zero_0_10 && a[10] == 0 && a[11] == 0 && (v4[0] | v4[1] | v4[2]) != 0;
        let nat64 = a[0] == 0
            && a[1] == 0x64
            && a[2] == 0xff
            && a[3] == 0x9b
            && (a[4] | a[5] | a[6] | a[7] | a[8] | a[9] | a[10] | a[11]) == 0;
        if mapped || compatible || nat64 { Self::V4(v4) } else { self }
    }

    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        match self {
            Self::V4(a) => a[0] == 127,
            Self::V6(a) => a[..15].iter().all(|b| *b == 0) && a[15] == 1,
        }
    }

    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        match self {
            Self::V4(a) => a.iter().all(|b| *b == 0),
            Self::V6(a) => a.iter().all(|b| *b == 0),
        }
    }

    /// 16-byte form for events: IPv4 in the first four bytes.
    pub fn to_event_bytes(self) -> [u8; 16] {
        match self {
            Self::V4(a) => {
                let mut out = [0u8; 16];
                out[..4].copy_from_slice(&a);
                out
            }
            Self::V6(a) => a,
        }
    }

    pub const fn family(&self) -> u8 {
        match self {
            Self::V4(_) => 4,
            Self::V6(_) => 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Destination::{self, V4, V6};

    fn v6(s: &str) -> Destination {
        extern crate std;
        V6(s.parse::<std::net::Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_as_ipv4() {
        assert_eq!(v6("::ffff:10.1.2.3").normalize(), V4([10, 1, 2, 3]));
        assert_eq!(v6("::10.1.2.3").normalize(), V4([10, 1, 2, 3]));
        assert_eq!(v6("64:ff9b::10.1.2.3").normalize(), V4([10, 1, 2, 3]));
        assert_eq!(v6("::ffff:127.0.0.1").normalize(), V4([127, 0, 0, 1]));
    }

    #[test]
    fn plain_ipv6_stays_ipv6() {
        for s in ["::", "::1", "2001:db8::1", "64:ff9b:1::10.1.2.3", "fe80::ffff:10.1.2.3"] {
            assert_eq!(v6(s).normalize(), v6(s), "{s}");
        }
    }

    #[test]
    fn loopback_and_unspecified() {
        assert!(V4([127, 9, 9, 9]).is_loopback());
        assert!(!V4([128, 0, 0, 1]).is_loopback());
        assert!(v6("::1").is_loopback());
        assert!(!v6("::2").is_loopback());
        assert!(v6("::").is_unspecified());
        assert!(V4([0; 4]).is_unspecified());
    }
}

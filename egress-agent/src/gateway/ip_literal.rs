//! IP literals as clients and resolvers actually accept them, normalised before any check.
//!
//! `inet_aton` (and so curl, Python's `socket`, many HTTP stacks) reads `2130706433`,
//! `0x7f.1`, `0177.0.0.1` and `127.1` all as 127.0.0.1. A gateway that compares only dotted
//! quads would let `http://2130706433/` through a loopback ban, so every form is decoded here,
//! and IPv6 addresses that embed an IPv4 one (mapped, compatible, NAT64) are judged as that IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address a host string denotes if it is an IP literal in any accepted form, normalised.
/// `None` means it is a name (to be resolved, then checked).
pub fn parse(host: &str) -> Option<IpAddr> {
    let h = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    // A zone index (fe80::1%eth0) names a local interface: never a valid external target, but
    // it is still an IP literal and must be judged as one.
    let h = h.split_once('%').map_or(h, |(a, _)| a);
    if let Ok(v6) = h.parse::<Ipv6Addr>() {
        return Some(normalize(IpAddr::V6(v6)));
    }
    parse_inet_aton(h.strip_suffix('.').unwrap_or(h)).map(IpAddr::V4)
}

/// IPv4 embedded in IPv6 is judged as the IPv4 it carries.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let o = v6.octets();
            let embedded = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
                // IPv4-compatible (deprecated, ::a.b.c.d), but not :: or ::1.
                IpAddr::V4(embedded)
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 well-known prefix 64:ff9b::/96.
                IpAddr::V4(embedded)
            } else {
                ip
            }
        }
        IpAddr::V4(_) => ip,
    }
}

/// The BSD `inet_aton` grammar: one to four parts, each decimal, octal (leading 0) or hex
/// (0x); the last part fills all remaining bytes.
fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    if s.is_empty() {
        return None;
    }
    let parts: Vec<u64> = s.split('.').map(parse_part).collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|p| *p > 0xff) {
        return None;
    }
    let last_bits = 8 * (4 - head.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let value = head.iter().fold(0u64, |acc, p| (acc << 8) | p) << last_bits | last;
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

fn parse_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (hex, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        // "0x" alone is 0 for inet_aton.
        return (radix == 16).then_some(0);
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<IpAddr> {
        Some(IpAddr::V4(s.parse().unwrap()))
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback() {
        for s in [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "0177.0.0.1",
            "0177.1",
            "127.1",
            "127.0.1",
            "127.0.0.1.",
            "[::ffff:127.0.0.1]",
            "::ffff:7f00:1",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
        ] {
            assert_eq!(parse(s), v4("127.0.0.1"), "{s}");
        }
    }

    #[test]
    fn metadata_and_private_spellings() {
        assert_eq!(parse("169.254.169.254"), v4("169.254.169.254"));
        assert_eq!(parse("2852039166"), v4("169.254.169.254"));
        assert_eq!(parse("0xa9fea9fe"), v4("169.254.169.254"));
        assert_eq!(parse("10.1"), v4("10.0.0.1"));
        assert_eq!(parse("0"), v4("0.0.0.0"));
    }

    #[test]
    fn names_and_out_of_range_literals_are_not_addresses() {
        for s in ["example.com", "256.0.0.1", "1.2.3.4.5", "0x1.0x100.1.1", "08.0.0.1", "4294967296", "", "."]
        {
            assert_eq!(parse(s), None, "{s:?}");
        }
        // Plain IPv6 stays IPv6; :: and ::1 are not read as IPv4-compatible.
        assert_eq!(parse("2001:db8::1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse("::1"), Some("::1".parse().unwrap()));
        assert_eq!(parse("[fe80::1%eth0]"), Some("fe80::1".parse().unwrap()));
    }
}

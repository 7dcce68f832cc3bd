//! Destinations the gateway refuses unless a rule names them explicitly: everything that is not
//! the public internet. A proxy inside the cluster that would dial these is a way into the
//! node, the cluster network or the cloud provider's metadata service (credentials).

use std::net::IpAddr;

use ipnet::IpNet;

/// Why an address is not a public destination. Names are stable (log and metrics labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Blocked {
    /// Cloud instance metadata services (checked before link-local, which holds most of them).
    Metadata,
    Loopback,
    Private,
    LinkLocal,
    /// Carrier-grade NAT, 100.64.0.0/10 (also used for cluster networks).
    Cgnat,
    Multicast,
    Unspecified,
    /// Reserved, broadcast, documentation and benchmarking ranges: never a real server.
    Reserved,
    /// In `blockedCidrs`: public on the wire, but the operator's own (a cloud's pod, Service or
    /// node ranges).
    Configured,
}

impl Blocked {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Metadata => "metadata",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::Cgnat => "cgnat",
            Self::Multicast => "multicast",
            Self::Unspecified => "unspecified",
            Self::Reserved => "reserved",
            Self::Configured => "configured",
        }
    }
}

const TABLE: &[(&str, Blocked)] = &[
    // AWS, GCP, Azure, OpenStack, Oracle; AWS ECS task metadata; AWS IPv6; Alibaba; Azure's
    // WireServer (a public address, but the host's agent channel: VM extensions, health, keys).
    ("169.254.169.254/32", Blocked::Metadata),
    ("169.254.170.2/32", Blocked::Metadata),
    ("fd00:ec2::254/128", Blocked::Metadata),
    ("100.100.100.200/32", Blocked::Metadata),
    ("168.63.129.16/32", Blocked::Metadata),
    ("127.0.0.0/8", Blocked::Loopback),
    ("::1/128", Blocked::Loopback),
    ("10.0.0.0/8", Blocked::Private),
    ("172.16.0.0/12", Blocked::Private),
    ("192.168.0.0/16", Blocked::Private),
    ("fc00::/7", Blocked::Private),
    ("169.254.0.0/16", Blocked::LinkLocal),
    ("fe80::/10", Blocked::LinkLocal),
    ("100.64.0.0/10", Blocked::Cgnat),
    ("224.0.0.0/4", Blocked::Multicast),
    ("ff00::/8", Blocked::Multicast),
    ("0.0.0.0/8", Blocked::Unspecified),
    ("::/128", Blocked::Unspecified),
    ("240.0.0.0/4", Blocked::Reserved),
    ("192.0.0.0/24", Blocked::Reserved),
    ("192.0.2.0/24", Blocked::Reserved),
    ("198.18.0.0/15", Blocked::Reserved),
    ("198.51.100.0/24", Blocked::Reserved),
    ("203.0.113.0/24", Blocked::Reserved),
    ("2001:db8::/32", Blocked::Reserved),
    // Transition mechanisms whose embedded IPv4 is not decoded here: Teredo, 6to4, local-use
    // NAT64 (RFC 8215; the well-known 64:ff9b::/96 is decoded instead), SIIT.
    ("2001::/32", Blocked::Reserved),
    ("2002::/16", Blocked::Reserved),
    ("64:ff9b:1::/48", Blocked::Reserved),
    ("::ffff:0:0:0/96", Blocked::Reserved),
    ("100::/64", Blocked::Reserved),
];

/// The table parsed once: `classify` runs for every address a connection may dial.
fn parsed_table() -> &'static [(IpNet, Blocked)] {
    static PARSED: std::sync::LazyLock<Vec<(IpNet, Blocked)>> = std::sync::LazyLock::new(|| {
        TABLE.iter().map(|(net, class)| (net.parse().expect("the table holds valid CIDRs"), *class)).collect()
    });
    &PARSED
}

/// The class of a non-public address; `None` for a public one. Embedded IPv4 (mapped,
/// compatible, NAT64) is judged as that IPv4 (see `ip_literal::normalize`).
pub fn classify(ip: IpAddr) -> Option<Blocked> {
    let ip = super::ip_literal::normalize(ip);
    let listed = parsed_table().iter().find_map(|(net, class)| net.contains(&ip).then_some(*class));
    // IPv6 is public only inside the global unicast block 2000::/3; everything outside it that
    // the table does not name (deprecated site-local, unassigned space, other NAT64 prefixes)
    // is not a destination on the internet.
    match ip {
        IpAddr::V6(v6) if listed.is_none() && (v6.segments()[0] & 0xe000) != 0x2000 => {
            Some(Blocked::Reserved)
        }
        _ => listed,
    }
}

/// For the classes a broad rule must not open (metadata services; loopback and the unspecified
/// address, which reach the gateway's own pod: a sidecar's admin port, say), the built-in range
/// that holds `ip`. A rule opens such an address only with a CIDR inside that range: an exact
/// /32 for a metadata service, something within 127.0.0.0/8 for loopback. `None` for every other
/// address, which any covering CIDR opens.
pub fn narrow_range(ip: IpAddr) -> Option<IpNet> {
    let ip = super::ip_literal::normalize(ip);
    parsed_table().iter().find_map(|(net, class)| {
        (net.contains(&ip) && matches!(class, Blocked::Metadata | Blocked::Loopback | Blocked::Unspecified))
            .then_some(*net)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<Blocked> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn each_class() {
        assert_eq!(class("169.254.169.254"), Some(Blocked::Metadata));
        assert_eq!(class("fd00:ec2::254"), Some(Blocked::Metadata));
        assert_eq!(class("168.63.129.16"), Some(Blocked::Metadata), "Azure WireServer");
        assert_eq!(class("169.254.1.1"), Some(Blocked::LinkLocal));
        assert_eq!(class("127.3.2.1"), Some(Blocked::Loopback));
        assert_eq!(class("10.96.0.1"), Some(Blocked::Private));
        assert_eq!(class("172.31.255.255"), Some(Blocked::Private));
        assert_eq!(class("fd12::1"), Some(Blocked::Private));
        assert_eq!(class("100.64.0.1"), Some(Blocked::Cgnat));
        assert_eq!(class("239.1.1.1"), Some(Blocked::Multicast));
        assert_eq!(class("0.0.0.0"), Some(Blocked::Unspecified));
        assert_eq!(class("::"), Some(Blocked::Unspecified));
        assert_eq!(class("255.255.255.255"), Some(Blocked::Reserved));
    }

    #[test]
    fn ipv6_outside_global_unicast_and_transition_prefixes() {
        for s in [
            "fec0::1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378::1",
            "::ffff:0:a9fe:a9fe",
            "4000::1",
        ] {
            assert_eq!(class(s), Some(Blocked::Reserved), "{s}");
        }
        assert_eq!(class("fe80::1"), Some(Blocked::LinkLocal));
        assert_eq!(class("2001:db9::1"), None);
    }

    #[test]
    fn embedded_ipv4_is_judged_as_ipv4() {
        assert_eq!(class("::ffff:169.254.169.254"), Some(Blocked::Metadata));
        assert_eq!(class("64:ff9b::10.0.0.1"), Some(Blocked::Private));
        assert_eq!(class("::ffff:8.8.8.8"), None);
    }

    #[test]
    fn public_addresses_pass() {
        for s in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "64:ff9b::8.8.8.8"] {
            assert_eq!(class(s), None, "{s}");
        }
    }
}

extern crate std;

use std::vec::Vec;

use super::*;
use crate::policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, PortRule};

/// A linear longest-prefix table: slow and obviously right, to test `judge` against.
#[derive(Default)]
struct Table {
    v4: Vec<(u32, [u8; 4], u8, AllowRules)>,
}

fn covers(prefix: [u8; 4], len: u8, addr: [u8; 4]) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    u32::from_be_bytes(prefix) & mask == u32::from_be_bytes(addr) & mask
}

impl AllowLookup for Table {
    fn rules_v4(&self, policy_id: u32, addr: [u8; 4]) -> Option<&AllowRules> {
        self.v4
            .iter()
            .filter(|(p, prefix, len, _)| *p == policy_id && covers(*prefix, *len, addr))
            .max_by_key(|(_, _, len, _)| *len)
            .map(|(_, _, _, rules)| rules)
    }
    fn rules_v6(&self, _: u32, _: [u8; 16]) -> Option<&AllowRules> {
        None
    }
}

fn rules(list: &[(u8, Reason, u16, u16)]) -> AllowRules {
    let mut r = AllowRules::EMPTY;
    for (i, (protocol, reason, first, last)) in list.iter().enumerate() {
        r.rules[i] = PortRule {
            protocol: *protocol,
            reason: *reason as u8,
            reserved: [0; 2],
            port_first: *first,
            port_last: *last,
        };
    }
    r.count = list.len() as u32;
    r
}

fn table() -> Table {
    Table {
        v4: std::vec![
            (7, [10, 0, 0, 1], 32, rules(&[(PROTO_TCP, Reason::AllowGateway, 3128, 3128)])),
            (
                7,
                [10, 0, 0, 53],
                32,
                rules(&[(PROTO_UDP, Reason::AllowDns, 53, 53), (PROTO_TCP, Reason::AllowDns, 53, 53)])
            ),
            (7, [192, 168, 0, 0], 16, rules(&[(PROTO_ANY, Reason::AllowExtraCidr, 0, u16::MAX)])),
        ],
    }
}

const PACKET: Origin = Origin::Packet { via_loopback: false, source_routed: false };

fn flow(dst: [u8; 4], protocol: u8, dport: Option<u16>) -> Flow {
    Flow {
        dst: Destination::V4(dst),
        protocol,
        dport: dport.unwrap_or(0),
        port_known: dport.is_some(),
        later_fragment: false,
        origin: PACKET,
    }
}

#[test]
fn gateway_only_on_its_port_and_protocol() {
    let t = table();
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 1], PROTO_TCP, Some(3128))), Reason::AllowGateway);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 1], PROTO_TCP, Some(22))), Reason::DenyPort);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 1], PROTO_UDP, Some(3128))), Reason::DenyPort);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 1], PROTO_ICMP, None)), Reason::DenyPort);
}

#[test]
fn dns_on_53_only() {
    let t = table();
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 53], PROTO_UDP, Some(53))), Reason::AllowDns);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 53], PROTO_TCP, Some(53))), Reason::AllowDns);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 53], PROTO_UDP, Some(54))), Reason::DenyPort);
    assert_eq!(judge(&t, 7, &flow([10, 0, 0, 54], PROTO_UDP, Some(53))), Reason::DenyDestination);
}

#[test]
fn other_policy_ids_see_nothing() {
    assert_eq!(judge(&table(), 8, &flow([10, 0, 0, 1], PROTO_TCP, Some(3128))), Reason::DenyDestination);
}

#[test]
fn any_protocol_cidr_allows_everything_inside() {
    let t = table();
    assert_eq!(judge(&t, 7, &flow([192, 168, 4, 4], PROTO_ICMP, None)), Reason::AllowExtraCidr);
    assert_eq!(judge(&t, 7, &flow([192, 169, 4, 4], PROTO_ICMP, None)), Reason::DenyDestination);
}

#[test]
fn later_fragments_to_port_restricted_destinations_are_denied() {
    let mut f = flow([10, 0, 0, 1], PROTO_TCP, None);
    f.later_fragment = true;
    assert_eq!(judge(&table(), 7, &f), Reason::DenyFragment);
}

#[test]
fn loopback_must_leave_through_loopback() {
    let t = table();
    let mut f = flow([127, 0, 0, 1], PROTO_TCP, Some(1));
    assert_eq!(judge(&t, 7, &f), Reason::DenyLoopbackSpoof);
    f.origin = Origin::Packet { via_loopback: true, source_routed: false };
    assert_eq!(judge(&t, 7, &f), Reason::AllowLoopback);
    f.origin = Origin::Syscall;
    assert_eq!(judge(&t, 7, &f), Reason::AllowLoopback);
}

#[test]
fn anything_through_the_loopback_device_stays_local() {
    let mut f = flow([10, 9, 9, 9], PROTO_UDP, Some(9));
    f.origin = Origin::Packet { via_loopback: true, source_routed: true };
    assert_eq!(judge(&table(), 7, &f), Reason::AllowLoopback);
}

#[test]
fn unspecified_is_local_only_for_syscalls() {
    let t = table();
    let mut f = flow([0, 0, 0, 0], PROTO_TCP, Some(80));
    f.origin = Origin::Syscall;
    assert_eq!(judge(&t, 7, &f), Reason::AllowLoopback);
    f.origin = PACKET;
    assert_eq!(judge(&t, 7, &f), Reason::DenyDestination);
}

#[test]
fn source_routed_packets_are_denied_even_to_the_gateway() {
    let mut f = flow([10, 0, 0, 1], PROTO_TCP, Some(3128));
    f.origin = Origin::Packet { via_loopback: false, source_routed: true };
    assert_eq!(judge(&table(), 7, &f), Reason::DenySourceRoute);
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    let t = table();
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&[10, 0, 0, 1]);
    let mut f = flow([0; 4], PROTO_TCP, Some(3128));
    f.dst = Destination::V6(mapped);
    assert_eq!(judge(&t, 7, &f), Reason::AllowGateway);
    f.dport = 80;
    assert_eq!(judge(&t, 7, &f), Reason::DenyPort);
}

#[test]
fn tunnels_need_a_rule_that_names_them() {
    let mut t = table();
    // Any protocol and every UDP port to 192.168/16: not enough for a tunnel.
    for (protocol, dport) in [(4, None), (41, None), (47, None), (115, None), (137, None)] {
        assert_eq!(
            judge(&t, 7, &flow([192, 168, 1, 1], protocol, dport)),
            Reason::DenyEncapsulation,
            "{protocol}"
        );
    }
    for port in [1701, 4789, 4790, 6081, 8472] {
        assert_eq!(
            judge(&t, 7, &flow([192, 168, 1, 1], PROTO_UDP, Some(port))),
            Reason::DenyEncapsulation,
            "udp {port}"
        );
    }
    assert_eq!(judge(&t, 7, &flow([192, 168, 1, 1], PROTO_UDP, Some(4788))), Reason::AllowExtraCidr);
    // Rules that name them: GRE by protocol, VXLAN by protocol and port.
    t.v4.push((
        7,
        [172, 16, 0, 0],
        12,
        rules(&[
            (47, Reason::AllowExtraCidr, 0, u16::MAX),
            (PROTO_UDP, Reason::AllowExtraCidr, 0, u16::MAX),
            (PROTO_UDP, Reason::AllowExtraCidr, 4789, 4789),
        ]),
    ));
    assert_eq!(judge(&t, 7, &flow([172, 16, 0, 1], 47, None)), Reason::AllowExtraCidr);
    assert_eq!(judge(&t, 7, &flow([172, 16, 0, 1], PROTO_UDP, Some(4789))), Reason::AllowExtraCidr);
    assert_eq!(judge(&t, 7, &flow([172, 16, 0, 1], PROTO_UDP, Some(6081))), Reason::DenyEncapsulation);
    assert_eq!(judge(&t, 7, &flow([172, 16, 0, 1], 4, None)), Reason::DenyEncapsulation);
    // No rule for the address at all: the ordinary reason.
    assert_eq!(judge(&t, 7, &flow([10, 9, 9, 9], 47, None)), Reason::DenyDestination);
}

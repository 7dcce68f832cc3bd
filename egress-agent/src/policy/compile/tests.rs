use std::net::IpAddr;

use egress_common::{
    addr::Destination,
    decide::{AllowLookup, Flow, Origin, judge},
    policy::{AllowRules, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    verdict::Reason,
};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{CompiledRules, compile};
use crate::policy::config::parse;

/// Longest-prefix lookup over compiled entries, as the kernel trie does it.
impl AllowLookup for CompiledRules {
    fn rules_v4(&self, _: u32, addr: [u8; 4]) -> Option<&AllowRules> {
        (0..=32).rev().find_map(|len| {
            let net = Ipv4Net::new(addr.into(), len).ok()?.trunc();
            self.v4.get(&net)
        })
    }
    fn rules_v6(&self, _: u32, addr: [u8; 16]) -> Option<&AllowRules> {
        (0..=128).rev().find_map(|len| {
            let net = Ipv6Net::new(addr.into(), len).ok()?.trunc();
            self.v6.get(&net)
        })
    }
}

fn compiled(yaml: &str) -> CompiledRules {
    let specs = parse(yaml).unwrap_or_else(|e| panic!("{e:?}"));
    compile(&specs[0]).unwrap()
}

fn verdict(rules: &CompiledRules, dst: &str, protocol: u8, port: Option<u16>) -> Reason {
    let dst = match dst.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => Destination::V4(a.octets()),
        IpAddr::V6(a) => Destination::V6(a.octets()),
    };
    let flow = Flow {
        dst,
        protocol,
        dport: port.unwrap_or(0),
        port_known: port.is_some(),
        later_fragment: false,
        origin: Origin::Packet { via_loopback: false, source_routed: false },
    };
    judge(rules, 1, &flow)
}

const POLICY: &str = r#"
policies:
  - cgroup: pod
    mode: enforce
    gateways:
      - address: 10.0.0.5
        ports: [3128]
      - address: fd00::5
        ports: [3128]
    dns: [10.0.0.53]
    extra:
      - cidr: 10.0.0.0/8
        protocol: tcp
        ports: ["443"]
      - cidr: 172.16.0.0/12
"#;

#[test]
fn rules_of_covering_prefixes_apply_inside_more_specific_ones() {
    let r = compiled(POLICY);
    // The gateway /32 inherits the /8's tcp/443 rule.
    assert_eq!(verdict(&r, "10.0.0.5", PROTO_TCP, Some(3128)), Reason::AllowGateway);
    assert_eq!(verdict(&r, "10.0.0.5", PROTO_TCP, Some(443)), Reason::AllowExtraCidr);
    assert_eq!(verdict(&r, "10.0.0.5", PROTO_TCP, Some(80)), Reason::DenyPort);
    assert_eq!(verdict(&r, "10.0.0.53", PROTO_UDP, Some(53)), Reason::AllowDns);
    assert_eq!(verdict(&r, "10.0.0.53", PROTO_TCP, Some(443)), Reason::AllowExtraCidr);
    assert_eq!(verdict(&r, "10.9.9.9", PROTO_UDP, Some(443)), Reason::DenyPort);
    assert_eq!(verdict(&r, "172.20.1.1", PROTO_ICMP, None), Reason::AllowExtraCidr);
    assert_eq!(verdict(&r, "11.0.0.1", PROTO_TCP, Some(443)), Reason::DenyDestination);
}

#[test]
fn ipv6_gateway_and_mapped_forms() {
    let r = compiled(POLICY);
    assert_eq!(verdict(&r, "fd00::5", PROTO_TCP, Some(3128)), Reason::AllowGateway);
    assert_eq!(verdict(&r, "fd00::6", PROTO_TCP, Some(3128)), Reason::DenyDestination);
    assert_eq!(verdict(&r, "::ffff:10.0.0.5", PROTO_TCP, Some(3128)), Reason::AllowGateway);
    assert_eq!(verdict(&r, "::ffff:8.8.8.8", PROTO_UDP, Some(53)), Reason::DenyDestination);
}

#[test]
fn mapped_cidrs_in_the_config_become_ipv4_entries() {
    let r = compiled("policies: [{cgroup: p, mode: enforce, extra: [{cidr: '::ffff:192.0.2.0/120'}]}]");
    assert!(r.v6.is_empty());
    assert_eq!(r.v4.keys().map(ToString::to_string).collect::<Vec<_>>(), ["192.0.2.0/24"]);
}

#[test]
fn an_empty_policy_allows_nothing() {
    let r = compiled("policies: [{cgroup: p, mode: audit}]");
    assert_eq!(verdict(&r, "10.0.0.5", PROTO_TCP, Some(3128)), Reason::DenyDestination);
}

#[test]
fn too_many_rules_on_one_prefix_is_an_error_naming_it() {
    let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
    let yaml = format!(
        "policies: [{{cgroup: p, mode: enforce, gateways: [{{address: 10.1.1.1, ports: [{}]}}]}}]",
        ports.join(",")
    );
    let spec = &parse(&yaml).unwrap()[0];
    let err = compile(spec).unwrap_err().to_string();
    assert!(err.contains("10.1.1.1/32") && err.contains("17"), "{err}");
}

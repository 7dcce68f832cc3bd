use super::{ParseError, PortRange, parse};
use crate::policy::{Mode, Protocol};

fn error(yaml: &str) -> String {
    match parse(yaml) {
        Ok(p) => panic!("expected an error, parsed {p:?}"),
        Err(ParseError::Syntax(e)) => e.to_string(),
        Err(ParseError::Invalid { at, message }) => format!("{at}: {message}"),
    }
}

#[test]
fn a_full_policy_parses() {
    let p = parse(
        r#"
policies:
  - cgroup: demo/pod
    mode: audit
    gateways: [{address: 10.0.0.1, ports: [3128, "8000-8100"]}]
    dns: ["10.0.0.53", "fd00::53"]
    extra: [{cidr: 192.168.0.0/16, protocol: udp, ports: [123]}]
"#,
    )
    .unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].mode, Mode::Audit);
    assert_eq!(
        p[0].gateways[0].1,
        vec![PortRange { first: 3128, last: 3128 }, PortRange { first: 8000, last: 8100 }]
    );
    assert_eq!(p[0].dns.len(), 2);
}

#[test]
fn errors_name_the_offending_value() {
    let cases = [
        ("policies: [{cgroup: a, mode: enforced}]", "\"enforced\""),
        ("policies: [{cgroup: a, mode: enforce, dns: [10.0.0.300]}]", "10.0.0.300"),
        ("policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/33}]}]", "10.0.0.0/33"),
        ("policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.1/8}]}]", "10.0.0.0/8"),
        ("policies: [{cgroup: a, mode: enforce, gateways: [{address: 10.0.0.1, ports: [0]}]}]", "port 0"),
        ("policies: [{cgroup: a, mode: enforce, gateways: [{address: 10.0.0.1, ports: [70000]}]}]", "70000"),
        (
            "policies: [{cgroup: a, mode: enforce, gateways: [{address: 10.0.0.1, ports: [\"90-80\"]}]}]",
            "90-80",
        ),
        (
            "policies: [{cgroup: a, mode: enforce, gateways: [{address: 10.0.0.1, ports: []}]}]",
            "at least one port",
        ),
        (
            "policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/8, protocol: icmp, ports: [1]}]}]",
            "tcp or udp",
        ),
        (
            "policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/8, protocol: grease}]}]",
            "\"grease\"",
        ),
        ("policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/8, protocol: \"255\"}]}]", "\"255\""),
        ("policies: [{cgroup: a, mode: enforce}, {cgroup: a, mode: audit}]", "already has a policy"),
        ("policies: [{cgroup: a, mode: enforce, gateway: []}]", "unknown field `gateway`"),
        ("polices: []", "unknown field `polices`"),
    ];
    for (yaml, needle) in cases {
        let e = error(yaml);
        assert!(e.contains(needle), "error for {yaml:?} should mention {needle:?}: {e}");
    }
}

#[test]
fn errors_say_which_policy() {
    let e = error("policies: [{cgroup: ok, mode: enforce}, {cgroup: bad, mode: enforce, dns: [x]}]");
    assert!(e.contains("policies[1]") && e.contains("\"bad\""), "{e}");
}

#[test]
fn interfaces_name_the_workloads_veth_and_addresses() {
    let p = parse(
        "policies: [{cgroup: a, mode: enforce, interfaces: [{name: veth-a, addresses: [10.0.0.7, 'fd00::7']}]}]",
    )
    .unwrap();
    assert_eq!(p[0].interfaces.len(), 1);
    assert_eq!(p[0].interfaces[0].name, "veth-a");
    assert_eq!(
        p[0].interfaces[0].addresses,
        vec!["10.0.0.7".parse::<std::net::IpAddr>().unwrap(), "fd00::7".parse().unwrap()]
    );
    assert!(parse("policies: [{cgroup: a, mode: enforce}]").unwrap()[0].interfaces.is_empty());
}

#[test]
fn bad_interfaces_are_rejected_naming_the_value() {
    let one = |iface: &str| format!("policies: [{{cgroup: a, mode: enforce, interfaces: [{iface}]}}]");
    let cases = [
        (one("{name: '', addresses: [10.0.0.7]}"), "\"\" is not a Linux interface name"),
        (one("{name: averyveryverylongname, addresses: [10.0.0.7]}"), "averyveryverylongname"),
        (one("{name: 'a/b', addresses: [10.0.0.7]}"), "\"a/b\""),
        (one("{name: veth-a, addresses: []}"), "needs the workload's addresses"),
        (one("{name: veth-a, addresses: [10.0.0.300]}"), "10.0.0.300"),
        (one("{name: veth-a, addresses: [127.0.0.1]}"), "127.0.0.1 cannot be"),
        (one("{name: veth-a, addresses: [10.0.0.7], mtu: 1500}"), "mtu"),
        (
            "policies: [{cgroup: a, mode: enforce, interfaces: [{name: v1, addresses: [10.0.0.7]}]}, {cgroup: b, mode: enforce, interfaces: [{name: v1, addresses: [10.0.0.8]}]}]".into(),
            "interface \"v1\" is already bound by policies[0]",
        ),
        (
            "policies: [{cgroup: a, mode: enforce, interfaces: [{name: v1, addresses: [10.0.0.7]}]}, {cgroup: b, mode: enforce, interfaces: [{name: v2, addresses: [10.0.0.7]}]}]".into(),
            "address 10.0.0.7 of interface \"v2\" is already bound to interface \"v1\"",
        ),
    ];
    for (yaml, expected) in cases {
        let e = error(&yaml);
        assert!(e.contains(expected), "{yaml}\n=> {e}\nexpected to contain {expected}");
    }
}

#[test]
fn tunnel_protocols_are_named_or_numbered() {
    let p = parse(
        "policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/8, protocol: gre}, {cidr: 10.0.0.0/8, protocol: ipip}, {cidr: 10.0.0.0/8, protocol: ipv6}, {cidr: 10.0.0.0/8, protocol: '115'}, {cidr: 10.0.0.0/8, protocol: '17'}]}]",
    )
    .unwrap();
    let protocols: Vec<Protocol> = p[0].extra.iter().map(|e| e.protocol).collect();
    assert_eq!(
        protocols,
        [
            Protocol::Number(47),
            Protocol::Number(4),
            Protocol::Number(41),
            Protocol::Number(115),
            Protocol::Udp
        ]
    );
}

#[test]
fn steering_goes_to_a_gateway_of_the_policy_and_names_what_is_wrong() {
    let with = |steer: &str| {
        format!(
            "policies: [{{cgroup: a, mode: enforce, gateways: [{{address: 10.0.0.3, ports: [8443, 8080]}}, {{address: \"fd00::3\", ports: [8443]}}], steer: [{steer}]}}]"
        )
    };
    let p = parse(&with(
        "{ports: [443], address: 10.0.0.3, address6: \"fd00::3\", port: 8443}, {ports: [80, 8000], address: 10.0.0.3, port: 8080}",
    ))
    .unwrap();
    let steer = &p[0].steer;
    assert_eq!(steer.keys().copied().collect::<Vec<_>>(), [80, 443, 8000]);
    assert_eq!(steer[&443].address6, Some("fd00::3".parse().unwrap()));
    assert_eq!(steer[&80].address6, None);
    assert_eq!(steer[&80].port, 8080);
    let cases = [
        (
            "{ports: [443], address: 10.0.0.9, port: 8443}",
            "10.0.0.9 port 8443 is not one of this policy's gateways",
        ),
        ("{ports: [443], address: 10.0.0.3, port: 9999}", "10.0.0.3 port 9999"),
        ("{ports: [443], address6: \"fd00::3\", port: 8080}", "fd00::3 port 8080"),
        ("{ports: [\"400-500\"], address: 10.0.0.3, port: 8443}", "\"400-500\" must be a single port"),
        ("{ports: [443], address: \"fd00::3\", port: 8443}", "is IPv6; put it in address6"),
        ("{ports: [443], address6: 10.0.0.3, port: 8443}", "is IPv4; put it in address"),
        ("{ports: [443], port: 8443}", "needs the gateway listener's address"),
        ("{ports: [], address: 10.0.0.3, port: 8443}", "at least one original port"),
        (
            "{ports: [443], address: 10.0.0.3, port: 8443}, {ports: [443], address: 10.0.0.3, port: 8080}",
            "port 443 is steered twice",
        ),
    ];
    for (steer, want) in cases {
        let e = error(&with(steer));
        assert!(e.contains(want), "{steer}: {e}");
        assert!(e.contains("steer["), "{steer}: the place is named: {e}");
    }
}

use super::{ParseError, PortRange, parse};
use crate::policy::Mode;

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
        ("policies: [{cgroup: a, mode: enforce, extra: [{cidr: 10.0.0.0/8, protocol: gre}]}]", "\"gre\""),
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

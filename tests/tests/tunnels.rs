//! Encapsulation through an allowed destination: an extra CIDR for any protocol that covers a
//! host with a tunnel device (a node's VXLAN or GRE endpoint) must not let the pod hand that
//! host a packet to decapsulate and forward past both layers. Tunnels pass only where a rule
//! names them. Proven on the receiving side by a sniffer; the same destination on an ordinary
//! protocol and port shows the rule is in force, so the test fails if the exclusion is removed.

use std::fs;

use egress_tests::{
    agent::Agent,
    client::{raw_ip, refused, succeeded, udp_sendto},
    lab::{EXTERNAL4, EXTERNAL6, Lab, text},
    sniff::Sniffer,
};

const IPIP: u8 = 4;
const IPV6_IN_IP: u8 = 41;
const GRE: u8 = 47;

/// The lab's policy plus `extra` rules for the external host, in both families.
fn policy_with_extra(lab: &Lab, rules: &[&str]) -> String {
    let mut text = lab.policy_text("enforce");
    text.push_str("    extra:\n");
    for cidr in [format!("{EXTERNAL4}/32"), format!("{EXTERNAL6}/128")] {
        for rule in rules {
            text.push_str(&format!("      - {{cidr: \"{cidr}\", {rule}}}\n"));
        }
    }
    text
}

#[test]
fn a_rule_for_any_protocol_does_not_cover_ip_in_ip_gre_or_udp_tunnel_ports() {
    let lab = Lab::new();
    fs::write(lab.policy_path(), policy_with_extra(&lab, &["protocol: any"])).expect("policy");
    let agent = Agent::start(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());

    // The rule is in force: ordinary UDP and a raw protocol to the host arrive.
    for host in [EXTERNAL4, EXTERNAL6] {
        let out = lab.in_pod(udp_sendto(host, 9000));
        assert!(succeeded(&out), "UDP 9000 to {host} is allowed by `any`:\n{}", text(&out));
        let out = lab.in_pod(raw_ip(host, 253));
        assert!(succeeded(&out), "raw protocol 253 to {host} is allowed by `any`:\n{}", text(&out));
    }
    let arrived = sniffer.seen();
    assert_eq!(arrived.len(), 4, "the allowed packets: {arrived:?}");
    sniffer.clear();

    for host in [EXTERNAL4, EXTERNAL6] {
        for protocol in [IPIP, IPV6_IN_IP, GRE] {
            let out = lab.in_pod(raw_ip(host, protocol));
            assert!(refused(&out), "IP protocol {protocol} to {host}:\n{}", text(&out));
        }
        for port in [4789, 8472, 6081] {
            let out = lab.in_pod(udp_sendto(host, port));
            assert!(refused(&out), "UDP {port} to {host}:\n{}", text(&out));
        }
    }
    assert_eq!(sniffer.seen(), vec![], "no tunnel packet may reach the host");
    let denial = agent.wait_until("egress deny", |e| e["dport"] == 4789);
    assert_eq!(denial["reason"], "deny_encapsulation", "{denial}");
}

#[test]
fn a_rule_that_names_the_tunnel_lets_it_through() {
    let lab = Lab::new();
    let rules = ["protocol: gre", "protocol: udp, ports: [4789]"];
    fs::write(lab.policy_path(), policy_with_extra(&lab, &rules)).expect("policy");
    let _agent = Agent::start(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());

    let out = lab.in_pod(raw_ip(EXTERNAL4, GRE));
    assert!(succeeded(&out), "GRE, named by the rule:\n{}", text(&out));
    let out = lab.in_pod(udp_sendto(EXTERNAL6, 4789));
    assert!(succeeded(&out), "VXLAN's port, named by the rule:\n{}", text(&out));
    let out = lab.in_pod(raw_ip(EXTERNAL4, IPIP));
    assert!(refused(&out), "IP-in-IP is not named:\n{}", text(&out));
    let protocols: Vec<(u8, u16)> = sniffer.seen().iter().map(|s| (s.protocol, s.dport)).collect();
    assert_eq!(protocols, vec![(GRE, 0), (17, 4789)]);
}

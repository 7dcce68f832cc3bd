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

/// A tunnel device made inside the pod's network namespace towards the external host (which
/// the policy's `any` rule covers), and an inner packet sent through it from a cgroup with no
/// policy, so only the outer packet's judges stand between it and the host. `kind` is an
/// `ip link add ... type` with its arguments; `made_in_pod`: `ip` runs in the pod's cgroup, so
/// the kernel's tunnel socket (VXLAN's) belongs to it.
fn send_through_tunnel(lab: &Lab, kind: &[&str], made_in_pod: bool) {
    let cgroup = if made_in_pod { &lab.pod_cgroup } else { &lab.other_cgroup };
    let mut add = vec!["link", "add", "tun9"];
    add.extend_from_slice(kind);
    for args in
        [add, vec!["addr", "add", "192.168.77.1/24", "dev", "tun9"], vec!["link", "set", "tun9", "up"]]
    {
        let out = lab.pod.run(Some(cgroup), "ip", &args);
        assert!(out.status.success(), "ip {}:\n{}", args.join(" "), text(&out));
    }
    // The inner destination is on the tunnel's subnet; the sender has no policy of its own.
    let _ = lab.in_other_cgroup(udp_sendto("192.168.77.2", 9000));
    let out = lab.pod.run(None, "ip", &["link", "del", "tun9"]);
    assert!(out.status.success(), "{}", text(&out));
}

fn tunnel_policy(lab: &Lab) -> String {
    let mut text = policy_with_extra(lab, &["protocol: any"]);
    // The tc layer judges what the tunnel sends out of the pod's veth, whoever made it.
    text.push_str(&format!(
        "    interfaces:\n      - name: v-pod\n        addresses: [{}, {}]\n",
        egress_tests::lab::POD4,
        egress_tests::lab::POD6
    ));
    text
}

#[test]
fn a_vxlan_device_in_the_pods_namespace_carries_nothing_out() {
    let lab = Lab::new();
    fs::write(lab.policy_path(), policy_with_extra(&lab, &["protocol: any"])).expect("policy");
    let agent = Agent::start_on_node(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let vxlan = ["type", "vxlan", "id", "42", "remote", EXTERNAL4, "dstport", "4789"];
    // Socket hooks only, device made outside the pod's cgroup: its packets are the kernel's.
    send_through_tunnel(&lab, &vxlan, false);
    let seen = sniffer.seen();
    assert!(seen.iter().any(|s| s.dport == 4789), "without the tc layer VXLAN gets out: {seen:?}");
    sniffer.clear();

    let before = agent.lines("tc layer applied").len();
    fs::write(lab.policy_path(), tunnel_policy(&lab)).expect("policy");
    agent.wait_for("tc layer applied", before + 1);
    send_through_tunnel(&lab, &vxlan, false);
    send_through_tunnel(&lab, &vxlan, true);
    assert_eq!(sniffer.seen(), vec![], "no VXLAN packet may reach the host");
    let denial = agent.wait_until("egress deny", |e| e["dport"] == 4789);
    assert_eq!(denial["reason"], "deny_encapsulation", "{denial}");
}

#[test]
#[ignore = "needs GRE and IPIP, which this host's kernel lacks: `cargo xtask vm` runs it on Debian's kernels"]
fn gre_and_ipip_devices_in_the_pods_namespace_carry_nothing_out() {
    let lab = Lab::new();
    for module in ["ip_gre", "ipip"] {
        let out = std::process::Command::new("modprobe").arg(module).output().expect("running modprobe");
        assert!(
            out.status.success(),
            "this test needs the kernel's {module} module (`modprobe {module}` failed: {}); run it with `cargo xtask vm`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::write(lab.policy_path(), tunnel_policy(&lab)).expect("policy");
    let _agent = Agent::start_on_node(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    for kind in [
        ["type", "gre", "remote", EXTERNAL4, "local", egress_tests::lab::POD4],
        ["type", "ipip", "remote", EXTERNAL4, "local", egress_tests::lab::POD4],
    ] {
        send_through_tunnel(&lab, &kind, false);
        send_through_tunnel(&lab, &kind, true);
    }
    let tunnelled: Vec<_> =
        sniffer.seen().into_iter().filter(|s| s.protocol == GRE || s.protocol == IPIP).collect();
    assert_eq!(tunnelled, vec![], "no GRE or IP-in-IP packet may reach the host");
}

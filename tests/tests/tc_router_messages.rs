//! What only a router sends never leaves a pod: a router advertisement or a redirect sent from
//! the pod's network namespace through a packet socket (CAP_NET_RAW, in the default container
//! capability set) would make the node and its neighbours route through the pod. The tc layer
//! passes only a host's own link control (solicitations, neighbour discovery, MLD). Each message
//! is first shown to take effect without the tc layer, so the test fails if the check goes.

use std::{fs, net::Ipv6Addr, time::Duration};

use egress_tests::{
    agent::Agent,
    client::{succeeded, tcp},
    frames,
    lab::{GATEWAY_PORT, GATEWAY6, Lab, text},
    listen::Server,
    netns::NetNs,
    sniff::Sniffer,
    sock, wait_until,
};

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The prefix the advertisement's Route Information option announces.
const ADVERTISED: &str = "2001:db8:bad::/48";

/// A router advertisement: default router for 1800 s with high preference, a route for
/// `ADVERTISED`, and the sender's link-layer address.
fn router_advertisement(mac: [u8; 6]) -> Vec<u8> {
    let mut m = vec![134, 0, 0, 0, 64, 0x08, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&mac);
    // Route Information (RFC 4191): length 2 (16 bytes), /48, high preference, 1800 s.
    m.extend_from_slice(&[24, 2, 48, 0x08, 0, 0, 0x07, 0x08]);
    m.extend_from_slice(&"2001:db8:bad::".parse::<Ipv6Addr>().expect("literal").octets()[..8]);
    m
}

/// A redirect telling the receiver to reach `destination` through `target`.
fn redirect(target: Ipv6Addr, destination: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![137, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&destination.octets());
    m
}

/// Routes a router advertisement installed in `ns`, as `ip -6 route` prints them.
fn ra_routes(ns: &NetNs) -> String {
    let out = ns.run(None, "ip", &["-6", "route", "show", "proto", "ra"]);
    assert!(out.status.success(), "ip -6 route in {}:\n{}", ns.name, text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The receivers accept advertisements as a node without IPv6 forwarding does, routes from
/// Route Information options included.
fn accept_advertisements(lab: &Lab) {
    for (ns, dev) in [(&lab.node, "br0"), (&lab.external, "eth0")] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.forwarding"), "0").expect("sysctl");
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_ra"), "1").expect("sysctl");
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_ra_rt_info_max_plen"), "64").expect("sysctl");
    }
}

#[test]
fn router_advertisements_and_redirects_from_a_pod_are_dropped_at_the_veth() {
    let lab = Lab::new();
    accept_advertisements(&lab);
    lab.write_policy("enforce");
    let agent = Agent::start_on_node(&lab);
    let pod_mac = frames::mac(&lab.pod, "eth0");
    let pod_ll = frames::link_local(&lab.pod, "eth0");
    let ext_ll = frames::link_local(&lab.external, "eth0");
    let ext_mac = frames::mac(&lab.external, "eth0");
    let ra = frames::icmp6(
        pod_mac,
        frames::multicast_mac(ALL_NODES),
        pod_ll,
        ALL_NODES,
        &router_advertisement(pod_mac),
    );
    let steer: Ipv6Addr = "2001:db8:bad::1".parse().expect("literal");
    let redirect = frames::icmp6(pod_mac, ext_mac, pod_ll, ext_ll, &redirect(pod_ll, steer));

    // Socket hooks only: the advertisement takes effect on the node and on its neighbour.
    frames::send(&lab.pod, &lab.pod_cgroup, &ra);
    for ns in [&lab.node, &lab.external] {
        wait_until(&format!("the advertisement's routes in {}", ns.name), Duration::from_secs(5), || {
            let routes = ra_routes(ns);
            routes.contains("default via fe80") && routes.contains(ADVERTISED)
        });
        ns.ip(&["-6", "route", "flush", "proto", "ra"]).expect("flush");
    }

    let before = agent.lines("tc layer applied").len();
    fs::write(lab.policy_path(), lab.policy_text_with_veth("enforce")).expect("policy");
    agent.wait_for("tc layer applied", before + 1);
    let sniff = Sniffer::start(&lab.external, &[pod_ll.into()]);
    frames::send(&lab.pod, &lab.pod_cgroup, &ra);
    frames::send(&lab.pod, &lab.pod_cgroup, &redirect);
    let seen = sniff.seen();
    assert!(seen.iter().all(|s| s.icmp6_type != 134 && s.icmp6_type != 137), "arrived: {seen:?}");
    for ns in [&lab.node, &lab.external] {
        assert_eq!(ra_routes(ns), "", "routes in {} are unchanged", ns.name);
    }
    let denial = agent.wait_until("egress deny", |l| l["hook"] == "tc/from_pod" && l["protocol"] == "icmpv6");
    assert_eq!(denial["src"], pod_ll.to_string(), "{denial}");

    // A host's own neighbour discovery still works: IPv6 to the gateway needs it.
    lab.pod.ip(&["-6", "neigh", "flush", "dev", "eth0"]).expect("flush");
    let _gw = Server::tcp_http(&lab.gateway, sock(GATEWAY6, GATEWAY_PORT));
    let out = lab.in_pod(tcp(GATEWAY6, GATEWAY_PORT));
    assert!(succeeded(&out), "the gateway over IPv6 after a neighbour flush:\n{}", text(&out));
}

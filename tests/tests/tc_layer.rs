//! The tc layer on the pod's veth: what the socket hooks cannot see (packet-socket frames, sockets
//! of other cgroups used inside the pod's network namespace, spoofed sources) is dropped where the
//! pod's frames enter the node, while the gateway, DNS and replies to inbound connections still
//! flow. Each denial is first shown to get through without the tc layer, so the tests can fail.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_tests::{
    agent::{self, Agent},
    client::{succeeded, tcp, udp_request},
    frames,
    lab::{DNS4, DNS6, EXTERNAL4, EXTERNAL6, GATEWAY_PORT, GATEWAY4, GATEWAY6, Lab, POD4, POD6, text},
    listen::Server,
    sniff::Sniffer,
    sock,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// The policy without the tc layer, then with it (reloaded in place); returns the agent.
fn agent_with_veth(lab: &Lab) -> Agent {
    fs::write(lab.policy_path(), lab.policy_text_with_veth("enforce")).expect("policy");
    let agent = Agent::start_on_node(lab);
    let applied = agent.wait_for("tc layer applied", 1);
    assert_eq!(applied.first().map(|l| l["enforced"].clone()), Some(1.into()), "{}", agent.log_text());
    agent
}

fn use_veth(lab: &Lab, agent: &Agent, with: bool) {
    let before = agent.lines("tc layer applied").len();
    let text = if with { lab.policy_text_with_veth("enforce") } else { lab.policy_text("enforce") };
    fs::write(lab.policy_path(), text).expect("policy");
    agent.wait_for("tc layer applied", before + 1);
}

fn pod_udp_frame(lab: &Lab, src: &str, dst: &str, dst_ns_mac: [u8; 6]) -> Vec<u8> {
    frames::udp(frames::mac(&lab.pod, "eth0"), dst_ns_mac, ip(src), ip(dst), 9999, b"exfil")
}

#[test]
fn packet_socket_frames_to_an_external_address_are_dropped_at_the_veth() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start_on_node(&lab);
    let ext_mac = frames::mac(&lab.external, "eth0");
    let sniff = Sniffer::start(&lab.external, &[ip(POD4), ip(POD6)]);
    let v4 = pod_udp_frame(&lab, POD4, EXTERNAL4, ext_mac);
    let v6 = pod_udp_frame(&lab, POD6, EXTERNAL6, ext_mac);

    // Socket hooks only: a packet socket goes straight past them.
    frames::send(&lab.pod, &lab.pod_cgroup, &v4);
    frames::send(&lab.pod, &lab.pod_cgroup, &v6);
    let seen = sniff.seen();
    assert_eq!(seen.len(), 2, "without the tc layer both frames arrive: {seen:?}");

    sniff.clear();
    use_veth(&lab, &agent, true);
    frames::send(&lab.pod, &lab.pod_cgroup, &v4);
    frames::send(&lab.pod, &lab.pod_cgroup, &v6);
    assert_eq!(sniff.seen(), vec![], "the tc layer drops them");
    let denial = agent.wait_until("egress deny", |l| l["hook"] == "tc/from_pod" && l["dst"] == EXTERNAL4);
    assert_eq!(denial["reason"], "deny_destination", "{denial}");
    assert_eq!(denial["src"], POD4, "{denial}");
}

#[test]
fn a_socket_of_an_unenforced_cgroup_used_in_the_pods_namespace_is_dropped_at_the_veth() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start_on_node(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    // A process outside the pod's cgroup, inside its network namespace (a socket passed over a
    // unix socket, or a process moved to another cgroup, looks the same to the kernel).
    let out = lab.in_other_cgroup(tcp(EXTERNAL4, 80));
    assert!(succeeded(&out), "without the tc layer it connects:\n{}", text(&out));
    assert_eq!(web.hits(), 1);

    use_veth(&lab, &agent, true);
    let out = lab.in_other_cgroup(tcp(EXTERNAL4, 80));
    assert!(!succeeded(&out), "with the tc layer it must not connect:\n{}", text(&out));
    let out = lab.in_other_cgroup(tcp(EXTERNAL6, 80));
    assert!(!succeeded(&out), "nor over IPv6:\n{}", text(&out));
    assert_eq!(web.hits(), 1, "no new connection reached the external host");
    agent.wait_until("egress deny", |l| l["hook"] == "tc/from_pod" && l["dport"] == 80);
}

#[test]
fn gateway_dns_and_replies_to_inbound_connections_still_flow() {
    let lab = Lab::new();
    let _agent = agent_with_veth(&lab);
    let _gw4 = Server::tcp_http(&lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    let _gw6 = Server::tcp_http(&lab.gateway, sock(GATEWAY6, GATEWAY_PORT));
    let _dns4 = Server::udp_echo(&lab.gateway, sock(DNS4, 53));
    let _dns6 = Server::udp_echo(&lab.gateway, sock(DNS6, 53));
    for (what, client) in [
        ("gateway over IPv4", tcp(GATEWAY4, GATEWAY_PORT)),
        ("gateway over IPv6", tcp(GATEWAY6, GATEWAY_PORT)),
        ("DNS over IPv4", udp_request(DNS4, 53)),
        ("DNS over IPv6", udp_request(DNS6, 53)),
    ] {
        let out = lab.in_pod(client.clone());
        assert!(succeeded(&out), "{what} from the pod:\n{}", text(&out));
        // The tc layer judges by the pod's policy, not by the socket's cgroup.
        let out = lab.in_other_cgroup(client);
        assert!(succeeded(&out), "{what} from another cgroup in the pod's namespace:\n{}", text(&out));
    }
    // A peer connecting in (a kubelet probe, a Service client) gets its replies.
    let _pod_web = Server::tcp_http(&lab.pod, sock(POD4, 8080));
    let out = lab.external.run(None, "curl", &["-sS", "--max-time", "3", &format!("http://{POD4}:8080/")]);
    assert!(succeeded(&out), "an inbound connection to the pod is answered:\n{}", text(&out));
    // ...but the pod cannot open one to the same peer.
    let _ext_web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 8080));
    assert!(!succeeded(&lab.in_other_cgroup(tcp(EXTERNAL4, 8080))));
}

#[test]
fn spoofed_sources_are_dropped_even_towards_the_gateway() {
    let lab = Lab::new();
    let agent = agent_with_veth(&lab);
    let gw_mac = frames::mac(&lab.gateway, "eth0");
    let spoofed4 = "10.231.0.99";
    let spoofed6 = "fd00:231::99";
    let sniff = Sniffer::start(&lab.gateway, &[ip(POD4), ip(POD6), ip(spoofed4), ip(spoofed6)]);
    // The pod's own address towards the gateway port passes: the frames are well formed.
    frames::send(&lab.pod, &lab.pod_cgroup, &pod_udp_frame(&lab, POD4, GATEWAY4, gw_mac));
    let seen = sniff.seen();
    assert_eq!(
        seen.len(),
        0,
        "UDP to the gateway is not allowed at all (its rule is TCP {GATEWAY_PORT}): {seen:?}"
    );
    let mut frame = frames::udp(frames::mac(&lab.pod, "eth0"), gw_mac, ip(POD4), ip(DNS4), 53, b"q");
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(sniff.seen().len(), 1, "a hand-made DNS query from the pod's own address arrives");

    sniff.clear();
    frame = frames::udp(frames::mac(&lab.pod, "eth0"), gw_mac, ip(spoofed4), ip(DNS4), 53, b"q");
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    frame = frames::udp(frames::mac(&lab.pod, "eth0"), gw_mac, ip(spoofed6), ip(DNS6), 53, b"q");
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    // Another workload's address (the external host's) is just as spoofed.
    frame = frames::udp(frames::mac(&lab.pod, "eth0"), gw_mac, ip(EXTERNAL4), ip(DNS4), 53, b"q");
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(sniff.seen(), vec![], "spoofed sources are dropped");
    let denial = agent.wait_until("egress deny", |l| l["reason"] == "deny_spoofed_source");
    assert_eq!(denial["hook"], "tc/from_pod", "{denial}");
}

#[test]
fn frames_that_are_not_ip_are_dropped_and_arp_passes() {
    let lab = Lab::new();
    let _agent = agent_with_veth(&lab);
    let ext_mac = frames::mac(&lab.external, "eth0");
    let pod_mac = frames::mac(&lab.pod, "eth0");
    // IEEE local experimental Ethertype: the bridge would switch it to the external host.
    let mut frame = frames::ethernet(pod_mac, ext_mac, 0x88b5);
    frame.extend_from_slice(&[0x42; 46]);
    let before = counter(&lab, "deny_not_ip");
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(counter(&lab, "deny_not_ip"), before + 1);
    // ARP keeps working: the pod resolves the gateway (a fresh neighbour entry needs ARP).
    lab.pod.ip(&["neigh", "flush", "dev", "eth0"]).expect("flush");
    let _gw = Server::tcp_http(&lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    assert!(succeeded(&lab.in_pod(tcp(GATEWAY4, GATEWAY_PORT))));
    assert!(counter(&lab, "allow_link_control") > 0);
}

/// The link-layer address `ns` has for `addr` on eth0, if any.
fn neighbour(ns: &egress_tests::netns::NetNs, addr: &str) -> Option<String> {
    let out = ns.run(None, "ip", &["-j", "-4", "neigh", "show", addr, "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j neigh");
    v[0]["lladdr"].as_str().map(str::to_owned)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// ARP that claims an address the pod does not have (here the external host's) would make its
/// neighbours on the bridge send that address's traffic to the pod. Dropped at the veth; ARP for
/// the pod's own address, and probes (sender 0.0.0.0), still pass.
#[test]
fn arp_claiming_an_address_that_is_not_the_pods_is_dropped() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start_on_node(&lab);
    let pod_mac = frames::mac(&lab.pod, "eth0");
    let (pod4, gateway4, external4) =
        (POD4.parse().unwrap(), GATEWAY4.parse().unwrap(), EXTERNAL4.parse().unwrap());
    // "The external host is at the pod's MAC", asked of the gateway, which learns the sender.
    let poison = frames::arp(1, pod_mac, external4, gateway4, [0xff; 6]);
    let forget = || lab.gateway.ip(&["neigh", "flush", "dev", "eth0"]).expect("flush");

    // Socket hooks only: the gateway takes the pod's word for it.
    forget();
    frames::send(&lab.pod, &lab.pod_cgroup, &poison);
    assert_eq!(
        neighbour(&lab.gateway, EXTERNAL4),
        Some(mac_text(pod_mac)),
        "without the tc layer it poisons"
    );

    forget();
    use_veth(&lab, &agent, true);
    let before = counter(&lab, "deny_spoofed_source");
    frames::send(&lab.pod, &lab.pod_cgroup, &poison);
    // A reply to the gateway's own MAC, the other shape of the same lie.
    let gateway_mac = frames::mac(&lab.gateway, "eth0");
    frames::send(&lab.pod, &lab.pod_cgroup, &frames::arp(2, pod_mac, external4, gateway4, gateway_mac));
    assert_eq!(neighbour(&lab.gateway, EXTERNAL4), None, "the tc layer drops ARP for another's address");
    assert_eq!(counter(&lab, "deny_spoofed_source"), before + 2);
    let denial = agent.wait_until("egress deny", |l| l["reason"] == "deny_spoofed_source");
    assert_eq!(denial["hook"], "tc/from_pod", "{denial}");

    // The pod's own address, and a probe that claims nothing, pass.
    frames::send(&lab.pod, &lab.pod_cgroup, &frames::arp(1, pod_mac, pod4, gateway4, [0xff; 6]));
    assert_eq!(
        neighbour(&lab.gateway, POD4),
        Some(mac_text(pod_mac)),
        "ARP for the pod's own address passes"
    );
    let allowed = counter(&lab, "allow_link_control");
    frames::send(
        &lab.pod,
        &lab.pod_cgroup,
        &frames::arp(1, pod_mac, Ipv4Addr::UNSPECIFIED, gateway4, [0xff; 6]),
    );
    assert!(counter(&lab, "allow_link_control") > allowed, "an ARP probe passes");
}

/// The same lie in IPv6: an unsolicited neighbour advertisement (override flag set) whose target
/// is another host's address updates the entry its neighbours have for that address. Dropped at
/// the veth, from the pod's own address as from a link-local one; advertisements of the pod's own
/// address still pass.
#[test]
fn neighbour_advertisements_for_an_address_that_is_not_the_pods_are_dropped() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start_on_node(&lab);
    let pod_mac = frames::mac(&lab.pod, "eth0");
    let ext_mac = mac_text(frames::mac(&lab.external, "eth0"));
    let pod6: Ipv6Addr = POD6.parse().unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let advert = |src: Ipv6Addr, target: &str| {
        let mut message = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        message.extend_from_slice(&target.parse::<Ipv6Addr>().unwrap().octets());
        // Target link-layer address option: the pod's MAC.
        message.extend_from_slice(&[2, 1]);
        message.extend_from_slice(&pod_mac);
        frames::icmp6(pod_mac, frames::multicast_mac(all_nodes), src, all_nodes, &message)
    };
    // The gateway knows the external host (a neighbour entry an advertisement may override).
    let known = || {
        lab.gateway
            .ip(&["-6", "neigh", "replace", EXTERNAL6, "lladdr", &ext_mac, "dev", "eth0", "nud", "stale"])
            .expect("neighbour entry")
    };
    let link_local = frames::link_local(&lab.pod, "eth0");

    // Socket hooks only: the gateway takes the pod's word for it.
    known();
    frames::send(&lab.pod, &lab.pod_cgroup, &advert(pod6, EXTERNAL6));
    assert_eq!(
        neighbour6(&lab.gateway, EXTERNAL6),
        Some(mac_text(pod_mac)),
        "without the tc layer it poisons"
    );

    use_veth(&lab, &agent, true);
    let before = counter(&lab, "deny_spoofed_source");
    for src in [pod6, link_local] {
        known();
        frames::send(&lab.pod, &lab.pod_cgroup, &advert(src, EXTERNAL6));
        assert_eq!(neighbour6(&lab.gateway, EXTERNAL6), Some(ext_mac.clone()), "from {src}: dropped");
    }
    assert_eq!(counter(&lab, "deny_spoofed_source"), before + 2);

    // The pod advertising its own address passes.
    lab.gateway
        .ip(&["-6", "neigh", "replace", POD6, "lladdr", "02:00:00:00:00:09", "dev", "eth0", "nud", "stale"])
        .expect("neighbour entry");
    frames::send(&lab.pod, &lab.pod_cgroup, &advert(pod6, POD6));
    assert_eq!(neighbour6(&lab.gateway, POD6), Some(mac_text(pod_mac)), "its own address passes");
}

/// A later IPv6 fragment has no ICMPv6 header: its first payload byte may be 136 (the type of a
/// neighbour advertisement) without being one. To a destination the policy opens for every
/// protocol, such a fragment passes like any other later fragment.
#[test]
fn a_later_fragment_is_never_taken_for_a_neighbour_advertisement() {
    let lab = Lab::new();
    let policy =
        format!("{}    extra:\n      - cidr: {EXTERNAL6}/128\n", lab.policy_text_with_veth("enforce"));
    fs::write(lab.policy_path(), policy).expect("policy");
    let agent = Agent::start_on_node(&lab);
    agent.wait_for("tc layer applied", 1);
    let sniff = Sniffer::start(&lab.external, &[ip(POD6)]);
    let mut frame =
        frames::ethernet(frames::mac(&lab.pod, "eth0"), frames::mac(&lab.external, "eth0"), 0x86dd);
    let payload_len: u16 = 8 + 16;
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&payload_len.to_be_bytes());
    frame.extend_from_slice(&[44, 64]);
    frame.extend_from_slice(&POD6.parse::<Ipv6Addr>().unwrap().octets());
    frame.extend_from_slice(&EXTERNAL6.parse::<Ipv6Addr>().unwrap().octets());
    // Fragment header: ICMPv6 follows, offset 8 bytes, last fragment.
    frame.extend_from_slice(&[58, 0, 0, 8, 0x12, 0x34, 0x56, 0x78]);
    frame.extend_from_slice(&[136; 16]);
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(sniff.seen().len(), 1, "the fragment arrives:\n{}", agent.log_text());
}

fn neighbour6(ns: &egress_tests::netns::NetNs, addr: &str) -> Option<String> {
    let out = ns.run(None, "ip", &["-j", "-6", "neigh", "show", addr, "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j neigh");
    v[0]["lladdr"].as_str().map(str::to_owned)
}

fn counter(lab: &Lab, reason: &str) -> u64 {
    let out = agent::cli(lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .find(|c| c["reason"] == reason)
        .and_then(|c| c["applied"].as_u64())
        .unwrap_or_else(|| panic!("no counter {reason} in {v}"))
}

#[test]
fn a_recreated_veth_is_enforced_again_and_enforcement_survives_the_agent() {
    let lab = Lab::new();
    let mut agent = agent_with_veth(&lab);
    let ext_mac = frames::mac(&lab.external, "eth0");
    let sniff = Sniffer::start(&lab.external, &[ip(POD4)]);

    // The pod's sandbox is recreated: a new veth pair with the same names and a new ifindex.
    lab.node.ip(&["link", "del", "v-pod"]).expect("delete veth");
    egress_tests::netns::ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &lab.pod.name,
        "type",
        "veth",
        "peer",
        "name",
        "v-pod",
        "netns",
        &lab.node.name,
    ])
    .expect("recreate veth");
    lab.node.ip(&["link", "set", "v-pod", "master", "br0", "up"]).expect("bridge");
    lab.pod.ip(&["addr", "add", &format!("{POD4}/24"), "dev", "eth0"]).expect("address");
    lab.pod.ip(&["link", "set", "eth0", "up"]).expect("up");
    agent.wait_until("tc layer applied", |l| l["links_attached"].as_u64() == Some(2));
    frames::send(&lab.pod, &lab.pod_cgroup, &pod_udp_frame(&lab, POD4, EXTERNAL4, ext_mac));
    assert_eq!(sniff.seen(), vec![], "the new veth drops the frame too");

    // SIGKILL: the programs stay attached; a new agent adopts them.
    agent.kill9();
    frames::send(&lab.pod, &lab.pod_cgroup, &pod_udp_frame(&lab, POD4, EXTERNAL4, ext_mac));
    assert_eq!(sniff.seen(), vec![], "with the agent dead");
    let second = Agent::start_on_node(&lab);
    let applied = second.wait_for("tc layer applied", 1);
    let adopted =
        applied[0]["links_adopted"].as_u64().unwrap() + applied[0]["links_replaced"].as_u64().unwrap();
    assert_eq!(adopted, 2, "{applied:#?}");
    assert_eq!(applied[0]["links_attached"], 0, "{applied:#?}");
    drop(second);

    // Teardown is the one way to remove it; run where the agent runs, as on a node (clsact
    // filters, on kernels without tcx, are found by interface name in that namespace).
    let out = agent::cli_on_node(&lab, &["teardown"]);
    assert!(out.status.success(), "{}", text(&out));
    frames::send(&lab.pod, &lab.pod_cgroup, &pod_udp_frame(&lab, POD4, EXTERNAL4, ext_mac));
    assert_eq!(sniff.seen().len(), 1, "after teardown the frame passes again");
}

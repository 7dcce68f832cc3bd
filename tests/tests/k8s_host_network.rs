//! A hostNetwork pod of an enforced namespace shares the node's network namespace and has no veth,
//! so the tc layer cannot reach it; its pod cgroup still carries the policy, so everything its
//! processes send is judged by the socket hooks and the packet program.

use egress_tests::{
    client::{refused, succeeded, tcp, udp_sendto},
    fake_api::fixtures,
    kube_node::{KubeNode, NODE, eventually},
    lab::{EXTERNAL4, GATEWAY_PORT, GATEWAY4, text},
    listen::Server,
    sniff::Sniffer,
    sock,
};

const UID: &str = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";
/// The node's own address on the simulated node's bridge.
const NODE_ADDR: &str = "10.231.0.1";

#[test]
fn a_host_network_pod_is_enforced_by_its_cgroup() {
    let node = KubeNode::new();
    node.lab.node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "br0"]).expect("node address");
    node.label("ops", &[("egressfw.io/mode", "enforce")]);
    let mut pod = fixtures::pod("ops", "agentish", UID, NODE, "BestEffort", Some(NODE_ADDR));
    pod.spec.as_mut().expect("spec").host_network = Some(true);
    node.api.apply(&pod);
    let container = node.create_pod_cgroup(UID);
    let agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    // The pod's processes run in the node's network namespace.
    let in_pod = |client: (&str, Vec<String>)| {
        let args: Vec<&str> = client.1.iter().map(String::as_str).collect();
        node.lab.node.run(Some(&container), client.0, &args)
    };
    // The same client from the node itself (no pod cgroup) reaches the external host: the
    // refusals below are the pod's policy, not the network.
    let out = node.lab.node.run(None, "sh", &["-c", &format!("echo hi | socat -T2 - TCP4:{EXTERNAL4}:80")]);
    assert!(succeeded(&out), "the node itself reaches the external host:\n{}", text(&out));

    let sniffer = Sniffer::start(&node.lab.external, &[NODE_ADDR.parse().unwrap()]);
    assert!(eventually(10, || refused(&in_pod(tcp(EXTERNAL4, 80)))), "the pod's direct egress is refused");
    assert!(refused(&in_pod(udp_sendto(EXTERNAL4, 9000))));
    // The node's kernel announces its multicast memberships (IGMPv3 reports to 224.0.0.22) after
    // the address above is added, from no socket at all: not the pod's traffic.
    let seen: Vec<_> = sniffer
        .seen()
        .into_iter()
        .filter(|s| !(s.protocol == 2 && s.dst == "224.0.0.22".parse::<std::net::IpAddr>().unwrap()))
        .collect();
    assert_eq!(seen, vec![], "nothing from the pod's cgroup reaches the external host");
    let out = in_pod(tcp(GATEWAY4, GATEWAY_PORT));
    assert!(succeeded(&out), "the gateway stays reachable:\n{}", text(&out));
    let applied = agent.wait_until("policy applied", |l| l["added"].as_u64() >= Some(1));
    assert_eq!(applied["tc_interfaces"], 0, "no veth, so no tc layer: {applied}");
}

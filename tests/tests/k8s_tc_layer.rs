//! The node agent finds an enforced pod's veth from the node's route to the pod's IP, puts the tc
//! layer on it, and takes it off when the pod goes.

use egress_tests::{
    agent,
    fake_api::fixtures,
    frames,
    kube_node::{KubeNode, NODE, eventually},
    lab::text,
    preempt::Preemptor,
    routed_pod::RoutedPod,
};
use k8s_openapi::api::core::v1::Pod;

const WEB: &str = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const POD_ADDR: &str = "10.231.77.2";
const HOST_ADDR: &str = "10.231.77.1";

fn inspect(node: &KubeNode) -> serde_json::Value {
    let out = agent::cli(&node.lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

fn counter(report: &serde_json::Value, reason: &str) -> u64 {
    report["counters"].as_array().unwrap().iter().find(|c| c["reason"] == reason).unwrap()["applied"]
        .as_u64()
        .unwrap()
}

#[test]
fn an_enforced_pods_veth_is_found_by_its_route_and_gets_the_tc_layer() {
    let node = KubeNode::new();
    let pod = RoutedPod::create(&format!("{}", std::process::id() % 100_000), POD_ADDR, HOST_ADDR)
        .unwrap_or_else(|e| panic!("building the routed pod: {e:#}"));
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.api.apply(&fixtures::pod("shop", "web", WEB, NODE, "BestEffort", Some(POD_ADDR)));
    let cgroup = node.create_pod_cgroup(WEB);
    let agent = node.start_agent();

    let applied = agent.wait_until("policy applied", |l| l["tc_interfaces"] == 1);
    assert_eq!(applied["tc_links_attached"], 2, "{applied}");
    let report = inspect(&node);
    let iface = &report["interfaces"][0];
    assert_eq!(iface["name"], pod.host_side.as_str(), "{report:#}");
    assert_eq!(iface["sources"], serde_json::json!([POD_ADDR]), "{report:#}");

    // A packet-socket frame from the pod to a destination outside its policy (the node's own
    // address on the veth) is dropped at the veth.
    let before = counter(&report, "deny_destination");
    let frame = frames::udp(
        frames::mac(&pod.ns, "eth0"),
        frames::mac_root(&pod.host_side),
        POD_ADDR.parse().unwrap(),
        HOST_ADDR.parse().unwrap(),
        9999,
        b"exfil",
    );
    frames::send(&pod.ns, &cgroup, &frame);
    assert!(
        eventually(5, || counter(&inspect(&node), "deny_destination") > before),
        "the tc layer counts the dropped frame"
    );
    agent.wait_until("egress deny", |l| l["hook"] == "tc/from_pod" && l["dst"] == HOST_ADDR);

    // A program put ahead of ours (a CNI attaching later) is found on the next pass: ours is
    // moved back to the head, logged and counted, and the frame is dropped again.
    let _ahead = Preemptor::attach(None, &pod.host_side, 0x51);
    assert!(
        eventually(20, || node.metric(&["egressfw_tc_moved_to_head_total"]) >= 1.0),
        "the agent moves ours back to the head and counts it:\n{}",
        agent.log_text()
    );
    agent.wait_until("tc program moved back to the head", |l| l["interface"] == pod.host_side.as_str());
    let before = counter(&inspect(&node), "deny_destination");
    frames::send(&pod.ns, &cgroup, &frame);
    assert!(
        eventually(5, || counter(&inspect(&node), "deny_destination") > before),
        "ours judges the pod's frames first again"
    );
    assert_eq!(node.get("/readyz").0, 200, "ready once ours is first again");

    // The pod goes: its veth is released.
    assert!(node.api.delete::<Pod>(Some("shop"), "web"));
    node.remove_pod_cgroup(WEB);
    assert!(
        eventually(10, || inspect(&node)["interfaces"].as_array().is_some_and(Vec::is_empty)),
        "the interface binding is removed with the pod"
    );
    agent.wait_until("policy applied", |l| l["tc_interfaces"] == 0);
}

/// An agent run in a pod's own network namespace (a DaemonSet without hostNetwork) would find
/// every pod address behind that pod's eth0, a veth, and put another pod's policy on its own
/// interface. The route lookup refuses: a pod's interface is never the default route's.
#[test]
fn outside_the_nodes_network_namespace_no_pod_interface_is_found() {
    let pod = RoutedPod::create(&format!("{}d", std::process::id() % 100_000), "10.231.78.2", "10.231.78.1")
        .unwrap_or_else(|e| panic!("building the routed pod: {e:#}"));
    let on_node = egress_agent::routes::pod_interface("10.231.78.2".parse().unwrap());
    assert_eq!(on_node, Ok(pod.host_side.clone()), "from the node, the pod's own veth");
    let inside = pod.ns.within(|| egress_agent::routes::pod_interface("10.231.79.2".parse().unwrap()));
    let err = inside.expect_err("inside a pod, another pod's address routes through the default route");
    assert!(err.to_string().contains("hostNetwork: true"), "{err}");
}

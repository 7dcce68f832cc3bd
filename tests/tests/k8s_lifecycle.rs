//! The node agent through restarts, API outages, expired watches and configuration changes:
//! enforcement never lapses, and the agent catches up with what changed meanwhile.

use egress_tests::{
    CGROUP_PROGRAMS, agent,
    client::{refused, succeeded, tcp},
    kube_node::{KubeNode, eventually},
    lab::{EXTERNAL4, GATEWAY_PORT, GATEWAY4, text},
    listen::Server,
    sock,
};

const WEB: &str = "0f5e2d3c-1b4a-4c5d-8e7f-a1b2c3d4e5f6";
const API: &str = "1a2b3c4d-5e6f-4a0b-9c8d-7e6f5a4b3c2d";

fn blocked(node: &KubeNode, uid: &str) -> bool {
    refused(&node.in_pod(uid, tcp(EXTERNAL4, 80)))
}

fn reaches(node: &KubeNode, uid: &str) -> bool {
    succeeded(&node.in_pod(uid, tcp(EXTERNAL4, 80)))
}

/// A node with `shop` enforced and pod WEB running in it.
fn enforced_node(config_extra: &str) -> KubeNode {
    let node = KubeNode::with_config_extra(config_extra);
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    node
}

fn link_ids(node: &KubeNode) -> Vec<u64> {
    let out = agent::cli(&node.lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<u64> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["links"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l["link_id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_restarted_agent_adopts_what_is_pinned_and_catches_up() {
    let node = enforced_node("");
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let mut first = node.start_agent();
    assert!(blocked(&node, WEB));
    let before = link_ids(&node);
    assert_eq!(before.len(), CGROUP_PROGRAMS, "a link per cgroup program on the pod");

    first.kill9();
    assert!(blocked(&node, WEB), "enforcement outlives the agent");
    // Meanwhile a second pod of the namespace starts.
    node.add_pod("shop", "api", API);
    node.create_pod_cgroup(API);

    let second = node.start_agent();
    let applied = second.wait_until("policy applied", |l| l["links_adopted"] == CGROUP_PROGRAMS);
    assert_eq!(applied["links_attached"], CGROUP_PROGRAMS, "only the new pod gets new links: {applied:#}");
    assert!(eventually(5, || blocked(&node, API)), "the pod started while the agent was away is enforced");
    let after = link_ids(&node);
    assert!(before.iter().all(|id| after.contains(id)), "the first pod keeps its very links");
    assert_eq!(after.len(), 2 * CGROUP_PROGRAMS, "and nothing else is attached: {after:?}");
}

#[test]
fn an_api_outage_changes_nothing_and_the_agent_catches_up_after() {
    let node = enforced_node("");
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let agent = node.start_agent();
    assert!(blocked(&node, WEB));

    node.api.set_available(false);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(blocked(&node, WEB), "the API being down releases nothing");
    assert_eq!(node.get("/healthz").0, 200, "the agent stays live");
    node.label("shop", &[("egressfw.io/mode", "audit")]); // made while the API is unreachable

    node.api.set_available(true);
    assert!(
        eventually(15, || reaches(&node, WEB)),
        "the change made during the outage is applied once the API is back:\n{}",
        agent.log_text()
    );
}

#[test]
fn an_expired_watch_relists_and_nothing_is_missed() {
    let node = enforced_node("");
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _agent = node.start_agent();
    assert!(blocked(&node, WEB));
    let lists_before = node.api.stats().lists;

    // The watches end and cannot come back (503) until the history is gone: a watch resumed
    // between the change and the compaction would get the change itself and no 410.
    node.api.set_available(false);
    node.label("shop", &[]); // lands while the watches are down...
    node.api.compact(); // ...and the history with it: re-watching gets 410 Gone
    node.api.set_available(true);
    assert!(eventually(15, || reaches(&node, WEB)), "the relist brings the change");
    let stats = node.api.stats();
    assert!(stats.gone > 0, "a 410 was sent: {stats:?}");
    assert!(stats.lists > lists_before, "and the agent listed again: {stats:?}");
}

#[test]
fn a_bad_configuration_is_rejected_and_the_last_good_one_stays() {
    let node = enforced_node("");
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    let _alt = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, 8443));
    let agent = node.start_agent();
    assert!(succeeded(&node.in_pod(WEB, tcp(GATEWAY4, GATEWAY_PORT))));

    std::fs::write(&node.config_path, "gateways:\n  - name: main\n    service: not-a-reference\n").unwrap();
    let rejected = agent.wait_until("new agent configuration rejected", |_| true);
    assert!(rejected["error"].as_str().unwrap().contains("\"not-a-reference\""), "{rejected:#}");
    assert!(succeeded(&node.in_pod(WEB, tcp(GATEWAY4, GATEWAY_PORT))), "the last good policy stays");
    assert!(blocked(&node, WEB));

    // A good change: the gateway Service also serves 8443 and the config now allows it.
    node.api.apply(&egress_tests::fake_api::fixtures::service(
        "egress",
        "gw",
        egress_tests::kube_node::GATEWAY_CLUSTER_IP,
        &[GATEWAY_PORT, 8443],
    ));
    node.set_gateway_ports(&[GATEWAY_PORT, 8443]);
    std::fs::write(
        &node.config_path,
        format!("gateways:\n  - name: main\n    service: egress/gw\n    ports: [{GATEWAY_PORT}, 8443]\n"),
    )
    .unwrap();
    assert!(
        eventually(10, || succeeded(&node.in_pod(WEB, tcp(GATEWAY4, 8443)))),
        "the new gateway port is allowed after the reload:\n{}",
        agent.log_text()
    );
}

#[test]
fn readiness_waits_for_the_caches_and_metrics_time_the_changes() {
    let node = enforced_node("");
    node.api.set_available(false);
    let starting = node.try_start_agent_unready();
    assert!(
        eventually(5, || node.get("/readyz") == (503, "not ready: starting: caches not synced yet\n".into())),
        "not ready before the caches sync: {:?}",
        node.get("/readyz")
    );
    node.api.set_available(true);
    assert!(eventually(15, || node.get("/readyz").0 == 200), "ready once synced:\n{}", starting.log_text());
    node.label("shop", &[("egressfw.io/mode", "audit")]);
    assert!(eventually(5, || node.metric(&["egressfw_policy_apply_seconds_count"]) >= 2.0));
    let metrics = node.get("/metrics").1;
    for name in ["egressfw_map_entries{map=\"policy\"} 1", "egressfw_pods{", "egressfw_reconciles_total{"] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}

#[test]
fn denials_become_rate_limited_events_on_the_pod_when_asked() {
    let node = enforced_node("podEvents: true\n");
    let _agent = node.start_agent();
    for _ in 0..3 {
        assert!(blocked(&node, WEB));
    }
    assert!(eventually(10, || !node.api.events().is_empty()), "a pod Event is recorded for the denial");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let events = node.api.events();
    assert_eq!(events.len(), 1, "one Event per pod per minute: {events:#?}");
    let e = &events[0];
    assert_eq!(e["reason"], "EgressDenied", "{e:#}");
    assert_eq!(e["regarding"]["name"], "web", "{e:#}");
    assert!(e["note"].as_str().unwrap().contains(EXTERNAL4), "{e:#}");
}

//! Client identities when pod IPs are reused: the newest running pod owns an address, a pod
//! that terminates gives it up (to an older pod still running there, if any), and late events
//! about the old pod do not hand its namespace back. Pods come from the fake API server.

use std::time::Duration;

use egress_tests::{
    fake_api::fixtures,
    gateway::{GatewayLab, PROXY_PORT, STRANGER4, status_and_body, wait_until},
    lab::GATEWAY4,
};
use serde_json::{Value, json};

/// A second address in the pod namespace, for a pod whose identity marks that the gateway has
/// seen every event before it (watch events arrive in order).
const MARKER4: &str = "10.231.0.14";

/// A running pod (JSON, for `apply_json`) created at `created`.
fn pod(ns: &str, name: &str, ip: &str, created: &str) -> Value {
    let mut v = serde_json::to_value(fixtures::pod(
        ns,
        name,
        &format!("uid-{name}"),
        "node-1",
        "BestEffort",
        Some(ip),
    ))
    .expect("pod JSON");
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Pod");
    v["metadata"]["creationTimestamp"] = json!(created);
    v
}

#[test]
fn a_reused_pod_ip_belongs_to_the_newest_running_pod() {
    let g = GatewayLab::new();
    g.lab.pod.ip(&["addr", "add", &format!("{MARKER4}/24"), "dev", "eth0"]).expect("marker address");
    // team-b may reach www only, team-c api only: what a source may reach tells its namespace.
    let (api, gw) = g.start_with_pod_watch("api.example.test");
    let proxy = format!("http://{GATEWAY4}:{PROXY_PORT}");
    let status = |source: &str, url: &str| status_and_body(&g.curl(source, &["--proxy", &proxy, url])).0;
    let who = |source: &str| match (
        status(source, "http://www.example.test/"),
        status(source, "http://api.example.test/"),
    ) {
        (200, 403) => "team-b",
        (403, 200) => "team-c",
        (403, 403) => "nobody",
        other => panic!("unexpected statuses {other:?}"),
    };
    let becomes = |what: &str, ns: &str| {
        wait_until(&format!("{what}: {STRANGER4} in {ns}"), Duration::from_secs(5), || who(STRANGER4) == ns);
    };

    let old = pod("team-b", "old", STRANGER4, "2024-01-01T00:00:00Z");
    api.apply_json(old.clone());
    becomes("a running pod", "team-b");
    api.apply_json(pod("team-c", "new", STRANGER4, "2024-02-01T00:00:00Z"));
    becomes("a newer pod on the same address", "team-c");

    // A late update of the old pod (its status, a label) must not take the address back.
    let mut late = old.clone();
    late["metadata"]["labels"] = json!({"touched": "yes"});
    api.apply_json(late);
    api.apply_json(pod("team-b", "marker", MARKER4, "2024-03-01T00:00:00Z"));
    wait_until("the marker pod", Duration::from_secs(5), || {
        status(MARKER4, "http://www.example.test/") == 200
    });
    assert_eq!(who(STRANGER4), "team-c", "an update of the older pod took its address back");

    // The newer pod goes: the older one, still running there, owns the address again.
    assert!(api.delete::<k8s_openapi::api::core::v1::Pod>(Some("team-c"), "new"));
    becomes("the newer pod deleted", "team-b");

    // A terminating pod (deletionTimestamp set) no longer owns its address.
    let mut terminating = old;
    terminating["metadata"]["deletionTimestamp"] = json!("2024-04-01T00:00:00Z");
    api.apply_json(terminating);
    becomes("the older pod terminating", "nobody");
    gw.wait_access("team-c was served", |v| v["namespace"] == "team-c" && v["decision"] == "allow");
}

//! The node agent against a fake API server and real kernel enforcement: namespace labels,
//! endpoint changes, pod lifecycle, restarts and API outages, proven with real traffic.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::Stdio,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use egress_tests::{
    client::{refused, succeeded, tcp, udp_request},
    fake_api::fixtures,
    kube_node::{Driver, KubeNode, NODE, eventually},
    lab::{DNS4, EXTERNAL4, GATEWAY_PORT, GATEWAY4, Lab, text},
    listen::Server,
    sniff::Sniffer,
    sock,
};

const WEB: &str = "0f5e2d3c-1b4a-4c5d-8e7f-a1b2c3d4e5f6";
const API: &str = "1a2b3c4d-5e6f-4a0b-9c8d-7e6f5a4b3c2d";

fn reaches(node: &KubeNode, uid: &str, host: &str, port: u16) -> bool {
    succeeded(&node.in_pod(uid, tcp(host, port)))
}

fn blocked(node: &KubeNode, uid: &str, host: &str, port: u16) -> bool {
    refused(&node.in_pod(uid, tcp(host, port)))
}

#[test]
fn labelling_a_namespace_enforces_its_pods_and_unlabelling_releases_them() {
    let node = KubeNode::new();
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    let _dns = Server::udp_echo(&node.lab.gateway, sock(DNS4, 53));
    assert!(reaches(&node, WEB, EXTERNAL4, 80), "an unlabelled namespace is not enforced");

    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    assert!(eventually(5, || blocked(&node, WEB, EXTERNAL4, 80)), "labelled enforce: direct egress refused");
    let sniffer = Sniffer::start(&node.lab.external, &Lab::pod_sources());
    assert!(blocked(&node, WEB, EXTERNAL4, 80));
    assert_eq!(sniffer.seen(), vec![], "nothing from the pod reaches the external host");
    assert!(reaches(&node, WEB, GATEWAY4, GATEWAY_PORT), "the gateway backend stays reachable");
    let out = node.in_pod(WEB, udp_request(DNS4, 53));
    assert!(succeeded(&out), "DNS backend on 53:\n{}", text(&out));

    // Verdicts are logged and counted with the pod's name.
    let deny = agent.wait_until("egress deny", |e| e["dst"] == EXTERNAL4);
    assert_eq!((deny["namespace"].as_str(), deny["pod"].as_str()), (Some("shop"), Some("web")), "{deny:#}");
    assert!(
        node.metric(&["egressfw_denials_total", "namespace=\"shop\"", "pod=\"web\"", "deny_destination"])
            >= 1.0,
        "{}",
        node.get("/metrics").1
    );

    node.label("shop", &[]);
    assert!(eventually(5, || reaches(&node, WEB, EXTERNAL4, 80)), "unlabelled: released");
    assert!(
        !node
            .lab
            .pin_dir
            .join("links")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().parse::<u64>().is_ok() }),
        "released pods keep no links"
    );
}

#[test]
fn audit_mode_passes_traffic_and_reports_it() {
    let node = KubeNode::new();
    node.label("shop", &[("egressfw.io/mode", "audit")]);
    node.add_pod("shop", "api", API);
    node.create_pod_cgroup(API);
    let agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    assert!(reaches(&node, API, EXTERNAL4, 80), "audit lets traffic through");
    let audit = agent.wait_until("egress audit", |e| e["dst"] == EXTERNAL4);
    assert_eq!(audit["pod"], "api", "{audit:#}");

    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    assert!(eventually(5, || blocked(&node, API, EXTERNAL4, 80)), "switched to enforce");
}

#[test]
fn gateway_endpoint_changes_follow_the_endpointslices() {
    let node = KubeNode::new();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let _agent = node.start_agent();
    let _old = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    let _new = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, GATEWAY_PORT));
    assert!(reaches(&node, WEB, GATEWAY4, GATEWAY_PORT));
    assert!(blocked(&node, WEB, EXTERNAL4, GATEWAY_PORT));

    // The gateway moves: the new backend opens, the old one closes.
    node.set_gateway_backends(&[EXTERNAL4]);
    assert!(eventually(5, || reaches(&node, WEB, EXTERNAL4, GATEWAY_PORT)), "new gateway backend allowed");
    assert!(blocked(&node, WEB, GATEWAY4, GATEWAY_PORT), "old gateway backend no longer allowed");
}

/// Waits (spinning) for a cgroup to appear, moves itself into it the instant it does, and sends
/// UDP datagrams as fast as it can; prints what happened as JSON.
const RACER: &str = r#"
import json, os, socket, sys, time
cg, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
procs = os.path.join(cg, "cgroup.procs")
deadline = time.monotonic() + 20
# Told before spinning, so the test creates the cgroup while this loop is already watching.
print("spinning", file=sys.stderr, flush=True)
while not os.path.exists(procs):
    if time.monotonic() > deadline:
        sys.exit("cgroup never appeared")
seen = time.monotonic()
with open(procs, "w") as f:
    f.write("0")
# A socket belongs to the cgroup it was created in: create it inside, as a container would.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = refused = other = 0
first = None
for _ in range(n):
    try:
        s.sendto(b"x", (host, port))
        sent += 1
    except PermissionError:
        refused += 1
    except OSError:
        other += 1
    if first is None:
        first = time.monotonic() - seen
print(json.dumps({"sent": sent, "refused": refused, "other": other, "first_send_after_s": first}))
"#;

#[test]
fn a_new_pod_is_enforced_from_the_instant_its_cgroup_appears() {
    let node = KubeNode::new();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    let _agent = node.start_agent();
    let gate = node.lab.pin_dir.join("links/gate");
    assert!(!gate.exists(), "no pending pod: no gate");

    // The scheduler binds the pod; the agent sees it before the kubelet creates its cgroup.
    node.add_pod("shop", "web", WEB);
    assert!(
        eventually(5, || node.metric(&["egressfw_pod_start_gate_attached"]) == 1.0),
        "a pending pod of an enforced namespace raises the pod-start gate"
    );
    assert!(gate.join("egress_skb").exists());

    let sniffer = Sniffer::start(&node.lab.external, &Lab::pod_sources());
    let mut racer = node
        .lab
        .pod
        .command("python3", Some(&node.lab.other_cgroup))
        .args(["-c", RACER])
        .arg(node.pod_cgroup(WEB))
        .args([EXTERNAL4, "9000", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the racer");
    // The racer says when it spins; the cgroup comes only then.
    let mut racer_err = BufReader::new(racer.stderr.take().expect("racer stderr"));
    let mut line = String::new();
    let _ = racer_err.read_line(&mut line);
    assert_eq!(line.trim(), "spinning", "the racer did not start its loop");
    node.create_pod_cgroup(WEB); // what the kubelet does
    let out = racer.wait_with_output().expect("racer output");
    let mut rest = String::new();
    let _ = racer_err.read_to_string(&mut rest);
    assert!(out.status.success(), "racer failed:\n{}{rest}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("racer prints JSON");
    assert_eq!(report["sent"], 0, "every datagram from the new pod must be refused: {report}");
    assert_eq!(report["refused"], 3000, "{report}");
    // Moving into the cgroup takes a few ms; the agent reacting to the new cgroup takes longer.
    assert!(report["first_send_after_s"].as_f64().unwrap() < 0.5, "the racer sent at once: {report}");
    assert_eq!(sniffer.seen(), vec![], "nothing from the new pod reached the external host");

    // The agent then enforces the pod itself and lowers the gate.
    assert!(
        eventually(5, || node.metric(&["egressfw_pod_start_gate_attached"]) == 0.0),
        "gate lowered once the pod is enforced"
    );
    assert!(!gate.exists());
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "the pod's own policy holds after the gate is gone");
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    assert!(reaches(&node, WEB, GATEWAY4, GATEWAY_PORT), "and lets the gateway through");
}

#[test]
fn pods_of_other_namespaces_keep_working_while_the_gate_is_up() {
    let node = KubeNode::new();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.label("free", &[]);
    node.add_pod("free", "batch", API);
    node.create_pod_cgroup(API);
    let _agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    node.add_pod("shop", "web", WEB); // pending: the gate goes up
    assert!(eventually(5, || node.metric(&["egressfw_pod_start_gate_attached"]) == 1.0));
    assert!(reaches(&node, API, EXTERNAL4, 80), "a known pod of an unlabelled namespace passes the gate");
    // An unknown cgroup under the pods root (a pod the agent has not seen) is held back.
    let stranger = node.pods_root.join("besteffort/podffffffff-0000-4000-8000-000000000000");
    std::fs::create_dir_all(&stranger).unwrap();
    let out = node.lab.in_cgroup(&stranger, tcp(EXTERNAL4, 80));
    assert!(refused(&out), "unknown pod cgroup while the gate is up:\n{}", text(&out));
}

#[test]
fn a_deleted_pod_leaves_nothing_behind() {
    let node = KubeNode::new();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let agent = node.start_agent();
    assert!(eventually(5, || node.metric(&["egressfw_map_entries", "map=\"policy\""]) == 1.0));
    // As in a cluster: the API marks the pod for deletion, the kubelet stops it and removes its
    // cgroup, then the object goes.
    let mut pod = fixtures::pod("shop", "web", WEB, NODE, "BestEffort", None);
    pod.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    node.api.apply(&pod);
    node.remove_pod_cgroup(WEB);
    node.api.delete::<k8s_openapi::api::core::v1::Pod>(Some("shop"), "web");
    assert!(
        eventually(5, || node.metric(&["egressfw_map_entries", "map=\"policy\""]) == 0.0),
        "policy entry removed"
    );
    assert!(eventually(5, || node.metric(&["egressfw_map_entries", "map=\"allow_v4\""]) == 0.0));
    // (A pass that sees the cgroup gone before the watch reports the deletion raises the gate
    // for a moment; the deletion lowers it.)
    let links = || std::fs::read_dir(node.lab.pin_dir.join("links")).unwrap().flatten().count();
    assert!(eventually(5, || links() == 0), "link pins left:\n{}", agent.log_text());
}

#[test]
fn the_agent_finds_its_own_pod_cgroup_to_exempt_it_from_the_gate() {
    use egress_agent::k8s::{own_pod, pod_cgroup::PodsRoot};
    let node = KubeNode::new();
    let ctr = node.create_pod_cgroup(API);
    let mut child = node.lab.pod.command("sleep", Some(&ctr)).arg("30").spawn().expect("sleep");
    let root = PodsRoot::at(node.pods_root.clone()).unwrap();
    assert_eq!(own_pod::find_pid(&root, child.id()), Some(node.pod_cgroup(API)));
    assert_eq!(own_pod::find_pid(&root, std::process::id()), None, "the test runner is in no pod");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn pods_are_found_and_enforced_with_the_systemd_cgroup_driver_too() {
    let node = KubeNode::with_driver(Driver::Systemd);
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    assert!(node.pod_cgroup(WEB).to_string_lossy().contains("kubepods-besteffort-pod0f5e2d3c_1b4a_"));
    let agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    assert!(eventually(5, || blocked(&node, WEB, EXTERNAL4, 80)), "{}", agent.log_text());
    assert!(reaches(&node, WEB, GATEWAY4, GATEWAY_PORT));
    let start = agent.wait_until("starting node agent", |_| true);
    assert_eq!(start["cgroup_driver"], "Systemd", "{start:#}");
}

/// Issue 15 on Kubernetes: a gateway that steers carries an unmodified pod's TCP connects to
/// port 443 to its Service, and a namespace labelled `egressfw.io/steering=off` keeps EPERM.
#[test]
fn a_steering_gateway_carries_unmodified_https_to_its_service_unless_the_namespace_opts_out() {
    const STEERED_TO: u16 = 8443;
    let node = KubeNode::new();
    std::fs::write(
        &node.config_path,
        format!(
            "gateways:\n  - name: main\n    service: egress/gw\n    ports: [{GATEWAY_PORT}, {STEERED_TO}]\n    steer: [{{port: 443, to: {STEERED_TO}}}]\ndns:\n  service: kube-system/kube-dns\n"
        ),
    )
    .unwrap();
    // The lab has no kube-proxy to carry a virtual ClusterIP: the Service's ClusterIP is the lab
    // gateway's own address, where a listener stands for the gateway's SNI port.
    node.api.apply(&fixtures::service("egress", "gw", GATEWAY4, &[GATEWAY_PORT, STEERED_TO]));
    node.set_gateway_ports(&[GATEWAY_PORT, STEERED_TO]);
    let listener = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, STEERED_TO));
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let _agent = node.start_agent();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    // Nothing listens on the external host's 443: a connection there succeeds only if it was
    // carried to the gateway's listener.
    assert!(eventually(5, || reaches(&node, WEB, EXTERNAL4, 443)), "steered to the gateway Service");
    assert!(listener.hits() >= 1, "the gateway's listener got the connection");
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "a port the gateway does not steer keeps EPERM");

    node.label("shop", &[("egressfw.io/mode", "enforce"), ("egressfw.io/steering", "off")]);
    assert!(eventually(5, || blocked(&node, WEB, EXTERNAL4, 443)), "steering turned off by the namespace");
}

/// Issue 17's first shapes: an existing proxy outside the cluster as the gateway (by address and
/// port, no Service), and a gateway group (a Service and that address): a namespace reaches
/// exactly its gateway's members. Which gateways a namespace may select is the agent
/// configuration's to say, not the namespace's label: a gateway that does not admit the namespace
/// leaves it on the default gateway, logged and counted.
#[test]
fn an_address_gateway_and_a_gateway_group_reach_their_members_and_nothing_else() {
    const PROXY_PORT: u16 = 8080;
    let node = KubeNode::new();
    std::fs::write(
        &node.config_path,
        format!(
            "gateways:\n  - name: main\n    service: egress/gw\n    ports: [{GATEWAY_PORT}]\n  - name: corporate\n    addresses: [{{address: {EXTERNAL4}, ports: [{PROXY_PORT}]}}]\n    allowedNamespaces: {{names: [legacy]}}\n  - name: group\n    services: [{{service: egress/gw, ports: [{GATEWAY_PORT}]}}]\n    addresses: [{{address: {EXTERNAL4}, ports: [{PROXY_PORT}]}}]\n    allowedNamespaces: {{names: [shop]}}\ndefaultGateway: main\ndns:\n  service: kube-system/kube-dns\n"
        ),
    )
    .unwrap();
    // The "corporate proxy" listens on the external host, next to a web server on 80.
    let _proxy = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, PROXY_PORT));
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _gateway = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let agent = node.start_agent();

    // shop's owner labels it for the corporate proxy, which admits only `legacy`.
    node.label("shop", &[("egressfw.io/mode", "enforce"), ("egressfw.io/gateway", "corporate")]);
    assert!(
        eventually(5, || node.metric(&[
            "egressfw_gateway_refused_pods",
            "namespace=\"shop\"",
            "gateway=\"corporate\""
        ]) == 1.0),
        "the refused selection is counted:\n{}",
        node.get("/metrics").1
    );
    assert!(blocked(&node, WEB, EXTERNAL4, PROXY_PORT), "a gateway that does not admit the namespace");
    assert!(reaches(&node, WEB, GATEWAY4, GATEWAY_PORT), "the default gateway instead");
    let narrowed = agent.wait_until("policy narrowed", |l| {
        l["problem"].as_str().is_some_and(|p| p.contains("selects gateway \"corporate\""))
    });
    assert!(narrowed["problem"].as_str().unwrap().contains("default gateway \"main\""), "{narrowed}");

    // The address gateway, for a namespace it admits (shop is renamed in the configuration).
    std::fs::write(
        &node.config_path,
        std::fs::read_to_string(&node.config_path)
            .unwrap()
            .replace("names: [legacy]", "names: [legacy, shop]"),
    )
    .unwrap();
    assert!(
        eventually(10, || blocked(&node, WEB, GATEWAY4, GATEWAY_PORT)),
        "the address gateway's namespace does not reach the cluster's gateway Service"
    );
    assert!(reaches(&node, WEB, EXTERNAL4, PROXY_PORT), "the proxy's address and port");
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "another port of the proxy's address");
    assert_eq!(
        node.metric(&["egressfw_gateway_refused_pods", "namespace=\"shop\""]),
        0.0,
        "nothing refused any more"
    );

    node.label("shop", &[("egressfw.io/mode", "enforce"), ("egressfw.io/gateway", "group")]);
    assert!(eventually(5, || reaches(&node, WEB, GATEWAY4, GATEWAY_PORT)), "the group's Service");
    assert!(reaches(&node, WEB, EXTERNAL4, PROXY_PORT), "the group's address");
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "nothing else");
}

#[test]
fn a_pod_whose_namespace_the_agent_has_not_seen_is_held_until_the_namespace_arrives() {
    let node = KubeNode::new();
    // The pod watch has the pod, the namespace watch not its Namespace: what a lagging
    // namespace watch (a relist after an API-server restart) shows the agent.
    node.add_pod("ghost", "app", WEB);
    node.create_pod_cgroup(WEB);
    let _agent = node.start_agent();
    let _web = Server::tcp_http(&node.lab.external, sock(EXTERNAL4, 80));
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    // Ready means the first pass has placed every pod it knows, this one included.
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "an unknown namespace is held, never passed");
    assert!(blocked(&node, WEB, GATEWAY4, GATEWAY_PORT), "held: nothing but loopback, not even the gateway");

    node.label("ghost", &[("egressfw.io/mode", "enforce")]);
    assert!(
        eventually(5, || reaches(&node, WEB, GATEWAY4, GATEWAY_PORT)),
        "the Namespace arrives labelled enforce: the pod gets its gateway"
    );
    assert!(blocked(&node, WEB, EXTERNAL4, 80), "and stays enforced");
}

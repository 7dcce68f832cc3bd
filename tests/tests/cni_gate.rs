//! The tc layer's pod-start gate: the `egressfw` CNI plugin attaches the tc programs to a new
//! pod's veth during ADD, before the runtime starts any of the pod's containers, so no frame of
//! an enforced pod crosses its veth unjudged, also while the node agent is down. Pods of
//! namespaces the agent knows did not opt in are not gated at all; a pod the plugin gated
//! because its namespace was unknown is released once the agent sees it is not enforced.
//!
//! Each pod is wired as a routed CNI wires it (`RoutedPod`), then the plugin runs as the runtime
//! runs it, then a racer floods packet-socket frames from the instant ADD returns.

use std::{fs, path::PathBuf};

use egress_tests::{
    agent,
    cni::{self, Arrivals, PodRef},
    fake_api::fixtures,
    frames,
    kube_node::{KubeNode, NODE, eventually},
    lab::text,
    routed_pod::RoutedPod,
};

const PORT: u16 = 9999;
const RACER_FRAMES: usize = 2000;

struct TestPod {
    pod: RoutedPod,
    arrivals: Arrivals,
    frame: Vec<u8>,
}

impl TestPod {
    fn create(tag: &str, subnet: u8) -> Self {
        let tag = format!("{}{tag}", std::process::id() % 100_000);
        let pod = RoutedPod::create(&tag, &format!("10.231.{subnet}.2"), &format!("10.231.{subnet}.1"))
            .unwrap_or_else(|e| panic!("building the routed pod: {e:#}"));
        let arrivals = Arrivals::listen(&pod, PORT);
        // To the host side's own address: a destination no policy here allows.
        let frame = frames::udp(
            frames::mac(&pod.ns, "eth0"),
            frames::mac_root(&pod.host_side),
            pod.addr.parse().unwrap(),
            pod.host_addr.parse().unwrap(),
            PORT,
            b"exfil",
        );
        Self { pod, arrivals, frame }
    }

    /// Packet-socket frames, then datagrams from an ordinary socket of a process in no
    /// enforced cgroup; how many arrived.
    fn race(&self) -> usize {
        cni::flood(&self.pod.ns, &self.frame, RACER_FRAMES);
        let script = format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(50):\n    s.sendto(b'x', ('{}', {PORT}))\n",
            self.pod.host_addr
        );
        let out = self.pod.ns.run(None, "python3", &["-c", &script]);
        assert!(out.status.success(), "the socket sender failed: {}", text(&out));
        self.arrivals.count()
    }
}

fn inspect(node: &KubeNode) -> serde_json::Value {
    let out = agent::cli(&node.lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

/// Whether the tc layer uses tcx links here (Linux 6.6+, unless clsact is forced).
fn tcx() -> bool {
    let forced = std::env::var("EGRESSFW_TC_MECHANISM").as_deref() == Ok("clsact");
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    !forced && (major, minor) >= (6, 6)
}

fn deny_no_policy(node: &KubeNode) -> u64 {
    let report = inspect(node);
    report["counters"].as_array().unwrap().iter().find(|c| c["reason"] == "deny_no_policy").unwrap()["applied"]
        .as_u64()
        .unwrap()
}

fn records(node: &KubeNode) -> Vec<PathBuf> {
    fs::read_dir(node.cni_state_dir().join("interfaces"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_new_pods_veth_is_gated_from_cni_add_even_while_the_agent_is_down() {
    let node = KubeNode::new();
    let pins = node.lab.pin_dir.clone();
    let state = node.cni_state_dir();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.api.apply(&fixtures::namespace("free", &[]));
    let mut agent = node.start_agent();
    // The agent tells the plugin which namespaces need no gate.
    let modes = state.join("namespaces.json");
    assert!(
        eventually(10, || fs::read_to_string(&modes)
            .is_ok_and(|t| t.contains(r#""shop": "enforce""#) && t.contains(r#""free": "pass""#))),
        "namespaces.json names the modes: {:?}",
        fs::read_to_string(&modes)
    );
    // Pinned after that first pass (before the agent reports ready): what the plugin attaches.
    assert!(pins.join("programs/egress_tc_from_pod").exists(), "the tc programs are pinned for the plugin");
    agent.kill9();
    // The agent is down from here. A namespace made meanwhile is unknown to the plugin.
    node.api.apply(&fixtures::namespace("later", &[]));

    // Control: a pod of a namespace that did not opt in is not gated: the same racer gets its
    // frames through. (This is also every new pod without the plugin: nothing judges its veth.)
    let free = TestPod::create("f", 82);
    cni::add(&pins, &state, &free.pod, &PodRef { namespace: "free", name: "app", uid: "uid-free" });
    let through = free.race();
    assert!(through > 0, "frames of a pod that is not enforced arrive");

    // An enforced pod: gated during ADD. Nothing the racer sends from the instant ADD returns
    // arrives, and the kernel counts the drops under the pinned counters.
    let before = deny_no_policy(&node);
    let web = TestPod::create("w", 81);
    let web_ref = PodRef { namespace: "shop", name: "web", uid: "uid-web" };
    cni::add(&pins, &state, &web.pod, &web_ref);
    assert_eq!(web.race(), 0, "no frame of the enforced pod crosses its veth while the agent is down");
    assert!(deny_no_policy(&node) >= before + RACER_FRAMES as u64, "the gate's drops are counted");
    assert_eq!(records(&node).len(), 1, "one gated interface on record: {:?}", records(&node));
    let listed = inspect(&node)["interfaces"].clone();
    if listed.as_array().is_some_and(|l| !l.is_empty()) || tcx() {
        // tcx gates are pinned links, which `inspect` lists; clsact filters leave no pins.
        let web_if = listed.as_array().unwrap().iter().find(|i| i["name"] == web.pod.host_side.as_str());
        assert_eq!(
            web_if.map(|i| i["gated"].clone()),
            Some(true.into()),
            "inspect shows the gate: {listed:#}"
        );
    }

    // A pod of the unknown namespace is gated too (fail closed)...
    let later = TestPod::create("l", 83);
    cni::add(&pins, &state, &later.pod, &PodRef { namespace: "later", name: "app", uid: "uid-later" });
    assert_eq!(later.race(), 0, "a pod of a namespace the agent never saw is gated");

    // The agent comes back. The enforced pod is bound from the plugin's record (its addresses
    // are not in the API yet) and judged by its policy; the other pod is released.
    node.api.apply(&fixtures::pod("shop", "web", "uid-web", NODE, "BestEffort", None));
    node.api.apply(&fixtures::pod("later", "app", "uid-later", NODE, "BestEffort", None));
    let _cgroup = node.create_pod_cgroup("uid-web");
    let agent = node.start_agent();
    agent.wait_until("policy applied", |l| l["tc_interfaces"] == 1);
    assert_eq!(web.race(), 0, "bound, the enforced pod still reaches nothing its policy refuses");
    // (Events of the gate's drops, queued while no agent read them, come first.)
    let denial = agent.wait_until("egress deny", |l| {
        l["hook"] == "tc/from_pod" && l["dst"] == web.pod.host_addr && l["reason"] == "deny_destination"
    });
    assert_eq!(denial["src"], web.pod.addr.as_str(), "judged by the pod's policy now: {denial}");
    assert!(
        eventually(10, || later.race() > 0),
        "the pod of a namespace that did not opt in is released once the agent knows it:\n{}",
        agent.log_text()
    );
    assert!(
        eventually(5, || records(&node).len() == 1),
        "the released pod's record is dropped, the enforced pod's kept: {:?}",
        records(&node)
    );

    // DEL drops the record; the veth goes with the pod's namespace.
    let del = cni::run("DEL", &pins, &state, &web.pod.ns, &web_ref, &cni::prev_result(&web.pod));
    assert!(del.status.success(), "DEL:\n{}", text(&del));
    assert_eq!(records(&node), Vec::<PathBuf>::new());
}

#[test]
fn without_pinned_programs_the_plugin_passes_pods_through_and_names_why() {
    let node = KubeNode::new();
    let pod = TestPod::create("n", 84);
    let who = PodRef { namespace: "shop", name: "web", uid: "uid-n" };
    let (pins, state) = (&node.lab.pin_dir, &node.cni_state_dir());
    // No agent ever ran with this pin directory: egressfw is not installed on the node.
    let out = cni::add(pins, state, &pod.pod, &who);
    assert!(text(&out).contains("not installed on this node"), "{}", text(&out));
    assert!(pod.race() > 0, "nothing attached");

    // VERSION answers; an ADD without the network plugin's result is refused with a CNI error.
    let run = |command: &str| cni::run(command, pins, state, &pod.pod.ns, &who, &serde_json::Value::Null);
    let version = run("VERSION");
    assert!(version.status.success(), "{}", text(&version));
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.0.0"), "{v}");
    let refused = run("ADD");
    assert!(!refused.status.success());
    let e: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert!(e["msg"].as_str().unwrap().contains("chained plugin"), "{e}");
}

//! The tc layer's pod-start gate: the `egressfw` CNI plugin attaches the tc programs to a new
//! pod's veth during ADD, before the runtime starts any of the pod's containers, so no frame of
//! an enforced pod crosses its veth unjudged, also while the node agent is down. Pods of
//! namespaces the agent knows did not opt in are not gated at all; a pod the plugin gated
//! because its namespace was unknown is released once the agent sees it is not enforced.
//!
//! Each pod is wired as a routed CNI wires it (`RoutedPod`), then the plugin runs as the runtime
//! runs it, then a racer floods packet-socket frames from the instant ADD returns.

use std::{collections::BTreeMap, fs, path::PathBuf};

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
        Self::wire(pod)
    }

    /// A pod on a bridge (flannel's `cni0`, the `bridge` plugin): the node's route to it names
    /// the bridge.
    fn create_bridged(tag: &str, subnet: u8) -> Self {
        let tag = format!("{}{tag}", std::process::id() % 100_000);
        let pod =
            RoutedPod::create_bridged(&tag, &format!("10.231.{subnet}.2"), &format!("10.231.{subnet}.1"))
                .unwrap_or_else(|e| panic!("building the bridged pod: {e:#}"));
        Self::wire(pod)
    }

    fn wire(pod: RoutedPod) -> Self {
        let arrivals = Arrivals::listen(&pod, PORT);
        // To the host's own address: a destination no policy here allows.
        let frame = frames::udp(
            frames::mac(&pod.ns, "eth0"),
            frames::mac_root(pod.host_device()),
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

/// How many verdicts of `reason` the kernel counted as applied (not audited).
fn applied(node: &KubeNode, reason: &str) -> u64 {
    let report = inspect(node);
    report["counters"].as_array().unwrap().iter().find(|c| c["reason"] == reason).unwrap()["applied"]
        .as_u64()
        .unwrap()
}

/// The plugin's records: "namespace/pod" -> whether the veth is gated.
fn records(node: &KubeNode) -> BTreeMap<String, bool> {
    let files: Vec<PathBuf> = fs::read_dir(node.cni_state_dir().join("interfaces"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let r: serde_json::Value =
                serde_json::from_slice(&fs::read(p).unwrap()).expect("a record is JSON");
            (
                format!("{}/{}", r["namespace"].as_str().unwrap(), r["pod"].as_str().unwrap()),
                r["gated"] == true,
            )
        })
        .collect()
}

fn on_record(entries: &[(&str, bool)]) -> BTreeMap<String, bool> {
    entries.iter().map(|(pod, gated)| (pod.to_string(), *gated)).collect()
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
    let before = applied(&node, "deny_no_policy");
    let web = TestPod::create("w", 81);
    let web_ref = PodRef { namespace: "shop", name: "web", uid: "uid-web" };
    cni::add(&pins, &state, &web.pod, &web_ref);
    assert_eq!(web.race(), 0, "no frame of the enforced pod crosses its veth while the agent is down");
    assert!(applied(&node, "deny_no_policy") >= before + RACER_FRAMES as u64, "the gate's drops are counted");
    assert_eq!(
        records(&node),
        on_record(&[("free/app", false), ("shop/web", true)]),
        "every pod's veth on record, the enforced pod's gated"
    );
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
        eventually(5, || records(&node)
            == on_record(&[("free/app", false), ("later/app", false), ("shop/web", true)])),
        "the released pod's record says its veth is open now: {:?}",
        records(&node)
    );

    // DEL drops the record; the veth goes with the pod's namespace.
    let del = cni::run("DEL", &pins, &state, &web.pod.ns, &web_ref, &cni::prev_result(&web.pod));
    assert!(del.status.success(), "DEL:\n{}", text(&del));
    assert_eq!(records(&node), on_record(&[("free/app", false), ("later/app", false)]));
}

/// A node whose conflist names the plugin is enrolled: after a reboot, or on a node the
/// autoscaler just added, bpffs and /run are empty until the agent's first pass. The plugin
/// refuses ADD meanwhile (the runtime starts none of the pod's containers and retries), and the
/// retry after the agent has pinned its programs gates the pod. `teardown` takes the entry out of
/// the conflist, so a node egressfw was removed from starts pods again.
#[test]
fn an_enrolled_node_refuses_new_pods_until_the_agent_has_pinned_its_programs() {
    let node = KubeNode::new();
    let (pins, state) = (node.lab.pin_dir.clone(), node.cni_state_dir());
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    let pod = TestPod::create("n", 84);
    let who = PodRef { namespace: "shop", name: "web", uid: "uid-n" };
    // The node just booted: no agent has run, nothing is pinned, no state.
    let refused = cni::run("ADD", &pins, &state, &pod.pod.ns, &who, &cni::prev_result(&pod.pod));
    assert!(!refused.status.success(), "ADD is refused while nothing is pinned:\n{}", text(&refused));
    let e: serde_json::Value = serde_json::from_slice(&refused.stdout).expect("a CNI error on stdout");
    let msg = e["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("shop/web") && msg.contains("programs/egress_tc_from_pod") && msg.contains("retries"),
        "the error names the pod, the missing pins and what happens next: {e}"
    );
    assert_eq!(e["code"], 100, "{e}");
    assert_eq!(records(&node), on_record(&[]), "a refused ADD leaves no record");

    // The agent starts (it runs in the host's network namespace: no ADD of its own to wait
    // for); the runtime's retry is gated from its first instant and then bound by the agent.
    node.api.apply(&fixtures::pod("shop", "web", "uid-n", NODE, "BestEffort", None));
    let _cgroup = node.create_pod_cgroup("uid-n");
    let agent = node.start_agent();
    assert!(pins.join("programs/egress_tc_from_pod").exists(), "pinned by the first pass");
    cni::add(&pins, &state, &pod.pod, &who);
    assert_eq!(pod.race(), 0, "no frame of the enforced pod crosses its veth");
    agent.wait_until("policy applied", |l| l["tc_interfaces"] == 1);
    assert_eq!(pod.race(), 0, "bound, the pod reaches nothing its policy refuses");
    drop(agent);

    // Teardown takes the plugin out of the conflist before it removes the pins.
    let conf_dir = node.lab.dir.join("net.d");
    fs::create_dir_all(&conf_dir).unwrap();
    let list = conf_dir.join("10-net.conflist");
    fs::write(&list, r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"egressfw"}]}"#)
        .unwrap();
    let down = agent::cli_on_node(&node.lab, &["teardown", "--cni-conf-dir", conf_dir.to_str().unwrap()]);
    assert!(down.status.success(), "teardown:\n{}", text(&down));
    let after: serde_json::Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(after["plugins"], serde_json::json!([{"type": "ptp"}]), "the entry is gone: {after}");
    assert!(text(&down).contains("took the egressfw CNI plugin out of"), "{}", text(&down));
    assert!(!pins.exists(), "and the pins");

    // VERSION answers; an ADD without the network plugin's result is refused with a CNI error.
    let run = |command: &str| cni::run(command, &pins, &state, &pod.pod.ns, &who, &serde_json::Value::Null);
    let version = run("VERSION");
    assert!(version.status.success(), "{}", text(&version));
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.0.0"), "{v}");
    let refused = run("ADD");
    assert!(!refused.status.success());
    let e: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert!(e["msg"].as_str().unwrap().contains("chained plugin"), "{e}");
}

/// ADDs racing forced full passes (SIGHUP): a full pass reads the plugin's records and lists the
/// tc pins, and an ADD that lands between the two reads must not leave a gate the pass takes
/// for a leftover. After the race every recorded pod still has its gate: nothing it sends
/// crosses its veth.
#[test]
fn adds_racing_full_passes_leave_no_record_without_its_gate() {
    const PODS: u8 = 12;
    let node = KubeNode::new();
    let (pins, state) = (node.lab.pin_dir.clone(), node.cni_state_dir());
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    let agent = node.start_agent();
    assert!(pins.join("programs/egress_tc_from_pod").exists(), "pinned by the first pass");
    let pods: Vec<TestPod> = (0..PODS).map(|i| TestPod::create(&format!("r{i}"), 120 + i)).collect();

    let pid = agent.pid().expect("the agent runs") as libc::pid_t;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let passes = std::thread::scope(|scope| {
        let hups = scope.spawn(|| {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: a signal to the agent this test started.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "the agent is gone");
                sent += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            sent
        });
        for (i, pod) in pods.iter().enumerate() {
            let (name, uid) = (format!("racer-{i}"), format!("uid-racer-{i}"));
            cni::add(&pins, &state, &pod.pod, &PodRef { namespace: "shop", name: &name, uid: &uid });
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hups.join().expect("the signal sender")
    });
    // Passes that were under way finish; then every gate is checked.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let seen = agent.log_text().matches("SIGHUP: full pass").count();
    assert!(seen > 1, "full passes ran during the ADDs ({seen} logged for {passes} signals)");
    assert_eq!(records(&node).len(), PODS as usize, "every ADD left its record");
    for (i, pod) in pods.iter().enumerate() {
        assert_eq!(pod.race(), 0, "pod racer-{i} lost its gate to a racing pass:\n{}", agent.log_text());
    }
}

/// On a bridged CNI the node's route to a pod names the bridge, so only the plugin's record
/// finds the pod's veth. The rollout `deploy/README` recommends starts namespaces in `audit`,
/// whose pods the plugin does not gate: it records their veths all the same, and when the
/// namespace switches to `enforce` the agent puts the tc layer on the veth. Without it the pod
/// keeps its socket hooks only, and packet-socket frames get out.
#[test]
fn a_bridged_pod_started_under_audit_gets_the_tc_layer_when_its_namespace_is_enforced() {
    const UID: &str = "uid-bridged";
    let node = KubeNode::new();
    let (pins, state) = (node.lab.pin_dir.clone(), node.cni_state_dir());
    node.label("shop", &[("egressfw.io/mode", "audit")]);
    let agent = node.start_agent();
    let modes = state.join("namespaces.json");
    assert!(
        eventually(10, || fs::read_to_string(&modes).is_ok_and(|t| t.contains(r#""shop": "audit""#))),
        "namespaces.json names shop as audit: {:?}",
        fs::read_to_string(&modes)
    );
    let web = TestPod::create_bridged("b", 85);
    let bridge = web.pod.host_device().to_string();
    let route = egress_agent::routes::pod_interface(web.pod.addr.parse().unwrap());
    assert!(
        route.as_ref().is_err_and(|e| format!("{e:#}").contains(&bridge)),
        "the node's route to the pod names the bridge, not the veth: {route:?}"
    );
    cni::add(&pins, &state, &web.pod, &PodRef { namespace: "shop", name: "web", uid: UID });
    node.api.apply(&fixtures::pod("shop", "web", UID, NODE, "BestEffort", Some(&web.pod.addr)));
    let _cgroup = node.create_pod_cgroup(UID);
    agent.wait_until("policy applied", |l| l["added"] == 1);
    assert!(web.race() > 0, "audit: the pod's frames pass (and are reported)");

    let denied = applied(&node, "deny_destination");
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    assert!(
        eventually(10, || web.race() == 0),
        "enforced: nothing the pod sends crosses its veth:\n{}",
        agent.log_text()
    );
    assert_eq!(web.race(), 0, "and it stays that way");
    let listed = inspect(&node)["interfaces"].clone();
    let veth = listed.as_array().unwrap().iter().find(|i| i["name"] == web.pod.host_side.as_str());
    assert_eq!(
        veth.map(|i| i["sources"].clone()),
        Some(serde_json::json!([web.pod.addr])),
        "inspect shows the tc layer on the bridged pod's veth, bound to its address: {listed:#}"
    );
    assert!(
        applied(&node, "deny_destination") >= denied + RACER_FRAMES as u64,
        "the veth's drops are counted as the pod's policy refusing the destination"
    );
    assert_eq!(
        records(&node),
        on_record(&[("shop/web", false)]),
        "the plugin recorded the veth, and left it open"
    );
}

/// Interface indexes are per network namespace, and every pod's eth0 has about the same small
/// one. A pod whose veth peer sits in some other namespace (not the node's) names a peer index
/// that, in the node's namespace, can be a stranger's host veth whose own peer is another pod's
/// eth0 with the same index. The plugin must not take that stranger's veth for the pod's: it
/// checks the namespace of the peer too, and refuses the ADD (nothing is gated or recorded).
#[test]
fn a_peer_index_from_another_namespace_never_matches_a_strangers_veth() {
    use egress_tests::netns::{NetNs, ip};
    let node = KubeNode::new();
    let (pins, state) = (node.lab.pin_dir.clone(), node.cni_state_dir());
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    let _agent = node.start_agent();
    let tag = std::process::id() % 100_000;
    // Free in this namespace and in the elsewhere one.
    let index = (40_000 + tag % 20_000).to_string();
    let elsewhere = NetNs::create(&format!("eft{tag}-x")).unwrap();
    let pod = NetNs::create(&format!("eft{tag}-p1")).unwrap();
    let stranger_pod = NetNs::create(&format!("eft{tag}-p2")).unwrap();
    // The pod's veth: its peer in `elsewhere`, at `index`; the pod's eth0 at 7.
    elsewhere
        .ip(&[
            "link", "add", "xv", "index", &index, "type", "veth", "peer", "name", "eth0", "index", "7",
            "netns", &pod.name,
        ])
        .unwrap();
    // A stranger's host veth at the same index here, whose peer is another pod's eth0 at 7.
    let stranger = format!("eftst{tag}");
    let _ = ip(&["link", "del", &stranger]);
    ip(&[
        "link",
        "add",
        &stranger,
        "index",
        &index,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "index",
        "7",
        "netns",
        &stranger_pod.name,
    ])
    .unwrap();
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = ip(&["link", "del", &self.0]);
        }
    }
    let _stranger = Gone(stranger.clone());

    let prev = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.path()}],
        "ips": [{"address": "10.231.86.2/32", "interface": 0}],
    });
    let out =
        cni::run("ADD", &pins, &state, &pod, &PodRef { namespace: "shop", name: "web", uid: "uid-x" }, &prev);
    assert!(!out.status.success(), "the ADD is refused, not matched to {stranger}:\n{}", text(&out));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a CNI error on stdout");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains(&stranger) && m.contains("another network namespace")),
        "the error names the stranger's veth and why it is not the pod's: {e}"
    );
    assert_eq!(records(&node), on_record(&[]), "nothing recorded");
}

/// CHECK verifies what ADD put in place, as the CNI spec asks of a plugin: the veth's record (the
/// agent's only way to the veth of a bridged pod) and, for a pod that must be enforced, our tc
/// programs running first on its host side. Each failure names what is missing; a pod whose
/// namespace is known not to be enforced needs only its record.
#[test]
fn check_fails_when_the_record_or_the_tc_layer_is_gone() {
    let node = KubeNode::new();
    let (pins, state) = (node.lab.pin_dir.clone(), node.cni_state_dir());
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    node.api.apply(&fixtures::namespace("free", &[]));
    let agent = node.start_agent();
    assert!(
        eventually(10, || fs::read_to_string(state.join("namespaces.json"))
            .is_ok_and(|t| t.contains(r#""free": "pass""#))),
        "the agent describes the namespaces"
    );
    let web = TestPod::create_bridged("k", 86);
    let web_ref = PodRef { namespace: "shop", name: "web", uid: "uid-k" };
    let free = TestPod::create("kf", 87);
    let free_ref = PodRef { namespace: "free", name: "app", uid: "uid-kf" };
    cni::add(&pins, &state, &web.pod, &web_ref);
    cni::add(&pins, &state, &free.pod, &free_ref);
    // The agent stops, so nothing repairs what the test takes away.
    drop(agent);
    let check = |pod: &TestPod, who: &PodRef<'_>| {
        let out = cni::run("CHECK", &pins, &state, &pod.pod.ns, who, &cni::prev_result(&pod.pod));
        let msg = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|e| e["msg"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        (out.status.success(), msg)
    };
    assert_eq!(check(&web, &web_ref), (true, String::new()), "gated and recorded");
    let no_prev = cni::run("CHECK", &pins, &state, &web.pod.ns, &web_ref, &serde_json::Value::Null);
    assert!(!no_prev.status.success() && text(&no_prev).contains("no prevResult"), "{}", text(&no_prev));
    assert_eq!(check(&free, &free_ref), (true, String::new()), "recorded, needs no gate");

    // The record goes: CHECK fails for both.
    let record = |pod: &TestPod| {
        state.join("interfaces").join(format!("{}.json", frames::ifindex(&pod.pod.host_side)))
    };
    for (pod, who) in [(&web, &web_ref), (&free, &free_ref)] {
        let aside = record(pod).with_extension("aside");
        fs::rename(record(pod), &aside).unwrap();
        let (ok, msg) = check(pod, who);
        assert!(!ok && msg.contains("has no egressfw record") && msg.contains(&pod.pod.host_side), "{msg}");
        fs::rename(&aside, record(pod)).unwrap();
    }

    // The gate goes (another tc user removed it): CHECK names the interface and both hooks.
    let host = web.pod.host_side.as_str();
    if tcx() {
        fs::remove_dir_all(pins.join("tc").join(frames::ifindex(host).to_string())).unwrap();
    } else {
        for hook in ["ingress", "egress"] {
            let out = std::process::Command::new("tc")
                .args(["filter", "del", "dev", host, hook, "pref", "1"])
                .output()
                .unwrap();
            assert!(out.status.success(), "tc filter del: {}", text(&out));
        }
    }
    let (ok, msg) = check(&web, &web_ref);
    assert!(!ok, "CHECK must fail without the tc layer");
    assert!(msg.contains(host) && msg.contains("ingress, egress") && msg.contains("not judged"), "{msg}");
    assert!(web.race() > 0, "and indeed the pod's frames get through now");
    assert_eq!(check(&free, &free_ref), (true, String::new()), "the pod that needs no gate is still fine");
}

/// The network plugin rewrites its conflist when it restarts, without our entry: until the entry
/// is back, new pods start with no gate. The agent watches the directory and puts it back at
/// once (the periodic tick, 10 s, is only the fallback), also when the runtime's active list
/// becomes another file.
#[test]
fn a_rewritten_conflist_is_chained_again_at_once() {
    let node = KubeNode::new();
    let conf_dir = node.lab.dir.join("net.d");
    fs::create_dir_all(&conf_dir).unwrap();
    let list = conf_dir.join("10-net.conflist");
    let plain = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"portmap"}]}"#;
    fs::write(&list, plain).unwrap();
    let agent = node.start_agent_with(&["--cni-conf-dir", conf_dir.to_str().unwrap()]);
    let chained = |path: &std::path::Path| {
        fs::read(path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).is_some_and(
            |v| v["plugins"].as_array().and_then(|p| p.last()).is_some_and(|p| p["type"] == "egressfw"),
        )
    };
    assert!(eventually(5, || chained(&list)), "chained at start:\n{}", agent.log_text());

    // The network plugin restarts: a new list, written by rename as they do, without our entry.
    for round in 0..3 {
        let tmp = conf_dir.join(".10-net.conflist.tmp");
        fs::write(&tmp, plain.replace("\"k8s\"", &format!("\"k8s-{round}\""))).unwrap();
        fs::rename(&tmp, &list).unwrap();
        let started = std::time::Instant::now();
        assert!(
            eventually(3, || chained(&list)),
            "round {round}: not chained again within 3 s:\n{}",
            agent.log_text()
        );
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
        assert_eq!(v["name"], format!("k8s-{round}"), "their list, with ours added: {v}");
        eprintln!("round {round}: chained again after {:?}", started.elapsed());
    }
    // Another plugin's list now sorts first: it becomes the active one, and is chained too.
    let first = conf_dir.join("05-cilium.conflist");
    fs::write(&first, r#"{"cniVersion":"1.0.0","name":"cilium","plugins":[{"type":"cilium-cni"}]}"#).unwrap();
    assert!(eventually(3, || chained(&first)), "the new active list:\n{}", agent.log_text());
}

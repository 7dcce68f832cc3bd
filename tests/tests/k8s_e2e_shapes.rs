//! End to end on a real node (tests/src/cluster): the pods that are not plain pods (a static pod,
//! a hostNetwork pod), a namespace that did not opt in, and removal as deploy/README.md says.

use std::time::Duration;

use egress_tests::{
    cluster::{
        e2e::{Cluster, SYSTEM, client_pod, deploy_dir, ok, on_host_network},
        node::{NODE_NAME, NodeShape, ProxyMode},
        outside,
    },
    lab::text,
};

/// Direct HTTP to the outside from `pod`: curl's exit code and what it printed.
fn direct_http(cluster: &Cluster, pod: &str, namespace: &str) -> (Option<i32>, String) {
    let out = cluster.curl(pod, namespace, &[&format!("http://{}/", outside::host(5))]);
    (out.status.code(), text(&out))
}

/// The plugin types the node's conflist chains, in order.
fn plugin_types(cluster: &Cluster) -> Vec<String> {
    let path = cluster.node.dir.join("cni-conf/10-egfw-test.conflist");
    let conflist: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    conflist["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["type"].as_str().map(str::to_owned))
        .collect()
}

/// `egress-agent teardown` on the node as deploy/README.md says (`kubectl debug node/...` with the
/// agent's image, the node's root at /host); returns the debug pod's final phase and its log.
fn debug_teardown(cluster: &Cluster) -> (String, String) {
    let debuggers = || {
        let out = cluster.kubectl(&["-n", SYSTEM, "get", "pods", "-o", "name"]);
        ok(&out, "listing pods")
            .lines()
            .filter(|p| p.contains("node-debugger-"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let before = debuggers();
    let image = format!("egress-agent:{}", env!("CARGO_PKG_VERSION"));
    ok(
        &cluster.kubectl(&[
            "-n",
            SYSTEM,
            "debug",
            &format!("node/{NODE_NAME}"),
            "--profile=sysadmin",
            &format!("--image={image}"),
            "--",
            "egress-agent",
            "--pin-dir",
            "/host/sys/fs/bpf/egressfw",
            "teardown",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
        ]),
        "kubectl debug node/... egress-agent teardown",
    );
    let mut debugger = None;
    egress_tests::wait_until("the node debugger pod", Duration::from_secs(30), || {
        debugger = debuggers().into_iter().find(|p| !before.contains(p));
        debugger.is_some()
    });
    let debugger = debugger.unwrap();
    let phase = || {
        let out = cluster.kubectl(&["-n", SYSTEM, "get", &debugger, "-o", "jsonpath={.status.phase}"]);
        ok(&out, "the debugger's phase")
    };
    egress_tests::wait_until("teardown to finish", Duration::from_secs(90), || {
        ["Succeeded", "Failed"].contains(&phase().as_str())
    });
    (phase(), text(&cluster.kubectl(&["-n", SYSTEM, "logs", &debugger])))
}

/// Three pods as the README describes them, on a node whose kube-proxy runs in nftables mode
/// (the other suites use iptables mode; steering goes through the Service VIP either way):
/// - a static pod of an enforced namespace: enforced, and its veth is bound (the kubelet gives
///   the CNI plugin its config hash as the UID), so it is steered, not left gated;
/// - a hostNetwork pod of an enforced namespace: enforced by its cgroup (no veth);
/// - a pod of a namespace that did not opt in: untouched.
#[test]
fn a_static_pod_a_host_network_pod_and_an_unenforced_pod_behave_as_the_readme_says() {
    let cluster =
        Cluster::enforcing("e2e-shapes", NodeShape { proxy: ProxyMode::Nftables, ..NodeShape::default() });
    ok(&cluster.kubectl(&["create", "namespace", "free"]), "creating a namespace");

    let files = cluster.test_files();
    cluster
        .node
        .add_static_pod("static-client", &client_pod("static-client", "team-a", &files))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mirror = format!("static-client-{NODE_NAME}");
    egress_tests::wait_until("the static pod's mirror pod", Duration::from_secs(60), || {
        cluster.kubectl(&["get", "pod", &mirror, "-n", "team-a"]).status.success()
    });
    cluster.wait_ready(&mirror, "team-a");
    cluster
        .apply(&on_host_network(&client_pod("host-client", "team-a", &files)), "creating a hostNetwork pod");
    cluster.wait_ready("host-client", "team-a");
    cluster.run_pod("client", "free");

    for pod in [mirror.as_str(), "host-client"] {
        assert_eq!(
            cluster.tcp_connect(pod, "team-a", 80),
            "EPERM",
            "direct HTTP from {pod} of an enforced namespace"
        );
        assert_eq!(cluster.udp_to_443(pod, "team-a"), "EPERM", "UDP to 443 from {pod}");
    }
    // Bound, not left gated: the static pod's unmodified HTTPS is steered and gets the page.
    cluster.wait_until_reaches_allowed(&mirror, "team-a", Duration::from_secs(30), "the static pod");

    // The namespace that did not opt in reaches the outside directly, HTTP and HTTPS.
    let (code, said) = direct_http(&cluster, "client", "free");
    assert_eq!(code, Some(0), "direct HTTP from a pod of a namespace that did not opt in: {said}");
    cluster.wait_until_reaches_allowed("client", "free", Duration::from_secs(10), "the unenforced pod");
}

/// Removal exactly as deploy/README.md says: delete the DaemonSet (enforcement stays), run
/// `egress-agent teardown` through `kubectl debug node/...`, delete the kustomization. Nothing of
/// egressfw is left on the node (no programs loaded, no pins, no conflist entry), and pods, old
/// and new, reach the outside directly.
#[test]
fn removal_as_the_deploy_readme_says_leaves_nothing_behind_and_pods_keep_their_network() {
    let mut cluster = Cluster::start("e2e-removal", NodeShape::default());
    cluster.outside_and_dns();
    cluster.deploy();
    cluster.opt_in("team-a", "enforce");
    cluster.run_pod("client", "team-a");
    assert_eq!(
        cluster.tcp_connect("client", "team-a", 80),
        "EPERM",
        "direct HTTP from an enforced pod before removal"
    );
    assert_eq!(plugin_types(&cluster).last().map(String::as_str), Some("egressfw"), "chained before removal");

    // While the agent runs, teardown refuses: the agent would put everything back.
    let (phase, said) = debug_teardown(&cluster);
    assert_eq!(phase, "Failed", "teardown with the agent running:\n{said}");
    assert!(said.contains("an egress-agent is running on this node"), "teardown's refusal:\n{said}");
    assert_eq!(cluster.tcp_connect("client", "team-a", 80), "EPERM", "a refused teardown changes nothing");

    ok(
        &cluster.kubectl(&[
            "-n",
            SYSTEM,
            "delete",
            "daemonset",
            "egress-agent",
            "--cascade=foreground",
            "--wait",
        ]),
        "deleting the DaemonSet",
    );
    assert_eq!(
        cluster.tcp_connect("client", "team-a", 80),
        "EPERM",
        "deleting the DaemonSet must not remove enforcement"
    );

    let (phase, said) = debug_teardown(&cluster);
    assert_eq!(phase, "Succeeded", "teardown through kubectl debug:\n{said}");
    assert!(said.contains("removed"), "teardown's log says nothing was removed:\n{said}");
    ok(
        &cluster.kubectl(&[
            "delete",
            "-k",
            &deploy_dir().display().to_string(),
            "--ignore-not-found",
            "--wait",
        ]),
        "kubectl delete -k deploy/",
    );

    // Nothing left: the conflist without our entry, the node's bpffs without our pins, and no
    // program of ours loaded anywhere on the machine (a program lives while a link or pin holds
    // it, so none loaded means none attached).
    let types = plugin_types(&cluster);
    assert!(
        !types.iter().any(|t| t == "egressfw"),
        "the conflist still names the plugin: {types:?}\nteardown said:\n{said}"
    );
    // (A fresh bpffs holds only the kernel's own progs.debug and maps.debug.)
    let pins = cluster
        .node
        .command(std::path::Path::new("find"))
        .args(["/sys/fs/bpf", "-mindepth", "1"])
        .output()
        .unwrap();
    let pins = ok(&pins, "listing the node's bpffs");
    let left: Vec<&str> = pins.lines().filter(|p| !p.ends_with(".debug")).collect();
    assert!(left.is_empty(), "pins left in the node's bpffs: {left:?}");
    let mut ours = Vec::new();
    let gone = egress_tests::poll_until(Duration::from_secs(10), || {
        let out = std::process::Command::new("bpftool").args(["prog", "show"]).output().unwrap();
        ours = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" name egress_"))
            .map(str::to_owned)
            .collect();
        out.status.success() && ours.is_empty()
    });
    assert!(gone, "programs of ours still loaded after teardown:\n{}", ours.join("\n"));

    // Pods keep their network: the pod that was enforced reaches the outside directly, and so
    // does a new one of the same namespace (no plugin in the chain any more).
    let reached = egress_tests::poll_until(Duration::from_secs(10), || {
        direct_http(&cluster, "client", "team-a").0 == Some(0)
    });
    assert!(
        reached,
        "the formerly enforced pod has no direct network: {}",
        direct_http(&cluster, "client", "team-a").1
    );
    cluster.run_pod("after", "team-a");
    let (code, said) = direct_http(&cluster, "after", "team-a");
    assert_eq!(code, Some(0), "a pod started after removal: {said}");
}

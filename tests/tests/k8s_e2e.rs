//! End to end on a real single-node Kubernetes (tests/src/cluster): the control plane, a kubelet
//! with containerd and runc, real pods on a routed or bridged pod network, images assembled
//! locally, and deploy/ applied exactly as the README says.

use std::process::Output;

use egress_tests::{
    cluster::{
        ControlPlane, TempDir, images,
        node::{Node, NodeShape, POD_CIDR},
    },
    lab::text,
};

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A control plane and a node with the pause and client images imported.
fn cluster(dir: &TempDir, shape: NodeShape) -> (ControlPlane, Node) {
    let name = format!("e{}", std::process::id() % 100_000);
    let plane =
        ControlPlane::start(&name, &dir.0).unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
    let node = Node::start(&plane, shape).unwrap_or_else(|e| panic!("starting the node: {e:#}"));
    let work = dir.0.join("images");
    for image in [images::pause(&work), images::client(&work)] {
        let image = image.unwrap_or_else(|e| panic!("building an image: {e:#}"));
        node.import_image(&image.archive, &image.base_name).unwrap_or_else(|e| panic!("{e:#}"));
    }
    (plane, node)
}

/// A pod running the machine's own curl and python3 (the host's /usr, read-only).
fn client_pod(name: &str, namespace: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: {image}
      imagePullPolicy: Never
      volumeMounts:
        - name: usr
          mountPath: /usr
          readOnly: true
  volumes:
    - name: usr
      hostPath:
        path: /usr
"#,
        image = images::CLIENT_IMAGE
    )
}

fn run_pod(plane: &ControlPlane, node: &Node, name: &str, namespace: &str) {
    ok(&plane.kubectl_with_input(&["apply", "-f", "-"], &client_pod(name, namespace)), "creating a pod");
    let wait = plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        &format!("pod/{name}"),
        "-n",
        namespace,
        "--timeout=120s",
    ]);
    assert!(
        wait.status.success(),
        "pod {namespace}/{name} not ready: {}\n{}\nkubelet's log ends:\n{}",
        text(&wait),
        text(&plane.kubectl(&["describe", "pod", name, "-n", namespace])),
        node.log_tail("kubelet")
    );
}

#[test]
fn a_pod_runs_on_the_node_and_runs_the_client_tools() {
    egress_tests::require_root();
    let dir = TempDir::new("e2e-pod");
    let (plane, node) = cluster(&dir, NodeShape::default());
    run_pod(&plane, &node, "client", "default");
    let ip = ok(&plane.kubectl(&["get", "pod", "client", "-o", "jsonpath={.status.podIP}"]), "pod IP");
    let prefix = POD_CIDR.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "pod IP {ip} outside {POD_CIDR}");
    let curl = ok(&plane.kubectl(&["exec", "client", "--", "curl", "--version"]), "curl in the pod");
    assert!(curl.starts_with("curl "), "{curl}");
}

/// Builds the agent's image from the binary under test, with the tag the manifests use (the
/// workspace version: deploy/base/kustomization.yaml follows it), and imports it.
fn import_agent_image(dir: &TempDir, node: &Node) {
    let image = images::agent(&dir.0.join("images"), &egress_tests::agent_bin(), env!("CARGO_PKG_VERSION"))
        .unwrap_or_else(|e| panic!("building the agent's image: {e:#}"));
    node.import_image(&image.archive, &image.base_name).unwrap_or_else(|e| panic!("{e:#}"));
}

fn rollout(plane: &ControlPlane, node: &Node, what: &str) {
    let out = plane.kubectl(&["rollout", "status", what, "-n", "egressfw-system", "--timeout=120s"]);
    assert!(
        out.status.success(),
        "{what} not rolled out: {}\n{}\n{}\nits log (previous container, then current):\n{}\n{}\nkubelet's log ends:\n{}",
        text(&out),
        text(&plane.kubectl(&["get", "pods", "-n", "egressfw-system", "-o", "wide"])),
        text(&plane.kubectl(&["describe", "pods", "-n", "egressfw-system"])),
        text(&plane.kubectl(&["logs", "-n", "egressfw-system", what, "--previous", "--tail=40"])),
        text(&plane.kubectl(&["logs", "-n", "egressfw-system", what, "--tail=40"])),
        node.log_tail("kubelet")
    );
}

#[test]
fn deploy_installs_the_cni_plugin_and_the_agent_and_gateway_become_ready() {
    egress_tests::require_root();
    let dir = TempDir::new("e2e-deploy");
    let (plane, node) = cluster(&dir, NodeShape::default());
    import_agent_image(&dir, &node);
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    ok(&plane.kubectl(&["apply", "-k", &deploy.display().to_string()]), "kubectl apply -k deploy/");
    rollout(&plane, &node, "daemonset/egress-agent");
    rollout(&plane, &node, "deployment/egress-gateway");

    // The init container chained the plugin into the node's real conflist, last.
    let conflist = std::fs::read_to_string(node.dir.join("cni-conf/10-egfw-test.conflist")).unwrap();
    let conflist: serde_json::Value = serde_json::from_str(&conflist).unwrap();
    let types: Vec<&str> =
        conflist["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types.last(), Some(&"egressfw"), "plugins in the conflist: {types:?}");
    assert!(
        node.dir.join("cni-bin/egressfw").is_file(),
        "the plugin binary is not in the node's CNI bin directory"
    );

    // The gateway is ready behind its Service.
    let ready = ok(
        &plane.kubectl(&[
            "get",
            "endpointslices",
            "-n",
            "egressfw-system",
            "-l",
            "kubernetes.io/service-name=egress-gateway",
            "-o",
            "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}",
        ]),
        "the gateway Service's endpoints",
    );
    assert!(!ready.trim().is_empty(), "no ready endpoint behind the egress-gateway Service");
}

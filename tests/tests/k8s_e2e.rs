//! End to end on a real single-node Kubernetes (tests/src/cluster): the control plane, a kubelet
//! with containerd and runc, real pods on a routed or bridged pod network, images assembled
//! locally, and deploy/ applied exactly as the README says.

use std::process::Output;

use egress_tests::{
    cluster::{
        ControlPlane, TempDir, images,
        node::{Node, POD_CIDR, PodNetwork},
    },
    lab::text,
};

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A control plane and a node with the pause and client images imported.
fn cluster(dir: &TempDir, network: PodNetwork) -> (ControlPlane, Node) {
    let name = format!("e{}", std::process::id() % 100_000);
    let plane =
        ControlPlane::start(&name, &dir.0).unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
    let node = Node::start(&plane, network).unwrap_or_else(|e| panic!("starting the node: {e:#}"));
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
    let (plane, node) = cluster(&dir, PodNetwork::Routed);
    run_pod(&plane, &node, "client", "default");
    let ip = ok(&plane.kubectl(&["get", "pod", "client", "-o", "jsonpath={.status.podIP}"]), "pod IP");
    let prefix = POD_CIDR.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "pod IP {ip} outside {POD_CIDR}");
    let curl = ok(&plane.kubectl(&["exec", "client", "--", "curl", "--version"]), "curl in the pod");
    assert!(curl.starts_with("curl "), "{curl}");
}

//! End to end on a real single-node Kubernetes (tests/src/cluster): the control plane, a kubelet
//! with containerd and runc, real pods on a routed or bridged pod network, images assembled
//! locally, and deploy/ applied exactly as the README says.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Output,
};

use egress_tests::{
    cluster::{
        ControlPlane, TempDir, dns, images,
        node::{Node, NodeShape, POD_CIDR, PodNetwork},
        outside,
    },
    lab::text,
    sniff::Sniffer,
};

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A control plane and a node with the pause and client images imported.
fn cluster(dir: &TempDir, shape: NodeShape) -> (ControlPlane, Node) {
    // One node per machine at a time (kubelets share the host's kubepods cgroups): the tests
    // run one at a time, each cluster gone before the next.
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

/// A pod running the machine's own curl and python3 (the host's /usr, read-only), with the
/// test's files (the outside's CA, scripts) at /test-files.
fn client_pod(name: &str, namespace: &str, certs: &Path) -> String {
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
        - name: test-files
          mountPath: /test-files
          readOnly: true
  volumes:
    - name: usr
      hostPath:
        path: /usr
    - name: test-files
      hostPath:
        path: {certs}
"#,
        image = images::CLIENT_IMAGE,
        certs = certs.display(),
    )
}

fn run_pod(plane: &ControlPlane, node: &Node, name: &str, namespace: &str) {
    let certs = node.dir.join("outside");
    ok(
        &plane.kubectl_with_input(&["apply", "-f", "-"], &client_pod(name, namespace, &certs)),
        "creating a pod",
    );
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

/// `kubectl apply -k deploy/` as the README says, with the agent's image built from the binary
/// under test; waits for the agent and the gateway to roll out.
fn deploy(dir: &TempDir, plane: &ControlPlane, node: &Node) {
    import_agent_image(dir, node);
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    ok(&plane.kubectl(&["apply", "-k", &deploy.display().to_string()]), "kubectl apply -k deploy/");
    rollout(plane, node, "daemonset/egress-agent");
    rollout(plane, node, "deployment/egress-gateway");
}

#[test]
fn deploy_installs_the_cni_plugin_and_the_agent_and_gateway_become_ready() {
    egress_tests::require_root();
    let dir = TempDir::new("e2e-deploy");
    let (plane, node) = cluster(&dir, NodeShape::default());
    deploy(&dir, &plane, &node);

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

const ALLOWED: &str = "allowed.test";
const DENIED: &str = "denied.test";

/// The cluster DNS (dnsmasq behind kube-system/kube-dns) with the outside's names, and the
/// outside serving HTTPS as them; returns the outside's CA (at /certs/ca.crt in client pods).
fn outside_and_dns(plane: &ControlPlane, node: &mut Node) -> PathBuf {
    let records = [(ALLOWED, outside::host(5)), (DENIED, outside::host(6))];
    ok(
        &plane.kubectl_with_input(&["apply", "-f", "-"], &dns::manifests(&records)),
        "creating the cluster DNS",
    );
    let wait = plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/dnsmasq",
        "-n",
        "kube-system",
        "--timeout=60s",
    ]);
    assert!(wait.status.success(), "cluster DNS not ready: {}", text(&wait));
    let dir = node.dir.join("outside");
    node.outside.serve(&dir, &[ALLOWED, DENIED]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Replaces the gateway's rules with `rules` (YAML list items) and restarts it.
fn gateway_rules(plane: &ControlPlane, node: &Node, rules: &str) {
    let current = ok(
        &plane.kubectl(&[
            "get",
            "configmap",
            "egress-gateway-config",
            "-n",
            "egressfw-system",
            "-o",
            r"jsonpath={.data.gateway\.yaml}",
        ]),
        "reading the gateway's configuration",
    );
    let start = current.find("rules:").expect("the shipped configuration has rules");
    let end = start + current[start..].find("blockedCidrs:").expect("blockedCidrs follows the rules");
    let edited = format!("{}rules:\n{rules}{}", &current[..start], &current[end..]);
    let patch = serde_json::json!({"data": {"gateway.yaml": edited}}).to_string();
    ok(
        &plane.kubectl(&[
            "patch",
            "configmap",
            "egress-gateway-config",
            "-n",
            "egressfw-system",
            "--type",
            "merge",
            "-p",
            &patch,
        ]),
        "patching the gateway's rules",
    );
    ok(
        &plane.kubectl(&["rollout", "restart", "deployment/egress-gateway", "-n", "egressfw-system"]),
        "restarting the gateway",
    );
    rollout(plane, node, "deployment/egress-gateway");
}

/// Labels `namespace` (created) with `mode` and waits until the node's CNI plugin knows it
/// (the agent writes the namespaces' modes into the state directory it shares with the plugin).
fn opt_in(plane: &ControlPlane, node: &Node, namespace: &str, mode: &str) {
    ok(&plane.kubectl(&["create", "namespace", namespace]), "creating a namespace");
    ok(
        &plane.kubectl(&["label", "namespace", namespace, &format!("egressfw.io/mode={mode}")]),
        "labelling it",
    );
    let state = node.dir.join("run-egressfw");
    egress_tests::wait_until(
        "the agent to record the namespace's mode for the CNI plugin",
        std::time::Duration::from_secs(30),
        || walk(&state).iter().any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains(namespace))),
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn exec(plane: &ControlPlane, pod: &str, namespace: &str, command: &[&str]) -> Output {
    let mut args = vec!["exec", pod, "-n", namespace, "--"];
    args.extend_from_slice(command);
    plane.kubectl(&args)
}

#[test]
fn an_enforced_pod_reaches_the_outside_only_through_the_gateway_and_only_where_allowed() {
    enforced_pod(PodNetwork::Routed, "e2e-enforce");
}

#[test]
fn an_enforced_pod_on_a_bridge_reaches_the_outside_only_through_the_gateway() {
    enforced_pod(PodNetwork::Bridged, "e2e-enforce-bridged");
}

fn enforced_pod(network: PodNetwork, tag: &str) {
    egress_tests::require_root();
    let dir = TempDir::new(tag);
    let (plane, mut node) = cluster(&dir, NodeShape { network, ..NodeShape::default() });
    outside_and_dns(&plane, &mut node);
    deploy(&dir, &plane, &node);
    gateway_rules(
        &plane,
        &node,
        &format!("      - namespaces: [team-a]\n        hosts: [\"{ALLOWED}\"]\n        ports: [443]\n"),
    );
    opt_in(&plane, &node, "team-a", "enforce");
    run_pod(&plane, &node, "client", "team-a");
    let gateway = ok(
        &plane.kubectl(&[
            "get",
            "service",
            "egress-gateway",
            "-n",
            "egressfw-system",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]),
        "the gateway's ClusterIP",
    );
    let proxy = format!("http://{gateway}:3128");
    let curl = |args: &[&str]| {
        let mut command = vec![
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "/test-files/ca.crt",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_connect}",
        ];
        command.extend_from_slice(args);
        exec(&plane, "client", "team-a", &command)
    };

    // Straight to the outside, HTTP: refused by the kernel at connect (curl's exit 7), where
    // an unenforced pod gets the page.
    let direct = curl(&[&format!("http://{}/", outside::host(5))]);
    assert_eq!(direct.status.code(), Some(7), "a direct connection from an enforced pod: {}", text(&direct));
    // Unmodified HTTPS is steered to the gateway (TCP 443): by name it is judged like a proxied
    // request, and a bare address (no SNI) does not get through.
    let steered = curl(&[&format!("https://{ALLOWED}/")]);
    assert_eq!(
        String::from_utf8_lossy(&steered.stdout),
        "200 000",
        "unmodified curl to {ALLOWED}: {}",
        text(&steered)
    );
    for target in [format!("https://{DENIED}/"), format!("https://{}/", outside::host(5))] {
        let refused = curl(&["--insecure", &target]);
        assert!(!refused.status.success(), "unmodified curl to {target} got through: {}", text(&refused));
    }
    // The steered socket reports the peer it asked for, not the gateway.
    let peer = python(
        &plane,
        &format!(
            "import socket; s = socket.create_connection(('{ALLOWED}', 443), 5); print(s.getpeername()[0])"
        ),
    );
    assert_eq!(ok(&peer, "getpeername of a steered socket").trim(), outside::host(5).to_string());
    // UDP to 443 (QUIC) is not steered: refused at send.
    let udp = python(
        &plane,
        &format!(
            "import errno, socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    s.sendto(b'x', ('{}', 443)); print('sent')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])",
            outside::host(5)
        ),
    );
    assert_eq!(ok(&udp, "UDP to 443").trim(), "EPERM");
    // Through the gateway's Service to an allowed name: the outside's page.
    let allowed = curl(&["-x", &proxy, &format!("https://{ALLOWED}/")]);
    assert!(allowed.status.success(), "through the gateway to {ALLOWED}: {}", text(&allowed));
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "200 200");
    // A name the namespace may not reach: the gateway answers the CONNECT with 403.
    let denied = curl(&["-x", &proxy, &format!("https://{DENIED}/")]);
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout),
        "000 403",
        "through the gateway to {DENIED}: {}",
        text(&denied)
    );

    // The gateway knew the pod by its real address: its access log names the namespace.
    let logs = ok(
        &plane.kubectl(&[
            "logs",
            "-n",
            "egressfw-system",
            "-l",
            "app.kubernetes.io/name=egress-gateway",
            "--tail=-1",
        ]),
        "the gateway's logs",
    );
    for (host, verdict) in [(ALLOWED, "allowed"), (DENIED, "denied")] {
        let line = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.to_string().contains(host) && v["namespace"] == "team-a");
        assert!(
            line.is_some(),
            "no access-log line for {host} ({verdict}) naming namespace team-a in:\n{logs}"
        );
    }

    // From the first instant (init container first): datagrams and hand-built frames to the
    // outside. Nothing arrives from the enforced namespace; from one that is not, both do.
    std::fs::write(node.dir.join("outside/flood.py"), include_str!("../images/flood.py")).unwrap();
    let pods: Vec<IpAddr> = (1..=254).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 0, i))).collect();
    let sniffer = Sniffer::start(&node.outside.ns, &pods);
    let arrived = |sniffer: &Sniffer| -> Vec<u16> {
        sniffer
            .seen()
            .iter()
            .filter(|p| p.dst == IpAddr::V4(outside::host(5)) && [DGRAM_PORT, FRAME_PORT].contains(&p.dport))
            .map(|p| p.dport)
            .collect()
    };
    let flooded = flood(&plane, &node, "team-a");
    let got = arrived(&sniffer);
    assert!(
        got.is_empty(),
        "{} packets of the enforced pod arrived outside (ports {got:?}); the pod said:\n{flooded}",
        got.len()
    );
    ok(&plane.kubectl(&["create", "namespace", "free"]), "creating a namespace");
    let flooded = flood(&plane, &node, "free");
    let got = arrived(&sniffer);
    for port in [DGRAM_PORT, FRAME_PORT] {
        assert!(
            got.contains(&port),
            "nothing on port {port} arrived from the unenforced pod (the check could not fail); it said:\n{flooded}"
        );
    }
}

/// Runs a python program in the enforced namespace's client pod.
fn python(plane: &ControlPlane, program: &str) -> Output {
    exec(plane, "client", "team-a", &["python3", "-c", program])
}

const DGRAM_PORT: u16 = 9999;
const FRAME_PORT: u16 = 9998;

/// Runs tests/images/flood.py in an init container and then in the main container of a pod in
/// `namespace`, 3 s each; returns what both printed.
fn flood(plane: &ControlPlane, node: &Node, namespace: &str) -> String {
    let command = format!(
        r#"["python3", "/test-files/flood.py", "{}", "{DGRAM_PORT}", "{FRAME_PORT}", "3"]"#,
        outside::host(5)
    );
    let container = |name: &str| {
        format!(
            "    - name: {name}\n      image: {image}\n      imagePullPolicy: Never\n      command: {command}\n      volumeMounts:\n        - {{name: usr, mountPath: /usr, readOnly: true}}\n        - {{name: test-files, mountPath: /test-files, readOnly: true}}\n",
            image = images::CLIENT_IMAGE
        )
    };
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: flood\n  namespace: {namespace}\nspec:\n  restartPolicy: Never\n  automountServiceAccountToken: false\n  initContainers:\n{}  containers:\n{}  volumes:\n    - {{name: usr, hostPath: {{path: /usr}}}}\n    - {{name: test-files, hostPath: {{path: {}}}}}\n",
        container("first"),
        container("main"),
        node.dir.join("outside").display()
    );
    ok(&plane.kubectl_with_input(&["apply", "-f", "-"], &pod), "creating the flooding pod");
    let done = plane.kubectl(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/flood",
        "-n",
        namespace,
        "--timeout=90s",
    ]);
    let said = ["first", "main"]
        .map(|c| text(&plane.kubectl(&["logs", "flood", "-n", namespace, "-c", c])))
        .join("\n");
    assert!(
        done.status.success(),
        "the flooding pod in {namespace} did not complete: {}\n{said}\n{}",
        text(&done),
        text(&plane.kubectl(&["describe", "pod", "flood", "-n", namespace]))
    );
    said
}

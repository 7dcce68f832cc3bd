//! What the end-to-end suites (tests/tests/k8s_e2e*.rs) share: a cluster with the pause and
//! client images, deploy/ applied as the README says, the outside and the cluster DNS, client
//! and flooding pods, and the kubectl calls the tests make again and again.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use super::{
    ControlPlane, TempDir, dns, images,
    node::{Node, NodeShape},
    outside,
};
use crate::{lab::text, sniff::Sniffer};

/// The outside's names, served over HTTPS by the outside and resolved by the cluster DNS.
pub const ALLOWED: &str = "allowed.test";
pub const DENIED: &str = "denied.test";
/// A third name the outside serves (at its 7th address), no rule mentions it.
pub const THIRD: &str = "third.test";
/// The namespace the agent and the gateway run in.
pub const SYSTEM: &str = "egressfw-system";
/// The agent's and the gateway's pods.
pub const AGENT_PODS: &str = "app.kubernetes.io/name=egress-agent";
pub const GATEWAY_PODS: &str = "app.kubernetes.io/name=egress-gateway";

/// The output of a command that must succeed; `what` names it in the failure.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A control plane and a node, with the pause and client images imported. Fields drop in
/// order: the node before its control plane, both before their directory.
pub struct Cluster {
    pub node: Node,
    pub plane: ControlPlane,
    pub dir: TempDir,
}

impl Cluster {
    pub fn start(tag: &str, shape: NodeShape) -> Self {
        crate::require_root();
        let dir = TempDir::new(tag);
        // One node per machine at a time (kubelets share the host's kubepods cgroups): the
        // tests run one at a time, each cluster gone before the next.
        let name = format!("e{}", std::process::id() % 100_000);
        let plane = ControlPlane::start(&name, &dir.0)
            .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
        let node = Node::start(&plane, shape).unwrap_or_else(|e| panic!("starting the node: {e:#}"));
        let work = dir.0.join("images");
        for image in [images::pause(&work), images::client(&work)] {
            let image = image.unwrap_or_else(|e| panic!("building an image: {e:#}"));
            node.import_image(&image.archive, &image.base_name).unwrap_or_else(|e| panic!("{e:#}"));
        }
        Self { node, plane, dir }
    }

    /// [`Cluster::start`], then what the enforcement tests all begin with: the outside and the
    /// cluster DNS, deploy/ applied, and namespace `team-a` in `enforce` mode, allowed to reach
    /// [`ALLOWED`] through the gateway.
    pub fn enforcing(tag: &str, shape: NodeShape) -> Self {
        let mut cluster = Self::start(tag, shape);
        cluster.outside_and_dns();
        cluster.deploy();
        cluster.allow("team-a");
        cluster.opt_in("team-a", "enforce");
        cluster
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.plane.kubectl(args)
    }

    /// `kubectl get <what> -n <namespace> -o jsonpath=<path>`, which must succeed.
    pub fn get(&self, what: &[&str], namespace: &str, path: &str) -> String {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        let output = format!("jsonpath={path}");
        args.extend_from_slice(&["-n", namespace, "-o", &output]);
        ok(&self.kubectl(&args), &format!("kubectl get {} ({path})", what.join(" ")))
    }

    /// `kubectl apply -f -` of `manifest`, which must succeed.
    pub fn apply(&self, manifest: &str, what: &str) {
        ok(&self.plane.kubectl_with_input(&["apply", "-f", "-"], manifest), what);
    }

    /// A command in a container of `pod`.
    pub fn exec(&self, pod: &str, namespace: &str, command: &[&str]) -> Output {
        let mut args = vec!["exec", pod, "-n", namespace, "--"];
        args.extend_from_slice(command);
        self.kubectl(&args)
    }

    /// Where pods find the test's files (the outside's CA, scripts): /test-files inside.
    pub fn test_files(&self) -> PathBuf {
        self.node.dir.join("outside")
    }

    /// Creates a client pod (see [`client_pod`]) and waits until it is ready.
    pub fn run_pod(&self, name: &str, namespace: &str) {
        self.apply(&client_pod(name, namespace, &self.test_files()), "creating a pod");
        self.wait_ready(name, namespace);
    }

    /// Waits for `pod` to be Ready; a failure shows the pod and the kubelet's log.
    pub fn wait_ready(&self, pod: &str, namespace: &str) {
        let wait = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "-n",
            namespace,
            "--timeout=120s",
        ]);
        assert!(
            wait.status.success(),
            "pod {namespace}/{pod} not ready: {}\n{}\nkubelet's log ends:\n{}",
            text(&wait),
            text(&self.kubectl(&["describe", "pod", pod, "-n", namespace])),
            self.node.log_tail("kubelet")
        );
    }

    /// Builds the agent's image from `binary`, tagged `tag`, and imports it.
    pub fn import_agent_image(&self, binary: &Path, tag: &str) {
        let image = images::agent(&self.dir.0.join("images"), binary, tag)
            .unwrap_or_else(|e| panic!("building the agent's image: {e:#}"));
        self.node.import_image(&image.archive, &image.base_name).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// `kubectl rollout status` of `what` in [`SYSTEM`]; a failure shows the pods, their logs
    /// and the kubelet's.
    pub fn rollout(&self, what: &str) {
        let out = self.kubectl(&["rollout", "status", what, "-n", SYSTEM, "--timeout=120s"]);
        assert!(
            out.status.success(),
            "{what} not rolled out: {}\n{}\n{}\nits log (previous container, then current):\n{}\n{}\nkubelet's log ends:\n{}",
            text(&out),
            text(&self.kubectl(&["get", "pods", "-n", SYSTEM, "-o", "wide"])),
            text(&self.kubectl(&["describe", "pods", "-n", SYSTEM])),
            text(&self.kubectl(&["logs", "-n", SYSTEM, what, "--previous", "--tail=40"])),
            text(&self.kubectl(&["logs", "-n", SYSTEM, what, "--tail=40"])),
            self.node.log_tail("kubelet")
        );
    }

    /// `kubectl apply -k deploy/` as the README says, with the agent's image built from the
    /// binary under test (tagged with the workspace version, which deploy/base follows); waits
    /// for the agent and the gateway to roll out.
    pub fn deploy(&self) {
        self.import_agent_image(&crate::agent_bin(), env!("CARGO_PKG_VERSION"));
        ok(&self.kubectl(&["apply", "-k", &deploy_dir().display().to_string()]), "kubectl apply -k deploy/");
        self.rollout("daemonset/egress-agent");
        self.rollout("deployment/egress-gateway");
    }

    /// The cluster DNS (dnsmasq behind kube-system/kube-dns) with the outside's names, and the
    /// outside serving HTTPS as them; returns the outside's CA (at /test-files/ca.crt in pods).
    pub fn outside_and_dns(&mut self) -> PathBuf {
        let records = [(ALLOWED, outside::host(5)), (DENIED, outside::host(6)), (THIRD, outside::host(7))];
        self.apply(&dns::manifests(&records), "creating the cluster DNS");
        let wait = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "pod/dnsmasq",
            "-n",
            "kube-system",
            "--timeout=60s",
        ]);
        assert!(wait.status.success(), "cluster DNS not ready: {}", text(&wait));
        let dir = self.test_files();
        let ca = self.node.outside.serve(&dir, &[ALLOWED, DENIED, THIRD]).unwrap_or_else(|e| panic!("{e:#}"));
        std::fs::write(dir.join("flood.py"), include_str!("../../images/flood.py")).unwrap();
        ca
    }

    /// Replaces the gateway's rules with `rules` (YAML list items) and restarts it; returns once
    /// the old pods are gone, not only once the new ones are ready (`rollout status` does not
    /// wait for that, and a test that compares the gateway's pods must not see a leaver).
    pub fn gateway_rules(&self, rules: &str) {
        let old =
            self.get(&["pods", "-l", GATEWAY_PODS], SYSTEM, "{range .items[*]}pod/{.metadata.name} {end}");
        self.edit_gateway_rules(rules);
        ok(
            &self.kubectl(&["rollout", "restart", "deployment/egress-gateway", "-n", SYSTEM]),
            "restarting the gateway",
        );
        self.rollout("deployment/egress-gateway");
        let mut wait = vec!["wait", "--for=delete", "-n", SYSTEM, "--timeout=120s"];
        wait.extend(old.split_whitespace());
        if wait.len() > 5 {
            ok(&self.kubectl(&wait), "waiting for the gateway's old pods to go");
        }
    }

    /// Replaces the gateway's rules with `rules` (YAML list items) in its ConfigMap, nothing
    /// more: the kubelet updates the mounted file, the gateway reloads it.
    pub fn edit_gateway_rules(&self, rules: &str) {
        let current = self.get(&["configmap", "egress-gateway-config"], SYSTEM, r"{.data.gateway\.yaml}");
        let start = current.find("rules:").expect("the shipped configuration has rules");
        let end = start + current[start..].find("blockedCidrs:").expect("blockedCidrs follows the rules");
        let edited = format!("{}rules:\n{rules}{}", &current[..start], &current[end..]);
        let patch = serde_json::json!({"data": {"gateway.yaml": edited}}).to_string();
        ok(
            &self.kubectl(&[
                "patch",
                "configmap",
                "egress-gateway-config",
                "-n",
                SYSTEM,
                "--type",
                "merge",
                "-p",
                &patch,
            ]),
            "patching the gateway's rules",
        );
    }

    /// Lets namespace `namespace` reach [`ALLOWED`] on 443 through the gateway.
    pub fn allow(&self, namespace: &str) {
        self.gateway_rules(&allow_rule(namespace, &[ALLOWED]));
    }

    /// Labels `namespace` (created) with `mode` and waits until the node's CNI plugin knows it
    /// (the agent writes the namespaces' modes into the state directory it shares with it).
    pub fn opt_in(&self, namespace: &str, mode: &str) {
        ok(&self.kubectl(&["create", "namespace", namespace]), "creating a namespace");
        ok(
            &self.kubectl(&["label", "namespace", namespace, &format!("egressfw.io/mode={mode}")]),
            "labelling it",
        );
        let state = self.node.dir.join("run-egressfw");
        crate::wait_until(
            "the agent to record the namespace's mode for the CNI plugin",
            Duration::from_secs(30),
            || {
                files_under(&state)
                    .iter()
                    .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains(namespace)))
            },
        );
    }

    /// The gateway Service's ClusterIP.
    pub fn gateway_ip(&self) -> String {
        ok(
            &self.kubectl(&[
                "get",
                "service",
                "egress-gateway",
                "-n",
                SYSTEM,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ]),
            "the gateway's ClusterIP",
        )
    }

    /// `curl` in a client pod, trusting the outside's CA, printing `<status> <CONNECT status>`.
    pub fn curl(&self, pod: &str, namespace: &str, args: &[&str]) -> Output {
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
        self.exec(pod, namespace, &command)
    }

    /// `egress-agent <args>` as an operator runs it: on the node, with the admin's kubeconfig
    /// (recommend, diff and observe read the cluster through the API server).
    pub fn egress_agent(&self, args: &[&str]) -> std::process::Command {
        let mut command = self.plane.ns.command(&crate::agent_bin().display().to_string(), None);
        command.args(args).env("KUBECONFIG", &self.plane.admin_kubeconfig);
        command
    }

    /// A python program in a client pod.
    pub fn python(&self, pod: &str, namespace: &str, program: &str) -> Output {
        self.exec(pod, namespace, &["python3", "-c", program])
    }

    /// What a UDP datagram from `pod` to the outside's port 443 (QUIC) gets: `sent` or the
    /// errno's name.
    pub fn udp_to_443(&self, pod: &str, namespace: &str) -> String {
        let program = format!(
            "import errno, socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n    s.sendto(b'x', ('{}', 443)); print('sent')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])",
            outside::host(5)
        );
        ok(&self.python(pod, namespace, &program), "UDP to 443").trim().to_owned()
    }

    /// What a TCP connect from `pod` to the outside's `port` gets: `connected` or the errno's
    /// name (EPERM: refused by the kernel at connect, before any packet).
    pub fn tcp_connect(&self, pod: &str, namespace: &str, port: u16) -> String {
        let program = format!(
            "import errno, socket\ntry:\n    socket.create_connection(('{}', {port}), 5); print('connected')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, e))",
            outside::host(5)
        );
        ok(&self.python(pod, namespace, &program), "a TCP connect").trim().to_owned()
    }

    /// Polls unmodified `curl https://ALLOWED/` from `pod` (steered when the namespace is
    /// enforced) until it gets the outside's page; fails the test, showing the pods and the
    /// agent, when it does not within `limit`.
    pub fn wait_until_reaches_allowed(&self, pod: &str, namespace: &str, limit: Duration, what: &str) {
        let mut last = None;
        let reached = crate::poll_until(limit, || {
            let out = self.curl(pod, namespace, &["--max-time", "5", &format!("https://{ALLOWED}/")]);
            let done = String::from_utf8_lossy(&out.stdout).starts_with("200 ");
            last = Some(out);
            done
        });
        assert!(
            reached,
            "{what}: {namespace}/{pod} never reached {ALLOWED}: {}\n{}\n{}",
            last.as_ref().map(text).unwrap_or_default(),
            text(&self.kubectl(&["get", "pods", "-A", "-o", "wide"])),
            self.agent_state()
        );
    }

    /// The agent's pod on the node: its name and UID (None while there is none).
    /// What the agent says and what it has in place (its log's end and `egress-agent inspect`),
    /// for failure messages.
    pub fn agent_state(&self) -> String {
        let Some((pod, _)) = self.agent_pod() else { return "no agent pod".into() };
        format!(
            "agent {pod}'s log ends:\n{}\n`egress-agent inspect` there:\n{}",
            text(&self.kubectl(&["logs", &pod, "-n", SYSTEM, "-c", "agent", "--tail=60"])),
            text(&self.exec(&pod, SYSTEM, &["egress-agent", "inspect"]))
        )
    }

    pub fn agent_pod(&self) -> Option<(String, String)> {
        let out = self.get(
            &["pods", "-l", AGENT_PODS],
            SYSTEM,
            "{range .items[*]}{.metadata.name} {.metadata.uid}{\"\\n\"}{end}",
        );
        let (name, uid) = out.lines().next()?.split_once(' ')?;
        Some((name.to_owned(), uid.to_owned()))
    }
}

/// A gateway rule (YAML list item): `namespace` may reach `hosts` on 443.
pub fn allow_rule(namespace: &str, hosts: &[&str]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "      - namespaces: [{namespace}]\n        hosts: [{}]\n        ports: [443]\n",
        hosts.join(", ")
    )
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A pod running the machine's own curl and python3 (the host's /usr, read-only), with the
/// test's files at /test-files.
pub fn client_pod(name: &str, namespace: &str, test_files: &Path) -> String {
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
        path: {test_files}
"#,
        image = images::CLIENT_IMAGE,
        test_files = test_files.display(),
    )
}

/// `manifest` (a [`client_pod`]) in the node's network namespace.
pub fn on_host_network(manifest: &str) -> String {
    manifest.replacen("spec:\n", "spec:\n  hostNetwork: true\n  dnsPolicy: ClusterFirstWithHostNet\n", 1)
}

/// What tests/images/flood.py sends: datagrams to `dgram_port` and hand-built frames to
/// `frame_port` of the outside's host 5, for `seconds`.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub dgram_port: u16,
    pub frame_port: u16,
    pub seconds: u32,
}

impl Flood {
    pub const DEFAULT: Self = Self { dgram_port: 9999, frame_port: 9998, seconds: 3 };

    /// The container that floods, named `name`.
    fn container(&self, name: &str) -> String {
        let command = format!(
            r#"["python3", "/test-files/flood.py", "{}", "{}", "{}", "{}"]"#,
            outside::host(5),
            self.dgram_port,
            self.frame_port,
            self.seconds
        );
        format!(
            "    - name: {name}\n      image: {image}\n      imagePullPolicy: Never\n      command: {command}\n      volumeMounts:\n        - {{name: usr, mountPath: /usr, readOnly: true}}\n        - {{name: test-files, mountPath: /test-files, readOnly: true}}\n",
            image = images::CLIENT_IMAGE
        )
    }

    /// A pod `name` in `namespace` that floods from its first instant: in an init container
    /// (`init`) and then in its main container, restarted as `restart_policy` says.
    pub fn pod(
        &self,
        name: &str,
        namespace: &str,
        test_files: &Path,
        init: bool,
        restart_policy: &str,
    ) -> String {
        let init =
            if init { format!("  initContainers:\n{}", self.container("first")) } else { String::new() };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  restartPolicy: {restart_policy}\n  terminationGracePeriodSeconds: 1\n  automountServiceAccountToken: false\n{init}  containers:\n{}  volumes:\n    - {{name: usr, hostPath: {{path: /usr}}}}\n    - {{name: test-files, hostPath: {{path: {}}}}}\n",
            self.container("main"),
            test_files.display()
        )
    }

    /// A sniffer in the outside for packets from pod addresses.
    pub fn sniffer(cluster: &Cluster) -> Sniffer {
        let pods: Vec<IpAddr> = (1..=254).map(|i| IpAddr::V4(Ipv4Addr::new(10, 244, 0, i))).collect();
        Sniffer::start(&cluster.node.outside.ns, &pods)
    }

    /// The destination ports of this flood's packets `sniffer` saw arrive.
    pub fn arrived(&self, sniffer: &Sniffer) -> Vec<u16> {
        sniffer
            .seen()
            .iter()
            .filter(|p| {
                p.dst == IpAddr::V4(outside::host(5)) && [self.dgram_port, self.frame_port].contains(&p.dport)
            })
            .map(|p| p.dport)
            .collect()
    }

    /// Runs a flooding pod `flood` in `namespace` (init container, then main) to completion;
    /// returns what both printed.
    pub fn run_to_completion(&self, cluster: &Cluster, namespace: &str) -> String {
        cluster.apply(
            &self.pod("flood", namespace, &cluster.test_files(), true, "Never"),
            "creating the flooding pod",
        );
        let done = cluster.kubectl(&[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/flood",
            "-n",
            namespace,
            "--timeout=90s",
        ]);
        let said = ["first", "main"]
            .map(|c| text(&cluster.kubectl(&["logs", "flood", "-n", namespace, "-c", c])))
            .join("\n");
        assert!(
            done.status.success(),
            "the flooding pod in {namespace} did not complete: {}\n{said}\n{}",
            text(&done),
            text(&cluster.kubectl(&["describe", "pod", "flood", "-n", namespace]))
        );
        said
    }
}

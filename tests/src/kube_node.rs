//! A Kubernetes node for the node agent's tests: the lab's network namespaces, a kubelet-style
//! pods cgroup tree (cgroupfs driver layout) under the test's own cgroup, and an in-process fake
//! API server holding the cluster objects. The real agent binary runs `egress-agent run`
//! against both.
//!
//! Pods all live in the lab's pod network namespace (10.231.0.2); what tells them apart is
//! their cgroup, which is all the kernel programs look at.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Output,
    time::Duration,
};

use crate::{
    agent::{self, Agent},
    fake_api::{FakeApi, fixtures},
    lab::{DNS4, DNS6, GATEWAY_PORT, GATEWAY4, GATEWAY6, Lab},
};

pub const NODE: &str = "node-1";
pub const GATEWAY_CLUSTER_IP: &str = "10.96.0.10";
pub const DNS_CLUSTER_IP: &str = "10.96.0.53";

/// The kubelet's cgroup driver, which decides how pod cgroups are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

pub struct KubeNode {
    pub api: FakeApi,
    /// `<test cgroup>/kubepods` (cgroupfs driver) or `<test cgroup>/kubepods.slice` (systemd).
    pub pods_root: PathBuf,
    pub driver: Driver,
    pub config_path: PathBuf,
    pub kubeconfig: PathBuf,
    pub http: SocketAddr,
    // Dropped last: removes the cgroups (pods included), pins and files.
    pub lab: Lab,
}

impl KubeNode {
    /// A node with the gateway and DNS Services in the API (backed by the lab's gateway and DNS
    /// addresses), namespace `shop` unlabelled, and no pods yet.
    pub fn new() -> Self {
        Self::with_config_extra("")
    }

    /// Like `new`, with extra lines appended to the agent configuration.
    pub fn with_config_extra(extra: &str) -> Self {
        Self::build(Driver::Cgroupfs, extra)
    }

    /// A node whose kubelet uses the systemd cgroup driver.
    pub fn with_driver(driver: Driver) -> Self {
        Self::build(driver, "")
    }

    fn build(driver: Driver, extra: &str) -> Self {
        let lab = Lab::new();
        ensure_host_bpffs();
        let api = FakeApi::start().expect("starting the fake API server");
        let (root, qos_dirs) = match driver {
            Driver::Cgroupfs => ("kubepods", ["burstable", "besteffort"]),
            Driver::Systemd => ("kubepods.slice", ["kubepods-burstable.slice", "kubepods-besteffort.slice"]),
        };
        let pods_root = lab.base_cgroup.join(root);
        for qos in qos_dirs {
            fs::create_dir_all(pods_root.join(qos)).expect("creating the pods cgroup tree");
        }
        let kubeconfig = lab.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("writing the kubeconfig");
        let config_path = lab.dir.join("agent.yaml");
        fs::write(
            &config_path,
            format!(
                "gateways:\n  - name: main\n    service: egress/gw\n    ports: [{GATEWAY_PORT}]\ndns:\n  service: kube-system/kube-dns\n{extra}"
            ),
        )
        .expect("writing the agent config");
        let http = free_local_port();
        let node = Self { api, pods_root, driver, config_path, kubeconfig, http, lab };
        for ns in ["egress", "kube-system", "shop"] {
            node.api.apply(&fixtures::namespace(ns, &[]));
        }
        node.api.apply(&fixtures::service("egress", "gw", GATEWAY_CLUSTER_IP, &[GATEWAY_PORT]));
        node.set_gateway_backends(&[GATEWAY4, GATEWAY6]);
        node.api.apply(&fixtures::service("kube-system", "kube-dns", DNS_CLUSTER_IP, &[53]));
        node.api.apply(&fixtures::endpoint_slice("kube-system", "kube-dns-1", "kube-dns", &[DNS4], &[53]));
        node.api.apply(&fixtures::endpoint_slice("kube-system", "kube-dns-2", "kube-dns", &[DNS6], &[53]));
        node
    }

    /// Replaces the gateway's backends (one EndpointSlice per address family, as the
    /// EndpointSlice controller publishes them).
    pub fn set_gateway_backends(&self, addrs: &[&str]) {
        self.set_gateway_slices(addrs, &[GATEWAY_PORT]);
    }

    /// The lab's gateway as the backend, serving `ports`.
    pub fn set_gateway_ports(&self, ports: &[u16]) {
        self.set_gateway_slices(&[GATEWAY4, GATEWAY6], ports);
    }

    fn set_gateway_slices(&self, addrs: &[&str], ports: &[u16]) {
        let (v4, v6): (Vec<&str>, Vec<&str>) = addrs.iter().partition(|a| !a.contains(':'));
        for (name, list) in [("gw-v4", v4), ("gw-v6", v6)] {
            self.api.apply(&fixtures::endpoint_slice("egress", name, "gw", &list, ports));
        }
    }

    pub fn label(&self, ns: &str, labels: &[(&str, &str)]) {
        self.api.apply(&fixtures::namespace(ns, labels));
    }

    /// A BestEffort pod on this node, known to the API (its cgroup is made separately).
    pub fn add_pod(&self, ns: &str, name: &str, uid: &str) {
        self.api.apply(&fixtures::pod(ns, name, uid, NODE, "BestEffort", Some(crate::lab::POD4)));
    }

    /// What the kubelet does when it starts the pod: the pod cgroup, then a container's.
    pub fn create_pod_cgroup(&self, uid: &str) -> PathBuf {
        let container = self.pod_cgroup(uid).join("ctr");
        fs::create_dir_all(&container).expect("creating the pod cgroup");
        container
    }

    /// Where the kubelet puts a BestEffort pod's cgroup with this node's driver.
    pub fn pod_cgroup(&self, uid: &str) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => self.pods_root.join("besteffort").join(format!("pod{uid}")),
            Driver::Systemd => self
                .pods_root
                .join("kubepods-besteffort.slice")
                .join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))),
        }
    }

    /// What the kubelet does when the pod is gone: kill its processes, remove its cgroups.
    pub fn remove_pod_cgroup(&self, uid: &str) {
        let pod = self.pod_cgroup(uid);
        let _ = fs::write(pod.join("cgroup.kill"), "1");
        for dir in [pod.join("ctr"), pod] {
            for _ in 0..50 {
                if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Runs a client (see `client`) in the pod's container cgroup.
    pub fn in_pod(&self, uid: &str, client: (&str, Vec<String>)) -> Output {
        self.lab.in_cgroup(&self.pod_cgroup(uid).join("ctr"), client)
    }

    /// `egress-agent run` for this node, once `/readyz` answers 200.
    pub fn start_agent(&self) -> Agent {
        self.try_start_agent()
            .unwrap_or_else(|log| panic!("node agent did not become ready; its log:\n{log}"))
    }

    /// [`Self::start_agent`] with more arguments for `egress-agent run`.
    pub fn start_agent_with(&self, args: &[&str]) -> Agent {
        let mut cmd = self.agent_command();
        cmd.args(args);
        Agent::spawn(&self.lab, cmd, |_| self.get("/readyz").0 == 200)
            .unwrap_or_else(|log| panic!("node agent did not become ready; its log:\n{log}"))
    }

    pub fn try_start_agent(&self) -> Result<Agent, String> {
        Agent::spawn(&self.lab, self.agent_command(), |_| self.get("/readyz").0 == 200)
    }

    /// Starts the agent and returns as soon as it waits for the API (not yet ready).
    pub fn try_start_agent_unready(&self) -> Agent {
        Agent::spawn(&self.lab, self.agent_command(), |a| a.log_text().contains("waiting for the API caches"))
            .unwrap_or_else(|log| panic!("node agent did not start; its log:\n{log}"))
    }

    fn agent_command(&self) -> std::process::Command {
        self.agent_command_with_pins(&self.lab.pin_dir)
    }

    /// `egress-agent run` for this node, pinning under `pins`.
    pub fn agent_command_with_pins(&self, pins: &std::path::Path) -> std::process::Command {
        let mut cmd = agent::command_for(&self.lab, &crate::agent_bin(), pins);
        let pods_cgroup =
            self.pods_root.strip_prefix(&self.lab.cgroup_root).expect("pods root under the mount");
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--node-name")
            .arg(NODE)
            .arg("--http-addr")
            .arg(self.http.to_string())
            .arg("--pods-cgroup")
            .arg(pods_cgroup)
            .arg("--cni-state-dir")
            .arg(self.cni_state_dir())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,egress_agent=debug");
        cmd
    }

    /// The directory the agent shares with the CNI plugin.
    pub fn cni_state_dir(&self) -> PathBuf {
        self.lab.dir.join("cni")
    }

    /// HTTP GET against the agent's health/metrics endpoint: (status, body); status 0 when
    /// nothing answers.
    pub fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect_timeout(&self.http, Duration::from_millis(200)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").is_err() {
            return (0, String::new());
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    /// The metrics line values matching all `parts` (e.g. a metric name and labels), summed.
    pub fn metric(&self, parts: &[&str]) -> f64 {
        self.get("/metrics")
            .1
            .lines()
            .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Default for KubeNode {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `check` holds within `secs` (times the VM's scale): see [`crate::poll_until`].
pub fn eventually(secs: u64, check: impl FnMut() -> bool) -> bool {
    crate::poll_until(Duration::from_secs(secs), check)
}

fn free_local_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local addr")
}

/// A Kubernetes node mounts bpffs at /sys/fs/bpf (systemd does); the node agent relies on it
/// and refuses to mount one itself.
pub fn ensure_host_bpffs() {
    let out = std::process::Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]).output();
    if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs") {
        return;
    }
    let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status();
    assert!(status.is_ok_and(|s| s.success()), "mounting bpffs at /sys/fs/bpf failed");
}

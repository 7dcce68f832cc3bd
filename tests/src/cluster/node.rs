//! A node of the test cluster: containerd and runc from Debian's packages, the network plugins
//! from Debian's containernetworking-plugins (`ptp` for a routed network, `bridge` for a bridged
//! one), and the kubelet built with the control plane. The node shares the control plane's
//! network namespace (the pods' veths, the API server and the agent all in one namespace the
//! test owns).
//!
//! **Files.** containerd and the kubelet run in a mount namespace of their own (a slave of the
//! host's, so the host never sees what they mount), where the directories a node owns are bind
//! mounts of directories under the node's own: `/opt/cni/bin`, `/etc/cni/net.d`,
//! `/run/containerd`, `/run/netns`, `/run/egressfw`, and a bpffs of its own at `/sys/fs/bpf`.
//! The DaemonSet's hostPath volumes therefore land in the test's directory, and everything the
//! node mounts goes when its processes do.
//!
//! **cgroups.** This machine has cgroup v1 hierarchies with cgroup2 at `/sys/fs/cgroup/unified`
//! holding only hugetlb, and its supervisor keeps the memory controller in v1
//! (docs/REAL-CLUSTER.md), so the kubelet runs with `failCgroupV1: false` and the cgroupfs
//! driver. runc places every container at the same path in the unified hierarchy too, which is
//! where the agent's cgroup programs attach. The kubelet's `kubepods` trees are removed on drop.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{API_ADDR, API_PORT, ControlPlane, outside::Outside, supervisor::Supervisor};

/// The node's name (its kubelet's client certificate is `system:node:<name>`).
pub const NODE_NAME: &str = "egfw-node";
/// The pods' addresses (host-local IPAM).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The cluster DNS Service's ClusterIP, as the kubelet tells pods.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 10);
/// The sandbox image containerd runs for every pod; [`super::images`] builds it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How pods are wired to the node: both shapes exist in the wild, and the tc layer sees a
/// different host side in each (a veth routed by the node, or a veth enslaved to a bridge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// `ptp`: one veth per pod, a /32 route to it on the node.
    Routed,
    /// `bridge`: every pod's veth on one bridge (`egfw-br0`), the node's address on the bridge.
    Bridged,
}

/// How kube-proxy programs Services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl ProxyMode {
    fn name(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

/// What kind of node to start.
#[derive(Clone, Copy, Debug)]
pub struct NodeShape {
    pub network: PodNetwork,
    pub proxy: ProxyMode,
}

impl Default for NodeShape {
    fn default() -> Self {
        Self { network: PodNetwork::Routed, proxy: ProxyMode::Iptables }
    }
}

/// A running node. Drop it before its control plane.
pub struct Node {
    /// First: the kubelet and containerd stop before anything else is cleaned up.
    procs: Supervisor,
    pub dir: PathBuf,
    /// containerd's socket, on the host's filesystem (so `ctr` works from outside).
    pub containerd_socket: PathBuf,
    /// The inode of the node's mount namespace: processes found in it at drop are the node's
    /// (containerd's shims outlive containerd).
    mount_ns: u64,
    mount_ns_path: PathBuf,
    netns_path: PathBuf,
    /// Host directories made only to mount over, removed again on drop (deepest first).
    made_dirs: Vec<PathBuf>,
    /// Where the node's default route goes.
    pub outside: Outside,
    shape: NodeShape,
}

/// The node's containerd and kubelet configuration files, under its directory.
const CONTAINERD_CONFIG: &str = "containerd.toml";
const KUBELET_CONFIG: &str = "kubelet.yaml";
/// The kubelet's static pod manifests, under the node's directory.
const STATIC_PODS: &str = "manifests";
/// The bridge of a bridged pod network.
const BRIDGE: &str = "egfw-br0";

/// The node's directories that replace the host's inside its mount namespace.
const MOUNTS: [(&str, &str); 5] = [
    ("cni-bin", "/opt/cni/bin"),
    ("cni-conf", "/etc/cni/net.d"),
    ("run-containerd", "/run/containerd"),
    ("netns", "/run/netns"),
    ("run-egressfw", "/run/egressfw"),
];

impl Node {
    /// Starts containerd, a kubelet and kube-proxy on `plane`'s network namespace, files under
    /// `<plane.dir>/node`, and waits for the Node object to be `Ready` and for kube-proxy to
    /// have programmed the `kubernetes` Service.
    pub fn start(plane: &ControlPlane, shape: NodeShape) -> Result<Self> {
        let dir = plane.dir.join("node");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut made_dirs = Vec::new();
        for (own, host) in MOUNTS {
            fs::create_dir_all(dir.join(own))?;
            made_dirs.extend(create_missing(Path::new(host))?);
        }
        link_cni_plugins(&dir.join("cni-bin"))?;
        fs::write(dir.join("cni-conf/10-egfw-test.conflist"), conflist(shape.network, &dir.join("ipam")))?;
        plane.ns.sysctl("net.ipv4.ip_forward", "1")?;
        // A node has a default route: without one, a connect to a Service's ClusterIP fails
        // (no route) before kube-proxy's DNAT could apply.
        let outside =
            Outside::create(&plane.ns, plane.ns.name.trim_start_matches("egfw-cp-"), &dir.join("outside"))?;
        let containerd_socket = dir.join("containerd/containerd.sock");
        fs::create_dir_all(dir.join("containerd"))?;
        fs::create_dir_all(dir.join(STATIC_PODS))?;
        fs::write(dir.join(CONTAINERD_CONFIG), containerd_toml(&dir, &containerd_socket))?;
        plane.pki.client("kubelet", &format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
        fs::write(
            dir.join(KUBELET_CONFIG),
            kubelet_yaml(&dir, &plane.pki.path("ca.crt"), &containerd_socket),
        )?;
        let mut node = Self {
            procs: Supervisor::new(&dir),
            dir,
            containerd_socket,
            mount_ns: 0,
            mount_ns_path: PathBuf::new(),
            netns_path: plane.ns.path(),
            made_dirs,
            outside,
            shape,
        };
        node.boot(plane)?;
        Ok(node)
    }

    /// Starts containerd (which makes the node's mount namespace), the kubelet and kube-proxy,
    /// and waits for the node to be Ready and kube-proxy to have synced.
    fn boot(&mut self, plane: &ControlPlane) -> Result<()> {
        let mut cmd = plane.ns.command("unshare", None);
        cmd.args(["--mount", "--propagation", "slave", "sh", "-ec"])
            .arg(mount_script(&self.dir, &self.dir.join(CONTAINERD_CONFIG)));
        self.procs.spawn("containerd", cmd)?;
        let containerd_pid = self.procs.pid("containerd").context("containerd's pid")?;
        let socket = self.containerd_socket.clone();
        self.procs
            .wait_for("containerd's socket", Duration::from_secs(30), "containerd", || socket.exists())?;
        self.mount_ns_path = PathBuf::from(format!("/proc/{containerd_pid}/ns/mnt"));
        self.mount_ns = fs::metadata(&self.mount_ns_path)?.ino();

        let kubeconfig = plane.pki.kubeconfig("kubelet", &format!("https://{API_ADDR}:{API_PORT}"))?;
        let mut kubelet = self.command(&plane.bins.kubelet);
        kubelet
            .arg(format!("--config={}", self.dir.join(KUBELET_CONFIG).display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", self.dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", self.dir.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={API_ADDR}"))
            .arg("--v=1");
        self.procs.spawn("kubelet", kubelet)?;
        let ready = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        self.procs.wait_for("the node to be Ready", Duration::from_secs(120), "kubelet", || {
            let out = plane.kubectl(&["get", "node", NODE_NAME, "-o", ready]);
            out.status.success() && out.stdout == b"True"
        })?;
        self.start_kube_proxy(plane, self.shape.proxy)
    }

    /// What a reboot does to the node, then boots it again: every process of the node and its
    /// pods stops, with them go the pods' network namespaces and veths, the node's bpffs (its
    /// pins) and its mount namespace; `/run` (containerd's state, netns, egressfw's state
    /// directory), the kubepods cgroups, the bridge and the packet-filter rules are emptied.
    /// What is on disk stays: the conflist with the plugin chained in, the plugin binary,
    /// containerd's images and the kubelet's files. The API server keeps every pod, so the
    /// kubelet starts them all again, before the agent is ready.
    pub fn reboot(&mut self, plane: &ControlPlane) -> Result<()> {
        self.procs.stop();
        clean_up(self.mount_ns, &[]);
        for dir in ["run-containerd", "netns", "run-egressfw", "containerd/state"] {
            let dir = self.dir.join(dir);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
        }
        let _ = plane.ns.command("ip", None).args(["link", "del", BRIDGE]).output();
        let flushed = plane.ns.command("nft", None).args(["flush", "ruleset"]).output()?;
        if !flushed.status.success() {
            bail!("nft flush ruleset: {}", String::from_utf8_lossy(&flushed.stderr).trim());
        }
        self.boot(plane)
    }

    fn start_kube_proxy(&mut self, plane: &ControlPlane, mode: ProxyMode) -> Result<()> {
        plane.pki.client("kube-proxy", "system:kube-proxy", &[])?;
        let kubeconfig = plane.pki.kubeconfig("kube-proxy", &format!("https://{API_ADDR}:{API_PORT}"))?;
        let config = self.dir.join("kube-proxy.yaml");
        fs::write(&config, kube_proxy_yaml(mode, &kubeconfig))?;
        let mut cmd = self.command(&plane.bins.kube_proxy);
        cmd.arg(format!("--config={}", config.display())).arg("--v=1");
        self.procs.spawn("kube-proxy", cmd)?;
        // Its health endpoint says 200 once it has synced its rules at least once.
        let netns = self.netns_path.clone();
        self.procs.wait_for("kube-proxy's first sync", Duration::from_secs(60), "kube-proxy", || {
            Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:10256/healthz"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// A command inside the node's mount and network namespaces (as a node's own processes
    /// see the machine).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.mount_ns_path.display()))
            .arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `ctr` against the node's containerd, in the namespace the CRI uses.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr (Debian package containerd)")
    }

    /// Imports an OCI archive (from [`super::images`]) as `<base_name>:<its tag>`.
    pub fn import_image(&self, archive: &Path, base_name: &str) -> Result<()> {
        let path = archive.display().to_string();
        let out = self.ctr(&["images", "import", "--base-name", base_name, &path])?;
        if !out.status.success() {
            bail!("ctr images import {path}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Gives the kubelet a static pod: `manifest` in its manifest directory as `<name>.yaml`.
    /// Its mirror pod in the API is `<pod's name>-<NODE_NAME>`.
    pub fn add_static_pod(&self, name: &str, manifest: &str) -> Result<()> {
        let path = self.dir.join(STATIC_PODS).join(format!("{name}.yaml"));
        fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))
    }

    /// The last lines of the kubelet's or containerd's log.
    pub fn log_tail(&self, name: &str) -> String {
        self.procs.log_tail(name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.procs.stop();
        clean_up(self.mount_ns, &self.made_dirs);
    }
}

/// Where a detached node records what [`stop_detached`] needs.
const DETACHED: &str = "node-detached";

impl Node {
    /// Leaves the node running (its processes, the outside and their namespaces outlive this
    /// value) and records what [`stop_detached`] needs under the node's directory.
    pub fn detach(mut self) -> Result<()> {
        let mut record: Vec<String> =
            self.procs.detach().iter().map(|(name, pid)| format!("pid {pid} {name}")).collect();
        record.push(format!("mountns {}", self.mount_ns));
        record.extend(self.made_dirs.drain(..).map(|d| format!("made {}", d.display())));
        fs::write(self.dir.join(DETACHED), record.join("\n") + "\n")?;
        self.outside.detach();
        self.mount_ns = 0;
        Ok(())
    }
}

/// Stops a node that [`Node::detach`] left running in `node_dir`, and cleans up as dropping it
/// would have. Nothing running is not an error.
pub fn stop_detached(node_dir: &Path) {
    let record = fs::read_to_string(node_dir.join(DETACHED)).unwrap_or_default();
    let mut pids = Vec::new();
    let mut mount_ns = 0;
    let mut made = Vec::new();
    for line in record.lines() {
        match line.split_once(' ') {
            Some(("pid", rest)) => pids.extend(rest.split(' ').next().and_then(|p| p.parse::<u32>().ok())),
            Some(("mountns", ino)) => mount_ns = ino.parse().unwrap_or(0),
            Some(("made", dir)) => made.push(PathBuf::from(dir)),
            _ => {}
        }
    }
    super::supervisor::stop_pids(&pids);
    if mount_ns != 0 {
        clean_up(mount_ns, &made);
    }
    let _ = fs::remove_file(node_dir.join(DETACHED));
}

/// What outlives the node's own processes: the shims (in the node's mount namespace) and the
/// containers (in kubepods cgroups); with them go the pods' network namespaces and mounts. Then
/// the kubepods cgroups and the host directories made to mount over.
fn clean_up(mount_ns: u64, made_dirs: &[PathBuf]) {
    if mount_ns == 0 {
        return; // detached
    }
    for _ in 0..50 {
        let mut pids = processes_in_mount_ns(mount_ns);
        pids.extend(processes_in_cgroups(&kubepods_trees()));
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            super::supervisor::signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for tree in kubepods_trees() {
        remove_cgroup_tree(&tree);
    }
    for dir in made_dirs.iter().rev() {
        let _ = fs::remove_dir(dir);
    }
}

/// The `kubepods` cgroup of every hierarchy (v1 ones and the unified one).
fn kubepods_trees() -> Vec<PathBuf> {
    let mut trees = Vec::new();
    for hierarchy in fs::read_dir(CGROUP_ROOT).into_iter().flatten().flatten() {
        let tree = hierarchy.path().join("kubepods");
        if tree.is_dir() {
            trees.push(tree);
        }
    }
    trees
}

fn processes_in_cgroups(trees: &[PathBuf]) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack: Vec<PathBuf> = trees.to_vec();
    while let Some(dir) = stack.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        stack.extend(
            fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()),
        );
    }
    pids
}

fn processes_in_mount_ns(inode: u64) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| m.ino() == inode))
        .collect()
}

/// Removes a cgroup and its children, deepest first (a cgroup with children cannot go).
fn remove_cgroup_tree(dir: &Path) {
    for child in fs::read_dir(dir).into_iter().flatten().flatten() {
        if child.path().is_dir() {
            remove_cgroup_tree(&child.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Creates `path` and its missing parents; returns the ones it made, outermost first.
fn create_missing(path: &Path) -> Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> =
        path.ancestors().take_while(|p| !p.exists()).map(Path::to_path_buf).collect();
    missing.reverse();
    for dir in &missing {
        fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(missing)
}

/// Debian installs the plugins in /usr/lib/cni; a node has them in its CNI bin directory, where
/// the DaemonSet's init container also installs ours.
fn link_cni_plugins(bin_dir: &Path) -> Result<()> {
    let debian = Path::new("/usr/lib/cni");
    let entries = fs::read_dir(debian).with_context(|| {
        format!("reading {} (Debian package containernetworking-plugins)", debian.display())
    })?;
    for entry in entries.flatten() {
        std::os::unix::fs::symlink(entry.path(), bin_dir.join(entry.file_name()))?;
    }
    Ok(())
}

/// The script that prepares the node's mount namespace and becomes containerd.
fn mount_script(dir: &Path, config: &Path) -> String {
    let mut script = String::from("mount --make-rshared /\n");
    for (own, host) in MOUNTS {
        script.push_str(&format!("mount --bind '{}' '{host}'\n", dir.join(own).display()));
    }
    script.push_str("mount -t bpf bpf /sys/fs/bpf\n");
    script.push_str(&format!("exec containerd --config '{}'\n", config.display()));
    script
}

fn conflist(network: PodNetwork, ipam_dir: &Path) -> String {
    let ipam = format!(
        r#"{{"type": "host-local", "dataDir": "{}", "ranges": [[{{"subnet": "{POD_CIDR}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}"#,
        ipam_dir.display()
    );
    let main = match network {
        PodNetwork::Routed => format!(r#"{{"type": "ptp", "ipMasq": false, "ipam": {ipam}}}"#),
        PodNetwork::Bridged => format!(
            r#"{{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true, "ipam": {ipam}}}"#
        ),
    };
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "egfw-test",
  "plugins": [
    {main},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#
    )
}

fn containerd_toml(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine's supervisor lets no process lower its OOM score, and the kubelet asks -998
  # for every sandbox: runc's init then dies before the container starts. containerd's own
  # setting for unprivileged hosts clamps the score at its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        root = dir.join("containerd/root").display(),
        state = dir.join("containerd/state").display(),
        socket = socket.display(),
    )
}

fn kube_proxy_yaml(mode: ProxyMode, kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: {mode}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The conntrack table size is the host's, not this network namespace's to set.
conntrack:
  maxPerCore: 0
"#,
        kubeconfig = kubeconfig.display(),
        mode = mode.name(),
    )
}

fn kubelet_yaml(dir: &Path, client_ca: &str, containerd_socket: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {client_ca}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://{socket}
cgroupDriver: cgroupfs
# This machine keeps memory in cgroup v1 (see the module's comment).
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [{CLUSTER_DNS}]
podLogsDirectory: {logs}
staticPodPath: {manifests}
# ConfigMap volumes are refreshed on the pod sync: every 10 s rather than the default minute, so
# a test of a configuration edit waits less (what it shows does not change).
syncFrequency: 10s
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
# Images cannot be pulled back here: never collect them, never evict for disk.
imageGCHighThresholdPercent: 100
evictionHard:
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
"#,
        socket = containerd_socket.display(),
        logs = dir.join("pod-logs").display(),
        manifests = dir.join(STATIC_PODS).display(),
    )
}

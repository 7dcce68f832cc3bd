//! A simulated node: a "node" namespace with a bridge, and hosts attached to it:
//!
//! ```text
//!   pod       10.231.0.2  fd00:231::2   processes run in the enforced cgroup (or not)
//!   gateway   10.231.0.3  fd00:231::3   the egress gateway (TCP 3128)
//!             10.231.0.4  fd00:231::4   cluster DNS (UDP/TCP 53)
//!   external  10.231.0.5  fd00:231::5   somewhere the pod must not reach
//! ```
//!
//! Everything (namespaces, veths, cgroups, bpffs pins, temporary files) is removed on drop.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, Result};

use crate::netns::NetNs;

pub const POD4: &str = "10.231.0.2";
pub const GATEWAY4: &str = "10.231.0.3";
pub const DNS4: &str = "10.231.0.4";
pub const EXTERNAL4: &str = "10.231.0.5";
pub const POD6: &str = "fd00:231::2";
pub const GATEWAY6: &str = "fd00:231::3";
pub const DNS6: &str = "fd00:231::4";
pub const EXTERNAL6: &str = "fd00:231::5";
pub const GATEWAY_PORT: u16 = 3128;

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Lab {
    pub id: String,
    /// Scratch directory for configs and logs.
    pub dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// The test's own cgroup subtree; `pod` and `other` live under it.
    pub base_cgroup: PathBuf,
    pub pod_cgroup: PathBuf,
    pub other_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    // Namespaces are deleted when the fields drop, after `Drop for Lab` removed cgroups and pins.
    pub pod: NetNs,
    pub gateway: NetNs,
    pub external: NetNs,
    pub node: NetNs,
}

impl Lab {
    #[expect(
        clippy::new_without_default,
        reason = "building a lab has side effects; a Default would hide them"
    )]
    pub fn new() -> Self {
        crate::require_root();
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        Self::named(&id).unwrap_or_else(|e| panic!("building the test lab: {e:#}"))
    }

    /// A lab with a fixed id; whatever an interrupted run with the same id left is removed first.
    pub fn named(id: &str) -> Result<Self> {
        let id = id.to_string();
        let short = format!("eft{}", id.replace('-', "x"));
        let dir = std::env::temp_dir().join(format!("egressfw-test-{id}"));
        fs::create_dir_all(&dir)?;
        let cgroup_root = cgroup2_mount()?;
        let base_cgroup = cgroup_root.join(format!("egressfw-test-{id}"));
        let pod_cgroup = base_cgroup.join("pod");
        let other_cgroup = base_cgroup.join("other");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/egressfw-test-{id}"));
        remove_cgroup_tree(&base_cgroup);
        let _ = fs::remove_dir_all(&pin_dir);
        // Namespaces first so a failure below still cleans up what exists (Drop runs on a built Lab
        // only, so build it as early as possible).
        let lab = Self {
            node: NetNs::create(&format!("{short}-node"))?,
            pod: NetNs::create(&format!("{short}-pod"))?,
            gateway: NetNs::create(&format!("{short}-gw"))?,
            external: NetNs::create(&format!("{short}-ext"))?,
            pin_dir,
            id,
            dir,
            cgroup_root,
            base_cgroup,
            pod_cgroup,
            other_cgroup,
        };
        for c in [&lab.base_cgroup, &lab.pod_cgroup, &lab.other_cgroup] {
            fs::create_dir_all(c).with_context(|| format!("creating cgroup {}", c.display()))?;
        }
        lab.node.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.node.ip(&["link", "set", "br0", "up"])?;
        lab.attach(&lab.pod, "v-pod", &[(POD4, POD6)])?;
        lab.attach(&lab.gateway, "v-gw", &[(GATEWAY4, GATEWAY6), (DNS4, DNS6)])?;
        lab.attach(&lab.external, "v-ext", &[(EXTERNAL4, EXTERNAL6)])?;
        Ok(lab)
    }

    /// A veth from `host` (eth0) to the node's bridge, with the given addresses.
    fn attach(&self, host: &NetNs, peer: &str, addrs: &[(&str, &str)]) -> Result<()> {
        crate::netns::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &host.name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &self.node.name,
        ])?;
        self.node.ip(&["link", "set", peer, "master", "br0", "up"])?;
        // No duplicate address detection: the addresses are usable at once.
        host.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        for (v4, v6) in addrs {
            host.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            host.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        }
        host.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn pod_sources() -> Vec<IpAddr> {
        vec![POD4.parse().expect("literal"), POD6.parse().expect("literal")]
    }

    /// Writes a standalone policy for the pod cgroup and returns its path.
    pub fn write_policy(&self, mode: &str) -> PathBuf {
        let path = self.dir.join("policy.yaml");
        fs::write(&path, self.policy_text(mode)).expect("writing policy");
        path
    }

    pub fn policy_text(&self, mode: &str) -> String {
        format!(
            "policies:\n  - cgroup: {pod}\n    mode: {mode}\n    gateways:\n      - address: {GATEWAY4}\n        ports: [{GATEWAY_PORT}]\n      - address: {GATEWAY6}\n        ports: [{GATEWAY_PORT}]\n    dns: [{DNS4}, {DNS6}]\n",
            pod = self.pod_cgroup.display()
        )
    }

    /// The policy, plus the tc layer on the pod's veth (`v-pod`, host side) for its addresses.
    pub fn policy_text_with_veth(&self, mode: &str) -> String {
        format!(
            "{}    interfaces:\n      - name: v-pod\n        addresses: [{POD4}, {POD6}]\n",
            self.policy_text(mode)
        )
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// Runs a client (see `client`) in the pod's namespace, inside the enforced cgroup.
    pub fn in_pod(&self, client: (&str, Vec<String>)) -> Output {
        self.in_cgroup(&self.pod_cgroup, client)
    }

    /// Runs a client in the pod's namespace, inside a cgroup with no policy.
    pub fn in_other_cgroup(&self, client: (&str, Vec<String>)) -> Output {
        self.in_cgroup(&self.other_cgroup, client)
    }

    pub fn in_cgroup(&self, cgroup: &Path, (program, args): (&str, Vec<String>)) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.pod.run(Some(cgroup), program, &args)
    }
}

/// The cgroup2 mount point from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .context("no cgroup2 filesystem in /proc/mounts")
}

/// Kills every process in a cgroup subtree and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.base_cgroup);
        if self.pin_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("warning: could not remove {}: {e}", self.pin_dir.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Output of a client as one string, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

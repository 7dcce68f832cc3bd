//! A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler, built from their published Go modules by `cargo xtask cluster build` (and
//! `cargo xtask test`), run as they run in a cluster: TLS everywhere but etcd's loopback, RBAC and
//! the Node authorizer on, admission as a cluster has it (NodeRestriction and the default set,
//! ValidatingAdmissionPolicy included), service-account tokens signed by the controller-manager.
//!
//! It runs in a network namespace of its own, so its ports never meet the host's and everything
//! it opens goes when the namespace goes. The API server listens on [`API_ADDR`], an address of a
//! dummy interface there (a cluster's endpoints may not be loopback). Dropped, it stops every
//! process and removes the namespace; [`ControlPlane::detach`] leaves it running instead (what
//! `cargo xtask cluster up` does).

pub mod dns;
pub mod e2e;
pub mod images;
pub mod node;
pub mod outside;
pub mod pki;
pub mod plane_gateway;
pub mod prometheus;
mod supervisor;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::NetNs;
use supervisor::Supervisor;

/// The Kubernetes release the cluster runs (and the kubectl the tests use).
pub const KUBE_VERSION: &str = "v1.35.4";
/// The etcd release that Kubernetes release supports.
pub const ETCD_VERSION: &str = "v3.6.14";
/// Where the API server listens, inside the control plane's network namespace.
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 250, 1);
pub const API_PORT: u16 = 6443;
/// ClusterIP range; the first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.232.0.0/16";
const FIRST_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 1);
/// Overrides where the binaries are looked for (a directory holding all seven).
pub const BIN_DIR_ENV: &str = "EGRESSFW_KUBE_BIN_DIR";

/// The binaries, where `cargo xtask cluster build` caches them.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
}

impl Binaries {
    /// `~/.cache/egressfw/kube-<version>/` and `~/.cache/egressfw/etcd-<version>/`, or
    /// [`BIN_DIR_ENV`]; an error naming the command that builds them when one is missing.
    pub fn find() -> Result<Self> {
        let (kube, etcd) = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) => (PathBuf::from(&dir), PathBuf::from(dir)),
            None => (kube_cache_dir()?, etcd_cache_dir()?),
        };
        let found = Self {
            etcd: etcd.join("etcd"),
            kube_apiserver: kube.join("kube-apiserver"),
            kube_controller_manager: kube.join("kube-controller-manager"),
            kube_scheduler: kube.join("kube-scheduler"),
            kubectl: kube.join("kubectl"),
            kubelet: kube.join("kubelet"),
            kube_proxy: kube.join("kube-proxy"),
        };
        for path in [
            &found.etcd,
            &found.kube_apiserver,
            &found.kube_controller_manager,
            &found.kube_scheduler,
            &found.kubectl,
            &found.kubelet,
            &found.kube_proxy,
        ] {
            if !path.is_file() {
                bail!(
                    "{} is missing: `cargo xtask cluster build` (or `cargo xtask test`) builds Kubernetes {KUBE_VERSION} and etcd {ETCD_VERSION} from their Go modules",
                    path.display()
                );
            }
        }
        Ok(found)
    }
}

/// Where the Kubernetes binaries of [`KUBE_VERSION`] are cached.
pub fn kube_cache_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join(format!("kube-{KUBE_VERSION}")))
}

/// Where the etcd binary of [`ETCD_VERSION`] is cached.
pub fn etcd_cache_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join(format!("etcd-{ETCD_VERSION}")))
}

fn cache_root() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/egressfw"))
}

/// A test's directory for a cluster's files, removed on drop: declare it before the
/// [`ControlPlane`] so that the cluster goes first.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self(std::env::temp_dir().join(format!("egressfw-{tag}-{}", std::process::id())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running control plane.
pub struct ControlPlane {
    /// First, so that the processes stop before the namespace goes.
    procs: Supervisor,
    pub ns: NetNs,
    pub dir: PathBuf,
    pub bins: Binaries,
    /// The cluster administrator's kubeconfig (group `system:masters`).
    pub admin_kubeconfig: PathBuf,
    pub pki: pki::Pki,
}

impl ControlPlane {
    /// Starts a control plane named `name` (its network namespace is `egfw-cp-<name>`) with its
    /// files under `dir`, and waits until the API server is ready and the controller-manager
    /// has made the `default` ServiceAccount (pods cannot be created before).
    pub fn start(name: &str, dir: &Path) -> Result<Self> {
        let bins = Binaries::find()?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ns = NetNs::create(&format!("egfw-cp-{name}"))?;
        // On the namespace's loopback device (kernels without the dummy driver exist): the
        // address itself is not a loopback one, which a cluster's endpoints may not be.
        ns.ip(&["addr", "add", &format!("{API_ADDR}/32"), "dev", "lo"])?;

        let pki = pki::Pki::create(&dir.join("pki"), &[API_ADDR, FIRST_SERVICE_IP])?;
        let server = format!("https://{API_ADDR}:{API_PORT}");
        pki.client("admin", "egressfw-admin", &["system:masters"])?;
        pki.client("controller-manager", "system:kube-controller-manager", &[])?;
        pki.client("scheduler", "system:kube-scheduler", &[])?;
        pki.client("apiserver-kubelet-client", "kube-apiserver", &["system:masters"])?;
        let admin_kubeconfig = pki.kubeconfig("admin", &server)?;
        let cm_kubeconfig = pki.kubeconfig("controller-manager", &server)?;
        let scheduler_kubeconfig = pki.kubeconfig("scheduler", &server)?;

        let procs = Supervisor::new(dir);
        let mut plane = Self { procs, ns, dir: dir.to_path_buf(), bins, admin_kubeconfig, pki };
        let etcd_data = dir.join("etcd");
        plane.spawn(
            "etcd",
            &plane.bins.etcd.clone(),
            &[
                "--data-dir",
                &etcd_data.display().to_string(),
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--name",
                "default",
                "--log-level",
                "warn",
            ],
        )?;
        let pki_dir = plane.pki.dir.clone();
        let p = |n: &str| pki_dir.join(n).display().to_string();
        plane.spawn(
            "kube-apiserver",
            &plane.bins.kube_apiserver.clone(),
            &[
                "--etcd-servers",
                "http://127.0.0.1:2379",
                "--bind-address",
                &API_ADDR.to_string(),
                "--advertise-address",
                &API_ADDR.to_string(),
                "--secure-port",
                &API_PORT.to_string(),
                "--client-ca-file",
                &p("ca.crt"),
                "--tls-cert-file",
                &p("apiserver.crt"),
                "--tls-private-key-file",
                &p("apiserver.key"),
                "--kubelet-client-certificate",
                &p("apiserver-kubelet-client.crt"),
                "--kubelet-client-key",
                &p("apiserver-kubelet-client.key"),
                // The node's name resolves nowhere here (kubectl exec and logs go to its IP).
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--service-cluster-ip-range",
                SERVICE_CIDR,
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                &p("sa.pub"),
                "--service-account-signing-key-file",
                &p("sa.key"),
                "--authorization-mode",
                "Node,RBAC",
                "--enable-admission-plugins",
                "NodeRestriction",
                "--allow-privileged=true",
                "--v",
                "1",
            ],
        )?;
        plane.wait_for("the API server to be ready", Duration::from_secs(120), |p| {
            p.kubectl(&["get", "--raw", "/readyz"]).status.success()
        })?;
        let mut cm = controller_flags(&cm_kubeconfig);
        cm.extend(
            [
                ("--service-account-private-key-file", p("sa.key")),
                ("--root-ca-file", p("ca.crt")),
                ("--cluster-signing-cert-file", p("ca.crt")),
                ("--cluster-signing-key-file", p("ca.key")),
                ("--use-service-account-credentials", "true".into()),
            ]
            .map(|(k, v)| format!("{k}={v}")),
        );
        plane.spawn("kube-controller-manager", &plane.bins.kube_controller_manager.clone(), &cm)?;
        let scheduler = controller_flags(&scheduler_kubeconfig);
        plane.spawn("kube-scheduler", &plane.bins.kube_scheduler.clone(), &scheduler)?;
        plane.wait_for("the controller-manager's default ServiceAccount", Duration::from_secs(120), |p| {
            p.kubectl(&["get", "serviceaccount", "default", "--namespace", "default"]).status.success()
        })?;
        Ok(plane)
    }

    /// Starts `program` inside the namespace, its output in `<dir>/<name>.log`.
    fn spawn(&mut self, name: &str, program: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Result<()> {
        let mut cmd = self.ns.command(&program.display().to_string(), None);
        cmd.args(args);
        self.procs.spawn(name, cmd)
    }

    fn wait_for(&mut self, what: &str, limit: Duration, ready: impl Fn(&Self) -> bool) -> Result<()> {
        let mut procs = std::mem::replace(&mut self.procs, Supervisor::new(&self.dir));
        let result = procs.wait_for(what, limit, "kube-apiserver", || ready(self));
        self.procs = procs;
        result
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, name: &str) -> String {
        self.procs.log_tail(name)
    }

    /// kubectl as the cluster administrator, inside the namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_command(args).output().expect("running kubectl")
    }

    /// kubectl as the administrator, with `stdin` as its standard input.
    pub fn kubectl_with_input(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = self
            .kubectl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("writing to kubectl");
        child.wait_with_output().expect("waiting for kubectl")
    }

    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command(&self.bins.kubectl.display().to_string(), None);
        cmd.args(args).env("KUBECONFIG", &self.admin_kubeconfig);
        cmd
    }

    /// Leaves the control plane running (its processes and namespace outlive this value) and
    /// records their pids in `<dir>/pids`, for [`stop_detached`].
    pub fn detach(mut self) -> Result<()> {
        let pids: Vec<String> = self.procs.detach().iter().map(|(n, pid)| format!("{n} {pid}")).collect();
        fs::write(self.dir.join("pids"), pids.join("\n") + "\n")?;
        std::mem::forget(std::mem::replace(&mut self.ns, NetNs { name: String::new() }));
        Ok(())
    }
}

/// What the controller-manager and the scheduler share: their kubeconfig for the API and for
/// checking who calls their own endpoints, no leader election (one replica), their endpoints on
/// loopback.
fn controller_flags(kubeconfig: &Path) -> Vec<String> {
    let k = kubeconfig.display();
    vec![
        format!("--kubeconfig={k}"),
        format!("--authentication-kubeconfig={k}"),
        format!("--authorization-kubeconfig={k}"),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--v=1".into(),
    ]
}

/// Stops a control plane that [`ControlPlane::detach`] left running under `dir` (and its node,
/// if [`node::Node::detach`] left one), and removes their network namespaces `egfw-cp-<name>`
/// and `egfw-out-<name>`. Nothing running is not an error.
pub fn stop_detached(name: &str, dir: &Path) -> Result<()> {
    node::stop_detached(&dir.join("node"));
    drop(NetNs { name: format!("egfw-out-{name}") });
    let pids: Vec<u32> = fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    supervisor::stop_pids(&pids);
    let _ = fs::remove_file(dir.join("pids"));
    drop(NetNs { name: format!("egfw-cp-{name}") });
    Ok(())
}

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

pub mod pki;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::NetNs;

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
/// Overrides where the binaries are looked for (a directory holding all five).
pub const BIN_DIR_ENV: &str = "EGRESSFW_KUBE_BIN_DIR";

/// The binaries, where `cargo xtask cluster build` caches them.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubectl: PathBuf,
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
        };
        for path in [
            &found.etcd,
            &found.kube_apiserver,
            &found.kube_controller_manager,
            &found.kube_scheduler,
            &found.kubectl,
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

/// A running control plane.
pub struct ControlPlane {
    pub ns: NetNs,
    pub dir: PathBuf,
    pub bins: Binaries,
    /// The cluster administrator's kubeconfig (group `system:masters`).
    pub admin_kubeconfig: PathBuf,
    children: Vec<(&'static str, Child)>,
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

        let mut plane = Self { ns, dir: dir.to_path_buf(), bins, admin_kubeconfig, children: Vec::new() };
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
        let p = |n: &str| pki.path(n);
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
    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = self.ns.command(&program.display().to_string(), None);
        cmd.args(args).stdout(log.try_clone()?).stderr(log);
        // A session of its own: a terminal's ^C reaches `cargo xtask`, not a detached cluster.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
        self.children.push((name, child));
        Ok(())
    }

    fn wait_for(&mut self, what: &str, limit: Duration, mut ready: impl FnMut(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + crate::patience(limit);
        loop {
            if ready(self) {
                return Ok(());
            }
            let exited = self.children.iter_mut().find_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some((*name, status)),
                _ => None,
            });
            if let Some((name, status)) = exited {
                bail!("{name} exited ({status}) while waiting for {what}:\n{}", self.log_tail(name));
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; kube-apiserver's log ends:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
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
        let pids: Vec<String> = self.children.iter().map(|(n, c)| format!("{n} {}", c.id())).collect();
        fs::write(self.dir.join("pids"), pids.join("\n") + "\n")?;
        self.children.clear();
        std::mem::forget(std::mem::replace(&mut self.ns, NetNs { name: String::new() }));
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // In reverse order of start: etcd last.
        for (_, child) in self.children.iter().rev() {
            signal(child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && self.children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
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

/// Stops a control plane that [`ControlPlane::detach`] left running under `dir`, and removes its
/// network namespace `egfw-cp-<name>`. Nothing running is not an error.
pub fn stop_detached(name: &str, dir: &Path) -> Result<()> {
    let pids: Vec<u32> = fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    stop(&pids);
    let _ = fs::remove_file(dir.join("pids"));
    drop(NetNs { name: format!("egfw-cp-{name}") });
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: plain syscall on a pid of the control plane's.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// SIGTERM, then SIGKILL to whatever is still there a few seconds later (processes this one did
/// not start: the init process reaps them, so a signal 0 tells whether they are gone).
fn stop(pids: &[u32]) {
    // In reverse order of start: etcd last.
    for &pid in pids.iter().rev() {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|&p| signal(p, 0)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for &pid in pids {
        signal(pid, libc::SIGKILL);
    }
}

//! `cargo xtask cluster build|up|down|status|kubectl`: a real Kubernetes control plane on this
//! machine (tests/src/cluster). `build` compiles Kubernetes and etcd from their published Go
//! modules at the pinned versions, once: the binaries are cached under `~/.cache/egressfw/`,
//! keyed by version, so a second run builds nothing.
//!
//! Kubernetes cannot be `go install`ed: its go.mod points the `k8s.io/*` staging modules at
//! `./staging/...` with replace lines. The build goes through a small wrapper module that
//! requires `k8s.io/kubernetes` and replaces every staging module with its published release
//! (`v0.<minor>.<patch>`), read from that go.mod rather than typed here. etcd's server module has
//! replace lines too, and gets a wrapper of its own.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use egress_tests::cluster::{
    self, ControlPlane, ETCD_VERSION, KUBE_VERSION, images,
    node::{Node, NodeShape},
};

use crate::run::require_root;

/// The commands of `k8s.io/kubernetes` the cluster runs.
const KUBE_COMMANDS: [&str; 6] =
    ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"];
/// The name `up` gives its control plane (network namespace `egfw-cp-cluster`).
const NAME: &str = "cluster";

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Build (or find in the cache) Kubernetes and etcd.
    Build,
    /// Start a cluster that keeps running: the control plane and a node (containerd, kubelet,
    /// kube-proxy) in network namespace egfw-cp-cluster.
    Up,
    /// Stop it and remove its namespace.
    Down,
    /// Whether it runs, and where its kubeconfig is.
    Status,
    /// Run kubectl against it, as the cluster administrator: `cargo xtask cluster kubectl -- get ns`.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn run(command: &ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Build => build().map(|_| ()),
        ClusterCommand::Up => {
            require_root("cargo xtask cluster up")?;
            crate::toolchain::ensure_debian_packages()?;
            build()?;
            let dir = state_dir()?;
            let _ = cluster::stop_detached(NAME, &dir);
            eprintln!("==> starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler");
            let plane = ControlPlane::start(NAME, &dir)?;
            eprintln!("==> starting the node: containerd, kubelet, kube-proxy (routed pod network)");
            let node = Node::start(&plane, NodeShape::default())?;
            eprintln!("==> importing the pause and client images");
            let work = dir.join("images");
            for image in [images::pause(&work)?, images::client(&work)?] {
                node.import_image(&image.archive, &image.base_name)?;
            }
            println!(
                "cluster up: API server https://{}:{} in network namespace {}, node {} Ready\nkubeconfig: {}\nimages: {} (the host's /usr mounted at /usr runs its tools)\ntry: cargo xtask cluster kubectl -- get nodes -o wide",
                cluster::API_ADDR,
                cluster::API_PORT,
                plane.ns.name,
                cluster::node::NODE_NAME,
                plane.admin_kubeconfig.display(),
                images::CLIENT_IMAGE,
            );
            node.detach()?;
            plane.detach()
        }
        ClusterCommand::Down => {
            require_root("cargo xtask cluster down")?;
            cluster::stop_detached(NAME, &state_dir()?)?;
            println!("cluster stopped");
            Ok(())
        }
        ClusterCommand::Status => {
            let out = kubectl(&["get", "--raw", "/readyz"])?;
            if out.status.success() {
                println!(
                    "control plane up; kubeconfig: {}",
                    state_dir()?.join("pki/admin.kubeconfig").display()
                );
            } else {
                println!("control plane not running ({})", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        }
        ClusterCommand::Kubectl { args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kubectl(&args)?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                bail!("kubectl failed with {}", out.status);
            }
            Ok(())
        }
    }
}

fn state_dir() -> Result<PathBuf> {
    Ok(cluster::kube_cache_dir()?.with_file_name("cluster"))
}

/// kubectl inside the detached control plane's namespace.
fn kubectl(args: &[&str]) -> Result<std::process::Output> {
    let bins = cluster::Binaries::find()?;
    let netns = format!("egfw-cp-{NAME}");
    Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(&bins.kubectl)
        .args(args)
        .env("KUBECONFIG", state_dir()?.join("pki/admin.kubeconfig"))
        .output()
        .context("running kubectl")
}

/// Builds whatever the cache lacks; returns the binaries.
pub fn build() -> Result<cluster::Binaries> {
    if let Ok(found) = cluster::Binaries::find() {
        return Ok(found);
    }
    let kube = cluster::kube_cache_dir()?;
    if !KUBE_COMMANDS.iter().all(|c| kube.join(c).is_file()) {
        build_kubernetes(&kube)?;
    }
    let etcd = cluster::etcd_cache_dir()?;
    if !etcd.join("etcd").is_file() {
        build_etcd(&etcd)?;
    }
    cluster::Binaries::find()
}

fn build_kubernetes(into: &Path) -> Result<()> {
    eprintln!(
        "==> building Kubernetes {KUBE_VERSION} ({}) from its Go modules: about 10-20 minutes on 2 cores the first time (9 min measured), cached after",
        KUBE_COMMANDS.join(", ")
    );
    let module = wrapper_module(&beside(into, "module"))?;
    let staging = staging_modules()?;
    let minor = KUBE_VERSION.trim_start_matches('v').split('.').nth(1).context("version")?.to_owned();
    let published = format!("v0.{}", KUBE_VERSION.trim_start_matches("v1."));
    for m in &staging {
        go(&module, &["mod", "edit", &format!("-replace={m}={m}@{published}")])?;
    }
    let tools: Vec<String> =
        KUBE_COMMANDS.iter().map(|c| format!("k8s.io/kubernetes/cmd/{c}@{KUBE_VERSION}")).collect();
    let mut args = vec!["get", "-tool"];
    args.extend(tools.iter().map(String::as_str));
    go(&module, &args)?;
    // As upstream's hack/lib/golang.sh builds them: static, trimmed, with the version stamped
    // (without it the node and `kubectl version` report a placeholder).
    let mut ldflags = String::from("-s -w");
    for pkg in ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"] {
        ldflags.push_str(&format!(
            " -X {pkg}.gitVersion={KUBE_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
        ));
    }
    let out_dir = beside(into, "partial");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir)?;
    let packages: Vec<String> = KUBE_COMMANDS.iter().map(|c| format!("k8s.io/kubernetes/cmd/{c}")).collect();
    let mut cmd = go_command(&module)?;
    cmd.args(["build", "-trimpath", "-tags=selinux,notest,grpcnotrace", "-ldflags", &ldflags, "-o"])
        .arg(format!("{}/", out_dir.display()))
        .args(&packages)
        .env("CGO_ENABLED", "0");
    run_with_heartbeat(&mut cmd, "building Kubernetes")?;
    let _ = fs::remove_dir_all(into);
    fs::rename(&out_dir, into).with_context(|| format!("moving the build to {}", into.display()))
}

fn build_etcd(into: &Path) -> Result<()> {
    eprintln!("==> building etcd {ETCD_VERSION} from its Go module (a few minutes the first time)");
    let module = wrapper_module(&beside(into, "module"))?;
    go(&module, &["get", "-tool", &format!("go.etcd.io/etcd/server/v3@{ETCD_VERSION}")])?;
    let out_dir = beside(into, "partial");
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir)?;
    let mut cmd = go_command(&module)?;
    cmd.args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
        .arg(out_dir.join("etcd"))
        .arg("go.etcd.io/etcd/server/v3")
        .env("CGO_ENABLED", "0");
    run_with_heartbeat(&mut cmd, "building etcd")?;
    let _ = fs::remove_dir_all(into);
    fs::rename(&out_dir, into).with_context(|| format!("moving the build to {}", into.display()))
}

/// `<dir>.<what>`, next to `dir` (the version's dots are part of the name, not an extension).
fn beside(dir: &Path, what: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}.{what}"))
}

/// An empty module in `dir` (made anew), for `go get -tool` to fill.
fn wrapper_module(dir: &Path) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join("go.mod"), "module egressfw.local/build\n\ngo 1.25\n")?;
    Ok(dir.to_path_buf())
}

/// The staging modules `k8s.io/kubernetes`'s go.mod replaces with `./staging/...`.
fn staging_modules() -> Result<Vec<String>> {
    let out = go_command(Path::new("."))?
        .args(["mod", "download", "-json", &format!("k8s.io/kubernetes@{KUBE_VERSION}")])
        .output()
        .context("go mod download")?;
    if !out.status.success() {
        bail!("go mod download k8s.io/kubernetes@{KUBE_VERSION}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("go mod download -json")?;
    let go_mod = info["GoMod"].as_str().context("no GoMod in go mod download's answer")?;
    let text = fs::read_to_string(go_mod).with_context(|| format!("reading {go_mod}"))?;
    let staging: Vec<String> = text
        .lines()
        .filter(|l| l.contains("=> ./staging/"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    if staging.is_empty() {
        bail!("{go_mod} replaces no staging module: the wrapper would build the wrong thing");
    }
    Ok(staging)
}

fn go_command(dir: &Path) -> Result<Command> {
    let mut cmd = crate::run::go()?;
    cmd.current_dir(dir);
    Ok(cmd)
}

fn go(dir: &Path, args: &[&str]) -> Result<()> {
    let out = go_command(dir)?.args(args).output().context("running go")?;
    if !out.status.success() {
        bail!("go {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a long command, printing how long it has been running every minute.
fn run_with_heartbeat(cmd: &mut Command, what: &str) -> Result<()> {
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("{what}: starting go"))?;
    let mut next = Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{what} failed with {status}");
            }
            eprintln!("    {what}: done in {}s", started.elapsed().as_secs());
            return Ok(());
        }
        if started.elapsed() >= next {
            eprintln!("    {what}: {} min so far", next.as_secs() / 60);
            next += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

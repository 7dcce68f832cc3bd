//! `cargo xtask bench policy`: how long the node agent takes from a Kubernetes change to
//! enforcement, with 1, 100 and 1,000 pods on the node, and how much memory it uses.
//!
//! The node is the integration tests' simulated one (fake API server, kubelet-style cgroup
//! tree, real kernel). The background pods all belong to an enforced namespace, so each has its
//! policy and six links: the worst case for a full diff. "Enforced" means the kernel state is
//! complete: the pod's last link pin exists (links are attached after the policy is written).
//! Two changes are timed:
//! - label: an unlabelled namespace with one running pod gets `egressfw.io/mode=enforce`;
//! - pod start: a pod of the enforced namespace is created in the API and its cgroup made.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use egress_tests::kube_node::KubeNode;

use super::percentile;
use crate::{run, toolchain};

#[derive(Args)]
pub struct PolicyArgs {
    /// Pods on the node, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    pods: Vec<usize>,
    /// Timed changes of each kind per run.
    #[arg(long, default_value_t = 30)]
    samples: usize,
}

struct RunResult {
    pods: usize,
    startup: Duration,
    label: Vec<f64>,
    pod_start: Vec<f64>,
    rss_kib: u64,
}

/// The last program `reconcile` attaches to a pod; its pin completes enforcement.
const LAST_LINK: &str = "egress_sendmsg6";
const TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(args: &PolicyArgs) -> Result<()> {
    run::require_root("cargo xtask bench")?;
    let tc = toolchain::setup_all()?;
    let bin = run::build_agent(&tc, true)?;
    // SAFETY: single-threaded here; the harness reads it when starting the agent.
    unsafe { std::env::set_var("EGRESS_AGENT_BIN", &bin) };
    let mut results = Vec::new();
    for &pods in &args.pods {
        eprintln!("{pods} pods on the node: setting up");
        results.push(measure(pods, args.samples)?);
    }
    println!("\n{}", render(&results, args));
    Ok(())
}

fn uid(kind: &str, i: usize) -> String {
    format!("{kind:0>8}-0000-4000-8000-{i:012}")
}

fn measure(pods: usize, samples: usize) -> Result<RunResult> {
    let node = KubeNode::new();
    node.label("load", &[("egressfw.io/mode", "enforce")]);
    for i in 0..pods {
        let u = uid("1", i);
        node.add_pod("load", &format!("load-{i}"), &u);
        node.create_pod_cgroup(&u);
    }
    let probe = uid("2", 0);
    node.label("target", &[]);
    node.add_pod("target", "probe", &probe);
    node.create_pod_cgroup(&probe);

    let started = Instant::now();
    let agent = node.try_start_agent().map_err(|log| anyhow::anyhow!("agent did not start:\n{log}"))?;
    let startup = started.elapsed();
    let rss_kib = rss_kib(agent.pid().context("agent pid")?)?;
    eprintln!("  agent ready after {startup:.2?}, {rss_kib} KiB resident");

    let probe_pin = last_link_pin(&node, &probe)?;
    let mut label = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        node.label("target", &[("egressfw.io/mode", "enforce")]);
        wait(|| probe_pin.exists(), "the labelled namespace's pod to be enforced")?;
        label.push(t0.elapsed().as_secs_f64());
        node.label("target", &[]);
        wait(|| !probe_pin.exists(), "the pod to be released")?;
    }
    let mut pod_start = Vec::with_capacity(samples);
    for i in 0..samples {
        let u = uid("3", i);
        let t0 = Instant::now();
        node.add_pod("load", &format!("new-{i}"), &u);
        node.create_pod_cgroup(&u);
        let pin = last_link_pin(&node, &u)?;
        wait(|| pin.exists(), "the new pod to be enforced")?;
        pod_start.push(t0.elapsed().as_secs_f64());
    }
    drop(agent);
    Ok(RunResult { pods, startup, label, pod_start, rss_kib })
}

fn last_link_pin(node: &KubeNode, uid: &str) -> Result<PathBuf> {
    let dir = node.pod_cgroup(uid);
    let id = fs::metadata(&dir).with_context(|| format!("cgroup {}", dir.display()))?.ino();
    Ok(node.lab.pin_dir.join("links").join(id.to_string()).join(LAST_LINK))
}

fn wait(mut done: impl FnMut() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {TIMEOUT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("reading the agent's status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<agent>/status")
}

fn render(results: &[RunResult], args: &PolicyArgs) -> String {
    let ms = |v: &[f64], p: f64| percentile(v.to_vec(), p) * 1000.0;
    let mut s = String::new();
    let pods: Vec<String> = args.pods.iter().map(ToString::to_string).collect();
    let _ = writeln!(s, "cargo xtask bench policy --pods {} --samples {}\n", pods.join(","), args.samples);
    let _ = writeln!(
        s,
        "| pods on the node | label -> enforced p50 | p99 | pod start -> enforced p50 | p99 | agent startup | agent RSS |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2?} | {:.1} MiB |",
            r.pods,
            ms(&r.label, 50.0),
            ms(&r.label, 99.0),
            ms(&r.pod_start, 50.0),
            ms(&r.pod_start, 99.0),
            r.startup,
            r.rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(s, "\nTarget: p99 under 100 ms, flat in the number of pods.");
    s
}

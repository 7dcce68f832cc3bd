//! `cargo xtask bench policy-apply`: how long a policy resource takes from `kubectl apply` to
//! the gateway's decisions, on a real API server (etcd, kube-apiserver, as `cargo xtask
//! cluster` builds them), with no other policies and with many.
//!
//! The gateway (release build) runs in the control plane's network namespace with a static
//! source table (127.0.0.0/8 is namespace team-a) and `policyResources: true`. An Admin
//! `ClusterEgressPolicy` passes the API server's own address on port 9 to every namespace.
//! Each timed change is one of team-a's `EgressPolicy` created (accepting that address) or
//! deleted; the clock starts when `kubectl` returns (the object is stored) and stops at the
//! first CONNECT to that address that the gateway decides the new way: 403 before, and after
//! the Accept the gateway dials (nothing listens: 502). Probes every 2 ms, each a new
//! connection. Traffic stays inside the namespace.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use clap::Args;
use egress_tests::cluster::{
    API_ADDR, ControlPlane, TempDir,
    plane_gateway::{self, PlaneGateway},
};

use super::percentile;
use crate::{run, toolchain};

#[derive(Args)]
pub struct PolicyApplyArgs {
    /// Timed changes (creations and deletions, alternating) per run.
    #[arg(long, default_value_t = 40)]
    changes: usize,
    /// Other EgressPolicy objects in the cluster, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "0,1000")]
    others: Vec<usize>,
}

const PROXY_PORT: u16 = 13128;
const PROXY: &str = "127.0.0.1:13128";
const TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(args: &PolicyApplyArgs) -> Result<()> {
    run::require_root("cargo xtask bench policy-apply")?;
    ensure!(args.changes >= 2, "--changes must be at least 2");
    let tc = toolchain::setup_all()?;
    let agent = run::build_agent(&tc, true)?;
    crate::cluster::build()?;
    let dir = TempDir::new("bench-apply");
    eprintln!("==> control plane (etcd, kube-apiserver), the CRDs, the gateway");
    let plane = ControlPlane::start("bapply", &dir.0)?;
    let kubectl = |args: &[&str]| -> Result<String> {
        let out = plane.kubectl(args);
        ensure!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let apply = |yaml: &str| -> Result<()> {
        let out = plane.kubectl_with_input(&["apply", "-f", "-"], yaml);
        ensure!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/crds/egressfw.io.yaml");
    kubectl(&["apply", "-f", &crds.display().to_string()])?;
    for crd in ["clusteregresspolicies.egressfw.io", "egresspolicies.egressfw.io"] {
        kubectl(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=30s"])?;
    }
    kubectl(&["create", "namespace", "team-a"])?;
    kubectl(&["create", "namespace", "filler"])?;
    apply(&format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {{name: delegate}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{}}}}\n  egress:\n    - {{name: probe, action: Pass, to: [{{networks: [{API_ADDR}/32]}}], ports: [{{port: 9}}]}}\n"
    ))?;
    let gateway = PlaneGateway::start(&plane, &agent, &dir.0, "gateway", PROXY_PORT, &[])?;
    let probe = || plane.ns.within(connect_status);

    let mut rows = Vec::new();
    let mut others_now = 0;
    for &others in &args.others {
        if others > others_now {
            eprintln!("==> {others} other EgressPolicy objects");
            apply(&fillers(others_now, others))?;
            others_now = others;
            // Timed from a settled state: every filler applied and its status written (the
            // gateway's own writes come back as watch events too).
            let started = Instant::now();
            loop {
                let written = kubectl(&[
                    "get",
                    "egresspolicies",
                    "-n",
                    "filler",
                    "-o",
                    "jsonpath={range .items[*]}{.status.observedGeneration}{\"\\n\"}{end}",
                ])?;
                let done = written.lines().filter(|l| !l.trim().is_empty()).count();
                if done >= others {
                    eprintln!(
                        "    the gateway applied them and wrote their status in {:.1?}",
                        started.elapsed()
                    );
                    break;
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!("only {done} of {others} fillers have a status after 5 minutes");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        eprintln!("==> {} changes with {others} other policies", args.changes);
        let mut took = Vec::new();
        for i in 0..args.changes {
            let (want_allowed, what) = if i % 2 == 0 { (true, "creating") } else { (false, "deleting") };
            if want_allowed {
                apply(&team_policy())?;
            } else {
                kubectl(&["delete", "egresspolicy", "probe", "-n", "team-a"])?;
            }
            let started = Instant::now();
            loop {
                let status = probe()?;
                if (status != 403) == want_allowed {
                    break;
                }
                if started.elapsed() > TIMEOUT {
                    bail!("{what} the policy had no effect within {TIMEOUT:?} (last answer {status})");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            took.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push((others, took));
    }
    drop(gateway);
    println!("\ncargo xtask bench policy-apply --changes {}\n", args.changes);
    println!("| other EgressPolicy objects | changes | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    let mut worst = 0.0_f64;
    for (others, took) in rows {
        let max = took.iter().copied().fold(0.0, f64::max);
        let p99 = percentile(took.clone(), 99.0);
        worst = worst.max(p99);
        println!("| {others} | {} | {:.1} | {p99:.1} | {max:.1} |", took.len(), percentile(took, 50.0));
    }
    println!(
        "\ntarget: a change applies to new connections within a second: p99 {worst:.1} ms, {}",
        if worst <= 1000.0 { "met" } else { "NOT MET" }
    );
    Ok(())
}

/// What the gateway answers a CONNECT to the delegated address.
fn connect_status() -> Result<u16> {
    Ok(plane_gateway::connect(PROXY, &format!("{API_ADDR}:9"))?.0)
}

/// team-a accepts the delegated address.
fn team_policy() -> String {
    format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: probe, namespace: team-a}}\nspec:\n  podSelector: {{}}\n  egress:\n    - {{name: probe, action: Accept, to: [{{networks: [{API_ADDR}/32]}}], ports: [{{port: 9}}]}}\n"
    )
}

/// EgressPolicy objects `from..to` in namespace `filler`, each with two rules, as one List.
fn fillers(from: usize, to: usize) -> String {
    let mut list = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for i in from..to {
        list.push_str(&format!(
            "- apiVersion: egressfw.io/v1alpha1\n  kind: EgressPolicy\n  metadata: {{name: filler-{i}, namespace: filler}}\n  spec:\n    podSelector: {{matchLabels: {{app: a{i}}}}}\n    egress:\n      - {{name: api, action: Accept, to: [{{domainNames: [api{i}.example.com]}}], ports: [{{port: 443}}]}}\n      - {{name: net, action: Accept, to: [{{networks: [10.{}.{}.0/24]}}]}}\n",
            i / 256 % 256,
            i % 256
        ));
    }
    list
}

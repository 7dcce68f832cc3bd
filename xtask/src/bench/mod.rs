//! `cargo xtask bench ...`: benchmarks that print results measured side by side in one run.

mod datapath;
mod gateway;
mod gateway_rules;
mod observations;
mod policy;
mod policy_apply;

use anyhow::{Context as _, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// iperf3 TCP throughput, 64-byte UDP packet rate, and ns per program run.
    Datapath(datapath::DatapathArgs),
    /// Node agent: time from a label change or pod creation to enforcement, and memory, with
    /// 1 to 1,000 pods on the node.
    Policy(policy::PolicyArgs),
    /// Egress gateway vs squid vs tinyproxy vs no proxy: CONNECT throughput, new tunnels per
    /// second, added round-trip latency, memory per idle tunnel.
    Gateway(gateway::GatewayArgs),
    /// Egress gateway: the cost of one authorisation from 10 to 10,000 rules over 1,000
    /// namespaces (a micro-benchmark, no network).
    GatewayRules(gateway_rules::GatewayRulesArgs),
    /// Egress gateway: the observations table under a flood of distinct hosts (entries, bytes,
    /// evictions, memory, cost per connection).
    Observations(observations::ObservationsArgs),
    /// Egress gateway: time from `kubectl apply` of a policy resource to the first connection
    /// it decides, on a real API server, with no other policies and with many.
    PolicyApply(policy_apply::PolicyApplyArgs),
    /// The client of `bench gateway`'s steered route, which must run inside the enforced
    /// cgroup: started by the benchmark, not by hand.
    #[command(hide = true)]
    SteeringClient(gateway::SteeringClientArgs),
}

pub fn run(which: &Bench) -> Result<()> {
    match which {
        Bench::Datapath(args) => datapath::run(args),
        Bench::Policy(args) => policy::run(args),
        Bench::Gateway(args) => gateway::run(args),
        Bench::GatewayRules(args) => gateway_rules::run(args),
        Bench::PolicyApply(args) => policy_apply::run(args),
        Bench::Observations(args) => observations::run(args),
        Bench::SteeringClient(args) => gateway::steering_client(args),
    }
}

/// The kernel's run-time statistics of BPF programs (`kernel.bpf_stats_enabled`), on while this
/// lives: collecting them costs a few ns per run, so they are on only while measuring.
struct BpfStats;

/// A program's totals so far.
#[derive(Clone, Copy)]
struct ProgramRuns {
    ns: u64,
    runs: u64,
}

impl BpfStats {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        std::fs::write(Self::SYSCTL, "1").context("enabling bpf_stats")?;
        Ok(Self)
    }

    /// The run time and run count of program `id` so far (bpftool).
    fn read(&self, id: u64) -> Result<ProgramRuns> {
        let out = crate::run::output(std::process::Command::new("bpftool").args([
            "prog",
            "show",
            "id",
            &id.to_string(),
            "--json",
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("bpftool prog show --json")?;
        Ok(ProgramRuns {
            ns: v["run_time_ns"].as_u64().unwrap_or(0),
            runs: v["run_cnt"].as_u64().unwrap_or(0),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, "0");
    }
}

fn median(v: Vec<f64>) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile (`p` in 0..=100); NaN for no samples.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The agent's `inspect --json` report for the lab's pins.
fn inspect(lab: &egress_tests::lab::Lab) -> Result<serde_json::Value> {
    let report = egress_tests::agent::cli(lab, &["inspect", "--json"]);
    serde_json::from_slice(&report.stdout).context("inspect --json")
}

/// The program id of the pinned link running `program` in an inspect `links` list.
fn program_id(links: &serde_json::Value, program: &str) -> Result<u64> {
    links
        .as_array()
        .and_then(|links| links.iter().find(|l| l["program"] == program))
        .and_then(|l| l["program_id"].as_u64())
        .with_context(|| format!("no {program} link in inspect (tcx needs Linux 6.6+)"))
}

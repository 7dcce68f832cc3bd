//! `cargo xtask bench ...`: benchmarks that print results measured side by side in one run.

mod datapath;
mod gateway;
mod gateway_rules;
mod policy;

use anyhow::Result;
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
}

pub fn run(which: &Bench) -> Result<()> {
    match which {
        Bench::Datapath(args) => datapath::run(args),
        Bench::Policy(args) => policy::run(args),
        Bench::Gateway(args) => gateway::run(args),
        Bench::GatewayRules(args) => gateway_rules::run(args),
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

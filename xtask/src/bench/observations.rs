//! `cargo xtask bench observations`: the gateway's observations table flooded with distinct
//! hosts (`egress-agent/benches/observations.rs`, release build): it stays within its capacity,
//! and the bytes it reports, the evictions and the process's memory growth say so in numbers.
//! No root, no network.

use anyhow::{Result, bail};
use clap::Args;

use crate::{run, toolchain};

#[derive(Args)]
pub struct ObservationsArgs {
    /// Distinct hosts in the flood.
    #[arg(long, default_value_t = 1_000_000)]
    hosts: usize,
}

pub fn run(args: &ObservationsArgs) -> Result<()> {
    if args.hosts < 10 {
        bail!("--hosts must be at least 10");
    }
    let tc = toolchain::setup_all()?;
    let mut cmd = run::cargo(&tc)?;
    cmd.args(["bench", "--quiet", "--package", "egress-agent", "--bench", "observations", "--"])
        .arg(args.hosts.to_string());
    eprintln!(
        "    building the agent in release mode and flooding the observations table with {} hosts",
        args.hosts
    );
    println!("cargo xtask bench observations --hosts {}\n", args.hosts);
    run::status(&mut cmd)
}

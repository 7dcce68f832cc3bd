//! `cargo xtask bench gateway-rules`: the gateway's per-request authorisation cost, by its file's
//! rules and by the policy resources, from 10 to 10,000 rules over 1,000 namespaces
//! (`egress-agent/benches/gateway_rules.rs`, release build, sizes interleaved round by round).
//! No root, no network: a micro-benchmark of the decision.

use anyhow::{Result, bail};
use clap::Args;

use crate::{run, toolchain};

#[derive(Args)]
pub struct GatewayRulesArgs {
    /// Rounds, each timing every size once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub fn run(args: &GatewayRulesArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be positive");
    }
    let tc = toolchain::setup_all()?;
    let mut cmd = run::cargo(&tc)?;
    cmd.args(["bench", "--quiet", "--package", "egress-agent", "--bench", "gateway_rules", "--"])
        .arg(args.rounds.to_string());
    eprintln!(
        "    building the agent in release mode and timing 5 rule sets of file rules and of policy resources x {} rounds",
        args.rounds
    );
    println!("cargo xtask bench gateway-rules --rounds {}\n", args.rounds);
    run::status(&mut cmd)
}

//! `cargo xtask test`: the whole suite, as CI runs it.

use std::{fs, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::{
    run::{build_agent, cargo, require_root, status},
    toolchain,
};

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy (quicker iteration).
    #[arg(long)]
    pub no_lint: bool,
    /// Only run integration tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    require_root("cargo xtask test")?;
    let tc = toolchain::setup_all()?;
    if !args.no_lint {
        step("rustfmt");
        status(
            Command::new(env!("CARGO"))
                .current_dir(crate::run::workspace_root())
                .args(["fmt", "--all", "--check"]),
        )?;
        step("clippy");
        status(cargo(&tc)?.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    }
    step("build the agent (with its eBPF object)");
    let agent = build_agent(&tc, false)?;
    step("unit tests");
    status(cargo(&tc)?.args(["test", "--workspace", "--exclude", "egress-tests"]))?;
    step("kernel tests: BPF_PROG_TEST_RUN and network namespaces (one at a time)");
    let mut cmd = cargo(&tc)?;
    cmd.args(["test", "--package", "egress-tests", "--", "--test-threads=1"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    cmd.env("EGRESS_AGENT_BIN", &agent);
    status(&mut cmd)?;
    step("checking that the tests left nothing behind");
    check_no_leftovers()
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// The integration tests promise to remove every namespace, cgroup and pin they create.
fn check_no_leftovers() -> Result<()> {
    let mut left = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        left.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("eft"))),
        );
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        left.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("egressfw-test-"))),
        );
    }
    if !left.is_empty() {
        bail!("the tests left these behind: {left:?}");
    }
    eprintln!("nothing left behind");
    Ok(())
}

//! `cargo xtask test`: the whole suite, as CI runs it.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
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
    let mut tally = Tally::default();
    step("unit tests");
    tally.run(cargo(&tc)?.args(["test", "--workspace", "--exclude", "egress-tests"]))?;
    step("kernel tests: BPF_PROG_TEST_RUN and network namespaces (one at a time)");
    let mut cmd = cargo(&tc)?;
    cmd.args(["test", "--package", "egress-tests", "--", "--test-threads=1"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    cmd.env("EGRESS_AGENT_BIN", &agent);
    tally.run(&mut cmd)?;
    step("checking that the tests left nothing behind");
    check_no_leftovers()?;
    // One closing line for the whole suite (cargo's own last line is a doc-test summary).
    println!("\nall suites: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Adds up cargo's "test result:" lines while passing the output through.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn run(&mut self, cmd: &mut Command) -> Result<()> {
        let line = crate::run::describe(cmd);
        let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting `{line}`"))?;
        let stdout = child.stdout.take().expect("piped");
        for l in BufReader::new(stdout).lines() {
            let l = l.context("reading test output")?;
            println!("{l}");
            if let Some(rest) = l.strip_prefix("test result: ") {
                self.passed += count(rest, " passed");
                self.failed += count(rest, " failed");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("`{line}` failed with {status}");
        }
        Ok(())
    }
}

/// The number before `label` in "ok. 8 passed; 0 failed; ...".
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
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

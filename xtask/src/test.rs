//! `cargo xtask test`: the whole suite, as CI runs it.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    fuzz, kustomize,
    run::{build_agent, build_other_agent, cargo, require_root, status},
    toolchain,
};

/// Enough to catch a shallow regression in the parsers on every run; long runs are separate
/// (docs/FUZZING.md).
const FUZZ_SECONDS: u64 = 15;

/// Integration suites that exercise the tc layer's attachment.
const TC_SUITES: [&str; 6] =
    ["tc_layer", "tc_order", "tc_router_messages", "k8s_tc_layer", "cni_gate", "upgrade"];

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
        // The fuzz crate is a workspace of its own, so `--all` above does not reach it.
        status(Command::new(env!("CARGO")).current_dir(crate::run::workspace_root()).args([
            "fmt",
            "--all",
            "--check",
            "--manifest-path",
            "fuzz/Cargo.toml",
        ]))?;
        step("clippy");
        status(cargo(&tc)?.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    }
    step("build the agent (with its eBPF object)");
    let agent = build_agent(&tc, false)?;
    step("build the agent again with another build stamp (the upgrade test's other build)");
    let other = build_other_agent(&tc)?;
    step(&format!("kustomize {} for the manifest tests", kustomize::VERSION));
    let kustomize = kustomize::ensure()?;
    step(&format!(
        "Kubernetes {} and etcd {} for the real-API-server tests (built once, cached)",
        egress_tests::cluster::KUBE_VERSION,
        egress_tests::cluster::ETCD_VERSION
    ));
    crate::cluster::build()?;
    let mut tally = Tally::default();
    step("unit tests");
    tally.run(cargo(&tc)?.args(["test", "--workspace", "--exclude", "egress-tests"]))?;
    step(&format!("fuzz targets, {FUZZ_SECONDS} s each"));
    tally.fuzz(&fuzz::run_targets(&tc, None, FUZZ_SECONDS)?)?;
    step("kernel tests: BPF_PROG_TEST_RUN and network namespaces (one at a time)");
    let mut cmd = cargo(&tc)?;
    cmd.args(["test", "--package", "egress-tests", "--", "--test-threads=1"]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    cmd.env("EGRESS_AGENT_BIN", &agent).env("EGRESS_AGENT_OTHER_BIN", &other).env(kustomize::ENV, &kustomize);
    tally.run(&mut cmd)?;
    if args.filter.is_none() {
        // This host has tcx, so the suite above used it; kernels before 6.6 use clsact filters,
        // which the tc suites also cover here rather than only in `cargo xtask vm`.
        step("the tc layer again, with clsact filters (the path of kernels before 6.6)");
        let mut cmd = cargo(&tc)?;
        cmd.args(["test", "--package", "egress-tests"]);
        for suite in TC_SUITES {
            cmd.args(["--test", suite]);
        }
        cmd.args(["--", "--test-threads=1"]);
        cmd.env("EGRESS_AGENT_BIN", &agent)
            .env("EGRESS_AGENT_OTHER_BIN", &other)
            .env("EGRESSFW_TC_MECHANISM", "clsact");
        tally.run(&mut cmd)?;
    }
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

    /// One test per fuzz target; a crash fails the suite, naming the saved input.
    fn fuzz(&mut self, outcomes: &[fuzz::Outcome]) -> Result<()> {
        let mut crashed = Vec::new();
        for outcome in outcomes {
            match &outcome.crash {
                None => self.passed += 1,
                Some(input) => {
                    self.failed += 1;
                    crashed.push(format!("{} ({})", outcome.target, input.display()));
                }
            }
        }
        if !crashed.is_empty() {
            bail!("fuzz targets crashed: {}; see docs/FUZZING.md to reproduce", crashed.join(", "));
        }
        Ok(())
    }
}

/// The number before `label` in "ok. 8 passed; 0 failed; ...".
pub(crate) fn count(summary: &str, label: &str) -> u64 {
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
pub fn check_no_leftovers() -> Result<()> {
    let named = |dir: &str, matches: &dyn Fn(&str) -> bool| -> Vec<std::path::PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| matches(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect()
    };
    let mut left = Vec::new();
    // The kernel tests' namespaces, and the real-cluster tests' (`cargo xtask cluster up`'s own
    // are meant to stay).
    left.extend(named("/run/netns", &|n| {
        n.starts_with("eft") || (n.starts_with("egfw-") && !n.ends_with("-cluster"))
    }));
    // The gateway tests' per-namespace hosts files (`ip netns exec` mounts them).
    left.extend(named("/etc/netns", &|n| n.starts_with("eft")));
    left.extend(named("/sys/fs/bpf", &|n| n.starts_with("egressfw-test-")));
    // A test node's kubelet cgroups, in any hierarchy.
    left.extend(
        named("/sys/fs/cgroup", &|_| true).into_iter().map(|h| h.join("kubepods")).filter(|p| p.is_dir()),
    );
    if !left.is_empty() {
        bail!("the tests left these behind: {left:?}");
    }
    eprintln!("nothing left behind");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn outcome(target: &str, crash: Option<&str>) -> fuzz::Outcome {
        fuzz::Outcome { target: target.into(), done: Some((1000, 15)), crash: crash.map(PathBuf::from) }
    }

    #[test]
    fn fuzz_targets_count_as_tests_and_a_crash_fails_naming_the_input() {
        let mut tally = Tally::default();
        tally.fuzz(&[outcome("a", None), outcome("b", None)]).unwrap();
        assert_eq!((tally.passed, tally.failed), (2, 0));
        let e =
            tally.fuzz(&[outcome("a", None), outcome("b", Some("fuzz/artifacts/b/crash-1"))]).unwrap_err();
        assert_eq!((tally.passed, tally.failed), (3, 1));
        assert!(e.to_string().contains("b (fuzz/artifacts/b/crash-1)"), "{e}");
    }
}

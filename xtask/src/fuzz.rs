//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (the gateway's readers of what
//! untrusted clients send) for a fixed time each, and says how much fuzzing that was. Long
//! runs, reproducing and minimising a crash: docs/FUZZING.md.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    run::{describe, output, workspace_root},
    toolchain::{self, EbpfToolchain},
};

#[derive(Args)]
pub struct FuzzArgs {
    /// Only this target (default: every target in fuzz/).
    #[arg(long)]
    pub target: Option<String>,
    /// How long to run each target, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

/// A single input that takes this long is a hang worth failing on: the parsers are linear in
/// input sizes of a few KiB. (libFuzzer's default, 20 minutes, outlasts any run xtask makes.)
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// How one target's run ended.
pub struct Outcome {
    pub target: String,
    /// Runs and seconds from libFuzzer's closing line, "Done N runs in S second(s)".
    pub done: Option<(u64, u64)>,
    /// The input that crashed or hung the target, as libFuzzer saved it.
    pub crash: Option<PathBuf>,
}

impl Outcome {
    /// One line for the summary.
    pub fn summary(&self) -> String {
        let t = &self.target;
        match (&self.crash, self.done) {
            (Some(input), _) => format!(
                "fuzz {t}: FAILED, input saved to {} (reproduce: cargo +nightly fuzz run --fuzz-dir fuzz {t} {})",
                input.display(),
                input.display()
            ),
            (None, Some((runs, secs))) => {
                format!("fuzz {t}: {runs} runs in {secs} s ({} runs/s), no crash", runs / secs.max(1))
            }
            (None, None) => format!("fuzz {t}: no crash, but libFuzzer printed no \"Done\" line"),
        }
    }
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let toolchain = toolchain::pick_ebpf_toolchain()?;
    toolchain::ensure_cargo_fuzz()?;
    let outcomes = run_targets(&toolchain, args.target.as_deref(), args.seconds)?;
    let failed: Vec<&str> =
        outcomes.iter().filter(|o| o.crash.is_some()).map(|o| o.target.as_str()).collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {} (inputs listed above)", failed.join(", "));
    }
    Ok(())
}

/// Runs every target (or only `only`) for `seconds` each, one after the other, and prints a
/// summary line per target. A crash is in the outcome, not an error: the caller decides.
pub fn run_targets(toolchain: &EbpfToolchain, only: Option<&str>, seconds: u64) -> Result<Vec<Outcome>> {
    let targets = match only {
        Some(t) => vec![t.to_owned()],
        None => list_targets(toolchain)?,
    };
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(toolchain, target, seconds)?);
    }
    eprintln!();
    for outcome in &outcomes {
        println!("{}", outcome.summary());
    }
    Ok(outcomes)
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo +<nightly> fuzz`: the sanitizer and coverage flags cargo-fuzz passes need nightly.
fn cargo_fuzz(toolchain: &EbpfToolchain) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{}", toolchain.name)).arg("fuzz").current_dir(workspace_root());
    if toolchain.needs_bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd
}

fn list_targets(toolchain: &EbpfToolchain) -> Result<Vec<String>> {
    let listed = output(cargo_fuzz(toolchain).arg("list").arg("--fuzz-dir").arg(fuzz_dir()))?;
    let targets: Vec<String> = listed.split_whitespace().map(str::to_owned).collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no targets in {}", fuzz_dir().display());
    }
    Ok(targets)
}

fn run_target(toolchain: &EbpfToolchain, target: &str, seconds: u64) -> Result<Outcome> {
    let dir = fuzz_dir();
    // libFuzzer adds the inputs it finds to the first corpus directory: a local, ignored one,
    // so that the committed seeds (the second) only change when someone merges into them.
    let local = dir.join("corpus-local").join(target);
    let seeds = dir.join("corpus").join(target);
    for d in [&local, &seeds] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = cargo_fuzz(toolchain);
    cmd.args(["run", "--fuzz-dir"])
        .arg(&dir)
        .arg(target)
        .arg(&local)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .stderr(Stdio::piped());
    let line = describe(&cmd);
    eprintln!("\nxtask: {line}");
    let mut child = cmd.spawn().with_context(|| format!("starting `{line}`"))?;
    let stderr = child.stderr.take().expect("piped");
    let (mut done, mut crash) = (None, None);
    // libFuzzer output is passed through; it can hold raw input bytes, hence no `lines()`.
    for raw in BufReader::new(stderr).split(b'\n') {
        let raw = raw.with_context(|| format!("reading the output of `{line}`"))?;
        let l = String::from_utf8_lossy(&raw);
        if !is_progress(&l) {
            eprintln!("{l}");
        }
        if let Some(rest) = l.strip_prefix("Done ") {
            done = parse_done(rest);
        }
        if let Some((_, path)) = l.split_once("Test unit written to ") {
            crash = Some(PathBuf::from(path.trim()));
        }
    }
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() && crash.is_none() {
        bail!("`{line}` failed with {status} before libFuzzer reported a crash (does the target build?)");
    }
    Ok(Outcome { target: target.to_owned(), done, crash })
}

/// libFuzzer's per-discovery status lines ("#4096\tNEW    cov: ...") and the dictionary it
/// recommends at the end: thousands of lines a minute that say nothing about the outcome.
/// INITED and DONE, and everything a crash prints, are kept.
fn is_progress(l: &str) -> bool {
    let status = l.strip_prefix('#').and_then(|r| r.split_once('\t')).is_some_and(|(n, what)| {
        !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
            && !what.starts_with("INITED")
            && !what.starts_with("DONE")
    });
    status || (l.starts_with('"') && l.contains("# Uses: "))
}

/// "123 runs in 15 second(s)" -> (123, 15).
fn parse_done(rest: &str) -> Option<(u64, u64)> {
    let mut words = rest.split_whitespace();
    let runs = words.next()?.parse().ok()?;
    let secs = words.nth(2)?.parse().ok()?;
    Some((runs, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_line() {
        assert_eq!(parse_done("1234567 runs in 15 second(s)"), Some((1_234_567, 15)));
        assert_eq!(parse_done("runs in 15 second(s)"), None);
    }

    #[test]
    fn progress_lines() {
        assert!(is_progress("#4096\tpulse  cov: 349 ft: 2067 corp: 501/80Kb"));
        assert!(is_progress("#9\tNEW    cov: 237 ft: 411 corp: 8/1887b lim: 270"));
        assert!(is_progress(r#""\377\377" # Uses: 421"#));
        assert!(!is_progress("#8\tINITED cov: 226 ft: 388 corp: 7/1639b"));
        assert!(!is_progress("#158186\tDONE   cov: 349 ft: 2099"));
        assert!(!is_progress("Done 158186 runs in 21 second(s)"));
        assert!(!is_progress("==123== ERROR: libFuzzer: deadly signal"));
    }
}

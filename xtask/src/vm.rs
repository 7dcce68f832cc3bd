//! `cargo xtask vm`: the kernel integration suite on other kernels than the host's. Each kernel
//! (Debian's own packages) boots in qemu with a small initramfs that mounts the host's root
//! read-only under a tmpfs overlay, so the VM runs the very binaries built here, with the
//! host's tools, on its own kernel.
//!
//! Files: `~/.cache/egressfw/vm/` holds the package indexes (`apt/`), extracted kernels
//! (`kernels/`), the snapshot of the built binaries (`bin/`) and each kernel's last run
//! (`runs/<series>/`: console.log, and share/ with a log per test binary and the guest's dmesg).

mod apt;
mod candidates;
mod cpio;
mod debversion;
mod host;
mod initramfs;
mod kernel;
mod modules;
mod path;
mod progress;
mod qemu;
mod report;
mod stage2;
mod suite;

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use self::{
    apt::Apt,
    host::{Accel, AccelChoice},
    kernel::Kernel,
    progress::Progress,
    qemu::{Boot, End},
    report::{BinaryResult, KernelReport, Outcome},
    suite::Suite,
};

#[derive(Args)]
pub struct VmArgs {
    /// Kernel series to boot, from Debian: 6.1 (bookworm), 6.12 (trixie or bookworm-backports),
    /// or any other series the archive has. The newest package of each is used.
    #[arg(long = "kernel", value_name = "VERSION", value_delimiter = ',', default_values = ["6.1", "6.12"])]
    pub kernels: Vec<String>,
    /// Only run tests whose name contains this (passed to each test binary).
    #[arg(long)]
    pub filter: Option<String>,
    /// Only run these test binaries (repeatable): enforcement, prog_test_run, ...
    #[arg(long = "test", value_name = "NAME")]
    pub tests: Vec<String>,
    /// Run every test binary on every kernel, even after a failure.
    #[arg(long)]
    pub keep_going: bool,
    /// Limit for each test binary inside the VM, in seconds (ten times longer without KVM).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// How qemu runs the guests.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Run the tests against this egress-agent binary instead of the one built from the tree
    /// (an older build, to see a new test fail on the code it guards against).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// Booting and mounting the root over 9p takes seconds; this is the slack on top of the test
/// binaries' own limits before a VM counts as hung.
const BOOT_ALLOWANCE: u64 = 120;

pub fn run(args: &VmArgs) -> Result<()> {
    for series in &args.kernels {
        if !is_series(series) {
            bail!("--kernel {series}: expected a kernel series such as 6.1 or 6.12");
        }
    }
    host::ensure_packages()?;
    let accel = Accel::pick(args.accel);
    let cache = cache_dir()?;
    eprintln!("\n==> building the agent and the kernel test binaries");
    let mut suite = suite::build(&cache.join("bin"), &args.tests)?;
    if let Some(agent) = &args.agent {
        if !agent.is_file() {
            bail!("--agent {}: no such file", agent.display());
        }
        eprintln!("    against the agent at {}", agent.display());
        suite.agent = agent.canonicalize().with_context(|| format!("--agent {}", agent.display()))?;
    }
    let apt = Apt::new(&cache.join("apt"))?;
    let ctx = Ctx { args, accel, cache: &cache, apt: &apt, suite: &suite, guest_path: path::for_guest() };
    let mut reports = Vec::new();
    for series in &args.kernels {
        if reports.iter().any(|r: &KernelReport| !r.ok()) && !args.keep_going {
            reports.push(KernelReport {
                label: series.clone(),
                outcome: Outcome::Skipped,
                binaries: Vec::new(),
                duration: Duration::ZERO,
            });
            continue;
        }
        eprintln!("\n==> kernel {series}");
        let report = run_kernel(&ctx, series);
        print!("{}", report.details());
        reports.push(report);
    }
    println!("\n{}", report::table(&reports));
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok() && !matches!(r.outcome, Outcome::Skipped))
        .map(|r| r.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel tests failed on {} (logs under {})",
            failed.join(", "),
            cache.join("runs").display()
        );
    }
    Ok(())
}

/// What every kernel's run shares.
struct Ctx<'a> {
    args: &'a VmArgs,
    accel: Accel,
    cache: &'a Path,
    apt: &'a Apt,
    suite: &'a Suite,
    guest_path: String,
}

/// One kernel, start to finish; any error becomes that kernel's "broken" result so the others
/// still run.
fn run_kernel(ctx: &Ctx<'_>, series: &str) -> KernelReport {
    let started = Instant::now();
    let kernel = match kernel::fetch(ctx.apt, ctx.cache, series) {
        Ok(k) => k,
        Err(e) => return broken(series.to_owned(), &e, started),
    };
    match boot_and_test(ctx, &kernel) {
        Ok((outcome, binaries)) => {
            KernelReport { label: kernel.label(), outcome, binaries, duration: started.elapsed() }
        }
        Err(e) => broken(kernel.label(), &e, started),
    }
}

fn broken(label: String, e: &anyhow::Error, started: Instant) -> KernelReport {
    KernelReport {
        label,
        outcome: Outcome::Broken(format!("{e:#}")),
        binaries: Vec::new(),
        duration: started.elapsed(),
    }
}

fn boot_and_test(ctx: &Ctx<'_>, kernel: &Kernel) -> Result<(Outcome, Vec<BinaryResult>)> {
    let tag = format!("vm: [{}]", kernel.series);
    eprintln!("{tag} building the initramfs for {}", kernel.release);
    let initramfs = initramfs::build(kernel)?;
    let run_dir = ctx.cache.join("runs").join(&kernel.series);
    let share = run_dir.join("share");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    let binaries = &ctx.suite.binaries;
    let timeout = ctx.args.timeout * ctx.accel.slowdown();
    let script = stage2::script(&stage2::Plan {
        binaries,
        agent: &ctx.suite.agent,
        other_agent: &ctx.suite.other_agent,
        filter: ctx.args.filter.as_deref(),
        keep_going: ctx.args.keep_going,
        timeout,
        path: &ctx.guest_path,
        time_scale: ctx.accel.slowdown(),
    });
    let script_path = share.join("stage2.sh");
    fs::write(&script_path, script).with_context(|| format!("writing {}", script_path.display()))?;
    let deadline =
        Duration::from_secs(BOOT_ALLOWANCE * ctx.accel.slowdown() + timeout * binaries.len() as u64);
    eprintln!("{tag} booting {} {} (logs in {})", kernel.package, kernel.version, run_dir.display());
    let console_log = run_dir.join("console.log");
    let boot = Boot {
        kernel,
        initramfs: &initramfs,
        share: &share,
        console_log: &console_log,
        accel: ctx.accel,
        deadline,
    };
    let mut progress = Progress::new(&tag, &share);
    let mut end = qemu::boot(&boot, |line| progress.line(line))?;
    // Under emulation a kernel now and then panics while booting (an int3 Oops in live code
    // patching, text_poke, racing between the emulated CPUs); nothing has run yet, so boot once
    // more. A kernel that really cannot boot fails again.
    if let (End::Panicked(line), Accel::Tcg, false) = (&end, ctx.accel, progress.ready) {
        let first = run_dir.join("console-first-boot.log");
        eprintln!(
            "{tag} the kernel panicked while booting ({line}); booting once more (first console: {})",
            first.display()
        );
        fs::rename(&console_log, &first).with_context(|| format!("keeping {}", first.display()))?;
        progress = Progress::new(&tag, &share);
        end = qemu::boot(&boot, |line| progress.line(line))?;
    }
    // The binaries that started; with no --keep-going the rest never ran after a failure.
    let results: Vec<BinaryResult> = binaries
        .iter()
        .filter(|b| share.join(format!("{}.log", b.name)).exists())
        .map(|b| BinaryResult::read(&share, &b.name))
        .collect();
    let all_passed = results.len() == binaries.len() && results.iter().all(BinaryResult::ok);
    let outcome = match end {
        End::TimedOut(last) => {
            eprintln!("{tag} kernel {} hung: killed qemu after {} s", kernel.label(), deadline.as_secs());
            Outcome::TimedOut(format!("no end within {} s; last console line: {last}", deadline.as_secs()))
        }
        // A panic while the VM powers off, after the tests, changes nothing about the results.
        End::Panicked(line) if !progress.finished => {
            Outcome::Broken(format!("kernel panic: {line} (see {})", console_log.display()))
        }
        End::PoweredOff if !progress.ready => Outcome::Broken(match progress.stage1_failure {
            Some(why) => format!("the VM could not set up its root: {why}"),
            None => format!("the VM stopped before the tests started (see {})", console_log.display()),
        }),
        _ if all_passed => Outcome::Passed,
        _ => Outcome::Failed,
    };
    Ok((outcome, results))
}

/// "6.1", "6.12": major.minor only.
fn is_series(s: &str) -> bool {
    let mut parts = s.split('.');
    let numeric = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
}

/// Downloads and runs survive `cargo clean`, like the bpf-linker build.
fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/egressfw/vm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_series_are_major_dot_minor() {
        assert!(is_series("6.1") && is_series("6.12"));
        assert!(!is_series("6") && !is_series("6.1.0") && !is_series("v6.1") && !is_series("6."));
    }
}

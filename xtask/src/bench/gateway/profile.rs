//! `--perf DIR`: a `perf record` of each proxy during its tunnel churn, and a summary of where
//! its CPU time went (kernel against userspace, then the hottest userspace symbols). Sampling
//! costs the proxy some CPU, so the figures of a profiled run are for reading the profile, not
//! for the record.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::toolchain;

/// Samples per second: enough for a few thousand samples in a churn of a few seconds.
const FREQUENCY: &str = "4999";

/// A running `perf record -p`; stopped (SIGINT, so it writes its file) by [`Recording::finish`].
pub struct Recording {
    child: Child,
    out: PathBuf,
}

/// Fails with the fix when perf is missing, before any round starts.
pub fn require_perf() -> Result<()> {
    if !toolchain::command_exists("perf") {
        bail!("--perf needs perf: install the Debian package linux-perf");
    }
    Ok(())
}

impl Recording {
    pub fn start(pid: u32, out: PathBuf) -> Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-F", FREQUENCY, "-g", "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf attaches asynchronously; give it a moment so the first tunnels are sampled too.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self { child, out })
    }

    pub fn finish(mut self) -> Result<PathBuf> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let status = self.child.wait().context("waiting for perf record")?;
        if !self.out.exists() {
            bail!("perf record wrote no {} ({status})", self.out.display());
        }
        Ok(self.out.clone())
    }
}

/// Kernel against userspace share, then the hottest userspace symbols.
pub fn summary(data: &Path) -> Result<String> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "-g", "none", "--sort", "dso,sym", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("perf report on {}", data.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Rows: "  12.34%  egress-agent  [.] symbol"; `[k]` marks a kernel symbol.
    let rows: Vec<(f64, bool, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            Some((pct.trim().parse().ok()?, rest.contains("[k]"), rest.trim()))
        })
        .collect();
    if rows.is_empty() {
        bail!("perf report on {} has no samples", data.display());
    }
    let kernel: f64 = rows.iter().filter(|r| r.1).map(|r| r.0).sum();
    let user: f64 = rows.iter().filter(|r| !r.1).map(|r| r.0).sum();
    let mut summary = format!(
        "profile {}: {kernel:.1}% of samples in the kernel, {user:.1}% in userspace; hottest userspace symbols:\n",
        data.display()
    );
    for (pct, _, what) in rows.iter().filter(|r| !r.1).take(40) {
        summary.push_str(&format!("  {pct:5.2}%  {what}\n"));
    }
    fs::write(data.with_extension("txt"), &summary)
        .with_context(|| format!("writing the summary of {}", data.display()))?;
    Ok(summary)
}

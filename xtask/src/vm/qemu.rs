//! Boots one kernel in qemu and follows its serial console until the guest powers off, the
//! kernel panics, or the deadline passes (then qemu is killed).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{host::Accel, kernel::Kernel};

/// Everything one boot needs.
pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initramfs: &'a Path,
    /// Shared read-write with the guest as `results`; stage 2 and the test logs live there.
    pub share: &'a Path,
    /// The whole serial console, for post-mortems.
    pub console_log: &'a Path,
    pub accel: Accel,
    pub deadline: Duration,
}

/// How the VM ended.
pub enum End {
    PoweredOff,
    /// The kernel panicked (the line that said so); `panic=-1` then made qemu exit.
    Panicked(String),
    /// Killed at the deadline; the last console line, to show where it hung.
    TimedOut(String),
}

/// Console lines that mean the kernel is gone.
const PANIC: &[&str] = &["Kernel panic - not syncing", "BUG: soft lockup"];

/// 2 vCPUs like a small node; 4 GiB leaves room for the tmpfs overlay the tests write to.
const SMP: &str = "2";
const MEMORY: &str = "4G";

pub fn boot(b: &Boot<'_>, mut on_line: impl FnMut(&str)) -> Result<End> {
    let mut cmd = command(b);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64 (package qemu-system-x86)")?;
    let mut log =
        File::create(b.console_log).with_context(|| format!("creating {}", b.console_log.display()))?;
    // A reader thread, so waiting for the next line can give up at the deadline.
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let until = Instant::now() + b.deadline;
    let mut last = String::new();
    let mut panicked = None;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                if panicked.is_none() && PANIC.iter().any(|p| line.contains(p)) {
                    panicked = Some(line.clone());
                }
                on_line(&line);
                last = line;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(End::TimedOut(last));
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    if let Some(line) = panicked {
        return Ok(End::Panicked(line));
    }
    if !status.success() {
        anyhow::bail!("qemu exited with {status} (see {})", b.console_log.display());
    }
    Ok(End::PoweredOff)
}

fn command(b: &Boot<'_>) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(b.accel.qemu_args());
    cmd.args(["-smp", SMP, "-m", MEMORY]);
    // No display, no default devices, no network card: only the serial console on stdout.
    cmd.args(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"]);
    cmd.arg("-kernel").arg(b.kernel.vmlinuz());
    cmd.arg("-initrd").arg(b.initramfs);
    // panic=-1: reboot at once on a panic, which -no-reboot turns into qemu exiting.
    // noapic: aya's VM tests hit "IO-APIC + timer doesn't work" panics under emulation.
    // loglevel=4: warnings and worse only, so the console stays readable.
    cmd.args(["-append", "console=ttyS0 panic=-1 noapic loglevel=4 rdinit=/init"]);
    // multidevs=remap: the host root spans several filesystems; keeps inode numbers unique.
    let share = |path: &Path, tag: &str, readonly: bool| {
        let ro = if readonly { ",readonly=on" } else { "" };
        format!("local,path={},mount_tag={tag},security_model=none,multidevs=remap{ro}", path.display())
    };
    cmd.arg("-virtfs").arg(share(Path::new("/"), "hostroot", true));
    cmd.arg("-virtfs").arg(share(&b.kernel.modules(), "modules", true));
    cmd.arg("-virtfs").arg(share(b.share, "results", false));
    cmd
}

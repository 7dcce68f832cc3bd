//! The long-running processes of a test cluster: each one's output in `<dir>/<name>.log`, in a
//! session of its own, watched while the cluster waits for something, and stopped in reverse
//! order of start (etcd, started first, stops last).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub struct Supervisor {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Supervisor {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), children: Vec::new() }
    }

    /// Starts `cmd` as `name`, its stdout and stderr in `<dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        let log = fs::File::create(self.log_path(name))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        // A session of its own: a terminal's ^C reaches `cargo xtask`, not a detached cluster.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Polls `ready` every half second until it holds; fails when a process exits first (with
    /// the end of its log) or after `limit` (with the end of `blame`'s log).
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        blame: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + crate::patience(limit);
        loop {
            if ready() {
                return Ok(());
            }
            if let Some((name, status)) = self.exited() {
                bail!("{name} exited ({status}) while waiting for {what}:\n{}", self.log_tail(&name));
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; {blame}'s log ends:\n{}", self.log_tail(blame));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn exited(&mut self) -> Option<(String, ExitStatus)> {
        self.children.iter_mut().find_map(|(name, child)| match child.try_wait() {
            Ok(Some(status)) => Some((name.clone(), status)),
            _ => None,
        })
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Lets every process outlive this value; returns `(name, pid)` in order of start, for
    /// [`stop_pids`].
    pub fn detach(&mut self) -> Vec<(String, u32)> {
        self.children.drain(..).map(|(n, c)| (n, c.id())).collect()
    }

    /// SIGTERM in reverse order of start, SIGKILL to what is left after a few seconds.
    pub fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            signal(child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && self.children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: plain syscall on a pid of the cluster's.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// [`Supervisor::stop`] for processes this one did not start (a detached cluster): the init
/// process reaps them, so a signal 0 tells whether they are gone.
pub fn stop_pids(pids: &[u32]) {
    for &pid in pids.iter().rev() {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|&p| signal(p, 0)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for &pid in pids {
        signal(pid, libc::SIGKILL);
    }
}

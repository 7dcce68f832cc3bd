//! Network namespaces made with iproute2, entered with setns(2).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail};

/// Runs `ip` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self.command("sysctl", None).args(["-qw", &format!("{key}={value}")]).output()?;
        if !out.status.success() {
            bail!("sysctl {key}={value} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A command that runs inside this namespace and, if given, inside `cgroup` (a cgroup
    /// directory). The child moves itself into the cgroup before entering the namespace and
    /// before exec, so the program's very first packet is already subject to the cgroup.
    pub fn command(&self, program: &str, cgroup: Option<&Path>) -> Command {
        let netns = File::open(self.path()).expect("netns file exists while NetNs lives");
        let procs = cgroup.map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .unwrap_or_else(|e| panic!("opening {}/cgroup.procs: {e}", c.display()))
        });
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls (write, setns) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // "0" moves the writing process.
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a command to completion inside the namespace (and cgroup).
    pub fn run(&self, cgroup: Option<&Path>, program: &str, args: &[&str]) -> Output {
        self.command(program, cgroup).args(args).output().unwrap_or_else(|e| {
            panic!("running {program} in netns {}: {e} (cargo xtask setup installs it)", self.name)
        })
    }

    /// Runs `f` on a scoped thread inside this namespace and returns its result.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let netns = File::open(self.path()).expect("netns file exists while NetNs lives");
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only.
                let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Runs `f` on a new thread that lives in this namespace (sockets it opens belong here).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let netns = File::open(self.path()).expect("netns file exists while NetNs lives");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only.
            let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

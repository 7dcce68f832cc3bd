//! The real agent binary, run in standalone mode against a lab.

use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::lab::Lab;

pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

/// `egress-agent --pin-dir <lab pins> --cgroup-root <root> <args>`.
pub fn command(lab: &Lab) -> Command {
    command_of(lab, &crate::agent_bin())
}

/// Like `command`, running the agent binary at `bin` (another build).
pub fn command_of(lab: &Lab, bin: &std::path::Path) -> Command {
    command_for(lab, bin, &lab.pin_dir)
}

/// Like `command_of`, with the pins in `pins` instead of the lab's pin directory.
pub fn command_for(lab: &Lab, bin: &std::path::Path, pins: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--pin-dir").arg(pins).arg("--cgroup-root").arg(&lab.cgroup_root).arg("--log-format").arg("json");
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a one-shot agent command (inspect, teardown).
pub fn cli(lab: &Lab, args: &[&str]) -> Output {
    command(lab).args(args).output().expect("running egress-agent")
}

/// Like `cli`, in the node's network namespace (where `inspect` can name the pods' veths).
pub fn cli_on_node(lab: &Lab, args: &[&str]) -> Output {
    on_node(lab, command(lab)).args(args).output().expect("running egress-agent")
}

/// Makes `cmd` enter the node's network namespace before it runs.
fn on_node(lab: &Lab, mut cmd: Command) -> Command {
    let netns = File::open(lab.node.path()).expect("node netns");
    // SAFETY: only setns between fork and exec.
    unsafe {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

impl Agent {
    /// Starts `standalone` with the lab's policy file and waits until it reports ready.
    pub fn start(lab: &Lab) -> Self {
        Self::try_start(lab).unwrap_or_else(|log| panic!("agent did not become ready; its log:\n{log}"))
    }

    /// Like `start`, but returns the log when the agent exits or never becomes ready.
    pub fn try_start(lab: &Lab) -> Result<Self, String> {
        let mut cmd = command(lab);
        cmd.arg("standalone").arg("--config").arg(lab.policy_path());
        Self::spawn(lab, cmd, |a| a.log_text().contains("\"message\":\"ready\""))
    }

    /// Like `start`, but the agent runs in the node's network namespace, where the pods'
    /// host-side veths are (as a DaemonSet pod with hostNetwork does): needed for the tc layer.
    pub fn start_on_node(lab: &Lab) -> Self {
        Self::try_start_on_node(lab)
            .unwrap_or_else(|log| panic!("agent did not become ready; its log:\n{log}"))
    }

    /// Like `start_on_node`, but returns the log when the agent exits or never becomes ready.
    pub fn try_start_on_node(lab: &Lab) -> Result<Self, String> {
        Self::try_start_build_on_node(lab, &crate::agent_bin())
    }

    /// `start_on_node` with the agent binary at `bin` (another build).
    pub fn start_build_on_node(lab: &Lab, bin: &std::path::Path) -> Self {
        Self::try_start_build_on_node(lab, bin)
            .unwrap_or_else(|log| panic!("agent {} did not become ready; its log:\n{log}", bin.display()))
    }

    fn try_start_build_on_node(lab: &Lab, bin: &std::path::Path) -> Result<Self, String> {
        let mut cmd = on_node(lab, command_of(lab, bin));
        cmd.arg("standalone").arg("--config").arg(lab.policy_path());
        Self::spawn(lab, cmd, |a| a.log_text().contains("\"message\":\"ready\""))
    }

    /// Spawns `cmd` (from [`command`]) and waits until `ready` says so; returns the log when
    /// the agent exits first or is not ready within 30 s.
    pub fn spawn(lab: &Lab, mut cmd: Command, ready: impl Fn(&Self) -> bool) -> Result<Self, String> {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = lab.dir.join(format!("agent-{n}.log"));
        let child = cmd
            .stderr(File::create(&log).expect("agent log file"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning egress-agent");
        let mut agent = Self { child: Some(child), log };
        let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
        loop {
            if ready(&agent) {
                return Ok(agent);
            }
            let exited = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let text = agent.log_text();
                agent.kill9();
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// JSON log lines whose message matches.
    pub fn lines(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(message)))
            .collect()
    }

    /// Waits until at least `count` lines match `message`.
    pub fn wait_for(&self, message: &str, count: usize) -> Vec<serde_json::Value> {
        let mut found = Vec::new();
        crate::poll_until(Duration::from_secs(10), || {
            found = self.lines(message);
            found.len() >= count
        });
        found
    }

    /// Waits for a line with `message` that satisfies `pred`, and returns it.
    pub fn wait_until(&self, message: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let mut found = None;
        crate::poll_until(Duration::from_secs(10), || {
            found = self.lines(message).into_iter().find(|v| pred(v));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no {message:?} line as expected; agent log:\n{}", self.log_text()))
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGHUP: reload the policy file.
    pub fn hangup(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

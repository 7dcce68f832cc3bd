//! The gateway as a process in a control plane's network namespace, reading the policy
//! resources from that plane's API server (no kubelet, no image): for the tests and the
//! benchmark that look at the gateway and the API server alone.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::ControlPlane;

/// How long the gateway may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A gateway with a static source table (127.0.0.0/8 is namespace `team-a`) and
/// `policyResources: true`. Stopped when dropped.
pub struct PlaneGateway {
    child: Child,
    /// Its HTTP proxy listener, `127.0.0.1:port` in the plane's namespace.
    pub proxy: String,
    log: PathBuf,
}

impl PlaneGateway {
    /// Starts `agent`'s gateway with its proxy on 127.0.0.1:`port` and its admin endpoint on
    /// the next port, `env` added to its environment, and returns once it is ready (the policy
    /// resources listed). Its files are `dir/<name>.yaml` and `dir/<name>.log`.
    pub fn start(
        plane: &ControlPlane,
        agent: &Path,
        dir: &Path,
        name: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let (proxy, admin) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", port + 1));
        let config = dir.join(format!("{name}.yaml"));
        fs::write(
            &config,
            format!(
                "listeners: {{httpProxy: {{listen: \"{proxy}\"}}}}\nadmin: \"{admin}\"\nsources:\n  static: [{{cidr: 127.0.0.0/8, namespace: team-a}}]\npolicyResources: true\nrules: []\n"
            ),
        )?;
        let log = dir.join(format!("{name}.log"));
        let mut cmd = plane.ns.command(&agent.display().to_string(), None);
        cmd.args(["gateway", "--config"])
            .arg(&config)
            .env("KUBECONFIG", &plane.admin_kubeconfig)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let gateway = Self { child: cmd.spawn().context("starting the gateway")?, proxy, log };
        let started = Instant::now();
        while plane.ns.within(|| http_status(&admin, "GET /readyz HTTP/1.0\r\n\r\n")).ok() != Some(200) {
            if started.elapsed() > READY_WITHIN {
                bail!(
                    "the gateway did not become ready within {READY_WITHIN:?}; its log:\n{}",
                    gateway.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(gateway)
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PlaneGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of the answer to `request`, sent on a new connection to `addr`.
pub fn http_status(addr: &str, request: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    status_of(&mut stream)
}

/// Reads an HTTP answer's status line from `stream` (and nothing after it).
fn status_of(stream: &mut TcpStream) -> Result<u16> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).context("reading the status line")?;
    let line = String::from_utf8_lossy(&head);
    line.get(9..12).and_then(|s| s.parse().ok()).with_context(|| format!("not an HTTP status line: {line:?}"))
}

/// A CONNECT to `target` through the proxy at `proxy`: the answer's status and, its head read
/// to the end, the connection (a tunnel when the status is 200).
pub fn connect(proxy: &str, target: &str) -> Result<(u16, TcpStream)> {
    let mut stream = TcpStream::connect(proxy).with_context(|| format!("connecting to {proxy}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
    let status = status_of(&mut stream)?;
    let mut tail = Vec::new();
    let mut byte = [0u8; 1];
    while !tail.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).context("reading the answer's head")?;
        tail.push(byte[0]);
    }
    Ok((status, stream))
}

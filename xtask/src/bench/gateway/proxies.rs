//! The three proxies of `bench gateway`, each run in the lab's gateway namespace from its own
//! configuration file in the lab's scratch directory, and its resident memory.
//!
//! - the egress gateway (release build), HTTP proxy listener, one rule by CIDR for the
//!   upstream's public address (and by name, for the steered route's SNI listener), access log
//!   on (to a file: it is part of the product);
//! - squid, minimal: CONNECT allowed for everyone in the lab, nothing cached, no access log,
//!   every file it writes in its own directory, in the foreground (`-N`);
//! - tinyproxy: CONNECT to the two upstream ports, the pod's address allowed, warnings only in
//!   its log, in the foreground (`-d`).

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_tests::{
    gateway::UPSTREAM4,
    lab::{GATEWAY_PORT, GATEWAY4, Lab, POD4},
};

use super::{
    Route,
    traffic::{ECHO_PORT, SINK_PORT},
};

pub const SQUID_PORT: u16 = 3129;
pub const TINYPROXY_PORT: u16 = 8888;
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What every proxy is sized for.
pub struct Sizing {
    /// Idle tunnels held at once (the memory measurement).
    pub idle: usize,
    /// `egress-agent gateway --threads`; `None`: the gateway's default (one per CPU).
    pub gateway_threads: Option<usize>,
}

/// A running proxy; killed on drop.
pub struct Proxy {
    pub route: Route,
    child: Daemon,
    log: PathBuf,
    /// The gateway's access log (its stdout).
    pub access_log: Option<PathBuf>,
}

impl Route {
    /// The proxy's listening address (all of them in the gateway namespace).
    pub fn proxy_addr(self) -> Option<SocketAddr> {
        let port = match self {
            Self::Direct => return None,
            Self::Gateway => GATEWAY_PORT,
            Self::Squid => SQUID_PORT,
            Self::Tinyproxy => TINYPROXY_PORT,
        };
        Some(egress_tests::sock(GATEWAY4, port))
    }
}

impl Proxy {
    /// Writes the configuration into `dir/<name>-<run>/` and starts the proxy, waiting until it
    /// accepts connections.
    pub fn start(lab: &Lab, route: Route, agent: &Path, sizing: &Sizing, run: usize) -> Result<Self> {
        let dir = lab.dir.join(format!("{}-{run}", route.short_name()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("stderr.log");
        let mut access_log = None;
        let mut cmd = match route {
            Route::Direct => bail!("the direct route has no proxy"),
            Route::Gateway => {
                let conf = dir.join("gateway.yaml");
                fs::write(&conf, gateway_config(sizing.idle)).context("writing the gateway config")?;
                // `ip netns exec` (which execs, keeping the pid) rather than setns: it mounts the
                // namespace's hosts file, where the gateway finds the steered route's upstream.
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", &lab.gateway.name]).arg(agent).stdin(Stdio::null());
                cmd.args(["--log-format", "json", "gateway", "--config"]).arg(&conf);
                if let Some(n) = sizing.gateway_threads {
                    cmd.args(["--threads", &n.to_string()]);
                }
                let access = dir.join("access.log");
                cmd.stdout(fs::File::create(&access).context("creating the gateway access log")?);
                access_log = Some(access);
                cmd
            }
            Route::Squid => {
                // Squid drops root for its `proxy` user before it opens its log.
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
                let conf = dir.join("squid.conf");
                fs::write(&conf, squid_config(&dir)?).context("writing squid.conf")?;
                let mut cmd = lab.gateway.command("squid", None);
                cmd.arg("-N").arg("-f").arg(&conf).stdout(Stdio::null());
                cmd
            }
            Route::Tinyproxy => {
                let conf = dir.join("tinyproxy.conf");
                fs::write(&conf, tinyproxy_config(&dir, sizing.idle)).context("writing tinyproxy.conf")?;
                let mut cmd = lab.gateway.command("tinyproxy", None);
                cmd.arg("-d").arg("-c").arg(&conf).stdout(Stdio::null());
                cmd
            }
        };
        let child = cmd
            .stderr(fs::File::create(&log).context("creating the proxy's stderr log")?)
            .spawn()
            .with_context(|| format!("starting {}", route.name()))?;
        let mut proxy = Self { route, child: Daemon(child), log, access_log };
        proxy.wait_ready(lab, &dir)?;
        Ok(proxy)
    }

    fn wait_ready(&mut self, lab: &Lab, dir: &Path) -> Result<()> {
        let addr = self.route.proxy_addr().expect("a proxy route");
        let log = &self.log;
        let ready = || match self.route {
            // The gateway binds before it reads the rules in; its log says when it serves.
            Route::Gateway => {
                fs::read_to_string(log).unwrap_or_default().contains("\"message\":\"gateway ready\"")
            }
            _ => true,
        };
        self.child.wait_serving(lab, self.route.name(), addr, ready, dir)
    }

    /// The proxy's main process.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Resident memory of the proxy and every process it started (squid may fork workers).
    pub fn rss_kib(&self) -> Result<u64> {
        process_tree(self.child.0.id())?.into_iter().map(vm_rss_kib).sum()
    }

    /// CPU seconds the proxy and every process it started have used so far (clock-tick
    /// resolution, 10 ms: runs are sized to use a few hundred ticks).
    pub fn cpu_time(&self) -> Result<CpuTime> {
        process_tree(self.child.0.id())?.into_iter().map(cpu_time).sum()
    }

    /// Lines in the gateway's access log so far.
    pub fn access_lines(&self) -> usize {
        self.access_log.as_ref().and_then(|p| fs::read_to_string(p).ok()).map_or(0, |t| t.lines().count())
    }
}

/// A process of the benchmark (a proxy, a relay); killed on drop.
pub struct Daemon(pub Child);

impl Daemon {
    /// Waits until `addr` takes connections from the pod namespace and `ready()` holds. Fails
    /// if the process exits first or [`START_TIMEOUT`] passes, with the logs in `dir`.
    pub fn wait_serving(
        &mut self,
        lab: &Lab,
        name: &str,
        addr: SocketAddr,
        ready: impl Fn() -> bool,
        dir: &Path,
    ) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready()
                && lab
                    .pod
                    .within(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                    .is_ok()
            {
                return Ok(());
            }
            let exited = self.0.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                bail!(
                    "{name} did not start listening on {addr} ({}); its logs in {}:\n{}",
                    exited.map_or_else(|| format!("not within {START_TIMEOUT:?}"), |s| s.to_string()),
                    dir.display(),
                    logs_of(dir)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn logs_of(dir: &Path) -> String {
    let mut all = String::new();
    for name in ["stderr.log", "cache.log", "tinyproxy.log", "socat.log"] {
        if let Ok(text) = fs::read_to_string(dir.join(name)) {
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            all.push_str(&format!("--- {name}\n"));
            for l in tail.into_iter().rev() {
                all.push_str(l);
                all.push('\n');
            }
        }
    }
    all
}

/// The upstream is a public address, so a rule by CIDR allows it. The limits leave room for
/// the idle tunnels, and keep them open for longer than any run.
fn gateway_config(idle: usize) -> String {
    format!(
        r#"listeners:
  httpProxy: {{listen: "{GATEWAY4}:{GATEWAY_PORT}"}}
{forward}{steered}sources:
  static:
    - {{cidr: {POD4}/32, namespace: bench}}
rules:
  - namespaces: [bench]
    cidrs: [{UPSTREAM4}/32]
{hosts}    ports: [{ECHO_PORT}, {SINK_PORT}]
limits:
  maxConnections: {max}
  idleTimeout: 10m
drainTimeout: 1s
"#,
        max = idle + 10_000,
        forward = super::relays::gateway_forward_config(),
        steered = super::steered::gateway_listener_config(),
        hosts = super::steered::gateway_rule_hosts(),
    )
}

/// Squid with only what CONNECT needs. No cache_dir (memory only, and `cache deny all`), no
/// access log, no pinger, no netdb file; pid file, cache log and core dumps in `dir`.
///
/// Squid looks up the client's address (PTR) on every connection. The lab has no DNS server,
/// so each query would stay pending for `dns_timeout`, and squid picks the ID of every new query
/// by walking the list of pending ones: after a few seconds of churn that walk took most of its
/// CPU time. A hosts file of its own answers the lookups as a resolver on a real node would.
fn squid_config(dir: &Path) -> Result<String> {
    let d = dir.display();
    fs::write(
        dir.join("hosts"),
        format!(
            "127.0.0.1 localhost\n{POD4} pod.bench.test\n{GATEWAY4} gateway.bench.test\n\
             {UPSTREAM4} upstream.bench.test\n"
        ),
    )
    .context("writing squid's hosts file")?;
    Ok(format!(
        "http_port {GATEWAY4}:{SQUID_PORT}
http_access allow all
cache deny all
workers 1
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache_store_log none
coredump_dir {d}
netdb_filename none
pinger_enable off
visible_hostname egressfw-bench
hosts_file {d}/hosts
"
    ))
}

/// Tinyproxy (1.11: a thread per connection) with enough clients for the idle tunnels.
fn tinyproxy_config(dir: &Path, idle: usize) -> String {
    let d = dir.display();
    format!(
        "Port {TINYPROXY_PORT}
Listen {GATEWAY4}
Timeout 600
MaxClients {max}
Allow {POD4}
ConnectPort {ECHO_PORT}
ConnectPort {SINK_PORT}
DisableViaHeader Yes
LogFile \"{d}/tinyproxy.log\"
LogLevel Warning
PidFile \"{d}/tinyproxy.pid\"
",
        max = idle + 256
    )
}

/// `root` and its descendants, from the parent field of every /proc/<pid>/stat.
fn process_tree(root: u32) -> Result<Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").context("listing /proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        if let Some(ppid) = stat_field(&stat, 1).and_then(|p| p.parse::<u32>().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut tree = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        tree.push(pid);
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    Ok(tree)
}

/// Field `n` after the command name of a /proc/<pid>/stat line (0: state, 1: ppid, 11: utime,
/// 12: stime); the name may hold spaces and parentheses, so fields count from the last `)`.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(n))
}

/// CPU seconds, as the kernel splits them: in the process itself, and in the kernel on its
/// behalf (system calls, and the network stack work they do inline).
#[derive(Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    /// `self - earlier`, times `scale`.
    pub fn since(self, earlier: Self, scale: f64) -> Self {
        Self { user: (self.user - earlier.user) * scale, system: (self.system - earlier.system) * scale }
    }
}

impl std::iter::Sum for CpuTime {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| Self { user: a.user + b.user, system: a.system + b.system })
    }
}

/// User and system CPU time of a process, including its threads that already exited.
fn cpu_time(pid: u32) -> Result<CpuTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = |n| stat_field(&stat, n).and_then(|v| v.parse::<u64>().ok());
    let (user, system) =
        ticks(11).zip(ticks(12)).with_context(|| format!("no utime/stime in /proc/{pid}/stat"))?;
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(CpuTime { user: user as f64 / hz, system: system as f64 / hz })
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

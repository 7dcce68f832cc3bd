//! The steered route of `bench gateway` (issue 15): an unmodified client in the enforced cgroup
//! connects straight to the upstream, and the kernel carries the connection to the gateway's
//! SNI listener. Measured next to the explicit route, CONNECT through the gateway's HTTP proxy
//! listener, from the same cgroup, to the same upstream, with the same first flight (a
//! ClientHello naming the upstream, which the echo server sends back):
//!
//! - new connections per second, with the gateway's CPU time per connection;
//! - time to first byte: from before `connect()` to the first byte of the upstream's answer
//!   (steering saves the CONNECT round trip);
//! - the connect hook's kernel run time per connect (`bpf_stats`: BPF_PROG_TEST_RUN does not run
//!   socket-address programs), steered against allowed, and sock_ops' per connection.
//!
//! The clients must run inside the pod's cgroup, where the programs are attached, so they run in
//! a child process: this same binary, as the hidden `bench steering-client`.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use egress_tests::{
    agent::Agent,
    gateway::UPSTREAM4,
    lab::{GATEWAY_PORT, GATEWAY4, Lab},
};

use super::{
    CpuMeter,
    proxies::Proxy,
    traffic::{self, ECHO_PORT, IO_TIMEOUT},
};
use crate::bench::{BpfStats, inspect, median, percentile, program_id};

/// The gateway's SNI listener that steered connections arrive on.
pub const STEERED_TLS_PORT: u16 = 3140;
/// The upstream's name: the ClientHello's SNI and the CONNECT target. The gateway resolves it
/// through its namespace's hosts file (see [`HostsFile`]).
const UPSTREAM_NAME: &str = "echo.bench.test";
/// Untimed cycles before the timed ones.
const WARM_UP: usize = 50;

/// How the client reaches the upstream.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Way {
    /// `CONNECT echo.bench.test:7000` to the gateway's HTTP proxy listener (allowed).
    Connect,
    /// `connect()` to the upstream's own address: refused by the policy, steered to the gateway.
    Steered,
}

impl Way {
    pub const ALL: [Self; 2] = [Self::Connect, Self::Steered];

    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT to the gateway's HTTP proxy listener",
            Self::Steered => "steered by the kernel to the gateway's SNI listener",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Steered => "steered",
        }
    }
}

/// The gateway's listener for steered connections (its upstream is the echo port).
pub fn gateway_listener_config() -> String {
    format!(
        "  tlsPassthrough: {{listen: \"{GATEWAY4}:{STEERED_TLS_PORT}\", upstreamPort: {ECHO_PORT}, steered: true}}\n"
    )
}

/// The gateway rule that lets the bench namespace reach the upstream by name.
pub fn gateway_rule_hosts() -> String {
    format!("    hosts: [{UPSTREAM_NAME}]\n")
}

/// The standalone policy for the pod's cgroup: the gateway's proxy and SNI listeners, and TCP
/// to the echo port steered to the latter.
fn policy(lab: &Lab) -> String {
    format!(
        "policies:\n  - cgroup: {pod}\n    mode: enforce\n    gateways:\n      - address: {GATEWAY4}\n        ports: [{GATEWAY_PORT}, {STEERED_TLS_PORT}]\n    steer:\n      - ports: [{ECHO_PORT}]\n        address: {GATEWAY4}\n        port: {STEERED_TLS_PORT}\n",
        pod = lab.pod_cgroup.display()
    )
}

/// `/etc/netns/<gateway namespace>/hosts`, which `ip netns exec` mounts over `/etc/hosts` for
/// the gateway: a node's resolver would answer for the upstream's name. Removed on drop.
pub struct HostsFile(PathBuf);

impl HostsFile {
    pub fn write(lab: &Lab) -> Result<Self> {
        let dir = PathBuf::from("/etc/netns").join(&lab.gateway.name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guard = Self(dir);
        fs::write(guard.0.join("hosts"), format!("127.0.0.1 localhost\n{UPSTREAM4} {UPSTREAM_NAME}\n"))
            .context("writing the gateway namespace's hosts file")?;
        Ok(guard)
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The standalone agent enforcing [`policy`] on the pod's cgroup, and the ids of the programs
/// whose run time is measured.
pub struct Enforcement {
    _agent: Agent,
    connect4: u64,
    sockops: u64,
}

impl Enforcement {
    /// Starts the agent at `EGRESS_AGENT_BIN` (the harness reads it).
    pub fn start(lab: &Lab) -> Result<Self> {
        fs::write(lab.policy_path(), policy(lab)).context("writing the steering policy")?;
        let agent =
            Agent::try_start(lab).map_err(|log| anyhow::anyhow!("the agent did not start:\n{log}"))?;
        let report = inspect(lab)?;
        let links = &report["policies"][0]["links"];
        Ok(Self {
            connect4: program_id(links, "egress_connect4")?,
            sockops: program_id(links, "egress_sockops")?,
            _agent: agent,
        })
    }
}

/// One way in one round.
#[derive(Clone)]
pub struct SteerSample {
    per_second: f64,
    errors: u64,
    ttfb_p50_us: f64,
    ttfb_p99_us: f64,
    /// The gateway's CPU time per connection of the churn.
    gateway_us_per_conn: f64,
    /// Mean kernel run time of the connect4 program per connect.
    connect4_ns: f64,
    /// Kernel run time of the sock_ops program per connection (it runs at several points).
    sockops_ns_per_conn: f64,
}

impl std::fmt::Display for SteerSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} connections/s, TTFB p50 {:.1} µs p99 {:.1} µs, connect4 {:.0} ns, sock_ops {:.0} ns",
            self.per_second, self.ttfb_p50_us, self.ttfb_p99_us, self.connect4_ns, self.sockops_ns_per_conn
        )
    }
}

/// What one round measures of the steered route.
pub struct RoundSettings {
    pub round: usize,
    pub seconds: f64,
    pub threads: usize,
    /// Connections per way for the time to first byte.
    pub connections: usize,
}

/// Connections per burst of the hook cost; bursts alternate between the ways.
const HOOK_BURST: usize = 200;
const HOOK_BURSTS: usize = 10;

/// Both ways in one round: churn (in an order that rotates with the round), then time to first
/// byte with the ways alternating connection by connection, then the programs' run time in
/// alternating bursts, so a change in the machine's speed falls on both ways alike.
pub fn measure_round(
    lab: &Lab,
    gateway: &Proxy,
    enforcement: &Enforcement,
    r: &RoundSettings,
) -> Result<Vec<SteerSample>> {
    let order: Vec<usize> = (0..Way::ALL.len()).map(|k| (r.round + k) % Way::ALL.len()).collect();
    let mut churned = vec![None; Way::ALL.len()];
    for &i in &order {
        let way = Way::ALL[i];
        churned[i] = Some(churn(lab, gateway, way, r).with_context(|| format!("the churn {}", way.name()))?);
    }
    let timed = client(lab, &["ttfb", "--count", &r.connections.to_string()])?;
    let ttfb: Vec<Vec<f64>> = (0..Way::ALL.len())
        .map(|i| {
            timed["ttfb_us"][i]
                .as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                .context("ttfb_us in the client's report")
        })
        .collect::<Result<_>>()?;
    let mut runs = vec![Vec::new(); Way::ALL.len()];
    let stats = BpfStats::enable()?;
    for _ in 0..HOOK_BURSTS {
        for &i in &order {
            let way = Way::ALL[i];
            let before = [stats.read(enforcement.connect4)?, stats.read(enforcement.sockops)?];
            client(lab, &["connects", "--way", way.arg(), "--count", &HOOK_BURST.to_string()])?;
            let after = [stats.read(enforcement.connect4)?, stats.read(enforcement.sockops)?];
            let connects = after[0].runs - before[0].runs;
            if connects < HOOK_BURST as u64 {
                bail!("connect4 ran {connects} times for {HOOK_BURST} connects {}", way.arg());
            }
            runs[i].push((
                (after[0].ns - before[0].ns) as f64 / connects as f64,
                (after[1].ns - before[1].ns) as f64 / HOOK_BURST as f64,
            ));
        }
    }
    drop(stats);
    Ok(churned
        .into_iter()
        .zip(ttfb)
        .zip(runs)
        .map(|((c, ttfb), runs)| {
            let (per_second, errors, gateway_us_per_conn) = c.expect("every way measured");
            SteerSample {
                per_second,
                errors,
                ttfb_p50_us: percentile(ttfb.clone(), 50.0),
                ttfb_p99_us: percentile(ttfb, 99.0),
                gateway_us_per_conn,
                connect4_ns: median(runs.iter().map(|r| r.0).collect()),
                sockops_ns_per_conn: median(runs.iter().map(|r| r.1).collect()),
            }
        })
        .collect())
}

/// Connections per second from the churn, failed connections, and the gateway's CPU time per
/// connection.
fn churn(lab: &Lab, gateway: &Proxy, way: Way, r: &RoundSettings) -> Result<(f64, u64, f64)> {
    let cpu = CpuMeter(Some(gateway));
    let start = cpu.now()?;
    let churn = client(
        lab,
        &[
            "churn",
            "--way",
            way.arg(),
            "--seconds",
            &r.seconds.to_string(),
            "--threads",
            &r.threads.to_string(),
        ],
    )?;
    let done = churn["done"].as_u64().unwrap_or(0);
    if done == 0 {
        bail!("no connection completed during the churn: {}", churn["first_error"]);
    }
    let gateway_us_per_conn =
        cpu.since(start, 1e6 / done as f64)?.map(super::proxies::CpuTime::total).unwrap_or(f64::NAN);
    Ok((
        churn["per_second"].as_f64().unwrap_or(0.0),
        churn["errors"].as_u64().unwrap_or(0),
        gateway_us_per_conn,
    ))
}

/// Runs `bench steering-client` in the pod's namespace and cgroup; its JSON report.
fn client(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let exe = std::env::current_exe().context("finding xtask's own binary")?;
    let out = lab
        .pod
        .command(&exe.to_string_lossy(), Some(&lab.pod_cgroup))
        .args(["bench", "steering-client"])
        .args(args)
        .output()
        .context("running the steering client")?;
    if !out.status.success() {
        bail!(
            "the steering client ({}) failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the steering client's report")
}

#[derive(Args)]
pub struct ClientArgs {
    #[command(subcommand)]
    what: ClientRun,
}

#[derive(clap::Subcommand)]
enum ClientRun {
    /// Connections per second from `threads` clients for `seconds`.
    Churn {
        #[arg(long, value_enum)]
        way: Way,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        threads: usize,
    },
    /// Time to first byte of `count` connections per way, one after the other, the ways
    /// alternating connection by connection.
    Ttfb {
        #[arg(long)]
        count: usize,
    },
    /// `count` connects, each closed at once: what the connect hook costs.
    Connects {
        #[arg(long, value_enum)]
        way: Way,
        #[arg(long)]
        count: usize,
    },
}

/// The client side, run in the pod's cgroup by [`client`]: prints one JSON report.
pub fn client_main(args: &ClientArgs) -> Result<()> {
    let hello = client_hello(UPSTREAM_NAME);
    let report = match args.what {
        ClientRun::Churn { way, seconds, threads } => {
            let churn = traffic::churn_of(|| cycle(way, &hello).map(drop), seconds, threads);
            serde_json::json!({
                "done": churn.done,
                "per_second": churn.per_second,
                "errors": churn.errors,
                "first_error": churn.first_error,
            })
        }
        ClientRun::Ttfb { count } => {
            let mut ttfb = vec![Vec::with_capacity(count); Way::ALL.len()];
            for i in 0..WARM_UP + count {
                for (way, times) in Way::ALL.iter().zip(&mut ttfb) {
                    let t = cycle(*way, &hello).with_context(|| format!("connection {i} {}", way.arg()))?;
                    if i >= WARM_UP {
                        times.push(t);
                    }
                }
            }
            serde_json::json!({ "ttfb_us": ttfb })
        }
        ClientRun::Connects { way, count } => {
            for i in 0..count {
                TcpStream::connect_timeout(&first_hop(way), IO_TIMEOUT)
                    .with_context(|| format!("connect {i}"))?;
            }
            serde_json::json!({ "connects": count })
        }
    };
    println!("{report}");
    Ok(())
}

/// One connection: connect (and CONNECT), send the ClientHello, read the upstream's answer (the
/// same bytes) and close. Returns the time to its first byte in µs.
fn cycle(way: Way, hello: &[u8]) -> io::Result<f64> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&first_hop(way), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    if way == Way::Connect {
        traffic::connect_through(&s, &format!("{UPSTREAM_NAME}:{ECHO_PORT}"))?;
    }
    s.write_all(hello)?;
    let mut back = vec![0u8; hello.len()];
    let first = s.read(&mut back)?;
    let ttfb = started.elapsed().as_secs_f64() * 1e6;
    if first == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the upstream answered"));
    }
    s.read_exact(&mut back[first..])?;
    if back != hello {
        return Err(io::Error::other("the upstream's answer is not the ClientHello it was sent"));
    }
    Ok(ttfb)
}

/// Where the client connects: the gateway's proxy listener, or the upstream itself.
fn first_hop(way: Way) -> SocketAddr {
    match way {
        Way::Connect => egress_tests::sock(GATEWAY4, GATEWAY_PORT),
        Way::Steered => SocketAddr::new(UPSTREAM4.parse().expect("literal"), ECHO_PORT),
    }
}

/// A minimal TLS 1.3-style ClientHello naming `server_name` (one cipher suite, the SNI
/// extension): what the gateway's SNI listener needs to route it, and nothing the echo server
/// needs to understand.
fn client_hello(server_name: &str) -> Vec<u8> {
    let name = server_name.as_bytes();
    let be16 = |n: usize| u16::try_from(n).expect("short").to_be_bytes();
    let mut sni = Vec::new();
    sni.extend(0u16.to_be_bytes()); // extension type: server_name
    sni.extend(be16(name.len() + 5)); // extension length
    sni.extend(be16(name.len() + 3)); // server name list length
    sni.push(0); // name type: host_name
    sni.extend(be16(name.len()));
    sni.extend(name);
    let mut body = vec![3, 3]; // legacy_version TLS 1.2
    body.extend([0x2a; 32]); // random
    body.push(0); // no session id
    body.extend([0, 2, 0x13, 0x01]); // one cipher suite: TLS_AES_128_GCM_SHA256
    body.extend([1, 0]); // compression: null
    body.extend(be16(sni.len()));
    body.extend(sni);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend(&u32::try_from(body.len()).expect("short").to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![22, 3, 1]; // handshake record, legacy version TLS 1.0
    record.extend(be16(handshake.len()));
    record.extend(handshake);
    record
}

/// The steering table of the report, and issue 15's targets.
pub fn render(samples: &[Vec<SteerSample>]) -> String {
    use std::fmt::Write as _;
    let (connect, steered) = (&samples[0], &samples[1]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| from the enforced cgroup, with a ClientHello | new connections/s | TTFB p50 µs | TTFB p99 µs | gateway CPU per connection | connect4 ns per connect | sock_ops ns per connection |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (way, rows) in Way::ALL.iter().zip(samples) {
        let med = |f: &dyn Fn(&SteerSample) -> f64| median(rows.iter().map(f).collect());
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} µs | {:.0} | {:.0} |",
            way.name(),
            med(&|x| x.per_second),
            med(&|x| x.ttfb_p50_us),
            med(&|x| x.ttfb_p99_us),
            med(&|x| x.gateway_us_per_conn),
            med(&|x| x.connect4_ns),
            med(&|x| x.sockops_ns_per_conn),
        );
    }
    let within = |f: &dyn Fn(&SteerSample) -> f64| {
        median(steered.iter().zip(connect).map(|(s, c)| f(s) / f(c)).collect())
    };
    let hook = median(steered.iter().zip(connect).map(|(s, c)| s.connect4_ns - c.connect4_ns).collect());
    let targets: [super::report::Target; 3] = [
        ("steered new connections/s >= CONNECT's", within(&|x| x.per_second), "x", 1.0, true),
        ("steered TTFB p50 <= CONNECT's", within(&|x| x.ttfb_p50_us), "x", 1.0, false),
        ("connect hook, steered minus allowed <= 1000 ns", hook, " ns", 1000.0, false),
    ];
    out.push_str(&super::report::targets_table("steering target", &targets));
    let errors: u64 = samples.iter().flatten().map(|s| s.errors).sum();
    let _ = writeln!(
        out,
        "\nBoth ways start in the pod's cgroup under an enforcing policy and end at the same echo \
         server through the same gateway process; ratios are taken within each round. The \
         programs' run times come from bpf_stats over {HOOK_BURSTS} bursts of {HOOK_BURST} \
         connects per way (connect, then close at once), the ways alternating burst by burst; \
         bpf_stats is on only for those bursts (it adds its own clock reads to every run).{}",
        if errors > 0 {
            format!(" Failed connections during the churn (not counted): {errors}.")
        } else {
            String::new()
        }
    );
    out
}

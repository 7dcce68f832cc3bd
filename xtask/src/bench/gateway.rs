//! `cargo xtask bench gateway`: the egress gateway against squid and tinyproxy, and against no
//! proxy at all, measured side by side with the same client and the same upstream server.
//!
//! ```text
//!   pod       10.231.0.2   the Rust client (threads in the pod namespace)
//!   gateway   10.231.0.3   egress gateway :3128, squid :3129, tinyproxy :8888,
//!                          plain relays to the echo port: gateway :3130, socat :3131
//!   external  11.231.0.5   echo :7000 and sink :7001 (tokio, in this process)
//! ```
//!
//! Each round restarts the three proxies, then measures the four routes in an order that rotates
//! from round to round, so machine noise and warm caches fall on every route alike. Per route:
//! memory per idle tunnel first (on the fresh process), then 1-byte round trips in one tunnel,
//! tunnel churn with concurrent clients, and bulk throughput through one tunnel. Ratios and
//! added latency are taken within a round, then the median over rounds is reported. Each round
//! ends with round trips through two plain TCP relays (no CONNECT), the gateway's `tcpForwards`
//! listener and socat: what one userspace hop adds here, whatever the proxy. Then the steered
//! route (see `steered`): a client in the enforced cgroup whose plain `connect()` the kernel
//! carries to the gateway, against CONNECT from the same cgroup.

mod profile;
mod proxies;
mod relays;
mod report;
mod steered;
mod traffic;

pub use self::steered::{ClientArgs as SteeringClientArgs, client_main as steering_client};

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use egress_tests::{gateway::UPSTREAM4, lab::Lab};

use self::{
    proxies::{CpuTime, Proxy, Sizing},
    relays::{Relay, start_socat},
    traffic::Via,
};
use super::percentile;
use crate::{run, toolchain};

#[derive(Args)]
pub struct GatewayArgs {
    /// Interleaved rounds (each measures every route once) [default: 5; --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// MiB sent through one tunnel for the bulk throughput [default: 512; --quick: 64].
    #[arg(long)]
    mib: Option<u64>,
    /// Seconds of tunnel churn per route and round [default: 4; --quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// Client threads opening tunnels at once during the churn.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// 1-byte round trips in one tunnel for the latency [default: 20000; --quick: 2000].
    #[arg(long)]
    pings: Option<usize>,
    /// Idle tunnels held through each proxy for its memory per tunnel [default: 1000; --quick: 200].
    #[arg(long)]
    idle: Option<usize>,
    /// Connections one after the other for the time to first byte, steered and CONNECT
    /// [default: 2000; --quick: 200].
    #[arg(long)]
    connections: Option<usize>,
    /// Worker threads of the gateway (`egress-agent gateway --threads`); default: its own
    /// default, one per CPU.
    #[arg(long)]
    gateway_threads: Option<usize>,
    /// A smoke run of under a minute: one round, small sizes (explicit flags still win).
    #[arg(long)]
    quick: bool,
    /// Record each proxy with `perf record` during its tunnel churn into this directory, and
    /// print where its CPU time went. Sampling costs CPU: a profiled run's figures are not for
    /// the record.
    #[arg(long)]
    perf: Option<PathBuf>,
}

/// The arguments with `--quick` and the defaults applied.
struct Settings {
    rounds: usize,
    mib: u64,
    seconds: f64,
    concurrency: usize,
    pings: usize,
    idle: usize,
    connections: usize,
    gateway_threads: Option<usize>,
    perf: Option<PathBuf>,
}

impl Settings {
    fn resolve(a: &GatewayArgs) -> Result<Self> {
        let q = a.quick;
        let s = Self {
            rounds: a.rounds.unwrap_or(if q { 1 } else { 5 }),
            mib: a.mib.unwrap_or(if q { 64 } else { 512 }),
            seconds: a.seconds.unwrap_or(if q { 1.0 } else { 4.0 }),
            concurrency: a.concurrency,
            pings: a.pings.unwrap_or(if q { 2000 } else { 20_000 }),
            idle: a.idle.unwrap_or(if q { 200 } else { 1000 }),
            connections: a.connections.unwrap_or(if q { 200 } else { 2000 }),
            gateway_threads: a.gateway_threads,
            perf: a.perf.clone(),
        };
        if s.rounds == 0
            || s.mib == 0
            || s.seconds <= 0.0
            || s.concurrency == 0
            || s.pings == 0
            || s.idle == 0
            || s.connections == 0
        {
            bail!(
                "--rounds, --mib, --seconds, --concurrency, --pings, --idle and --connections must be positive"
            );
        }
        Ok(s)
    }

    /// The command line that reproduces this run.
    fn command(&self) -> String {
        let mut c = format!(
            "cargo xtask bench gateway --rounds {} --mib {} --seconds {} --concurrency {} --pings {} --idle {} --connections {}",
            self.rounds, self.mib, self.seconds, self.concurrency, self.pings, self.idle, self.connections
        );
        if let Some(n) = self.gateway_threads {
            let _ = write!(c, " --gateway-threads {n}");
        }
        if let Some(dir) = &self.perf {
            let _ = write!(c, " --perf {}", dir.display());
        }
        c
    }
}

/// Where the client's bytes go on their way to the upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Gateway,
    Squid,
    Tinyproxy,
}

impl Route {
    const ALL: [Self; 4] = [Self::Direct, Self::Gateway, Self::Squid, Self::Tinyproxy];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Gateway => "egress gateway",
            Self::Squid => "squid",
            Self::Tinyproxy => "tinyproxy",
        }
    }

    fn short_name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Gateway => "gateway",
            Self::Squid => "squid",
            Self::Tinyproxy => "tinyproxy",
        }
    }

    fn via(self) -> Via {
        self.proxy_addr().map_or(Via::Direct, Via::Proxy)
    }
}

/// One route in one round.
#[derive(Clone)]
struct Sample {
    gbps: f64,
    tunnels_per_s: f64,
    churn_errors: u64,
    p50_us: f64,
    p99_us: f64,
    /// Proxies only, from here on.
    kib_per_tunnel: Option<f64>,
    /// The proxy's CPU time per GiB of the bulk transfer.
    cpu_ms_per_gib: Option<f64>,
    /// The proxy's CPU time per tunnel of the churn.
    cpu_us_per_tunnel: Option<CpuTime>,
    /// The proxy's CPU time per 1-byte round trip.
    cpu_us_per_rtt: Option<f64>,
    /// Share of the whole machine's CPU time that was busy during the bulk transfer: near 1,
    /// the transfer is CPU-bound, and a proxy's work comes out of the client's and server's.
    machine_busy_bulk: f64,
}

/// One plain relay's round trips in one round.
#[derive(Clone)]
struct RelaySample {
    p50_us: f64,
    p99_us: f64,
}

pub fn run(args: &GatewayArgs) -> Result<()> {
    let s = Settings::resolve(args)?;
    run::require_root("cargo xtask bench")?;
    let tc = toolchain::setup_all()?;
    for tool in ["squid", "tinyproxy"] {
        if !toolchain::command_exists(tool) {
            bail!(
                "{tool} is not installed, and the benchmark compares the gateway with it: \
                 `cargo xtask setup` installs it (Debian package `{tool}`)"
            );
        }
    }
    if let Some(dir) = &s.perf {
        profile::require_perf()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let agent = run::build_agent(&tc, true)?;
    // SAFETY: single-threaded here; the harness reads it when starting the node agent.
    unsafe { std::env::set_var("EGRESS_AGENT_BIN", &agent) };
    // Client and server ends of every idle tunnel live in this process; the proxies inherit
    // the limit too.
    raise_open_files(2 * s.idle as u64 + 1024)?;
    let lab = Lab::named("gwbench").context("building the benchmark node")?;
    prepare(&lab)?;
    let _hosts = steered::HostsFile::write(&lab)?;
    let enforcement = steered::Enforcement::start(&lab)?;
    let _upstream = traffic::Upstream::start(&lab.external)?;
    let _socat = start_socat(&lab, &lab.dir)?;
    let sizing = Sizing { idle: s.idle, gateway_threads: s.gateway_threads };
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Route::ALL.len()];
    let mut relayed: Vec<Vec<RelaySample>> = vec![Vec::new(); Relay::ALL.len()];
    let mut steering: Vec<Vec<steered::SteerSample>> = vec![Vec::new(); steered::Way::ALL.len()];
    let mut profiles = Vec::new();
    for round in 0..s.rounds {
        let proxies = Route::ALL[1..]
            .iter()
            .map(|&r| Proxy::start(&lab, r, &agent, &sizing, round))
            .collect::<Result<Vec<_>>>()?;
        for k in 0..Route::ALL.len() {
            let i = (round + k) % Route::ALL.len();
            let route = Route::ALL[i];
            eprintln!("round {}/{}: {}", round + 1, s.rounds, route.name());
            let proxy = proxies.iter().find(|p| p.route == route);
            let (sample, profiled) = measure(&lab, route, proxy, &s, round)?;
            profiles.extend(profiled);
            eprintln!(
                "  {:.2} Gbit/s, {:.0} tunnels/s, RTT p50 {:.1} µs p99 {:.1} µs{}",
                sample.gbps,
                sample.tunnels_per_s,
                sample.p50_us,
                sample.p99_us,
                sample.kib_per_tunnel.map(|k| format!(", {k:.1} KiB per idle tunnel")).unwrap_or_default()
            );
            samples[i].push(sample);
        }
        // The gateway's forward listener lives in this round's gateway process.
        for k in 0..Relay::ALL.len() {
            let i = (round + k) % Relay::ALL.len();
            let relay = Relay::ALL[i];
            let rtts = lab
                .pod
                .within(|| traffic::latency(Via::Relay(relay.addr()), s.pings))
                .with_context(|| format!("latency via {}", relay.name()))?;
            let sample =
                RelaySample { p50_us: percentile(rtts.clone(), 50.0), p99_us: percentile(rtts, 99.0) };
            eprintln!(
                "  plain relay, {}: RTT p50 {:.1} µs p99 {:.1} µs",
                relay.name(),
                sample.p50_us,
                sample.p99_us
            );
            relayed[i].push(sample);
        }
        let gw = proxies.iter().find(|p| p.route == Route::Gateway).expect("started every round");
        let settings = steered::RoundSettings {
            round,
            seconds: s.seconds,
            threads: s.concurrency,
            connections: s.connections,
        };
        let measured = steered::measure_round(&lab, gw, &enforcement, &settings)?;
        for ((way, sample), all) in steered::Way::ALL.iter().zip(measured).zip(&mut steering) {
            eprintln!("  {}: {sample}", way.name());
            all.push(sample);
        }
        eprintln!("  gateway access log: {} lines this round", gw.access_lines());
    }
    println!("\n{}", report::render(&samples, &relayed, &s));
    println!("{}", steered::render(&steering));
    for data in profiles {
        println!("{}", profile::summary(&data)?);
    }
    Ok(())
}

/// The upstream's public address on the external host, on-link routes to it from the pod
/// (direct route) and the gateway namespace, and room for tens of thousands of short
/// connections: the churn closes from the client side, so TIME_WAIT sockets pile up in the pod
/// namespace (client to proxy) and in the gateway namespace (proxy to upstream).
fn prepare(lab: &Lab) -> Result<()> {
    lab.external.ip(&["addr", "add", &format!("{UPSTREAM4}/24"), "dev", "eth0"])?;
    for ns in [&lab.pod, &lab.gateway] {
        ns.ip(&["route", "add", "11.231.0.0/24", "dev", "eth0"])?;
    }
    for ns in [&lab.pod, &lab.gateway, &lab.external] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    Ok(())
}

fn raise_open_files(need: u64) -> Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
            }
        }
    }
    if lim.rlim_cur < need {
        bail!(
            "{need} open files are needed for the idle tunnels but the hard limit is {}: raise it \
             (ulimit -Hn) or pass a smaller --idle",
            lim.rlim_cur
        );
    }
    Ok(())
}

/// One route's figures, and the profile of its churn when `--perf` asked for one.
fn measure(
    lab: &Lab,
    route: Route,
    proxy: Option<&Proxy>,
    s: &Settings,
    round: usize,
) -> Result<(Sample, Option<PathBuf>)> {
    let via = route.via();
    let name = route.name();
    let kib_per_tunnel = proxy.map(|p| idle_memory(lab, p, s.idle)).transpose()?;
    let cpu = CpuMeter(proxy);

    let start = cpu.now()?;
    let rtts =
        lab.pod.within(|| traffic::latency(via, s.pings)).with_context(|| format!("latency via {name}"))?;
    let cpu_us_per_rtt =
        cpu.since(start, 1e6 / (s.pings + traffic::WARM_UP_PINGS) as f64)?.map(CpuTime::total);

    let recording = match (&s.perf, proxy) {
        (Some(dir), Some(p)) => Some(profile::Recording::start(
            p.pid(),
            dir.join(format!("{}-round{}.data", route.short_name(), round + 1)),
        )?),
        _ => None,
    };
    let start = cpu.now()?;
    let churn = lab.pod.within(|| traffic::churn(via, s.seconds, s.concurrency));
    let cpu_us_per_tunnel = cpu.since(start, 1e6 / churn.done.max(1) as f64)?;
    let profiled = recording.map(profile::Recording::finish).transpose()?;
    if churn.errors > 0 {
        eprintln!(
            "  warning: {} failed tunnels via {name} during the churn; first: {}",
            churn.errors,
            churn.first_error.as_deref().unwrap_or("?")
        );
    }
    if churn.done == 0 {
        bail!("no tunnel via {name} completed during the churn: {}", churn.first_error.unwrap_or_default());
    }

    let (start, machine_start) = (cpu.now()?, machine_cpu()?);
    let gbps = lab
        .pod
        .within(|| traffic::bulk(via, s.mib))
        .with_context(|| format!("bulk throughput via {name}"))?;
    let cpu_ms_per_gib = cpu.since(start, 1e3 * 1024.0 / s.mib as f64)?.map(CpuTime::total);
    let machine_end = machine_cpu()?;
    let machine_busy_bulk =
        (machine_end.0 - machine_start.0) as f64 / (machine_end.1 - machine_start.1).max(1) as f64;

    let sample = Sample {
        gbps,
        tunnels_per_s: churn.per_second,
        churn_errors: churn.errors,
        p50_us: percentile(rtts.clone(), 50.0),
        p99_us: percentile(rtts, 99.0),
        kib_per_tunnel,
        cpu_ms_per_gib,
        cpu_us_per_tunnel,
        cpu_us_per_rtt,
        machine_busy_bulk,
    };
    Ok((sample, profiled))
}

/// Busy and total jiffies of the whole machine (all CPUs), from the first line of /proc/stat.
fn machine_cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The proxy's own CPU time over one measurement (nothing for the direct route).
struct CpuMeter<'a>(Option<&'a Proxy>);

impl CpuMeter<'_> {
    fn now(&self) -> Result<CpuTime> {
        self.0.map_or(Ok(CpuTime::default()), Proxy::cpu_time)
    }

    /// CPU seconds since `start`, times `scale` (to a unit per operation).
    fn since(&self, start: CpuTime, scale: f64) -> Result<Option<CpuTime>> {
        Ok(match self.0 {
            Some(p) => Some(p.cpu_time()?.since(start, scale)),
            None => None,
        })
    }
}

/// Growth of the proxy's resident memory while `n` established, idle tunnels go through it,
/// per tunnel. A few tunnels first, so state built once (thread pools, first allocations) is
/// not charged to the tunnels measured. Kernel memory (socket buffers, the gateway's pipes) is
/// not resident memory of the process and is not counted, for any proxy.
fn idle_memory(lab: &Lab, proxy: &Proxy, n: usize) -> Result<f64> {
    let via = proxy.route.via();
    let name = proxy.route.name();
    drop(lab.pod.within(|| traffic::idle(via, 16)).with_context(|| format!("warm-up tunnels via {name}"))?);
    std::thread::sleep(Duration::from_millis(300));
    let before = proxy.rss_kib()?;
    let held =
        lab.pod.within(|| traffic::idle(via, n)).with_context(|| format!("idle tunnels via {name}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let after = proxy.rss_kib()?;
    drop(held);
    // Let the proxy close them before the next measurement starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok((after as f64 - before as f64) / n as f64)
}

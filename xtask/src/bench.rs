//! `cargo xtask bench datapath`: the cost of the programs on the data path, measured side by
//! side. Each round runs the same iperf3 client from the pod to the gateway namespace over veth
//! with no programs attached, with a one-entry policy, and with a policy of 100,000 allow
//! entries, interleaved so machine noise hits every configuration alike. Reported as ratios to
//! the baseline of the same round (median over rounds), plus the mean kernel run time of the
//! packet program from bpf_stats.

use std::{fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use egress_tests::{
    agent::{self, Agent},
    lab::{GATEWAY4, Lab},
    netns::NetNs,
};

use crate::{run, toolchain};

#[derive(Subcommand)]
pub enum Bench {
    /// iperf3 TCP throughput, 64-byte UDP packet rate, and ns per program run.
    Datapath(DatapathArgs),
}

#[derive(Args)]
pub struct DatapathArgs {
    /// Interleaved rounds (each runs every configuration once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Allow entries in the large policy.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
}

const PORT: u16 = 5201;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Baseline,
    Small,
    Large,
}

impl Config {
    fn name(self, entries: usize) -> String {
        match self {
            Self::Baseline => "no programs".into(),
            Self::Small => "policy, 1 allow entry".into(),
            Self::Large => format!("policy, {entries} allow entries"),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Sample {
    tcp_gbps: f64,
    udp_pps: f64,
    /// Mean ns per run of the packet program (attached configurations only).
    ns_per_run: Option<f64>,
}

pub fn run(which: Bench) -> Result<()> {
    let Bench::Datapath(args) = which;
    run::require_root("cargo xtask bench")?;
    let tc = toolchain::setup_all()?;
    let bin = run::build_agent(&tc, true)?;
    // SAFETY: single-threaded here; the harness reads it when starting the agent.
    unsafe { std::env::set_var("EGRESS_AGENT_BIN", &bin) };
    let lab = Lab::named("bench").context("building the benchmark node")?;
    let _server = IperfServer::start(&lab.gateway)?;
    let configs = [Config::Baseline, Config::Small, Config::Large];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 1..=args.rounds {
        for (i, config) in configs.iter().enumerate() {
            eprintln!("round {round}/{}: {}", args.rounds, config.name(args.entries));
            samples[i].push(measure(&lab, *config, &args)?);
        }
    }
    let report = render(&configs, &samples, &args);
    println!("\n{report}");
    Ok(())
}

fn write_policy(lab: &Lab, config: Config, entries: usize) -> Result<()> {
    let mut yaml = lab.policy_text("enforce").replace("ports: [3128]", &format!("ports: [{PORT}]"));
    let _ = writeln!(yaml, "    extra:\n      - {{cidr: {GATEWAY4}/32, protocol: udp, ports: [{PORT}]}}");
    if config == Config::Large {
        // Disjoint /32s in 100.64.0.0/10: entries only, never a destination.
        for i in 0..entries.saturating_sub(1) {
            let n = 100u32 << 24 | 64 << 16 | (i as u32 + 1);
            let a = n.to_be_bytes();
            let _ = writeln!(
                yaml,
                "      - {{cidr: {}.{}.{}.{}/32, protocol: tcp, ports: [443]}}",
                a[0], a[1], a[2], a[3]
            );
        }
    }
    fs::write(lab.policy_path(), yaml).context("writing the benchmark policy")
}

fn measure(lab: &Lab, config: Config, args: &DatapathArgs) -> Result<Sample> {
    let agent = if config == Config::Baseline {
        None
    } else {
        write_policy(lab, config, args.entries)?;
        Some(Agent::try_start(lab).map_err(|log| anyhow::anyhow!("agent did not start:\n{log}"))?)
    };
    let tcp_gbps = iperf(lab, &["-t", &args.seconds.to_string()])?.tcp_gbps()?;
    let udp_pps = iperf(lab, &["-u", "-b", "0", "-l", "64", "-t", &args.seconds.to_string()])?.udp_pps()?;
    let ns_per_run = match agent {
        Some(_) => Some(ns_per_run(lab, args)?),
        None => None,
    };
    drop(agent);
    if config != Config::Baseline {
        let out = agent::cli(lab, &["teardown"]);
        if !out.status.success() {
            bail!("teardown failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(Sample { tcp_gbps, udp_pps, ns_per_run })
}

struct IperfServer {
    child: std::process::Child,
}

impl IperfServer {
    fn start(ns: &NetNs) -> Result<Self> {
        let child = ns
            .command("iperf3", None)
            .args(["-s", "-B", GATEWAY4, "-p", &PORT.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child })
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct IperfResult(serde_json::Value);

impl IperfResult {
    fn tcp_gbps(&self) -> Result<f64> {
        let bps = self.0["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 JSON without end.sum_received")?;
        Ok(bps / 1e9)
    }

    /// Datagrams that reached the server per second.
    fn udp_pps(&self) -> Result<f64> {
        let sum = &self.0["end"]["sum"];
        let packets = sum["packets"].as_f64().context("iperf3 JSON without end.sum.packets")?;
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let secs = sum["seconds"].as_f64().context("iperf3 JSON without end.sum.seconds")?;
        Ok((packets - lost) / secs)
    }
}

fn iperf(lab: &Lab, extra: &[&str]) -> Result<IperfResult> {
    let port = PORT.to_string();
    let mut args = vec!["-c", GATEWAY4, "-p", port.as_str(), "--json"];
    args.extend_from_slice(extra);
    let out = lab.pod.run(Some(&lab.pod_cgroup), "iperf3", &args);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("iperf3 {} printed no JSON: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))
    })?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 {}: {e}", args.join(" "));
    }
    Ok(IperfResult(json))
}

/// Mean ns per run of the packet program over a short UDP flood, from the kernel's bpf_stats
/// (enabled only for this measurement: collecting them costs a few ns per run itself).
fn ns_per_run(lab: &Lab, args: &DatapathArgs) -> Result<f64> {
    let report = agent::cli(lab, &["inspect", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).context("inspect --json")?;
    let prog_id = report["policies"][0]["links"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["program"] == "egress_skb"))
        .and_then(|l| l["program_id"].as_u64())
        .context("no egress_skb link in inspect")?;
    let stats = |_: ()| -> Result<(f64, f64)> {
        let out = run::output(Command::new("bpftool").args([
            "prog",
            "show",
            "id",
            &prog_id.to_string(),
            "--json",
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok((v["run_time_ns"].as_f64().unwrap_or(0.0), v["run_cnt"].as_f64().unwrap_or(0.0)))
    };
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling bpf_stats")?;
    let before = stats(())?;
    let flood = iperf(lab, &["-u", "-b", "0", "-l", "64", "-t", &args.seconds.min(2).to_string()]);
    let after = stats(());
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").context("disabling bpf_stats")?;
    flood?;
    let after = after?;
    let runs = after.1 - before.1;
    if runs <= 0.0 {
        bail!("the packet program did not run during the flood (prog id {prog_id})");
    }
    Ok((after.0 - before.0) / runs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn render(configs: &[Config], samples: &[Vec<Sample>], args: &DatapathArgs) -> String {
    let base = &samples[0];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cargo xtask bench datapath --rounds {} --seconds {} --entries {}\n",
        args.rounds, args.seconds, args.entries
    );
    let _ = writeln!(
        s,
        "| configuration | TCP Gbit/s (median) | TCP ratio | UDP 64 B pkt/s (median) | UDP ratio | ns per packet-program run |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (config, rows) in configs.iter().zip(samples) {
        // Ratios are taken round by round (same round's baseline), then the median.
        let tcp_ratio = median(rows.iter().zip(base).map(|(r, b)| r.tcp_gbps / b.tcp_gbps).collect());
        let udp_ratio = median(rows.iter().zip(base).map(|(r, b)| r.udp_pps / b.udp_pps).collect());
        let ns: Vec<f64> = rows.iter().filter_map(|r| r.ns_per_run).collect();
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.3} | {:.0} | {:.3} | {} |",
            config.name(args.entries),
            median(rows.iter().map(|r| r.tcp_gbps).collect()),
            tcp_ratio,
            median(rows.iter().map(|r| r.udp_pps).collect()),
            udp_ratio,
            if ns.is_empty() { "-".into() } else { format!("{:.0}", median(ns)) }
        );
    }
    let _ = writeln!(
        s,
        "\nTargets: TCP ratio >= 0.97, UDP ratio >= 0.92, <= 100 ns per run, flat from 1 to {} entries.",
        args.entries
    );
    s
}

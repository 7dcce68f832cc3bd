//! `cargo xtask bench datapath`: the cost of the programs on the data path, measured side by
//! side. Each round runs the same iperf3 client from the pod to the gateway namespace over veth
//! with no programs attached, with a one-entry policy, and with a policy of 100,000 allow
//! entries, each also with the tc layer on the pod's veth, interleaved so machine noise hits
//! every configuration alike. Reported as ratios to the baseline of the same round (median over
//! rounds), plus the mean kernel run time of the programs from bpf_stats.

use std::{fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use egress_tests::{
    agent::{self, Agent},
    lab::{GATEWAY4, Lab, POD4},
    netns::NetNs,
};

use super::{BpfStats, inspect, median, program_id};
use crate::{run, toolchain};

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
    /// Measure this egress-agent build instead of building the tree's (an older build, to put
    /// its programs' cost next to the current one's in back-to-back runs).
    #[arg(long, value_name = "PATH")]
    agent: Option<std::path::PathBuf>,
}

const PORT: u16 = 5201;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Baseline,
    Small,
    Large,
    SmallTc,
    LargeTc,
}

impl Config {
    fn name(self, entries: usize) -> String {
        match self {
            Self::Baseline => "no programs".into(),
            Self::Small => "policy, 1 allow entry".into(),
            Self::Large => format!("policy, {entries} allow entries"),
            Self::SmallTc => "policy + tc layer, 1 allow entry".into(),
            Self::LargeTc => format!("policy + tc layer, {entries} allow entries"),
        }
    }

    fn tc_layer(self) -> bool {
        matches!(self, Self::SmallTc | Self::LargeTc)
    }

    fn large(self) -> bool {
        matches!(self, Self::Large | Self::LargeTc)
    }
}

#[derive(Default, Clone, Copy)]
struct Sample {
    tcp_gbps: f64,
    udp_pps: f64,
    /// Mean ns per run of the packet program from bpf_stats (attached configurations only).
    ns_per_run: Option<f64>,
    /// Mean ns per run from BPF_PROG_TEST_RUN on an allowed packet, without bpf_stats' clock
    /// reads around each run.
    ns_test_run: Option<f64>,
    /// Mean ns per run of the tc programs from bpf_stats: (from the pod, to the pod).
    tc_ns_per_run: Option<(f64, f64)>,
    /// The same from BPF_PROG_TEST_RUN: an allowed frame from the pod, a plain ACK to it.
    tc_ns_test_run: Option<(f64, f64)>,
    /// BPF_PROG_TEST_RUN of the from-pod program on an ARP request from the pod's address.
    tc_arp_test_run: Option<f64>,
}

pub fn run(args: &DatapathArgs) -> Result<()> {
    run::require_root("cargo xtask bench")?;
    let tc = toolchain::setup_all()?;
    let bin = match &args.agent {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => anyhow::bail!("--agent {}: no such file", path.display()),
        None => run::build_agent(&tc, true)?,
    };
    // SAFETY: single-threaded here; the harness reads it when starting the agent.
    unsafe { std::env::set_var("EGRESS_AGENT_BIN", &bin) };
    let lab = Lab::named("bench").context("building the benchmark node")?;
    let _server = IperfServer::start(&lab.gateway)?;
    let configs = [Config::Baseline, Config::Small, Config::Large, Config::SmallTc, Config::LargeTc];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 1..=args.rounds {
        for (i, config) in configs.iter().enumerate() {
            eprintln!("round {round}/{}: {}", args.rounds, config.name(args.entries));
            samples[i].push(measure(&lab, *config, args)?);
        }
    }
    let report = render(&configs, &samples, args);
    println!("\n{report}");
    Ok(())
}

fn write_policy(lab: &Lab, config: Config, entries: usize) -> Result<()> {
    let text =
        if config.tc_layer() { lab.policy_text_with_veth("enforce") } else { lab.policy_text("enforce") };
    let mut yaml = text.replace("ports: [3128]", &format!("ports: [{PORT}]"));
    let _ = writeln!(yaml, "    extra:\n      - {{cidr: {GATEWAY4}/32, protocol: udp, ports: [{PORT}]}}");
    if config.large() {
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
        // The tc layer needs the agent where the pod's veth is: the node's namespace.
        let started = if config.tc_layer() { Agent::try_start_on_node(lab) } else { Agent::try_start(lab) };
        Some(started.map_err(|log| anyhow::anyhow!("agent did not start:\n{log}"))?)
    };
    let tcp_gbps = iperf(lab, &["-t", &args.seconds.to_string()])?.tcp_gbps()?;
    let udp_pps = iperf(lab, &["-u", "-b", "0", "-l", "64", "-t", &args.seconds.to_string()])?.udp_pps()?;
    let (ns_per_run, ns_test_run, tc_ns_per_run, tc_test_runs) = match agent {
        Some(_) => {
            let report = inspect(lab)?;
            let skb = program_id(&report["policies"][0]["links"], "egress_skb")?;
            let mut ids = vec![skb];
            if config.tc_layer() {
                let links = &report["interfaces"][0]["links"];
                ids.push(program_id(links, "egress_tc_from_pod")?);
                ids.push(program_id(links, "egress_tc_to_pod")?);
            }
            let ns = ns_per_run(lab, args, &ids)?;
            let (tc, tc_test_run) = if config.tc_layer() {
                (Some((ns[1], ns[2])), Some(tc_ns_test_run(lab, ids[1], ids[2])?))
            } else {
                (None, None)
            };
            (Some(ns[0]), Some(ns_test_run(lab, skb)?), tc, tc_test_run)
        }
        None => (None, None, None, None),
    };
    drop(agent);
    if config != Config::Baseline {
        // Where the agent ran: on kernels without tcx the tc layer's clsact filters are found by
        // interface name in that namespace.
        let out = agent::cli_on_node(lab, &["teardown"]);
        if !out.status.success() {
            bail!("teardown failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(Sample {
        tcp_gbps,
        udp_pps,
        ns_per_run,
        ns_test_run,
        tc_ns_per_run,
        tc_ns_test_run: tc_test_runs.map(|(from, to, _)| (from, to)),
        tc_arp_test_run: tc_test_runs.map(|(_, _, arp)| arp),
    })
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

/// Mean ns per run over a million BPF_PROG_TEST_RUN runs of an allowed TCP packet (the common
/// case), run by bpftool inside the pod's cgroup (the test packet's socket is charged to the
/// caller's cgroup, so the pod's policy applies) and network namespace (so the packet can name
/// eth0 as its device rather than loopback, which the program would let through untested).
fn ns_test_run(lab: &Lab, prog_id: u64) -> Result<f64> {
    let ifindex = ifindex(&lab.pod, "eth0")?;
    let run = TestRun { prog_id, frame: tcp_frame(0), ifindex, returns: "1" };
    run.mean_ns(lab, &lab.pod, Some(&lab.pod_cgroup), "skb")
}

/// The tc programs by BPF_PROG_TEST_RUN, run in the node's namespace with the pod's host-side
/// veth as the frame's device (the programs find the pod's policy through it): from the pod, an
/// allowed TCP segment to the gateway and an ARP request for the gateway from the pod's own
/// address (its sender is checked against the interface's addresses); to the pod, a plain ACK
/// (the common case, which the fast path skips). All go on to the next program (TC_NEXT, -1).
/// Returns (from, to, ARP from).
fn tc_ns_test_run(lab: &Lab, from_pod: u64, to_pod: u64) -> Result<(f64, f64, f64)> {
    const TCP_ACK: u8 = 0x10;
    let ifindex = ifindex(&lab.node, "v-pod")?;
    let next = "4294967295";
    let from = TestRun { prog_id: from_pod, frame: tcp_frame(TCP_ACK), ifindex, returns: next };
    let to = TestRun { prog_id: to_pod, frame: tcp_frame(TCP_ACK), ifindex, returns: next };
    let arp = TestRun { prog_id: from_pod, frame: arp_frame(), ifindex, returns: next };
    Ok((
        from.mean_ns(lab, &lab.node, None, "tc-from")?,
        to.mean_ns(lab, &lab.node, None, "tc-to")?,
        arp.mean_ns(lab, &lab.node, None, "tc-arp")?,
    ))
}

/// An Ethernet frame with an ARP request from the pod's address for the gateway's.
fn arp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&POD4.parse::<std::net::Ipv4Addr>().expect("POD4 is an address").octets());
    frame.extend_from_slice(&[0; 6]);
    frame
        .extend_from_slice(&GATEWAY4.parse::<std::net::Ipv4Addr>().expect("GATEWAY4 is an address").octets());
    frame.resize(60, 0);
    frame
}

/// An Ethernet frame with an IPv4 TCP segment from the pod to the gateway's benchmark port.
fn tcp_frame(tcp_flags: u8) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&POD4.parse::<std::net::Ipv4Addr>().expect("POD4 is an address").octets());
    ip[16..20]
        .copy_from_slice(&GATEWAY4.parse::<std::net::Ipv4Addr>().expect("GATEWAY4 is an address").octets());
    ip[20..22].copy_from_slice(&40000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&PORT.to_be_bytes());
    ip[32] = 5 << 4;
    ip[33] = tcp_flags;
    frame.extend_from_slice(&ip);
    frame
}

fn ifindex(ns: &NetNs, device: &str) -> Result<u32> {
    let links = run::output(Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", device]))?;
    let links: serde_json::Value = serde_json::from_str(&links)?;
    let ifindex =
        links[0]["ifindex"].as_u64().with_context(|| format!("no ifindex for {device} in {}", ns.name))?;
    Ok(ifindex as u32)
}

/// One `bpftool prog run ... repeat 1000000`.
struct TestRun {
    prog_id: u64,
    frame: Vec<u8>,
    /// The frame's device (`struct __sk_buff` ifindex).
    ifindex: u32,
    /// The return value every run must give, as bpftool prints it.
    returns: &'static str,
}

impl TestRun {
    fn mean_ns(&self, lab: &Lab, ns: &NetNs, cgroup: Option<&std::path::Path>, name: &str) -> Result<f64> {
        let data = lab.dir.join(format!("{name}-frame.bin"));
        fs::write(&data, &self.frame)?;
        // struct __sk_buff up to ifindex (offset 40), with ingress_ifindex (36) the same: the
        // tc program finds the pod's policy by the device the frame came in on.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let ctx_path = lab.dir.join(format!("{name}-ctx.bin"));
        fs::write(&ctx_path, ctx)?;
        let id = self.prog_id.to_string();
        let (d, c) = (data.to_string_lossy().into_owned(), ctx_path.to_string_lossy().into_owned());
        let out = ns.run(
            cgroup,
            "bpftool",
            &["prog", "run", "id", &id, "data_in", &d, "ctx_in", &c, "repeat", "1000000"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains(&format!("Return value: {},", self.returns)) {
            bail!(
                "bpftool prog run (program {id}, expected return {}): {text} {}",
                self.returns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text.split("duration (average): ")
            .nth(1)
            .and_then(|r| r.split("ns").next())
            .and_then(|n| n.trim().parse::<f64>().ok())
            .with_context(|| format!("no duration in bpftool output: {text}"))
    }
}

/// Mean ns per run of each program over a short UDP flood, from the kernel's bpf_stats
/// (enabled only for this measurement: collecting them costs a few ns per run itself).
fn ns_per_run(lab: &Lab, args: &DatapathArgs, prog_ids: &[u64]) -> Result<Vec<f64>> {
    let stats = BpfStats::enable()?;
    let read = || prog_ids.iter().map(|&id| stats.read(id)).collect::<Result<Vec<_>>>();
    let before = read();
    let flood = iperf(lab, &["-u", "-b", "0", "-l", "64", "-t", &args.seconds.min(2).to_string()]);
    let after = read();
    drop(stats);
    flood?;
    let (before, after) = (before?, after?);
    prog_ids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(id, (b, a))| {
            let runs = a.runs - b.runs;
            if runs == 0 {
                bail!("program {id} did not run during the flood");
            }
            Ok((a.ns - b.ns) as f64 / runs as f64)
        })
        .collect()
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
        "| configuration | TCP Gbit/s (median) | TCP ratio | UDP 64 B pkt/s (median) | UDP ratio | ns/run, bpf_stats | ns/run, test run | tc ns/run from / to pod, bpf_stats | tc ns/run from / to pod, test run | tc ns/run, ARP from pod, test run |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for (config, rows) in configs.iter().zip(samples) {
        // Ratios are taken round by round (same round's baseline), then the median.
        let tcp_ratio = median(rows.iter().zip(base).map(|(r, b)| r.tcp_gbps / b.tcp_gbps).collect());
        let udp_ratio = median(rows.iter().zip(base).map(|(r, b)| r.udp_pps / b.udp_pps).collect());
        let ns: Vec<f64> = rows.iter().filter_map(|r| r.ns_per_run).collect();
        let ns_run: Vec<f64> = rows.iter().filter_map(|r| r.ns_test_run).collect();
        let show = |v: Vec<f64>| if v.is_empty() { "-".to_string() } else { format!("{:.0}", median(v)) };
        let pair = |pick: fn(&Sample) -> Option<(f64, f64)>| {
            let from: Vec<f64> = rows.iter().filter_map(|r| pick(r).map(|t| t.0)).collect();
            let to: Vec<f64> = rows.iter().filter_map(|r| pick(r).map(|t| t.1)).collect();
            if from.is_empty() { "-".to_string() } else { format!("{} / {}", show(from), show(to)) }
        };
        let (tc, tc_run) = (pair(|r| r.tc_ns_per_run), pair(|r| r.tc_ns_test_run));
        let arp: Vec<f64> = rows.iter().filter_map(|r| r.tc_arp_test_run).collect();
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.3} | {:.0} | {:.3} | {} | {} | {} | {} | {} |",
            config.name(args.entries),
            median(rows.iter().map(|r| r.tcp_gbps).collect()),
            tcp_ratio,
            median(rows.iter().map(|r| r.udp_pps).collect()),
            udp_ratio,
            show(ns),
            show(ns_run),
            tc,
            tc_run,
            show(arp)
        );
    }
    let _ = writeln!(
        s,
        "\nTargets: TCP ratio >= 0.97, UDP ratio >= 0.92, <= 100 ns per run, flat from 1 to {} entries.",
        args.entries
    );
    s
}

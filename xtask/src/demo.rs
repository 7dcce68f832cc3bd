//! `cargo xtask demo`: a simulated node in network namespaces. Part 1 (standalone mode): an
//! enforced pod tries to reach the world in every way it can; the table shows what the kernel let
//! through and what arrived. Part 2 (`demo_k8s`): the Kubernetes node agent enforces a pod when
//! its namespace is labelled. The pod's veth carries the tc layer, so frames from packet sockets
//! and sockets of other cgroups in its network namespace are judged too.

use std::{net::SocketAddr, process::Output};

use anyhow::{Context as _, Result};
use egress_tests::{
    agent::{self, Agent},
    client::{self, refused, succeeded},
    frames,
    lab::{DNS4, EXTERNAL4, EXTERNAL6, GATEWAY_PORT, GATEWAY4, Lab},
    listen::Server,
    sniff::Sniffer,
};

use crate::{run, toolchain};

struct Attempt {
    who: &'static str,
    what: String,
    expect_allowed: bool,
    client: (&'static str, Vec<String>),
}

pub(crate) fn sock(s: &str) -> SocketAddr {
    s.parse().expect("literal address")
}

pub fn run() -> Result<()> {
    run::require_root("cargo xtask demo")?;
    let tc = toolchain::setup_all()?;
    let bin = run::build_agent(&tc, false)?;
    // SAFETY: single-threaded at this point; the harness reads it when starting the agent.
    unsafe { std::env::set_var("EGRESS_AGENT_BIN", &bin) };

    println!(
        "\nBuilding a node in network namespaces: pod {}, gateway {GATEWAY4}:{GATEWAY_PORT}, DNS {DNS4}:53, external {EXTERNAL4}",
        egress_tests::lab::POD4
    );
    let lab = Lab::named("demo").context("building the demo node")?;
    // The pod's cgroup gets the socket hooks, its veth (v-pod, host side) the tc layer.
    std::fs::write(lab.policy_path(), lab.policy_text_with_veth("enforce")).context("writing the policy")?;
    let _proxy = Server::tcp_http(&lab.gateway, sock(&format!("{GATEWAY4}:{GATEWAY_PORT}")));
    let _ssh = Server::tcp_http(&lab.gateway, sock(&format!("{GATEWAY4}:22")));
    let _dns = Server::udp_echo(&lab.gateway, sock(&format!("{DNS4}:53")));
    let _web = Server::tcp_http(&lab.external, sock(&format!("{EXTERNAL4}:80")));
    let _web6 = Server::tcp_http(&lab.external, sock(&format!("[{EXTERNAL6}]:80")));
    let _udp = Server::udp_echo(&lab.external, sock(&format!("{EXTERNAL4}:9000")));
    let watched: Vec<std::net::IpAddr> =
        Lab::pod_sources().into_iter().chain(["10.231.0.99".parse()?, UNENFORCED4.parse()?]).collect();
    let at_external = Sniffer::start(&lab.external, &watched);
    let at_gateway = Sniffer::start(&lab.gateway, &watched);
    // A pod with no policy of its own, on its own veth: the contrast.
    let unenforced = UnenforcedPod::attach(&lab)?;

    println!("Policy ({}):\n{}", lab.policy_path().display(), lab.policy_text_with_veth("enforce"));
    // In the node's network namespace, where the pod's veth is (a DaemonSet uses hostNetwork).
    let agent =
        Agent::try_start_on_node(&lab).map_err(|log| anyhow::anyhow!("the agent did not start:\n{log}"))?;
    println!("Agent running in standalone mode (pins under {}).\n", lab.pin_dir.display());
    let frame_to_external = frames::udp(
        frames::mac(&lab.pod, "eth0"),
        frames::mac(&lab.external, "eth0"),
        egress_tests::lab::POD4.parse()?,
        EXTERNAL4.parse()?,
        9000,
        b"exfiltrated",
    );
    let spoofed_to_dns = frames::udp(
        frames::mac(&lab.pod, "eth0"),
        frames::mac(&lab.gateway, "eth0"),
        "10.231.0.99".parse()?,
        DNS4.parse()?,
        53,
        b"query",
    );

    let attempts = [
        (
            "enforced pod",
            format!("HTTP to the gateway {GATEWAY4}:{GATEWAY_PORT}"),
            true,
            client::curl(&format!("http://{GATEWAY4}:{GATEWAY_PORT}/")),
        ),
        ("enforced pod", format!("DNS query, UDP {DNS4}:53"), true, client::udp_request(DNS4, 53)),
        (
            "enforced pod",
            format!("HTTP straight to {EXTERNAL4}:80 (sidecar bypass)"),
            false,
            client::curl(&format!("http://{EXTERNAL4}/")),
        ),
        ("enforced pod", format!("UDP sendto {EXTERNAL4}:9000"), false, client::udp_sendto(EXTERNAL4, 9000)),
        (
            "enforced pod",
            format!("UDP to port 53 of {EXTERNAL4} (not DNS)"),
            false,
            client::udp_sendto(EXTERNAL4, 53),
        ),
        (
            "enforced pod",
            format!("ICMP echo via raw socket to {EXTERNAL4}"),
            false,
            client::hping_icmp(EXTERNAL4),
        ),
        ("enforced pod", format!("raw IP protocol 253 to {EXTERNAL4}"), false, client::hping_raw(EXTERNAL4)),
        ("enforced pod", format!("TCP over IPv6 to [{EXTERNAL6}]:80"), false, client::tcp(EXTERNAL6, 80)),
        (
            "enforced pod",
            format!("IPv4-mapped IPv6 [::ffff:{EXTERNAL4}]:80"),
            false,
            client::tcp(&format!("::ffff:{EXTERNAL4}"), 80),
        ),
        ("enforced pod", format!("SSH port on the gateway {GATEWAY4}:22"), false, client::tcp(GATEWAY4, 22)),
        (
            "enforced pod",
            format!("AF_PACKET frame to {EXTERNAL4} (no socket hook)"),
            false,
            frames::packet_socket_client(&frame_to_external),
        ),
        (
            "enforced pod",
            "AF_PACKET frame from spoofed 10.231.0.99 to DNS".into(),
            false,
            frames::packet_socket_client(&spoofed_to_dns),
        ),
        (
            "other cgroup",
            format!("HTTP to {EXTERNAL4}:80 from the pod's netns"),
            false,
            client::curl(&format!("http://{EXTERNAL4}/")),
        ),
        (
            "unenforced pod",
            format!("HTTP straight to {EXTERNAL4}:80"),
            true,
            client::curl(&format!("http://{EXTERNAL4}/")),
        ),
    ]
    .map(|(who, what, expect_allowed, client)| Attempt { who, what, expect_allowed, client });

    println!("{:<15} {:<48} {:<34} ARRIVED", "FROM", "ATTEMPT", "CLIENT SAW");
    let mut surprises = 0;
    for a in attempts {
        at_external.clear();
        at_gateway.clear();
        let out = match a.who {
            "enforced pod" => lab.in_pod(a.client),
            "other cgroup" => lab.in_other_cgroup(a.client),
            _ => unenforced.run(a.client),
        };
        let arrived = at_external.seen().len() + at_gateway.seen().len();
        let saw = describe(&out);
        let ok = (arrived > 0) == a.expect_allowed;
        surprises += usize::from(!ok);
        let mark = if ok { "" } else { "   <-- UNEXPECTED" };
        println!(
            "{:<15} {:<48} {:<34} {}{mark}",
            a.who,
            a.what,
            saw,
            if arrived > 0 { format!("yes ({arrived} packets)") } else { "nothing".into() }
        );
    }

    println!(
        "(A packet socket's send() succeeds: its frames never pass a socket hook. The tc layer on the\n pod's veth drops them, and judges the other cgroup's socket by the pod's policy.)"
    );
    let events = agent.wait_for("egress deny", 8);
    println!("\nDeny events from the agent log (JSON lines; {} in all):", events.len());
    for e in events.iter().take(12) {
        println!(
            "  {:<18} {:<6} {:<22} reason {:<18} cgroup {}",
            e["hook"].as_str().unwrap_or("?"),
            e["protocol"].as_str().unwrap_or("?"),
            format!("{} port {}", e["dst"].as_str().unwrap_or("?"), e["dport"]),
            e["reason"].as_str().unwrap_or("?"),
            e["policy_cgroup"].as_str().unwrap_or("?")
        );
    }
    println!("\n$ egress-agent inspect");
    let out = agent::cli_on_node(&lab, &["inspect"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    drop(agent);
    drop(unenforced);
    drop(lab);
    println!("\nDemo node removed (namespaces, cgroups, pins).");
    surprises += crate::demo_k8s::run()?;
    println!("\nDemo node removed (namespaces, cgroups, pins, fake API server).");
    surprises += crate::demo_gateway::run()?;
    println!("\nDemo node removed (namespaces, cgroups, pins, gateway, upstream servers).");
    anyhow::ensure!(surprises == 0, "{surprises} attempts did not behave as expected");
    Ok(())
}

/// The address of the demo's unenforced pod.
const UNENFORCED4: &str = "10.231.0.7";

/// A second pod on the bridge with no policy and no tc layer.
struct UnenforcedPod {
    ns: egress_tests::netns::NetNs,
}

impl UnenforcedPod {
    fn attach(lab: &Lab) -> Result<Self> {
        let ns = egress_tests::netns::NetNs::create(&format!("eft{}-free", lab.id.replace('-', "x")))?;
        egress_tests::netns::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "v-free",
            "netns",
            &lab.node.name,
        ])?;
        lab.node.ip(&["link", "set", "v-free", "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{UNENFORCED4}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(Self { ns })
    }

    fn run(&self, (program, args): (&str, Vec<String>)) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ns.run(None, program, &args)
    }
}

pub(crate) fn describe(out: &Output) -> String {
    if succeeded(out) {
        "succeeded".into()
    } else if refused(out) {
        "EPERM (Operation not permitted)".into()
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        format!("failed: {}", last.chars().take(24).collect::<String>())
    }
}

//! `cargo xtask demo`: a simulated node in network namespaces. Part 1 (standalone mode): an
//! enforced pod tries to reach the world in every way it can; the table shows what the kernel let
//! through and what arrived. Part 2 (`demo_k8s`): the Kubernetes node agent enforces a pod when
//! its namespace is labelled.

use std::{net::SocketAddr, process::Output};

use anyhow::{Context as _, Result};
use egress_tests::{
    agent::{self, Agent},
    client::{self, refused, succeeded},
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
    lab.write_policy("enforce");
    let _proxy = Server::tcp_http(&lab.gateway, sock(&format!("{GATEWAY4}:{GATEWAY_PORT}")));
    let _ssh = Server::tcp_http(&lab.gateway, sock(&format!("{GATEWAY4}:22")));
    let _dns = Server::udp_echo(&lab.gateway, sock(&format!("{DNS4}:53")));
    let _web = Server::tcp_http(&lab.external, sock(&format!("{EXTERNAL4}:80")));
    let _web6 = Server::tcp_http(&lab.external, sock(&format!("[{EXTERNAL6}]:80")));
    let _udp = Server::udp_echo(&lab.external, sock(&format!("{EXTERNAL4}:9000")));
    let at_external = Sniffer::start(&lab.external, &Lab::pod_sources());
    let at_gateway = Sniffer::start(&lab.gateway, &Lab::pod_sources());

    println!("Policy ({}):\n{}", lab.policy_path().display(), lab.policy_text("enforce"));
    let agent = Agent::try_start(&lab).map_err(|log| anyhow::anyhow!("the agent did not start:\n{log}"))?;
    println!("Agent running in standalone mode (pins under {}).\n", lab.pin_dir.display());

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
        let out = if a.who == "enforced pod" { lab.in_pod(a.client) } else { lab.in_other_cgroup(a.client) };
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
    let out = agent::cli(&lab, &["inspect"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    drop(agent);
    drop(lab);
    println!("\nDemo node removed (namespaces, cgroups, pins).");
    surprises += crate::demo_k8s::run()?;
    println!("\nDemo node removed (namespaces, cgroups, pins, fake API server).");
    surprises += crate::demo_gateway::run()?;
    println!("\nDemo node removed (namespaces, cgroups, pins, gateway, upstream servers).");
    anyhow::ensure!(surprises == 0, "{surprises} attempts did not behave as expected");
    Ok(())
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

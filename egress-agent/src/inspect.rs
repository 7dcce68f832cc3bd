//! `egress-agent inspect`: what is really in the kernel, read from the pins (not from any agent's
//! memory): links and the programs they run, policies, allow entries, counters.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use aya::programs::links::{FdLink, PinnedLink};
use egress_common::{
    policy::PROTO_ANY,
    verdict::{ALL_REASONS, Reason},
};
use serde::Serialize;

use crate::{
    cgroup,
    events::protocol_name,
    interfaces::ifname,
    kernel::{
        bpffs::PinLayout,
        maps::{KernelMaps, PassiveMarkStats},
        tc_maps::TcMaps,
    },
    policy::Mode,
};

#[derive(Serialize)]
pub struct Report {
    pub pin_dir: String,
    pub policies: Vec<PolicyReport>,
    /// Pod interfaces under the tc layer.
    pub interfaces: Vec<InterfaceReport>,
    pub counters: Vec<CounterReport>,
    pub events_suppressed: u64,
    pub events_lost_ring_full: u64,
    /// Accepted connections marked for the reply exemption (see `egress_sockops`).
    pub passive_marks: PassiveMarkStats,
    /// Entries in the IPv4 and IPv6 allow tables, over all policies (and leftovers).
    pub allow_entries_v4: usize,
    pub allow_entries_v6: usize,
}

#[derive(Serialize)]
pub struct PolicyReport {
    pub cgroup_id: u64,
    /// None when the cgroup no longer exists.
    pub cgroup_path: Option<String>,
    pub mode: String,
    pub policy_id: u32,
    pub links: Vec<LinkReport>,
    pub allow: Vec<AllowReport>,
    /// Steered TCP ports: `443 -> 10.0.0.3:8443 / [fd00::3]:8443`.
    pub steer: Vec<String>,
}

#[derive(Serialize)]
pub struct InterfaceReport {
    pub ifindex: u32,
    /// None when the interface no longer exists in this network namespace.
    pub name: Option<String>,
    pub policy_cgroup_id: u64,
    /// The only source addresses accepted from it.
    pub sources: Vec<String>,
    /// Attached but bound to no policy: the CNI plugin's gate, waiting for the agent (everything
    /// the pod sends is dropped meanwhile). Seen through the tcx pins; clsact gates have none.
    pub gated: bool,
    /// tcx links pinned for it (none with clsact filters, which have no pins).
    pub links: Vec<LinkReport>,
}

#[derive(Serialize)]
pub struct LinkReport {
    pub program: String,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Serialize)]
pub struct AllowReport {
    pub prefix: String,
    pub rules: Vec<String>,
}

#[derive(Serialize)]
pub struct CounterReport {
    pub reason: &'static str,
    pub number: u8,
    pub applied: u64,
    pub audited: u64,
}

pub fn collect(pins: &PinLayout, cgroup_root: &Path) -> Result<Report> {
    if !pins.exists() {
        anyhow::bail!("nothing is pinned at {} (no agent has run with this --pin-dir)", pins.root.display());
    }
    let maps = KernelMaps::from_pins(pins)?;
    let policies = maps.policies()?;
    let entries = maps.allow_entries()?;
    let mut ids: Vec<u64> = policies.keys().copied().collect();
    ids.extend(pins.pinned_cgroups()?);
    ids.sort_unstable();
    ids.dedup();
    let paths = cgroup::paths_of(cgroup_root, &ids);
    let mut out = Vec::new();
    for id in ids {
        let policy = policies.get(&id);
        let rules = policy.and_then(|p| entries.get(&p.policy_id));
        let mut allow = Vec::new();
        let steer = rules.map(|r| r.steer.iter().map(|(port, t)| describe_steer(*port, t)).collect());
        if let Some(r) = rules {
            allow.extend(r.v4.iter().map(|(n, v)| AllowReport { prefix: n.to_string(), rules: describe(v) }));
            allow.extend(r.v6.iter().map(|(n, v)| AllowReport { prefix: n.to_string(), rules: describe(v) }));
        }
        out.push(PolicyReport {
            cgroup_id: id,
            cgroup_path: paths.get(&id).map(|p| p.display().to_string()),
            mode: policy
                .map(|p| {
                    Mode::from_kernel(p.mode)
                        .map_or_else(|| format!("unknown({})", p.mode), |m| m.name().into())
                })
                .unwrap_or_else(|| "none (links only: fail closed)".into()),
            policy_id: policy.map_or(0, |p| p.policy_id),
            links: links_of(pins, id),
            steer: steer.unwrap_or_default(),
            allow,
        });
    }
    let interfaces = interfaces_of(pins)?;
    let counters = maps.counters()?;
    let (suppressed, ring_full) = maps.event_losses()?;
    let passive_marks = maps.passive_marks()?;
    let (allow_entries_v4, allow_entries_v6) = maps.allow_entry_counts()?;
    Ok(Report {
        pin_dir: pins.root.display().to_string(),
        policies: out,
        interfaces,
        counters: ALL_REASONS
            .iter()
            .map(|r| {
                let c = counters[*r as usize];
                CounterReport { reason: r.name(), number: *r as u8, applied: c.applied, audited: c.audited }
            })
            .collect(),
        events_suppressed: suppressed,
        events_lost_ring_full: ring_full,
        passive_marks,
        allow_entries_v4,
        allow_entries_v6,
    })
}

fn interfaces_of(pins: &PinLayout) -> Result<Vec<InterfaceReport>> {
    // Pins from before the tc layer have no tc maps.
    let Ok(tc) = TcMaps::from_pins(pins) else { return Ok(Vec::new()) };
    let sources = tc.sources()?;
    let bound = tc.interfaces()?;
    let gated: Vec<(u32, u64)> =
        pins.pinned_interfaces()?.into_iter().filter(|i| !bound.contains_key(i)).map(|i| (i, 0)).collect();
    let mut all: Vec<(u32, u64)> = bound.into_iter().chain(gated).collect();
    all.sort_unstable();
    Ok(all
        .into_iter()
        .map(|(ifindex, policy_cgroup_id)| InterfaceReport {
            ifindex,
            name: ifname(ifindex),
            policy_cgroup_id,
            sources: sources.keys().filter(|s| s.ifindex == ifindex).map(|s| s.addr.to_string()).collect(),
            gated: policy_cgroup_id == 0,
            links: links_in(&pins.tc_links(ifindex)),
        })
        .collect())
}

fn links_of(pins: &PinLayout, cgroup_id: u64) -> Vec<LinkReport> {
    links_in(&pins.cgroup_links(cgroup_id))
}

fn links_in(dir: &Path) -> Vec<LinkReport> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|it| it.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|program| {
            let info =
                PinnedLink::from_pin(dir.join(&program)).ok().and_then(|l| FdLink::from(l).info().ok());
            LinkReport {
                program,
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect()
}

fn describe(rules: &egress_common::policy::AllowRules) -> Vec<String> {
    rules
        .as_slice()
        .iter()
        .map(|r| {
            let proto = if r.protocol == PROTO_ANY { "any".to_string() } else { protocol_name(r.protocol) };
            let ports = if r.any_port() {
                String::new()
            } else if r.port_first == r.port_last {
                format!("/{}", r.port_first)
            } else {
                format!("/{}-{}", r.port_first, r.port_last)
            };
            let why = Reason::from_u8(r.reason).map_or("?", |r| r.name().trim_start_matches("allow_"));
            format!("{proto}{ports} ({why})")
        })
        .collect()
}

pub fn print_table(r: &Report) {
    println!("pin directory: {}", r.pin_dir);
    if r.policies.is_empty() {
        println!("\nno enforced cgroups");
    }
    for p in &r.policies {
        println!(
            "\ncgroup {} (id {}): mode {}, policy id {}",
            p.cgroup_path.as_deref().unwrap_or("<deleted>"),
            p.cgroup_id,
            p.mode,
            p.policy_id
        );
        println!("  {:<18} {:>8} {:>8}", "LINK", "LINK ID", "PROG ID");
        for l in &p.links {
            let show = |v: Option<u32>| v.map_or("?".into(), |v| v.to_string());
            println!("  {:<18} {:>8} {:>8}", l.program, show(l.link_id), show(l.program_id));
        }
        println!("  {:<44} RULES", "ALLOW PREFIX");
        if p.allow.is_empty() {
            println!("  (none: only loopback is allowed)");
        }
        for a in &p.allow {
            println!("  {:<44} {}", a.prefix, a.rules.join(", "));
        }
    }
    for i in &r.interfaces {
        if i.gated {
            println!(
                "\ninterface {} (ifindex {}): gated by the CNI plugin, bound to no policy yet (drops everything), {} tcx links",
                i.name.as_deref().unwrap_or("<gone>"),
                i.ifindex,
                i.links.len()
            );
            continue;
        }
        println!(
            "\ninterface {} (ifindex {}): policy of cgroup id {}, sources {}, {} tcx links",
            i.name.as_deref().unwrap_or("<gone>"),
            i.ifindex,
            i.policy_cgroup_id,
            i.sources.join(", "),
            i.links.len()
        );
    }
    println!("\n{:<22} {:>4} {:>14} {:>14}", "REASON", "NO.", "APPLIED", "AUDIT-PASSED");
    for c in &r.counters {
        println!("{:<22} {:>4} {:>14} {:>14}", c.reason, c.number, c.applied, c.audited);
    }
    println!(
        "\nevents held back by the kernel rate limit: {}, lost to a full ring buffer: {}",
        r.events_suppressed, r.events_lost_ring_full
    );
    let m = &r.passive_marks;
    println!(
        "accepted connections marked for replies: {} now ({} marked, {} released), {} evicted while in use",
        m.live(),
        m.marked,
        m.released,
        m.evicted_in_use
    );
}

pub fn print_json(r: &Report) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(r).context("encoding the report")?);
    Ok(())
}

/// One steered port, as the operator wrote it.
fn describe_steer(port: u16, t: &egress_common::steer::SteerTarget) -> String {
    use egress_common::steer::{STEER_V4, STEER_V6};
    let mut to = Vec::new();
    if t.families & STEER_V4 != 0 {
        to.push(format!("{}:{}", std::net::Ipv4Addr::from(t.addr4), t.port));
    }
    if t.families & STEER_V6 != 0 {
        to.push(format!("[{}]:{}", std::net::Ipv6Addr::from(t.addr6), t.port));
    }
    format!("{port} -> {}", to.join(" / "))
}

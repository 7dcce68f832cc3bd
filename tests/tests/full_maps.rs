//! A policy change that does not fit the kernel's allow table is refused and changes nothing:
//! what was enforced stays enforced, nothing of the refused change is left behind, and later
//! changes that fit still apply.

use std::{fmt::Write as _, fs};

use egress_common::maps::MAX_ALLOW_ENTRIES;
use egress_tests::{
    agent::{self, Agent},
    client::{refused, succeeded, udp_sendto},
    lab::{EXTERNAL4, Lab, text},
    listen::Server,
    sock,
};

/// The lab's policy with `count` extra /32 entries in 100.64.0.0/10 starting at `first` (never a
/// destination), plus UDP 9000 to the external host when `external` is set.
fn policy(lab: &Lab, first: u32, count: u32, external: bool) -> String {
    let mut yaml = lab.policy_text("enforce");
    yaml.push_str("    extra:\n");
    if external {
        let _ = writeln!(yaml, "      - {{cidr: {EXTERNAL4}/32, protocol: udp, ports: [9000]}}");
    }
    for i in first..first + count {
        let a = (100u32 << 24 | 64 << 16 | i).to_be_bytes();
        let _ = writeln!(
            yaml,
            "      - {{cidr: {}.{}.{}.{}/32, protocol: tcp, ports: [443]}}",
            a[0], a[1], a[2], a[3]
        );
    }
    yaml
}

fn allow_entries(lab: &Lab) -> u64 {
    let out = agent::cli(lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|p| p["allow"].as_array().map_or(0, Vec::len) as u64)
        .sum()
}

#[test]
fn a_change_that_does_not_fit_is_refused_and_leaves_nothing_behind() {
    let lab = Lab::new();
    // More than half the table: the change below needs room for old and new side by side.
    let half = MAX_ALLOW_ENTRIES / 2 + 1_000;
    fs::write(lab.policy_path(), policy(&lab, 1, half, true)).expect("policy");
    let agent = Agent::start(&lab);
    let _udp = Server::udp_echo(&lab.external, sock(EXTERNAL4, 9000));
    let out = lab.in_pod(udp_sendto(EXTERNAL4, 9000));
    assert!(succeeded(&out), "the first policy allows UDP 9000:\n{}", text(&out));
    let applied = allow_entries(&lab);

    // Another set of the same size, without the external host: old and new do not fit together.
    fs::write(lab.policy_path(), policy(&lab, half + 1, half, false)).expect("policy");
    let rejected = agent.wait_for("reload rejected", 1);
    assert_eq!(rejected.len(), 1, "the change must be refused:\n{}", agent.log_text());
    let out = lab.in_pod(udp_sendto(EXTERNAL4, 9000));
    assert!(succeeded(&out), "the enforced policy stays:\n{}", text(&out));
    assert_eq!(allow_entries(&lab), applied, "nothing of the refused change stays in the table");

    // A change that fits applies.
    fs::write(lab.policy_path(), policy(&lab, 1, 10, false)).expect("policy");
    let reloaded = agent.wait_for("policy reloaded", 1);
    assert_eq!(reloaded.len(), 1, "a change that fits must apply:\n{}", agent.log_text());
    let out = lab.in_pod(udp_sendto(EXTERNAL4, 9000));
    assert!(refused(&out), "the small policy no longer allows UDP 9000:\n{}", text(&out));
}

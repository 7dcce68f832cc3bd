//! The gateway's per-request authorisation cost as the configuration grows: 10 to 10,000 rules
//! spread over 1,000 namespaces, each size measured in the same rounds, interleaved. Run by
//! `cargo xtask bench gateway-rules`, which prints the table this writes.
//!
//! Each rule belongs to one namespace and allows an exact name and a `*.` wildcard on 443.
//! Requests come from the namespaces that have rules, in a fixed pseudo-random order: a third
//! ask for an exact name, a third for a name under a wildcard, a third for a name no rule of
//! that namespace allows (the deny path scans whatever the decision scans).

use std::{hint::black_box, time::Instant};

use egress_agent::gateway::{
    config,
    policy::{Policy, Target},
};

const NAMESPACES: usize = 1000;
const SIZES: [usize; 4] = [10, 100, 1000, 10_000];
const REQUESTS: usize = 200_000;

/// A source namespace and what it asks for.
type Request = (String, Target);

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let setups: Vec<(Policy, Vec<Request>)> = SIZES.iter().map(|&n| (policy(n), requests(n))).collect();
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    for _ in 0..rounds {
        for (i, (policy, requests)) in setups.iter().enumerate() {
            per_size[i].push(ns_per_request(policy, requests));
        }
    }
    let medians: Vec<f64> = per_size.into_iter().map(median).collect();
    println!(
        "| rules (over {NAMESPACES} namespaces) | ns per authorisation (median of {rounds}) | vs 10 rules |"
    );
    println!("|---|---|---|");
    for (n, m) in SIZES.iter().zip(&medians) {
        println!("| {n} | {m:.0} | {:.2}x |", m / medians[0]);
    }
    let worst = medians.iter().copied().fold(0.0, f64::max) / medians[0];
    println!(
        "\ntarget: flat from 10 to 10,000 rules (at most 2x the cost at 10): {worst:.2}x, {}",
        if worst <= 2.0 { "met" } else { "NOT MET" }
    );
}

fn policy(rules: usize) -> Policy {
    let mut yaml = String::from(
        "listeners: {httpProxy: {listen: \"127.0.0.1:3128\"}}\nsources: {kubernetes: true}\nrules:\n",
    );
    for i in 0..rules {
        yaml.push_str(&format!(
            "  - {{namespaces: [ns-{}], hosts: [\"svc{i}.example.com\", \"*.api{i}.example.net\"], ports: [443]}}\n",
            i % NAMESPACES
        ));
    }
    let c = config::parse(&yaml).expect("the generated configuration parses");
    Policy::new(c.rules, c.blocked_cidrs)
}

/// The same number of requests at every size, spread over the rules that exist.
fn requests(rules: usize) -> Vec<Request> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..REQUESTS)
        .map(|k| {
            // xorshift: a fixed sequence, no dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % rules as u64) as usize;
            let name = match k % 3 {
                0 => format!("svc{i}.example.com"),
                1 => format!("a.b.api{i}.example.net"),
                _ => format!("nothing{i}.example.org"),
            };
            (format!("ns-{}", i % NAMESPACES), Target::parse(&name).expect("a valid name"))
        })
        .collect()
}

fn ns_per_request(policy: &Policy, requests: &[Request]) -> f64 {
    let started = Instant::now();
    let mut granted = 0usize;
    for (ns, target) in requests {
        granted += usize::from(black_box(policy.authorize(Some(ns), target, 443)).is_ok());
    }
    let elapsed = started.elapsed();
    assert!(granted > requests.len() / 2, "two thirds of the requests are allowed ({granted})");
    elapsed.as_nanos() as f64 / requests.len() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

//! The gateway's per-request authorisation cost as the configuration grows: 10 to 10,000 rules
//! spread over 1,000 namespaces, each size measured in the same rounds, interleaved. Run by
//! `cargo xtask bench gateway-rules`, which prints the tables this writes.
//!
//! The gateway file: each rule belongs to one namespace and allows an exact name and a `*.`
//! wildcard on 443. Requests come from the namespaces that have rules, in a fixed pseudo-random
//! order: a third ask for an exact name, a third for a name under a wildcard, a third for a name
//! no rule of that namespace allows (the deny path scans whatever the decision scans).
//!
//! The policy resources (`decision::authorize` with an empty file): as many Admin rules as
//! namespace rules. Admin rule i, in the `ClusterEgressPolicy` of namespace i mod 1,000 (selected
//! by its label), passes `*.api<i>.example.net` and a /24; namespace rule i, in that
//! namespace's `EgressPolicy`, accepts one name under it and half the /24. Requests: a third the
//! accepted name, a third an address in the accepted half, a third a name nothing decides.

use std::{hint::black_box, time::Instant};

use egress_agent::{
    crd::{ClusterEgressPolicy, EgressPolicy},
    gateway::{
        config, decision,
        policy::{Policy, Target},
        tiers::{Client, Labels, Tiers, Via},
    },
};

const NAMESPACES: usize = 1000;
/// Rules, and how many of them the requests ask about. The last row tells the cost of the
/// decision's work apart from cache misses: the largest rule set, asked about as few rules as
/// the smallest.
const ROWS: [(usize, usize); 5] = [(10, 10), (100, 100), (1000, 1000), (10_000, 10_000), (10_000, 10)];
const REQUESTS: usize = 200_000;

/// A source namespace and what it asks for.
type Request = (String, Target);

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    file_rules(rounds);
    println!();
    policy_resources(rounds);
    println!();
    one_destination_many_subjects(rounds);
}

fn file_rules(rounds: usize) {
    let setups: Vec<(Policy, Vec<Request>)> = ROWS.iter().map(|&(n, a)| (policy(n), requests(a))).collect();
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    for _ in 0..rounds {
        for (i, (policy, requests)) in setups.iter().enumerate() {
            per_size[i].push(ns_per_request(policy, requests));
        }
    }
    table("the gateway file's rules", "rules", rounds, per_size);
}

/// Prints the medians of each size and the ratio to the smallest.
fn table(what: &str, unit: &str, rounds: usize, per_size: Vec<Vec<f64>>) {
    let medians: Vec<f64> = per_size.into_iter().map(median).collect();
    println!("{what}:\n");
    println!("| {unit} (over {NAMESPACES} namespaces) | ns per authorisation (median of {rounds}) | vs 10 |");
    println!("|---|---|---|");
    for ((n, asked), m) in ROWS.iter().zip(&medians) {
        let row = if asked == n { n.to_string() } else { format!("{n}, asking about {asked} of them") };
        println!("| {row} | {m:.0} | {:.2}x |", m / medians[0]);
    }
    let worst = medians[..4].iter().copied().fold(0.0, f64::max) / medians[0];
    println!(
        "\ntarget: flat from 10 to 10,000 (at most 2x the cost at 10): {worst:.2}x, {}",
        if worst <= 2.0 { "met" } else { "NOT MET" }
    );
}

/// A namespace (by index) and what it asks for.
type Asked = (usize, Target);

fn policy_resources(rounds: usize) {
    let labels = namespace_labels();
    let setups: Vec<(Tiers, Vec<Asked>)> = ROWS.iter().map(|&(n, a)| (tiers(n), asked(a))).collect();
    let empty = Policy::default();
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    for _ in 0..rounds {
        for (i, (tiers, asked)) in setups.iter().enumerate() {
            per_size[i].push(ns_per_decision(&empty, tiers, &labels, asked, asked.len() / 2));
        }
    }
    table("policy resources (Admin Pass, then the namespace's Accept)", "rules per tier", rounds, per_size);
}

/// The namespaces' labels: their name, and team `t<j>`.
fn namespace_labels() -> Vec<Labels> {
    (0..NAMESPACES)
        .map(|j| {
            [
                ("kubernetes.io/metadata.name".to_owned(), format!("ns-{j}")),
                ("team".to_owned(), format!("t{j}")),
            ]
            .into()
        })
        .collect()
}

/// One destination that every Admin policy names, each for other namespaces: policy p passes
/// `*.github.com` on 443 to team `t<p mod 1000>` (the platform delegating GitHub team by team),
/// and every namespace accepts `api.github.com`. Every policy is a candidate for every request;
/// what tells them apart is the subject. Requests from the namespaces that have a policy: half
/// for the accepted name, half for a name under the Pass that nobody accepts.
fn one_destination_many_subjects(rounds: usize) {
    let labels = namespace_labels();
    let setups: Vec<(Tiers, Vec<Asked>)> = ROWS
        .iter()
        .map(|&(n, a)| {
            let asked = xorshift(a.min(NAMESPACES))
                .enumerate()
                .map(|(k, j)| {
                    let host = if k % 2 == 0 { "api.github.com" } else { "nothing.github.com" };
                    (j, Target::parse(host).expect("a valid name"))
                })
                .collect();
            (shared_destination_tiers(n), asked)
        })
        .collect();
    let empty = Policy::default();
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    for _ in 0..rounds {
        for (i, (tiers, asked)) in setups.iter().enumerate() {
            per_size[i].push(ns_per_decision(&empty, tiers, &labels, asked, asked.len() / 3));
        }
    }
    table("one destination, many Admin policies (each for its own team)", "policies", rounds, per_size);
}

fn shared_destination_tiers(policies: usize) -> Tiers {
    let admin: Vec<ClusterEgressPolicy> = (0..policies)
        .map(|p| {
            serde_yaml::from_str(&format!(
                "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {{name: github-{p}}}\nspec:\n  tier: Admin\n  priority: 100\n  subject: {{namespaces: {{matchLabels: {{team: t{}}}}}}}\n  egress:\n    - {{name: github, action: Pass, to: [{{domainNames: ['*.github.com']}}], ports: [{{port: 443}}]}}\n",
                p % NAMESPACES
            ))
            .expect("a generated ClusterEgressPolicy")
        })
        .collect();
    let own: Vec<EgressPolicy> = (0..policies.min(NAMESPACES))
        .map(|j| {
            serde_yaml::from_str(&format!(
                "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: own, namespace: ns-{j}}}\nspec:\n  podSelector: {{}}\n  egress:\n    - {{name: api, action: Accept, to: [{{domainNames: [api.github.com]}}]}}\n"
            ))
            .expect("a generated EgressPolicy")
        })
        .collect();
    let (tiers, rejected) = Tiers::build(&admin, &own);
    assert!(rejected.is_empty(), "{rejected:?}");
    tiers
}

/// The network of rule `i`: 10.a.b.0, as a /24 (Admin) or a /25 (the namespace).
fn net(i: usize) -> String {
    format!("10.{}.{}.0", i / 256, i % 256)
}

fn tiers(rules: usize) -> Tiers {
    let policies = rules.min(NAMESPACES);
    let mut admin: Vec<String> = (0..policies)
        .map(|p| {
            format!(
                "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {{name: team-{p}}}\nspec:\n  tier: Admin\n  priority: {}\n  subject: {{namespaces: {{matchLabels: {{team: t{p}}}}}}}\n  egress:\n",
                p % 1000
            )
        })
        .collect();
    let mut own: Vec<String> = (0..policies)
        .map(|p| {
            format!(
                "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: own, namespace: ns-{p}}}\nspec:\n  podSelector: {{}}\n  egress:\n"
            )
        })
        .collect();
    for i in 0..rules {
        let net = net(i);
        admin[i % policies].push_str(&format!(
            "    - {{name: pass-{i}, action: Pass, to: [{{domainNames: ['*.api{i}.example.net']}}, {{networks: [{net}/24]}}], ports: [{{port: 443}}]}}\n"
        ));
        own[i % policies].push_str(&format!(
            "    - {{name: accept-{i}, action: Accept, to: [{{domainNames: [x.api{i}.example.net]}}, {{networks: [{net}/25]}}]}}\n"
        ));
    }
    let admin: Vec<ClusterEgressPolicy> =
        admin.iter().map(|y| serde_yaml::from_str(y).expect("a generated ClusterEgressPolicy")).collect();
    let own: Vec<EgressPolicy> =
        own.iter().map(|y| serde_yaml::from_str(y).expect("a generated EgressPolicy")).collect();
    let (tiers, rejected) = Tiers::build(&admin, &own);
    assert!(rejected.is_empty(), "{rejected:?}");
    tiers
}

fn asked(rules: usize) -> Vec<Asked> {
    xorshift(rules)
        .enumerate()
        .map(|(k, i)| {
            let target = match k % 3 {
                0 => format!("x.api{i}.example.net"),
                1 => format!("10.{}.{}.7", i / 256, i % 256),
                _ => format!("nothing{i}.example.org"),
            };
            (i % NAMESPACES, Target::parse(&target).expect("a valid target"))
        })
        .collect()
}

/// The mean cost of a decision; at least `allowed` of them must be allowed.
fn ns_per_decision(file: &Policy, tiers: &Tiers, labels: &[Labels], asked: &[Asked], allowed: usize) -> f64 {
    let none = Labels::new();
    let names: Vec<String> = (0..NAMESPACES).map(|j| format!("ns-{j}")).collect();
    let started = Instant::now();
    let mut granted = 0usize;
    for (j, target) in asked {
        let client = Client { namespace: &names[*j], namespace_labels: &labels[*j], pod_labels: &none };
        let decided = decision::authorize(file, tiers, Some(&client), target, 443, Via::Connect);
        granted += usize::from(black_box(decided).is_ok());
    }
    let elapsed = started.elapsed();
    assert!(granted > allowed, "more than {allowed} are allowed ({granted} of {})", asked.len());
    elapsed.as_nanos() as f64 / asked.len() as f64
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
    xorshift(rules)
        .enumerate()
        .map(|(k, i)| {
            let name = match k % 3 {
                0 => format!("svc{i}.example.com"),
                1 => format!("a.b.api{i}.example.net"),
                _ => format!("nothing{i}.example.org"),
            };
            (format!("ns-{}", i % NAMESPACES), Target::parse(&name).expect("a valid name"))
        })
        .collect()
}

/// `REQUESTS` rule indexes below `rules` in a fixed pseudo-random order (xorshift: no dependency).
fn xorshift(rules: usize) -> impl Iterator<Item = usize> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..REQUESTS).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % rules as u64) as usize
    })
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

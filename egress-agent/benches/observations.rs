//! The gateway's observations table under a flood of distinct hosts: entries, estimated bytes,
//! evictions, the process's resident memory and the cost of counting a connection, with the
//! table at its default capacity. Run by `cargo xtask bench observations`.
//!
//! Each round counts `hosts` connections to as many distinct names (one namespace's workload,
//! as a client that varies the name without limit would), then as many again to 100 names it
//! has seen (the common case: a table that already holds what a namespace reaches).

use std::{hint::black_box, time::Instant};

use egress_agent::gateway::{
    access_log::Record,
    observations::{DEFAULT_CAPACITY, ObservationMetrics, Observations},
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn record(host: &str) -> Record {
    let mut r = Record::new("http_proxy", "10.0.0.5:40000".parse().expect("an address"));
    r.namespace = Some("team-a".into());
    r.authority = Some(format!("{host}:443"));
    r.allow("(bench)".into());
    r
}

fn main() {
    let hosts: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let table = Observations::new(DEFAULT_CAPACITY, ObservationMetrics::default());
    let before = rss_kib();
    println!(
        "| connections counted | distinct hosts | entries | estimated bytes | evicted | RSS growth KiB | ns per connection |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut counted = 0usize;
    for (step, distinct) in [(hosts / 10, true), (hosts - hosts / 10, true), (hosts, false)] {
        // One record, its authority rewritten per connection: the memory that grows is the
        // table's (the name's formatting is in the time, as the gateway formats it too).
        let mut r = record("x");
        let started = Instant::now();
        for i in 0..step {
            let host = if distinct {
                format!("h{}.flood.example", counted + i)
            } else {
                format!("known{}.example", i % 100)
            };
            r.authority = Some(format!("{host}:443"));
            table.record(black_box(&r), None, DEFAULT_CAPACITY);
        }
        let ns = started.elapsed().as_nanos() as f64 / step as f64;
        counted += step;
        let (entries, evicted, bytes) = table.size();
        println!(
            "| {counted} | {} | {entries} | {bytes} | {evicted} | {} | {ns:.0} |",
            if distinct { "all" } else { "100 seen before" },
            rss_kib().saturating_sub(before)
        );
        assert!(entries <= DEFAULT_CAPACITY, "the table outgrew its capacity: {entries}");
    }
}

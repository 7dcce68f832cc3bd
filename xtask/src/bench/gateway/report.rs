//! The report of `bench gateway`: medians over rounds, ratios taken within each round, and the
//! gateway's targets marked met or not.

use std::fmt::Write as _;

use egress_tests::gateway::UPSTREAM4;

use super::{RelaySample, Route, Sample, Settings, relays::Relay};
use crate::bench::median;

pub fn render(samples: &[Vec<Sample>], relayed: &[Vec<RelaySample>], s: &Settings) -> String {
    let index = |r: Route| Route::ALL.iter().position(|x| *x == r).expect("listed");
    let direct = &samples[index(Route::Direct)];
    let squid = &samples[index(Route::Squid)];
    let med = |rows: &[Sample], f: &dyn Fn(&Sample) -> f64| median(rows.iter().map(f).collect());
    // Within a round first (same round's direct or squid), then the median over rounds.
    let vs = |rows: &[Sample], base: &[Sample], f: &dyn Fn(&Sample) -> f64| {
        median(rows.iter().zip(base).map(|(r, b)| f(r) / f(b)).collect())
    };
    let added = |rows: &[Sample], f: &dyn Fn(&Sample) -> f64| {
        median(rows.iter().zip(direct).map(|(r, d)| f(r) - f(d)).collect())
    };
    let gbps = |x: &Sample| x.gbps;
    let tps = |x: &Sample| x.tunnels_per_s;
    let p50 = |x: &Sample| x.p50_us;
    let p99 = |x: &Sample| x.p99_us;

    let mut out = String::new();
    let _ = writeln!(out, "{}\n", s.command());
    let _ = writeln!(
        out,
        "| route | bulk Gbit/s | vs direct | new tunnels/s | vs squid | RTT p50 µs | RTT p99 µs | added p50 µs | added p99 µs | KiB per idle tunnel |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (route, rows) in Route::ALL.iter().zip(samples) {
        let proxied = *route != Route::Direct;
        let dash = |v: f64, digits: usize| if proxied { format!("{v:.digits$}") } else { "-".into() };
        let kib: Vec<f64> = rows.iter().filter_map(|r| r.kib_per_tunnel).collect();
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.0} | {} | {:.1} | {:.1} | {} | {} | {} |",
            route.name(),
            med(rows, &gbps),
            vs(rows, direct, &gbps),
            med(rows, &tps),
            dash(vs(rows, squid, &tps), 2),
            med(rows, &p50),
            med(rows, &p99),
            dash(added(rows, &p50), 1),
            dash(added(rows, &p99), 1),
            if kib.is_empty() { "-".into() } else { format!("{:.1}", median(kib)) },
        );
    }
    let _ = writeln!(
        out,
        "\n| route | machine CPU busy during bulk | proxy CPU per GiB relayed | proxy CPU per tunnel (churn), of it in the kernel | proxy CPU per round trip |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (route, rows) in Route::ALL.iter().zip(samples) {
        let cpu = |f: &dyn Fn(&Sample) -> Option<f64>, unit: &str, digits: usize| {
            let v: Vec<f64> = rows.iter().filter_map(f).collect();
            if v.is_empty() { "-".to_string() } else { format!("{:.digits$} {unit}", median(v)) }
        };
        let _ = writeln!(
            out,
            "| {} | {:.0}% | {} | {} | {} |",
            route.name(),
            100.0 * med(rows, &|x| x.machine_busy_bulk),
            cpu(&|x| x.cpu_ms_per_gib, "ms", 0),
            per_tunnel(rows),
            cpu(&|x| x.cpu_us_per_rtt, "µs", 1)
        );
    }
    let _ = writeln!(
        out,
        "\n| plain TCP relay (no CONNECT), to the same echo server | RTT p50 µs | RTT p99 µs | added p50 µs | added p99 µs |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (relay, rows) in Relay::ALL.iter().zip(relayed) {
        let added = |f: &dyn Fn(&RelaySample) -> f64, g: &dyn Fn(&Sample) -> f64| {
            median(rows.iter().zip(direct).map(|(r, d)| f(r) - g(d)).collect())
        };
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            relay.name(),
            median(rows.iter().map(|r| r.p50_us).collect()),
            median(rows.iter().map(|r| r.p99_us).collect()),
            added(&|r| r.p50_us, &p50),
            added(&|r| r.p99_us, &p99),
        );
    }
    let gw = &samples[index(Route::Gateway)];
    let tinyproxy = &samples[index(Route::Tinyproxy)];
    let socat = &relayed[Relay::ALL.iter().position(|r| *r == Relay::Socat).expect("listed")];
    // Both against the same round's direct route, then gateway over socat within the round.
    let added_vs_socat = median(
        gw.iter()
            .zip(socat)
            .zip(direct)
            .map(|((g, so), d)| (g.p50_us - d.p50_us) / (so.p50_us - d.p50_us))
            .collect(),
    );
    let cpu_ratio = |rows: &[Sample], base: &[Sample], f: &dyn Fn(&Sample) -> Option<f64>| {
        median(rows.iter().zip(base).filter_map(|(r, b)| Some(f(r)? / f(b)?)).collect())
    };
    let per_tunnel = |x: &Sample| x.cpu_us_per_tunnel.map(|c| c.total());
    let per_gib = |x: &Sample| x.cpu_ms_per_gib;
    // Issue 16: figures that measure the proxy, each against a proxy or relay in the same round
    // (client, upstream and proxy share two cores here, so absolute rates measure the machine).
    let targets: [Target; 4] = [
        ("proxy CPU per tunnel <= 0.8x tinyproxy's", cpu_ratio(gw, tinyproxy, &per_tunnel), "x", 0.8, false),
        ("added RTT p50 <= socat's (plain relay)", added_vs_socat, "x", 1.0, false),
        ("proxy CPU per GiB <= 0.3x squid's", cpu_ratio(gw, squid, &per_gib), "x", 0.3, false),
        (
            "memory per idle tunnel <= 64 KiB",
            median(gw.iter().filter_map(|r| r.kib_per_tunnel).collect()),
            " KiB",
            64.0,
            false,
        ),
    ];
    out.push_str(&targets_table("gateway target", &targets));
    let _ = writeln!(
        out,
        "\nMedians over {} round(s); ratios and added latency are taken within each round. All \
         routes: CONNECT to {UPSTREAM4} from one client; bulk is one tunnel, churn is {} client \
         threads (open, CONNECT, 1-byte echo, close). The gateway writes its access log (a JSON \
         line per tunnel) to a file; squid runs with `access_log none`, tinyproxy at LogLevel \
         Warning (no per-connection lines). Bulk throughput is reported against direct with \
         the machine's busy share, not as a target: it measures the two shared cores as much as \
         the proxy.",
        s.rounds, s.concurrency
    );
    let errors: Vec<String> = Route::ALL
        .iter()
        .zip(samples)
        .map(|(r, rows)| (r, rows.iter().map(|x| x.churn_errors).sum::<u64>()))
        .filter(|(_, e)| *e > 0)
        .map(|(r, e)| format!("{}: {e}", r.name()))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "Failed tunnels during the churn (not counted): {}.", errors.join(", "));
    }
    out
}

/// A target: what, the measured value, its unit (`x` for a ratio), the limit, and whether the
/// value must be at least the limit (rather than at most).
pub type Target = (&'static str, f64, &'static str, f64, bool);

/// The targets as a table, each marked met or not.
pub fn targets_table(title: &str, targets: &[Target]) -> String {
    let mut out = format!("\n| {title} | measured | |\n|---|---|---|\n");
    for &(what, value, unit, limit, at_least) in targets {
        let met = if at_least { value >= limit } else { value <= limit };
        let digits = match unit {
            "x" => 2,
            " ns" => 0,
            _ => 1,
        };
        let _ = writeln!(
            out,
            "| {what} | {value:.digits$}{unit} | {} |",
            if met { "met" } else { "**not met**" }
        );
    }
    out
}

/// The proxy's CPU time per tunnel of the churn, and the part of it spent in the kernel.
fn per_tunnel(rows: &[Sample]) -> String {
    let t: Vec<_> = rows.iter().filter_map(|x| x.cpu_us_per_tunnel).collect();
    if t.is_empty() {
        return "-".into();
    }
    let total = median(t.iter().map(|c| c.total()).collect());
    let kernel = median(t.iter().map(|c| c.system).collect());
    format!("{total:.1} µs, {kernel:.1} µs")
}

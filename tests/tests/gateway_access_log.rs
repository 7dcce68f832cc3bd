//! The access log never holds up connections: its lines go to a writer thread through a bounded
//! queue, and when stdout stops taking them (a stalled log shipper; here a pipe nobody reads)
//! further lines are dropped and counted while requests keep being served.

use std::path::Path;

use egress_tests::gateway::{GatewayLab, PROXY_PORT, base_config};
use egress_tests::lab::{GATEWAY4, POD4};

const REQUESTS: usize = 1500;

#[test]
fn a_stuck_stdout_costs_log_lines_not_requests() {
    let g = GatewayLab::new();
    let gw = g.start_with_stuck_stdout(
        &base_config(&g.ca, 100),
        &[("EGRESSFW_GATEWAY_ACCESS_LOG_QUEUE", Path::new("16"))],
    );
    // One curl, one keep-alive connection, REQUESTS forwarded requests: far more lines than the
    // pipe (64 KiB) and the queue hold together.
    let proxy = format!("http://{GATEWAY4}:{PROXY_PORT}");
    let urls = format!("http://api.example.test/?n=[1-{REQUESTS}]");
    // curl's --max-time bounds each transfer; `timeout` bounds them all (stretched where
    // everything runs slower: under TCG a busy host made 60 s too short for 1,500 requests).
    let all = egress_tests::patience(std::time::Duration::from_secs(60)).as_secs().to_string();
    let args = [
        all.as_str(),
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--interface",
        POD4,
        "--proxy",
        &proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &urls,
    ];
    let out = g.lab.pod.run(None, "timeout", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text.lines().filter(|l| l.trim() == "200").count();
    assert_eq!(
        ok,
        REQUESTS,
        "every request is served although the access log is stuck:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        text.chars().take(300).collect::<String>()
    );
    let (_, metrics) = g.admin_get("/metrics");
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("egressfw_gateway_access_log_dropped_lines_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter in:\n{metrics}"));
    assert!(dropped > 0.0, "the lines that found the queue full are counted");
    assert!(dropped < REQUESTS as f64, "lines before the pipe filled were written: {dropped}");
    drop(gw);
}

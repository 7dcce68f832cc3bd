//! Operating the gateway: configuration reload (applied without dropping tunnels, a bad file
//! rejected with the old one kept), draining on SIGTERM, metrics and probes, and client
//! identities from the Kubernetes pod list (fake API server).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use egress_tests::{
    fake_api::fixtures,
    gateway::{GatewayLab, PROXY_PORT, STRANGER4, UPSTREAM_BODY, UPSTREAM4, base_config, status_and_body},
    lab::{GATEWAY4, POD4, text},
    listen::Server,
    wait_until,
};

fn proxy() -> String {
    format!("http://{GATEWAY4}:{PROXY_PORT}")
}

/// Opens a CONNECT tunnel to the upstream's HTTP port and returns the socket once it is up.
fn open_tunnel() -> TcpStream {
    let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect to the proxy");
    s.write_all(b"CONNECT api.example.test:80 HTTP/1.1\r\nHost: api.example.test:80\r\n\r\n").expect("write");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("CONNECT reply");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    s
}

/// One HTTP/1.0 request through an open tunnel; the upstream's whole answer.
fn use_tunnel(mut s: TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.0\r\nHost: api.example.test\r\n\r\n").expect("write through the tunnel");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

fn wait_log(gw: &egress_tests::gateway::Gateway, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log_text().contains(needle) {
        assert!(Instant::now() < deadline, "gateway never logged {needle:?}:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_applies_good_configs_keeps_tunnels_and_rejects_bad_ones() {
    let g = GatewayLab::new();
    let base = base_config(&g.ca, 100);
    let gw = g.start(&base);
    let forbidden =
        || status_and_body(&g.curl(POD4, &["--proxy", &proxy(), "http://forbidden.example.test/"])).0;
    assert_eq!(forbidden(), 403);
    let tunnel = g.in_pod(open_tunnel);

    let widened =
        base.replace("hosts: [api.example.test,", "hosts: [forbidden.example.test, api.example.test,");
    assert_ne!(widened, base);
    fs::write(g.config_path(), &widened).expect("rewrite config");
    wait_log(&gw, "gateway configuration reloaded");
    assert_eq!(forbidden(), 200, "the reloaded rules apply to new requests");
    // The tunnel opened before the reload still carries traffic.
    let through = g.in_pod(move || use_tunnel(tunnel));
    assert!(through.contains(UPSTREAM_BODY), "{through}");

    // A broken file: rejected with the error, and the last good rules stay.
    fs::write(g.config_path(), "listeners: [this is not a config").expect("rewrite config");
    wait_log(&gw, "rejected the new gateway configuration");
    assert!(gw.log_text().contains("gateway.yaml"), "the error names the file:\n{}", gw.log_text());
    assert_eq!(forbidden(), 200);
    // An invalid value also names itself.
    fs::write(g.config_path(), widened.replace("headerTimeout: 1s", "headerTimeout: soon")).expect("rewrite");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log_text().contains("limits.headerTimeout") {
        assert!(Instant::now() < deadline, "no error naming limits.headerTimeout:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, metrics) = g.admin_get("/metrics");
    assert!(metrics.contains("egressfw_gateway_config_reloads_total{result=\"rejected\"} 2"), "{metrics}");
    assert!(metrics.contains("egressfw_gateway_config_reloads_total{result=\"applied\"} 1"), "{metrics}");
}

#[test]
fn sigterm_drains_open_tunnels_then_exits() {
    let g = GatewayLab::new();
    let mut gw = g.start(&base_config(&g.ca, 100));
    let tunnel = g.in_pod(open_tunnel);
    gw.signal(libc::SIGTERM);
    wait_log(&gw, "draining");
    // Not ready any more, and no new connections.
    assert_eq!(g.admin_get("/readyz").0, 503);
    let refused = g.in_pod(|| TcpStream::connect((GATEWAY4, PROXY_PORT)).is_err());
    assert!(refused, "listeners must close on SIGTERM");
    // The open tunnel still works, and once it closes the gateway exits at once.
    let t = Instant::now();
    let through = g.in_pod(move || use_tunnel(tunnel));
    assert!(through.contains(UPSTREAM_BODY), "{through}");
    let status = gw.wait_exit(Duration::from_secs(2)).expect("the gateway exits once drained");
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let line = gw.wait_access("drained tunnel", |v| v["end"] == "closed");
    assert!(line["bytes_down"].as_u64().unwrap() > 0, "{line}");
}

#[test]
fn the_drain_deadline_cuts_what_is_left() {
    let g = GatewayLab::new();
    // Tunnels would idle out after 20 s; the drain deadline (3 s) comes first.
    let mut gw = g.start(&base_config(&g.ca, 100).replace("idleTimeout: 2s", "idleTimeout: 20s"));
    let tunnel = g.in_pod(open_tunnel);
    let t = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(Duration::from_secs(8)).expect("the gateway exits at the drain deadline");
    let took = t.elapsed();
    assert!(status.success(), "{status}");
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(6), "exit after {took:?}");
    let line = gw.wait_access("cut tunnel", |v| v["end"] == "drain_deadline");
    assert_eq!(line["authority"], "api.example.test:80");
    drop(tunnel);
}

#[test]
fn metrics_and_probes() {
    let g = GatewayLab::new();
    let _gw = g.start(&base_config(&g.ca, 100));
    assert_eq!(g.admin_get("/healthz").0, 200);
    assert_eq!(g.admin_get("/readyz").0, 200);
    for url in ["http://api.example.test/", "http://api.example.test/", "http://forbidden.example.test/"] {
        let out = g.curl(POD4, &["--proxy", &proxy(), url]);
        assert!(matches!(status_and_body(&out).0, 200 | 403), "{}", text(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = [
        "egressfw_gateway_connections_total{listener=\"http_proxy\",rule=\"api.example.test\",namespace=\"team-a\"} 2",
        "egressfw_gateway_denials_total{listener=\"http_proxy\",reason=\"not_allowed\",namespace=\"team-a\"} 1",
        "egressfw_gateway_bytes_total{listener=\"http_proxy\",direction=\"down\"}",
        "egressfw_gateway_duration_seconds_count{listener=\"http_proxy\"} 3",
        "egressfw_gateway_upstream_connect_seconds_count",
        "egressfw_gateway_active_connections 0",
    ];
    loop {
        let (status, body) = g.admin_get("/metrics");
        assert_eq!(status, 200);
        let missing: Vec<_> = want.iter().filter(|w| !body.contains(*w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn client_namespaces_come_from_the_pod_list() {
    let g = GatewayLab::new();
    let (api, gw) = g.start_with_pod_watch("www.example.test");
    let from_stranger =
        || status_and_body(&g.curl(STRANGER4, &["--proxy", &proxy(), "http://www.example.test/"])).0;
    assert_eq!(from_stranger(), 403);
    api.apply(&fixtures::pod("team-c", "web", "uid-web", "node-1", "BestEffort", Some(STRANGER4)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while from_stranger() != 200 {
        assert!(Instant::now() < deadline, "the pod's namespace never applied:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = gw.wait_access("team-c", |v| v["namespace"] == "team-c" && v["decision"] == "allow");
    assert!(line["source"].as_str().unwrap().starts_with(STRANGER4), "{line}");
    assert!(api.delete::<k8s_openapi::api::core::v1::Pod>(Some("team-c"), "web"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while from_stranger() != 403 {
        assert!(Instant::now() < deadline, "the deleted pod's address still has a namespace");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks often enough for a test, with a timeout a TLS handshake meets even where everything
/// runs slower (under TCG a 150 ms timeout cut handshakes short).
fn check_timing() -> String {
    let timeout = egress_tests::patience(Duration::from_millis(300)).as_millis();
    format!("  interval: {}ms\n  timeout: {timeout}ms\n", timeout + 100)
}

/// Issue 17: a gateway in front of one upstream reports ready only while that upstream answers
/// (TCP connect, or a verified TLS handshake), so Kubernetes takes it out of its Service while
/// the upstream is down and puts it back when it returns.
#[test]
fn readiness_follows_the_upstreams() {
    const PORT: u16 = 7100;
    let g = GatewayLab::new();
    let upstream = egress_tests::sock(UPSTREAM4, PORT);
    let server = Server::tcp_http(&g.lab.external, upstream);
    let config = base_config(&g.ca, 100).replace(
        "limits:",
        &format!(
            "readiness:\n  upstreams:\n    - {{address: \"api.example.test:{PORT}\"}}\n    - {{address: \"api.example.test:443\", tls: true}}\n{}  caFile: \"{}\"\nlimits:",
            check_timing(),
            g.ca.display()
        ),
    );
    let _gw = g.start(&config);
    let ready = || g.admin_get("/readyz");
    wait_until("ready while both upstreams answer", Duration::from_secs(5), || ready().0 == 200);

    drop(server);
    wait_until("not ready once the upstream is gone", Duration::from_secs(5), || ready().0 == 503);
    let (_, why) = ready();
    assert!(why.contains(&format!("api.example.test:{PORT}")), "/readyz names the upstream: {why}");
    assert!(!why.contains(":443"), "the TLS upstream still answers: {why}");

    let _server = Server::tcp_http(&g.lab.external, upstream);
    wait_until("ready again when it is back", Duration::from_secs(5), || ready().0 == 200);
}

/// A TLS check verifies the certificate: a server with a self-signed one does not count.
#[test]
fn a_tls_readiness_check_needs_a_valid_certificate() {
    let g = GatewayLab::new();
    let config = base_config(&g.ca, 100).replace(
        "limits:",
        &format!(
            "readiness:\n  upstreams: [{{address: \"bad.example.test:443\", tls: true}}]\n{}  caFile: \"{}\"\nlimits:",
            check_timing(),
            g.ca.display()
        ),
    );
    let _gw = g.start(&config);
    wait_until("a reason on /readyz", Duration::from_secs(5), || {
        g.admin_get("/readyz").1.contains("bad.example.test:443")
    });
    let (status, why) = g.admin_get("/readyz");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("TLS"), "the handshake failed: {why}");
}

//! Transparent steering (issue 15): an unmodified client in the enforced cgroup, with no proxy
//! settings, reaches an allowed host through the gateway. The kernel carries its TCP connect to
//! the gateway's listener (443 to the SNI-routed one, 80 to the Host-routed one); the gateway
//! applies the namespace's rules; the client sees the address it asked for. Real curl, real
//! kernel, real gateway; a sniffer on the "internet" proves nothing from the pod went there
//! directly.

use std::{net::IpAddr, process::Output};

use egress_tests::{
    agent::Agent,
    client::{refused, tcp, udp_sendto},
    gateway::{
        GatewayLab, TLS_PORT, TRANSPARENT_PORT, UPSTREAM_BODY, UPSTREAM4, UPSTREAM6, base_config,
        status_and_body,
    },
    lab::{GATEWAY_PORT, GATEWAY4, GATEWAY6, POD4, POD6, text},
    sniff::Sniffer,
};

/// The lab's policy, with the gateway's TLS and transparent HTTP listeners allowed, and 443 and
/// 80 steered to them.
fn steering_policy(g: &GatewayLab, mode: &str) -> String {
    let ports = format!("ports: [{GATEWAY_PORT}, {TLS_PORT}, {TRANSPARENT_PORT}]");
    let base = g.lab.policy_text(mode).replace(&format!("ports: [{GATEWAY_PORT}]"), &ports);
    format!(
        "{base}    steer:\n      - ports: [443]\n        address: {GATEWAY4}\n        address6: {GATEWAY6}\n        port: {TLS_PORT}\n      - ports: [80]\n        address: {GATEWAY4}\n        port: {TRANSPARENT_PORT}\n"
    )
}

/// The tests' gateway configuration with the SNI and Host listeners marked as steering targets.
fn steering_gateway(g: &GatewayLab) -> String {
    base_config(&g.ca, 100)
        .replace("upstreamPort: 443}", "upstreamPort: 443, steered: true}")
        .replace("upstreamPort: 80}", "upstreamPort: 80, steered: true}")
}

/// curl in the enforced cgroup, with no proxy settings at all.
fn curl_in_pod(g: &GatewayLab, args: &[&str]) -> Output {
    let mut all = vec!["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", "--noproxy", "*"];
    all.extend_from_slice(args);
    g.lab.pod.run(Some(&g.lab.pod_cgroup), "curl", &all)
}

/// What getpeername() says after connect() to `host:port`, from the enforced cgroup.
fn peer_after_connect(g: &GatewayLab, host: &str, port: u16) -> Output {
    let script = "import socket, sys\n\
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n\
s = socket.socket(fam, socket.SOCK_STREAM)\n\
s.settimeout(5)\n\
s.connect((sys.argv[1], int(sys.argv[2])))\n\
peer = s.getpeername()\n\
print(peer[0], peer[1])\n";
    g.lab.pod.run(Some(&g.lab.pod_cgroup), "python3", &["-c", script, host, &port.to_string()])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn an_unmodified_client_reaches_allowed_hosts_through_the_gateway() {
    let g = GatewayLab::new();
    std::fs::write(g.lab.policy_path(), steering_policy(&g, "enforce")).unwrap();
    let _agent = Agent::start(&g.lab);
    let gw = g.start(&steering_gateway(&g));
    let sniffer = Sniffer::start(&g.lab.external, &[ip(POD4), ip(POD6)]);
    let ca = g.ca.display().to_string();

    // HTTPS to an allowed name, as the application wrote it: through the SNI listener.
    let resolve = format!("api.example.test:443:{UPSTREAM4}");
    let out = curl_in_pod(&g, &["--cacert", &ca, "--resolve", &resolve, "https://api.example.test/"]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "steered HTTPS: {}", text(&out));
    // The upstream's own page (openssl s_server -www), so the connection went all the way.
    assert!(body.contains("s_server"), "the upstream's page: {}", text(&out));
    let line = gw.wait_access("the steered HTTPS connection", |l| {
        l["listener"] == "tls_passthrough" && l["sni"] == "api.example.test" && l["end"].is_string()
    });
    assert_eq!(line["namespace"], "team-a", "{line}");
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["steered"], true, "the access log says the kernel carried it: {line}");
    // The pod's own address (IPv4-mapped: the listener is dual-stack).
    assert!(line["source"].as_str().unwrap().contains(POD4), "{line}");

    // Plain HTTP: through the Host-routed listener.
    let resolve = format!("www.example.test:80:{UPSTREAM4}");
    let out = curl_in_pod(&g, &["--resolve", &resolve, "http://www.example.test/"]);
    assert_eq!(status_and_body(&out), (200, UPSTREAM_BODY.to_owned()), "steered HTTP: {}", text(&out));
    let line = gw.wait_access("the steered HTTP request", |l| l["listener"] == "http_transparent");
    assert_eq!(line["authority"], "www.example.test:80", "{line}");
    assert_eq!((line["decision"].as_str(), line["steered"].as_bool()), (Some("allow"), Some(true)), "{line}");

    // A host no rule allows: refused by the gateway at the TLS handshake, and logged.
    let resolve = format!("forbidden.example.test:443:{UPSTREAM4}");
    let out = curl_in_pod(&g, &["--cacert", &ca, "--resolve", &resolve, "https://forbidden.example.test/"]);
    assert!(!out.status.success(), "a forbidden host must fail: {}", text(&out));
    let line = gw.wait_access("the forbidden host", |l| l["sni"] == "forbidden.example.test");
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str()),
        (Some("deny"), Some("not_allowed")),
        "{line}"
    );

    // The application sees the address it connected to, not the gateway's, on both families.
    for (host, port) in [(UPSTREAM4, 443), (UPSTREAM6, 443), (UPSTREAM4, 80)] {
        let out = peer_after_connect(&g, host, port);
        let seen = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            seen,
            format!("{host} {port}"),
            "getpeername after connect to {host} {port}: {}",
            text(&out)
        );
    }

    // An IPv6-only socket steered to a gateway with no IPv6 address (port 80: address only)
    // fails as it would on any IPv4-only path, with ENETUNREACH rather than EPERM. The same
    // socket then connects to the gateway itself: getpeername must show that peer, not the
    // address of the failed steered connect (its record stays with the socket).
    let script = "import socket, sys\n\
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
s.settimeout(5)\n\
try:\n    s.connect((sys.argv[1], 80))\n    print('connected')\nexcept OSError as e:\n    print(e.errno)\n\
s.connect((sys.argv[2], int(sys.argv[3])))\n\
peer = s.getpeername()\n\
print(peer[0], peer[1])\n";
    let out = g.lab.pod.run(
        Some(&g.lab.pod_cgroup),
        "python3",
        &["-c", script, UPSTREAM6, GATEWAY6, &TLS_PORT.to_string()],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("101\n{GATEWAY6} {TLS_PORT}"),
        "V6ONLY to a mapped target, then the same socket to the gateway: {}",
        text(&out)
    );

    // What is not steered keeps EPERM: another TCP port, and UDP to a steered one (QUIC).
    assert!(refused(&g.lab.in_pod(tcp(UPSTREAM4, 22))), "TCP to a port that is not steered");
    assert!(refused(&g.lab.in_pod(udp_sendto(UPSTREAM4, 443))), "UDP to a steered port");

    assert_eq!(sniffer.seen(), vec![], "nothing from the pod reaches the external host directly");
}

/// A Multipath TCP socket (`IPPROTO_MPTCP`) to a steered port, on both families: the kernel
/// runs the connect hook for its first TCP subflow, which is carried to the gateway like any
/// TCP connect; the socket the application holds must still report the address it asked for,
/// and the gateway must serve it (TLS to the upstream's name through the SNI listener, the
/// certificate checked against the test CA).
#[test]
fn a_multipath_tcp_socket_is_steered_and_sees_the_address_it_asked_for() {
    let g = GatewayLab::new();
    std::fs::write(g.lab.policy_path(), steering_policy(&g, "enforce")).unwrap();
    let _agent = Agent::start(&g.lab);
    let gw = g.start(&steering_gateway(&g));
    let sniffer = Sniffer::start(&g.lab.external, &[ip(POD4), ip(POD6)]);
    let script = "import socket, ssl, sys\n\
host, ca = sys.argv[1], sys.argv[2]\n\
fam = socket.AF_INET6 if ':' in host else socket.AF_INET\n\
s = socket.socket(fam, socket.SOCK_STREAM, 262)\n\
s.settimeout(5)\n\
s.connect((host, 443))\n\
peer = s.getpeername()\n\
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL), peer[0], peer[1])\n\
t = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname='api.example.test')\n\
t.sendall(b'GET / HTTP/1.0\\r\\nHost: api.example.test\\r\\n\\r\\n')\n\
print(b's_server' in t.recv(4096))\n";
    let ca = g.ca.display().to_string();
    for host in [UPSTREAM4, UPSTREAM6] {
        let out = g.lab.pod.run(Some(&g.lab.pod_cgroup), "python3", &["-c", script, host, &ca]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("262 {host} 443\nTrue"),
            "an MPTCP socket to {host} 443: {}",
            text(&out)
        );
    }
    let lines = gw.wait_lines(2);
    assert!(
        lines.iter().filter(|l| l["sni"] == "api.example.test" && l["steered"] == true).count() >= 2,
        "both connections went through the SNI listener: {lines:?}"
    );
    assert_eq!(sniffer.seen(), vec![], "nothing from the pod reaches the external host directly");
}

/// Audit mode rewrites nothing: the connect goes where the application sent it (here nowhere:
/// the pod has no route to the "internet"), the gateway never sees it, and the agent reports
/// what enforcing would have done.
#[test]
fn audit_mode_reports_would_steer_and_rewrites_nothing() {
    let g = GatewayLab::new();
    std::fs::write(g.lab.policy_path(), steering_policy(&g, "audit")).unwrap();
    let agent = Agent::start(&g.lab);
    let gw = g.start(&steering_gateway(&g));
    let out = peer_after_connect(&g, UPSTREAM4, 443);
    assert!(!out.status.success(), "not carried to the gateway, so not connected: {}", text(&out));
    assert!(!refused(&out), "audit mode refuses nothing: {}", text(&out));
    let event = agent.wait_until("egress would_steer", |e| e["dst"] == UPSTREAM4);
    assert_eq!(
        (event["reason"].as_str(), event["dport"].as_u64()),
        (Some("allow_steered"), Some(443)),
        "{event}"
    );
    assert!(gw.access_lines().is_empty(), "the gateway saw nothing: {:?}", gw.access_lines());
}

/// Steering is pinned like the rest of the policy: it holds while the agent is down (SIGKILL)
/// and after a new agent adopts what is pinned.
#[test]
fn steering_holds_while_the_agent_is_down_and_after_a_restart() {
    let g = GatewayLab::new();
    std::fs::write(g.lab.policy_path(), steering_policy(&g, "enforce")).unwrap();
    let mut agent = Agent::start(&g.lab);
    let _gw = g.start(&steering_gateway(&g));
    let ca = g.ca.display().to_string();
    let resolve = format!("api.example.test:443:{UPSTREAM4}");
    let https = || {
        status_and_body(&curl_in_pod(
            &g,
            &["--cacert", &ca, "--resolve", &resolve, "https://api.example.test/"],
        ))
        .0
    };
    assert_eq!(https(), 200, "steered with the agent running");
    agent.kill9();
    assert_eq!(https(), 200, "steered with the agent down");
    let _agent = Agent::start(&g.lab);
    assert_eq!(https(), 200, "steered after a new agent adopted the pins");
    let out = peer_after_connect(&g, UPSTREAM4, 443);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{UPSTREAM4} 443"), "{}", text(&out));
}

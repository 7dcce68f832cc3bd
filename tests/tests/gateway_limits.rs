//! Malformed and hostile clients against the real gateway: a raw-socket corpus of bad request
//! heads (each with its status, access-log reason and whether the connection must close),
//! slowloris, idle tunnels, the connection cap, and static TCP forwards.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use egress_tests::{
    gateway::{
        FORWARD_BLOCKED_PORT, FORWARD_PORT, GatewayLab, PROXY_PORT, TEAM_B4, UPSTREAM_BODY, base_config,
        raw_request,
    },
    lab::{GATEWAY4, POD4},
};

#[test]
fn malformed_requests_are_refused_and_logged() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let many_headers: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(20_000));
    // (name, request, status line prefix, access-log reason, must the connection close?)
    let corpus: Vec<(&str, String, &str, &str, bool)> = vec![
        (
            "CL+TE",
            "POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            "HTTP/1.1 400",
            "ambiguous_framing",
            true,
        ),
        (
            "duplicate CL",
            "POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".into(),
            "HTTP/1.1 400",
            "ambiguous_framing",
            true,
        ),
        (
            "conflicting CL",
            "POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy".into(),
            "HTTP/1.1 400",
            "bad_request",
            true,
        ),
        ("garbage", "\x16\x03\x01garbage\r\n\r\n".into(), "HTTP/1.1 400", "bad_request", true),
        ("origin-form", "GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n".into(), "HTTP/1.1 400", "bad_request", true),
        ("https URI", "GET https://api.example.test/ HTTP/1.1\r\n\r\n".into(), "HTTP/1.1 400", "bad_request", true),
        ("CONNECT without port", "CONNECT api.example.test HTTP/1.1\r\n\r\n".into(), "HTTP/1.1 400", "bad_target", true),
        (
            "two Host headers",
            "GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nHost: forbidden.example.test\r\n\r\n".into(),
            "HTTP/1.1 400",
            "bad_request",
            true,
        ),
        (
            "userinfo in authority",
            "GET http://api.example.test@forbidden.example.test/ HTTP/1.1\r\n\r\n".into(),
            "HTTP/1.1 400",
            "bad_target",
            true,
        ),
        (
            "too many headers",
            format!("GET http://api.example.test/ HTTP/1.1\r\n{many_headers}\r\n"),
            "HTTP/1.1 431",
            "header_too_large",
            true,
        ),
        (
            "huge header",
            format!("GET http://api.example.test/ HTTP/1.1\r\n{huge_header}\r\n"),
            "HTTP/1.1 431",
            "header_too_large",
            true,
        ),
    ];
    for (name, request, status, reason, closes) in &corpus {
        let before = gw.access_lines().len();
        let (reply, closed) = g.in_pod(|| raw_request(PROXY_PORT, request.as_bytes()));
        assert!(reply.starts_with(status), "{name}: expected {status}, got {reply:?}");
        assert_eq!(closed, *closes, "{name}: connection closed? reply {reply:?}");
        let lines = gw.wait_lines(before + 1);
        assert_eq!(lines.len(), before + 1, "{name}: one access-log line per refused request: {lines:?}");
        let last = &lines[before];
        assert_eq!(last["reason"], *reason, "{name}: {last}");
        assert_eq!(last["decision"], "deny", "{name}: {last}");
    }
}

#[test]
fn pipelined_requests_are_each_authorised() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    // A smuggling attempt without ambiguous framing: the second request rides behind the first.
    let (reply, _) = g.in_pod(|| {
        raw_request(
            PROXY_PORT,
            b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\nGET http://forbidden.example.test/ HTTP/1.1\r\nHost: forbidden.example.test\r\nConnection: close\r\n\r\n",
        )
    });
    let statuses: Vec<&str> = reply.matches("HTTP/1.1 ").map(|_| "").collect();
    assert_eq!(statuses.len(), 2, "two responses expected: {reply}");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(UPSTREAM_BODY) && reply.contains("HTTP/1.1 403"), "{reply}");
    assert_eq!(gw.line_for("forbidden.example.test:80")["reason"], "not_allowed");
}

#[test]
fn slow_and_idle_clients_are_cut() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100)); // headerTimeout 1s, idleTimeout 2s
    // Slowloris: a head that never ends.
    let held = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect");
        s.write_all(b"GET http://api.example.test/ HTTP/1.1\r\nX-Slow: ").expect("write");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let t = Instant::now();
        let mut buf = [0u8; 256];
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(300));
            if s.write_all(b"a").is_err() {
                break;
            }
        }
        let _ = s.read(&mut buf);
        t.elapsed()
    });
    assert!(held < Duration::from_millis(2500), "the gateway held a slowloris head for {held:?}");
    gw.wait_access("slowloris", |v| v["reason"] == "header_timeout");

    // An idle CONNECT tunnel is closed after idleTimeout.
    let (reply, lasted) = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect");
        s.write_all(b"CONNECT api.example.test:80 HTTP/1.1\r\n\r\n").expect("write");
        s.set_read_timeout(Some(Duration::from_secs(6))).expect("timeout");
        let t = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        (String::from_utf8_lossy(&got).to_string(), t.elapsed())
    });
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        lasted >= Duration::from_millis(1900) && lasted < Duration::from_secs(5),
        "idle tunnel lasted {lasted:?}"
    );
    let line = gw.wait_access("idle tunnel", |v| {
        v["end"] == "idle_timeout" || v["reason"] == "idle_before_first_byte"
    });
    assert_eq!(line["authority"], "api.example.test:80", "{line}");
}

#[test]
fn the_connection_cap_holds() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 2));
    g.in_pod(|| {
        let open = |_| {
            let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect");
            s.write_all(b"CONNECT api.example.test:80 HTTP/1.1\r\n\r\n").expect("write");
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let mut buf = [0u8; 128];
            let n = s.read(&mut buf).expect("reply");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
            s
        };
        let _held: Vec<TcpStream> = (0..2).map(open).collect();
        let (reply, closed) = raw_request(PROXY_PORT, b"GET http://api.example.test/ HTTP/1.1\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 503") && closed, "{reply}");
    });
    gw.wait_access("cap", |v| v["reason"] == "too_many_connections");
    // Slots come back when tunnels close.
    let out =
        g.curl(POD4, &["--proxy", &format!("http://{GATEWAY4}:{PROXY_PORT}"), "http://api.example.test/"]);
    assert_eq!(egress_tests::gateway::status_and_body(&out).0, 200);
}

#[test]
fn static_tcp_forwards_apply_the_policy() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let (reply, _) = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, FORWARD_PORT)).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        (got, ())
    });
    assert!(reply.contains(UPSTREAM_BODY), "{reply}");
    let line = gw.line_for("api.example.test:7000");
    assert_eq!((line["listener"].as_str(), line["reason"].as_str()), (Some("tcp_forward"), Some("allowed")));
    // A forward whose name resolves to a private address: closed, logged.
    let got = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, FORWARD_BLOCKED_PORT)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(gw.line_for("internal.example.test:80")["reason"], "blocked_private");
}

#[test]
fn one_client_cannot_take_every_slot() {
    let g = GatewayLab::new();
    let config = base_config(&g.ca, 100)
        .replace("  maxConnections: 100", "  maxConnections: 100\n  maxConnectionsPerSource: 2");
    let gw = g.start(&config);
    g.in_pod(|| {
        let open = || {
            let mut s = socket_from(POD4);
            s.write_all(b"CONNECT api.example.test:80 HTTP/1.1\r\n\r\n").expect("write");
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let mut buf = [0u8; 128];
            let n = s.read(&mut buf).expect("reply");
            (s, String::from_utf8_lossy(&buf[..n]).to_string())
        };
        let (a, ra) = open();
        let (b, rb) = open();
        assert!(ra.starts_with("HTTP/1.1 200") && rb.starts_with("HTTP/1.1 200"), "{ra} {rb}");
        let (_c, rc) = open();
        assert!(rc.starts_with("HTTP/1.1 429"), "a third connection from the same address: {rc}");
        drop((a, b));
    });
    gw.wait_access("per-source cap", |v| v["reason"] == "source_connection_limit");
    // Another client is not affected.
    let out =
        g.curl(TEAM_B4, &["--proxy", &format!("http://{GATEWAY4}:{PROXY_PORT}"), "http://www.example.test/"]);
    assert_eq!(egress_tests::gateway::status_and_body(&out).0, 200);
}

/// A TCP connection to the proxy port from a given local address.
fn socket_from(source: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&egress_tests::sock(source, 0).into()).expect("bind");
    sock.connect(&egress_tests::sock(GATEWAY4, PROXY_PORT).into()).expect("connect");
    sock.into()
}

//! What travels inside a CONNECT tunnel after the 200: plain HTTP/1 must name the host the
//! tunnel was opened for (on every request, also split across reads and pipelined), HTTP/2
//! with prior knowledge needs a rule that allows it. (ClientHellos inside tunnels are in
//! `gateway_tls.rs`.)

use std::{io::Write as _, time::Duration};

use egress_tests::gateway::{GatewayLab, UPSTREAM_BODY, base_config, connect_tunnel, read_reply, wait_until};

/// Opens a tunnel to `authority`, writes `chunks` as separate segments (waiting for each to be
/// sent), and reads what comes back until the gateway or upstream closes (3 s at most).
fn through_tunnel(g: &GatewayLab, authority: &str, chunks: &[&[u8]]) -> (String, bool) {
    g.in_pod(|| {
        let mut s = connect_tunnel(authority);
        for c in chunks {
            s.write_all(c).expect("write into the tunnel");
            s.flush().expect("flush");
            // Separate segments: the gateway must reassemble a head it got in pieces.
            std::thread::sleep(Duration::from_millis(40));
        }
        let (got, closed) = read_reply(&mut s, Duration::from_secs(3));
        (String::from_utf8_lossy(&got).to_string(), closed)
    })
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[test]
fn plain_http_in_a_tunnel_must_name_the_connect_host() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    // The host the tunnel is for: relayed to the upstream.
    let (reply, _) = through_tunnel(
        &g,
        "api.example.test:80",
        &[b"GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n"],
    );
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.contains(UPSTREAM_BODY),
        "{reply}"
    );

    // (name, what the client writes into a tunnel to api.example.test:80)
    let fronting: &[(&str, &[&[u8]])] = &[
        ("another Host", &[b"GET / HTTP/1.1\r\nHost: forbidden.example.test\r\n\r\n"]),
        ("split across reads", &[b"GE", b"T / HTTP/1.1\r\nHo", b"st: forbidden.example.test\r\n\r\n"]),
        (
            "absolute-form target",
            &[b"GET http://forbidden.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n"],
        ),
        ("another port", &[b"GET / HTTP/1.1\r\nHost: api.example.test:7000\r\n\r\n"]),
        ("no Host", &[b"GET / HTTP/1.1\r\n\r\n"]),
    ];
    for (name, chunks) in fronting {
        let before = gw.access_lines().len();
        let (reply, closed) = through_tunnel(&g, "api.example.test:80", chunks);
        assert!(
            reply.starts_with("HTTP/1.1 4"),
            "{name}: expected a refusal inside the tunnel, got {reply:?}"
        );
        assert!(closed, "{name}: the tunnel must close after the refusal: {reply:?}");
        assert!(!reply.contains(UPSTREAM_BODY), "{name}: the request reached the upstream: {reply:?}");
        wait_until(&format!("{name}: a denial in the access log"), Duration::from_secs(5), || {
            gw.access_lines().iter().skip(before).any(|v| v["decision"] == "deny")
        });
    }
    let line = gw.wait_access("fronting inside a tunnel", |v| {
        v["reason"] == "target_mismatch"
            && v["authority"].as_str().is_some_and(|a| a.starts_with("forbidden.example.test"))
    });
    assert_eq!(line["decision"], "deny", "{line}");

    // Pipelining: the second request rides behind an allowed first one, in the same segment.
    let (reply, _) = through_tunnel(
        &g,
        "api.example.test:80",
        &[b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\nGET / HTTP/1.1\r\nHost: forbidden.example.test\r\n\r\n"],
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("HTTP/1.1 403"), "the pipelined request must be refused: {reply}");
    assert_eq!(reply.matches(UPSTREAM_BODY).count(), 1, "{reply}");
}

#[test]
fn http2_prior_knowledge_in_a_tunnel_needs_a_rule_that_allows_it() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    // No rule allows it for api.example.test: the gateway answers as an HTTP/2 server would
    // (SETTINGS, then GOAWAY with HTTP_1_1_REQUIRED) and closes.
    let (reply, closed) = through_tunnel(&g, "api.example.test:80", &[&H2_PREFACE[..10], &H2_PREFACE[10..]]);
    let bytes = reply.as_bytes();
    assert!(
        bytes.len() >= 9 + 17 && bytes[3] == 4 && bytes[9 + 3] == 7,
        "expected SETTINGS then GOAWAY, got {reply:?}"
    );
    assert_eq!(&bytes[9 + 13..9 + 17], &[0, 0, 0, 0xd], "GOAWAY's error code: HTTP_1_1_REQUIRED");
    assert!(closed);
    let line = gw.wait_access("h2 refused", |v| v["reason"] == "h2_prior_knowledge");
    assert_eq!(line["authority"], "api.example.test:80", "{line}");
    drop(gw);
    let config = base_config(&g.ca, 100).replace(
        "  - namespaces: [team-b]",
        "  - namespaces: [team-a]\n    hosts: [www.example.test]\n    ports: [80]\n    allowH2PriorKnowledge: true\n  - namespaces: [team-b]",
    );
    let _gw = g.start(&config);
    // The rule for www.example.test opts in: the preface reaches the upstream (an HTTP/1.0
    // server, which answers that it does not speak HTTP/2).
    let (reply, _) = through_tunnel(&g, "www.example.test:80", &[H2_PREFACE]);
    assert!(reply.contains("505"), "the preface was not relayed: {reply:?}");
}

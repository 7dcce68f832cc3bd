//! The gateway's TLS paths with real TLS clients and servers: SNI passthrough (curl --resolve,
//! openssl s_client, a ClientHello split across segments), domain fronting through CONNECT, and
//! TLS origination verified against a test CA.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::Arc,
    time::Duration,
};

use egress_tests::{
    gateway::{GatewayLab, ORIGINATE_PORT, PROXY_PORT, TLS_PORT, base_config, status_and_body},
    lab::{GATEWAY4, POD4, text},
};

/// A real ClientHello (rustls) for `server_name`.
fn client_hello(server_name: &str) -> Vec<u8> {
    client_hello_with(server_name, true)
}

/// A real ClientHello (rustls) for `server_name`, with or without the SNI extension.
fn client_hello_with(server_name: &str, sni: bool) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.enable_sni = sni;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("ClientHello bytes");
    out
}

/// Writes `chunks` with pauses (separate TCP segments) and returns the first bytes answered.
fn send_in_pieces(stream: &mut TcpStream, chunks: &[&[u8]]) -> Vec<u8> {
    stream.set_nodelay(true).expect("nodelay");
    for c in chunks {
        stream.write_all(c).expect("write");
        std::thread::sleep(Duration::from_millis(60));
    }
    stream.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap_or(0);
    buf[..n].to_vec()
}

const ALERT_ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

#[test]
fn sni_passthrough_relays_allowed_names_untouched() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let ca = g.ca.display().to_string();
    let resolve = |name: &str| format!("{name}:{TLS_PORT}:{GATEWAY4}");
    // curl verifies the upstream's own certificate: the gateway did not terminate TLS.
    let out = g.curl(
        POD4,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &resolve("api.example.test"),
            &format!("https://api.example.test:{TLS_PORT}/"),
        ],
    );
    assert_eq!(status_and_body(&out).0, 200, "{}", text(&out));
    let line = gw.wait_access("SNI api", |v| v["sni"] == "api.example.test");
    assert_eq!(line["reason"], "allowed", "{line}");
    assert_eq!(line["listener"], "tls_passthrough");
    assert!(line["bytes_down"].as_u64().unwrap() > 500, "{line}");

    // A name no rule allows: the client sees a TLS alert, not a hang.
    let out = g.lab.pod.run(
        None,
        "openssl",
        &[
            "s_client",
            "-connect",
            &format!("{GATEWAY4}:{TLS_PORT}"),
            "-servername",
            "forbidden.example.test",
            "-brief",
        ],
    );
    let t = text(&out);
    assert!(!out.status.success() && t.contains("access denied"), "{t}");
    assert_eq!(
        gw.wait_access("SNI forbidden", |v| v["sni"] == "forbidden.example.test")["reason"],
        "not_allowed"
    );

    // No SNI at all.
    let out = g.lab.pod.run(
        None,
        "openssl",
        &["s_client", "-connect", &format!("{GATEWAY4}:{TLS_PORT}"), "-noservername", "-brief"],
    );
    assert!(!out.status.success() && text(&out).contains("unrecognized name"), "{}", text(&out));
    gw.wait_access("no SNI", |v| v["reason"] == "no_server_name");

    // Not TLS at all: closed, logged.
    let reply = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, TLS_PORT)).expect("connect");
        send_in_pieces(&mut s, &[b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n"])
    });
    assert!(reply.is_empty(), "plain text on the TLS port got {reply:?}");
    gw.wait_access("plain text", |v| v["reason"] == "not_tls");
}

#[test]
fn a_client_hello_split_across_segments_is_reassembled() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let hello = client_hello("api.example.test");
    let reply = g.in_pod(|| {
        let mut s = TcpStream::connect((GATEWAY4, TLS_PORT)).expect("connect");
        send_in_pieces(&mut s, &[&hello[..3], &hello[3..40], &hello[40..]])
    });
    // The upstream's ServerHello (a handshake record) came back through the gateway.
    assert_eq!(reply.first(), Some(&22), "expected a TLS handshake record, got {reply:?}");
    gw.wait_access("split hello", |v| v["sni"] == "api.example.test" && v["reason"] == "allowed");
}

#[test]
fn connect_tunnels_cannot_front_another_name() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let connect_then = |sni: &str| {
        // "": a ClientHello without the SNI extension.
        let hello =
            if sni.is_empty() { client_hello_with("api.example.test", false) } else { client_hello(sni) };
        g.in_pod(|| {
            let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect");
            s.write_all(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n")
                .expect("write");
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let mut head = [0u8; 1024];
            let n = s.read(&mut head).expect("CONNECT reply");
            let head = String::from_utf8_lossy(&head[..n]).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            send_in_pieces(&mut s, &[&hello])
        })
    };
    // The same name: the upstream answers with its ServerHello.
    assert_eq!(connect_then("api.example.test").first(), Some(&22));
    // Another name through the same tunnel (domain fronting): a TLS alert, and a denial logged.
    assert_eq!(connect_then("forbidden.example.test"), ALERT_ACCESS_DENIED);
    let line = gw.wait_access("fronting", |v| v["reason"] == "target_mismatch");
    assert_eq!(line["sni"], "forbidden.example.test");
    assert_eq!(line["authority"], "api.example.test:443");
    // No SNI at all in a tunnel to a name: the upstream (a CDN) would pick the site by other
    // means, so the gateway cannot tell which one the client gets.
    assert_eq!(connect_then(""), ALERT_UNRECOGNIZED_NAME);
    let line = gw.wait_access("no SNI in a tunnel", |v| v["reason"] == "no_server_name");
    assert_eq!(line["authority"], "api.example.test:443");
}

#[test]
fn tls_origination_verifies_the_upstream() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let url = format!("http://{GATEWAY4}:{ORIGINATE_PORT}/");
    // Plain HTTP in, HTTPS out: openssl s_server -www answers with its status page.
    let out = g.curl(POD4, &["-H", "Host: api.example.test", &url]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "{}", text(&out));
    assert!(body.contains("s_server"), "expected the TLS server's page: {body}");
    let line = gw.line_for("api.example.test:443");
    assert_eq!(
        (line["listener"].as_str(), line["reason"].as_str()),
        (Some("tls_origination"), Some("allowed"))
    );
    // A certificate the configured CA did not sign: 502, never a plain-text fallback.
    let out = g.curl(POD4, &["-H", "Host: bad.example.test", &url]);
    assert_eq!(status_and_body(&out).0, 502, "{}", text(&out));
    assert_eq!(gw.line_for("bad.example.test:443")["reason"], "upstream_tls_failed");
    // The diagnostic line says which connection it is about (the connection's span).
    let diagnostic = gw
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "upstream TLS handshake failed")
        .unwrap_or_else(|| panic!("no handshake failure logged:\n{}", gw.log_text()));
    let span = &diagnostic["span"];
    assert_eq!(span["name"], "connection", "{diagnostic}");
    assert_eq!(span["listener"], "tls_origination", "{diagnostic}");
    assert_eq!(span["namespace"], "team-a", "{diagnostic}");
    assert_eq!(span["target"], "bad.example.test:443", "{diagnostic}");
    assert!(span["source"].as_str().is_some_and(|s| s.starts_with(POD4)), "{diagnostic}");
    // A host the listener does not originate to.
    let out = g.curl(POD4, &["-H", "Host: www.example.test", &url]);
    assert_eq!(status_and_body(&out).0, 403, "{}", text(&out));
    assert_eq!(gw.line_for("www.example.test")["reason"], "not_originated");
}

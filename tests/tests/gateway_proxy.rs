//! The gateway's HTTP proxy port with real curl clients: what each namespace may reach, every
//! denial class with its status and access-log reason, per-request authorisation on kept-alive
//! connections, and the transparent HTTP port.

use egress_tests::{
    gateway::{
        GatewayLab, PROXY_PORT, STRANGER4, TEAM_B4, TRANSPARENT_PORT, UPSTREAM_BODY, base_config,
        status_and_body,
    },
    lab::{GATEWAY4, POD4, text},
};

fn proxy() -> String {
    format!("http://{GATEWAY4}:{PROXY_PORT}")
}

#[test]
fn each_namespace_reaches_only_what_its_rules_allow() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let ca = g.ca.display().to_string();
    // (source, url, extra curl args, expected status, expected access-log reason)
    let cases: &[(&str, &str, &[&str], u16, &str)] = &[
        (POD4, "http://api.example.test/", &[], 200, "allowed"),
        (POD4, "http://API.Example.TEST./", &[], 200, "allowed"),
        (POD4, "https://api.example.test/", &["--cacert", &ca], 200, "allowed"),
        (POD4, "http://v6.example.test/", &[], 200, "allowed"),
        (POD4, "http://forbidden.example.test/", &[], 403, "not_allowed"),
        (POD4, "http://api.example.test:8000/", &[], 403, "not_allowed"),
        (POD4, "http://internal.example.test/", &[], 403, "blocked_private"),
        (POD4, "http://meta.example.test/", &[], 403, "blocked_metadata"),
        (POD4, "http://loop.example.test/", &[], 403, "blocked_loopback"),
        (POD4, "http://mapped.example.test/", &[], 403, "blocked_loopback"),
        // Metadata through a local-use NAT64 prefix: not decoded, so not public either.
        (POD4, "http://nat64.example.test/", &[], 403, "blocked_reserved"),
        (POD4, "http://nowhere.example.test/", &[], 502, "resolve_failed"),
        // IP literals in every spelling are addresses, and no rule names an address.
        (POD4, "http://11.231.0.5/", &[], 403, "not_allowed"),
        (POD4, "http://2130706433/", &[], 403, "not_allowed"),
        (POD4, "http://[::ffff:169.254.169.254]/", &[], 403, "not_allowed"),
        (TEAM_B4, "http://www.example.test/", &[], 200, "allowed"),
        (TEAM_B4, "http://api.example.test/", &[], 403, "not_allowed"),
        (STRANGER4, "http://www.example.test/", &[], 403, "unknown_source"),
    ];
    for (source, url, extra, want_status, want_reason) in cases {
        let mut args = vec!["--proxy", proxy().leak() as &str, "-g"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = g.curl(source, &args);
        let (status, body) = status_and_body(&out);
        let https = url.starts_with("https");
        if https && *want_status != 200 {
            // curl reports a refused CONNECT as an error, with the status in its message.
            assert!(text(&out).contains(&want_status.to_string()), "{url} from {source}: {}", text(&out));
        } else {
            assert_eq!(status, *want_status, "{url} from {source}: {}", text(&out));
        }
        if *want_status == 200 && !https {
            assert_eq!(body, UPSTREAM_BODY, "{url}: the body must come from the upstream");
        }
        let host_port = authority_of(url);
        let line = gw.wait_access(&format!("{url} from {source}"), |v| {
            v["authority"] == host_port.as_str()
                && v["source"].as_str().is_some_and(|s| s.starts_with(source))
        });
        assert_eq!(line["reason"], *want_reason, "{url} from {source}: {line}");
        if *want_status == 200 {
            assert_eq!(line["decision"], "allow", "{line}");
            assert!(line["upstream"].as_str().is_some(), "{line}");
        }
    }
    // Every line has the fields operators rely on.
    for line in gw.access_lines() {
        for field in [
            "start",
            "listener",
            "source",
            "namespace",
            "decision",
            "reason",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(line.get(field).is_some(), "field {field} missing: {line}");
        }
    }
}

/// The authority the gateway logs: the normalised host and the port (default 80/443).
fn authority_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let hostport = rest.split('/').next().unwrap();
    let default = if scheme == "https" { 443 } else { 80 };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !hostport.ends_with(']') => (h.to_string(), p.parse().unwrap()),
        _ => (hostport.to_string(), default),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host = match host.as_str() {
        "2130706433" => "127.0.0.1".to_string(),
        "[::ffff:169.254.169.254]" => "169.254.169.254".to_string(),
        h => h.to_string(),
    };
    format!("{host}:{port}")
}

#[test]
fn every_request_on_a_kept_alive_connection_is_authorised() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    // One curl, two URLs: curl reuses the proxy connection.
    let out = g.curl(
        POD4,
        &[
            "--proxy",
            &proxy(),
            "http://api.example.test/",
            "-o",
            "/dev/null",
            "http://forbidden.example.test/",
        ],
    );
    assert!(
        text(&out).ends_with("403") || String::from_utf8_lossy(&out.stdout).contains("403"),
        "{}",
        text(&out)
    );
    let first = gw.line_for("api.example.test:80");
    let second = gw.line_for("forbidden.example.test:80");
    assert_eq!(first["reason"], "allowed");
    assert_eq!(second["reason"], "not_allowed");
    assert_eq!(first["source"], second["source"], "both requests came over one client connection");
}

#[test]
fn host_header_must_match_the_target() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let out = g
        .curl(POD4, &["--proxy", &proxy(), "-H", "Host: forbidden.example.test", "http://api.example.test/"]);
    assert_eq!(status_and_body(&out).0, 403, "{}", text(&out));
    assert_eq!(gw.line_for("api.example.test")["reason"], "target_mismatch");
}

#[test]
fn transparent_port_routes_by_host() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let url = format!("http://{GATEWAY4}:{TRANSPARENT_PORT}/");
    let out = g.curl(POD4, &["-H", "Host: api.example.test", &url]);
    assert_eq!(status_and_body(&out), (200, UPSTREAM_BODY.to_string()), "{}", text(&out));
    let out = g.curl(POD4, &["-H", "Host: forbidden.example.test", &url]);
    assert_eq!(status_and_body(&out).0, 403, "{}", text(&out));
    assert_eq!(gw.line_for("forbidden.example.test:80")["listener"], "http_transparent");
    // A Host with a port picks that port (and the rules judge it).
    let out = g.curl(POD4, &["-H", "Host: api.example.test:7000", &url]);
    assert_eq!(status_and_body(&out).0, 200, "{}", text(&out));
    let out = g.curl(POD4, &["-H", "Host: api.example.test:9", &url]);
    assert_eq!(status_and_body(&out).0, 403, "{}", text(&out));
}

#[test]
fn curl_honours_the_proxy_environment_variables() {
    let g = GatewayLab::new();
    let gw = g.start(&base_config(&g.ca, 100));
    let ca = g.ca.display().to_string();
    // How workloads are pointed at the gateway: HTTPS_PROXY / http_proxy, no curl flags.
    for (url, extra) in
        [("https://api.example.test/", vec!["--cacert", ca.as_str()]), ("http://www.example.test/", vec![])]
    {
        let out = g
            .lab
            .pod
            .command("curl", None)
            .args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(&extra)
            .arg(url)
            .env("HTTPS_PROXY", proxy())
            // curl reads only the lower-case http_proxy (httpoxy); HTTPS_PROXY in either case.
            .env("http_proxy", proxy())
            .env_remove("NO_PROXY")
            .output()
            .expect("running curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{url}: {}", text(&out));
    }
    assert_eq!(gw.line_for("api.example.test:443")["method"], "CONNECT");
    assert_eq!(gw.line_for("www.example.test:80")["method"], "GET");
}

#[test]
fn blocked_cidrs_close_public_ranges_that_a_rule_can_reopen() {
    let g = GatewayLab::new();
    // The "internet" range stands in for a cloud's public pod or node range.
    let config = format!("blockedCidrs: [11.231.0.0/24]\n{}", base_config(&g.ca, 100)).replace(
        "  - namespaces: [team-b]\n    hosts: [www.example.test]\n",
        "  - namespaces: [team-b]\n    hosts: [www.example.test]\n    cidrs: [11.231.0.5/32]\n",
    );
    let gw = g.start(&config);
    let out = g.curl(POD4, &["--proxy", &proxy(), "http://api.example.test/"]);
    assert_eq!(status_and_body(&out).0, 403, "{}", text(&out));
    assert_eq!(gw.line_for("api.example.test:80")["reason"], "blocked_configured");
    // The IPv6 address of the same host is outside the blocked range.
    let out = g.curl(POD4, &["--proxy", &proxy(), "http://v6.example.test/"]);
    assert_eq!(status_and_body(&out).0, 200, "{}", text(&out));
    // A rule that names the address in its cidrs opens it again, for that rule's namespace.
    let out = g.curl(TEAM_B4, &["--proxy", &proxy(), "http://www.example.test/"]);
    assert_eq!(status_and_body(&out), (200, UPSTREAM_BODY.to_string()), "{}", text(&out));
}

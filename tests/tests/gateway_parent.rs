//! The gateway chained to an existing corporate proxy (`upstreamProxy`, issue 17): a real squid
//! is the only way out. The gateway's rules decide first; what they allow leaves through squid
//! (CONNECT for tunnels, absolute-form for plain HTTP) with the configured credentials; what
//! they deny never reaches squid; squid's own refusals and its absence are reported.

use egress_tests::{
    gateway::{ADMIN_PORT, GatewayLab, PROXY_PORT, TLS_PORT, UPSTREAM_BODY, status_and_body},
    lab::{GATEWAY4, POD4, text},
    parent_proxy::{PARENT_BLOCKED, ParentProxy},
};

const USER: &str = "egress";
const PASSWORD: &str = "correct horse";

/// The gateway with an HTTP proxy and an SNI listener, team-a's rules, and squid as the parent,
/// with credentials read from files as a mounted Secret provides them.
fn parent_config(g: &GatewayLab, password: &str) -> String {
    let dir = g.lab.dir.join("parent-credentials");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("username"), USER).unwrap();
    std::fs::write(dir.join("password"), format!("{password}\n")).unwrap();
    format!(
        r#"
listeners:
  httpProxy: {{listen: "0.0.0.0:{PROXY_PORT}"}}
  tlsPassthrough: {{listen: "0.0.0.0:{TLS_PORT}", upstreamPort: 443}}
admin: "0.0.0.0:{ADMIN_PORT}"
sources:
  static:
    - {{cidr: {POD4}/32, namespace: team-a}}
rules:
  - namespaces: [team-a]
    hosts: [api.example.test, www.example.test, {PARENT_BLOCKED}]
    ports: [80, 443]
  - namespaces: [team-a]
    cidrs: [0.0.0.0/0]
    ports: [80]
upstreamProxy:
  address: "{parent}"
  auth: {{usernameFile: {d}/username, passwordFile: {d}/password}}
limits:
  connectTimeout: 2s
"#,
        parent = ParentProxy::address(),
        d = dir.display()
    )
}

fn proxy() -> String {
    format!("http://{GATEWAY4}:{PROXY_PORT}")
}

#[test]
fn allowed_traffic_leaves_through_the_parent_and_denied_traffic_never_reaches_it() {
    let g = GatewayLab::new();
    let squid = ParentProxy::start(&g.lab, Some((USER, PASSWORD)));
    let gw = g.start(&parent_config(&g, PASSWORD));
    let ca = g.ca.display().to_string();
    let proxy = proxy();

    // HTTPS through the gateway's CONNECT: a CONNECT to squid, with the credentials.
    let out = g.curl(POD4, &["-x", &proxy, "--cacert", &ca, "https://api.example.test/"]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "CONNECT through the parent: {}", text(&out));
    assert!(body.contains("s_server"), "the upstream's own page: {}", text(&out));
    let line =
        gw.wait_access("the tunnel", |l| l["authority"] == "api.example.test:443" && l["end"].is_string());
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["via"], ParentProxy::address(), "the access log names the parent: {line}");
    assert_eq!(line["upstream"], ParentProxy::address(), "{line}");

    // Plain HTTP: an absolute-form request to squid.
    let out = g.curl(POD4, &["-x", &proxy, "http://www.example.test/"]);
    assert_eq!(status_and_body(&out), (200, UPSTREAM_BODY.to_owned()), "plain HTTP: {}", text(&out));

    // The SNI listener's passthrough goes through the parent too.
    let to = format!("api.example.test:443:{GATEWAY4}:{TLS_PORT}");
    let out = g.curl(POD4, &["--connect-to", &to, "--cacert", &ca, "https://api.example.test/"]);
    assert_eq!(status_and_body(&out).0, 200, "SNI passthrough through the parent: {}", text(&out));

    let log = squid.access_log();
    assert!(
        log.contains(&format!("CONNECT api.example.test:443 {USER}")),
        "squid saw the tunnels, authenticated:\n{log}"
    );
    assert!(
        log.contains(&format!("GET http://www.example.test/ {USER}")),
        "squid saw the absolute-form GET:\n{log}"
    );

    // A host the rules do not allow is refused by the gateway; squid never hears of it.
    let out = g.curl(POD4, &["-x", &proxy, "--cacert", &ca, "https://forbidden.example.test/"]);
    assert!(!out.status.success(), "{}", text(&out));
    let line = gw.wait_access("the denied tunnel", |l| l["authority"] == "forbidden.example.test:443");
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str()),
        (Some("deny"), Some("not_allowed")),
        "{line}"
    );
    assert!(line.get("via").is_none(), "a denial goes nowhere: {line}");
    assert!(!squid.access_log().contains("forbidden"), "squid saw the denied host:\n{}", squid.access_log());

    // An IP literal is still checked before it is handed to the parent: the broad rule above
    // does not open the metadata address or loopback, and squid never hears of them.
    for literal in ["169.254.169.254", "127.0.0.1"] {
        let out = g.curl(POD4, &["-x", &proxy, &format!("http://{literal}/")]);
        assert_eq!(status_and_body(&out).0, 403, "{literal} through the parent: {}", text(&out));
        let line = gw.wait_access("the refused literal", |l| l["authority"] == format!("{literal}:80"));
        assert_eq!(line["decision"], "deny", "{line}");
        assert!(line.get("via").is_none(), "{line}");
        assert!(!squid.access_log().contains(literal), "squid saw {literal}:\n{}", squid.access_log());
    }

    // Allowed by the rules, refused by squid: 502 with the reason, squid's status logged.
    let out = g.curl(POD4, &["-x", &proxy, "--cacert", &ca, &format!("https://{PARENT_BLOCKED}/")]);
    assert!(!out.status.success(), "{}", text(&out));
    let line = gw.wait_access("squid's refusal", |l| l["authority"] == format!("{PARENT_BLOCKED}:443"));
    assert_eq!(
        (
            line["decision"].as_str(),
            line["reason"].as_str(),
            line["status"].as_u64(),
            line["parent_status"].as_u64()
        ),
        (Some("error"), Some("parent_refused"), Some(502), Some(403)),
        "{line}"
    );
    let (_, metrics) = g.admin_get("/metrics");
    assert!(
        metrics.lines().any(|l| l.contains("reason=\"parent_refused\"") && !l.starts_with('#')),
        "counted by reason:\n{}",
        metrics.lines().filter(|l| l.contains("reason")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn wrong_credentials_and_a_missing_parent_are_reported() {
    let g = GatewayLab::new();
    let mut squid = ParentProxy::start(&g.lab, Some((USER, PASSWORD)));
    let ca = g.ca.display().to_string();
    let proxy = proxy();
    {
        let gw = g.start(&parent_config(&g, "wrong"));
        let out = g.curl(POD4, &["-x", &proxy, "--cacert", &ca, "https://api.example.test/"]);
        assert!(!out.status.success(), "{}", text(&out));
        let line = gw.wait_access("the refused tunnel", |l| l["reason"] == "parent_refused");
        assert_eq!(line["parent_status"], 407, "squid asked for valid credentials: {line}");
    }

    let gw = g.start(&parent_config(&g, PASSWORD));
    squid.stop();
    let out = g.curl(POD4, &["-x", &proxy, "-I", "http://www.example.test/"]);
    assert_eq!(status_and_body(&out).0, 502, "no parent, no way out: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("parent_unreachable"), "{}", text(&out));
    let line = gw.wait_access("the unreachable parent", |l| l["reason"] == "parent_unreachable");
    assert_eq!((line["decision"].as_str(), line["status"].as_u64()), (Some("error"), Some(502)), "{line}");
}

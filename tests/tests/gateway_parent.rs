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

/// One request on a kept-alive connection to the gateway's proxy port: its status and body.
fn keep_alive_get(s: &mut std::net::TcpStream, url: &str, host: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    write!(s, "GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n").expect("request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, length) = loop {
        let n = s.read(&mut buf).expect("response");
        assert!(n > 0, "the gateway closed the kept-alive connection: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .expect("a response with Content-Length");
            break (end + 4, length);
        }
    };
    while got.len() < head_end + length {
        let n = s.read(&mut buf).expect("body");
        assert!(n > 0, "body cut short");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (status, String::from_utf8_lossy(&got[head_end..head_end + length]).to_string())
}

/// A client keeps its connection to the gateway, whose upstream for plain HTTP is a kept
/// connection to parent A. The configuration is reloaded to parent B with B's credentials: the
/// next request goes to B, never over the kept connection to A (which would hand A B's
/// credentials and log the request `via` B).
#[test]
fn a_reload_to_another_parent_never_sends_its_credentials_to_the_old_one() {
    const USER_B: &str = "egress-b";
    const PASSWORD_B: &str = "battery staple";
    let g = GatewayLab::new();
    let a = ParentProxy::start(&g.lab, Some((USER, PASSWORD)));
    let b = ParentProxy::start_on(
        &g.lab,
        egress_tests::parent_proxy::PARENT_PORT + 1,
        Some((USER_B, PASSWORD_B)),
    );
    let gw = g.start(&parent_config(&g, PASSWORD));
    let to_b = {
        let dir = g.lab.dir.join("parent-b-credentials");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("username"), USER_B).unwrap();
        std::fs::write(dir.join("password"), PASSWORD_B).unwrap();
        parent_config(&g, PASSWORD)
            .replace(&ParentProxy::address(), &b.addr())
            .replace(&g.lab.dir.join("parent-credentials").display().to_string(), &dir.display().to_string())
    };
    let reloads = || gw.log_text().matches("gateway configuration reloaded").count();
    let (first, second) = g.in_pod(|| {
        let mut s = std::net::TcpStream::connect(GatewayLab::gateway_addr(PROXY_PORT)).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let first = keep_alive_get(&mut s, "http://www.example.test/", "www.example.test");
        let before = reloads();
        std::fs::write(g.config_path(), &to_b).unwrap();
        assert!(
            egress_tests::poll_until(std::time::Duration::from_secs(5), || reloads() > before),
            "the gateway reloads:\n{}",
            gw.log_text()
        );
        (first, keep_alive_get(&mut s, "http://www.example.test/", "www.example.test"))
    });
    assert_eq!(first, (200, UPSTREAM_BODY.to_string()), "through A");
    assert_eq!(second, (200, UPSTREAM_BODY.to_string()), "through B, with B's credentials");
    let lines = gw.wait_lines(2);
    let vias: Vec<&str> = lines.iter().filter_map(|l| l["via"].as_str()).collect();
    assert_eq!(
        vias,
        vec![ParentProxy::address(), b.addr()],
        "the access log names the parent each went through"
    );
    let a_log = a.access_log();
    // (The harness's own connect when squid started is logged too, with no request.)
    assert_eq!(a_log.matches("www.example.test").count(), 1, "A saw the first request only:\n{a_log}");
    assert!(!a_log.contains(USER_B), "A never saw B's user:\n{a_log}");
    assert!(b.access_log().contains(USER_B), "B served the second:\n{}", b.access_log());
}

/// Writes `files` into `dir` the way the kubelet updates a Secret volume: a new timestamped
/// directory, a `..data_tmp` symlink to it renamed over `..data`, and per-file symlinks through
/// `..data` (made once). The files' own paths never change; only the `..data` rename happens.
fn secret_volume(dir: &std::path::Path, version: &str, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, content) in files {
        std::fs::write(data.join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
}

/// The parent's password is rotated in its Secret (and at the parent): the next request through
/// the gateway carries the new one, with no restart and no change to the configuration file.
#[test]
fn a_rotated_parent_password_is_used_without_a_restart() {
    const ROTATED: &str = "new horse";
    let g = GatewayLab::new();
    // The parent already wants the new password; the Secret still holds the old one.
    let _squid = ParentProxy::start(&g.lab, Some((USER, ROTATED)));
    let secret = g.lab.dir.join("parent-secret");
    std::fs::create_dir_all(&secret).unwrap();
    secret_volume(&secret, "2026_12_05_01", &[("username", USER), ("password", PASSWORD)]);
    let config = parent_config(&g, PASSWORD)
        .replace(&g.lab.dir.join("parent-credentials").display().to_string(), &secret.display().to_string());
    let gw = g.start(&config);
    let proxy = proxy();
    let status = || status_and_body(&g.curl(POD4, &["-x", &proxy, "http://www.example.test/"])).0;
    assert_eq!(status(), 407, "the old password is refused by the parent");

    secret_volume(&secret, "2026_12_05_02", &[("username", USER), ("password", ROTATED)]);
    assert!(
        egress_tests::poll_until(std::time::Duration::from_secs(5), || status() == 200),
        "the rotated password is used without a restart:\n{}",
        gw.log_text()
    );
    assert!(
        gw.log_text()
            .lines()
            .any(|l| l.contains("gateway configuration reloaded") && l.contains("\"files_changed\":true")),
        "the reload says the files changed:\n{}",
        gw.log_text()
    );

    // SIGHUP re-reads the files even when nothing announced a change.
    std::fs::write(secret.join("..2026_12_05_02/password"), PASSWORD).unwrap();
    gw.signal(libc::SIGHUP);
    assert!(
        egress_tests::poll_until(std::time::Duration::from_secs(5), || status() == 407),
        "after SIGHUP the file's content is what is sent:\n{}",
        gw.log_text()
    );
}

/// The parent is configured as `proxy.corp`. With a search list (every pod has one), a resolver
/// that takes it as relative asks for `proxy.corp.<search domain>` once `proxy.corp` does not
/// resolve: in a cluster, a Service `proxy` in a namespace `corp`, which any tenant who owns
/// such a namespace can create and so receive every CONNECT with the parent's credentials. The
/// gateway resolves the parent's name as fully qualified: the tenant's answer is never asked for.
#[test]
fn the_parents_name_is_never_completed_by_the_search_list() {
    use egress_tests::{fake_dns::FakeDns, lab::EXTERNAL4, sock};
    let g = GatewayLab::new();
    let squid = ParentProxy::start(&g.lab, None);
    let resolv = std::fs::read_to_string(g.resolv_conf()).unwrap();
    std::fs::write(g.resolv_conf(), format!("{resolv}search tenant.test\noptions ndots:1\n")).unwrap();
    // The tenant's name answers with the (squid) address that would receive the requests.
    let dns = FakeDns::start(&g.lab.gateway, sock("127.0.0.1", 53));
    dns.script("proxy.corp.tenant.test", &[EXTERNAL4.parse().unwrap()]);
    let config = parent_config(&g, PASSWORD)
        .replace(&ParentProxy::address(), &format!("proxy.corp:{}", egress_tests::parent_proxy::PARENT_PORT));
    let gw = g.start(&config);
    let out = g.curl(POD4, &["-x", &proxy(), "-I", "http://www.example.test/"]);
    assert_eq!(status_and_body(&out).0, 502, "no parent by that name: {}", text(&out));
    gw.wait_access("the unresolved parent", |l| l["reason"] == "parent_unreachable");
    assert_eq!(dns.asked("proxy.corp.tenant.test"), 0, "the search list was never applied");
    assert!(!squid.access_log().contains("www.example.test"), "{}", squid.access_log());
}

/// Where the parent is the only way out, the readiness checks of the upstreams it covers go
/// through it (CONNECT, with its credentials): an upstream only the parent can reach makes the
/// gateway ready, and the parent's absence makes it not ready, naming the parent.
#[test]
fn readiness_checks_go_through_the_parent_where_it_is_the_way_out() {
    use egress_tests::parent_proxy::PARENT_ONLY;
    let g = GatewayLab::new();
    let mut squid = ParentProxy::start(&g.lab, Some((USER, PASSWORD)));
    let config = parent_config(&g, PASSWORD).replace(
        "limits:",
        &format!("readiness:\n  upstreams: [{{address: \"{PARENT_ONLY}:80\"}}]\n  interval: 300ms\n  timeout: 250ms\nlimits:"),
    );
    let _gw = g.start(&config);
    assert!(
        egress_tests::poll_until(std::time::Duration::from_secs(5), || g.admin_get("/readyz").0 == 200),
        "ready: the upstream answers through the parent ({:?})",
        g.admin_get("/readyz")
    );
    assert!(
        squid.access_log().contains(&format!("{PARENT_ONLY}:80")),
        "checked through squid:\n{}",
        squid.access_log()
    );
    squid.stop();
    assert!(
        egress_tests::poll_until(std::time::Duration::from_secs(5), || g.admin_get("/readyz").0 == 503),
        "not ready without the parent"
    );
    let (_, why) = g.admin_get("/readyz");
    assert!(why.contains(PARENT_ONLY) && why.contains("through the parent proxy"), "{why}");
}

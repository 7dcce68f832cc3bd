//! The configuration file's parser: a full example, and errors that name the bad value.

use std::time::Duration;

use super::*;

const FULL: &str = r#"
listeners:
  httpProxy: {listen: "0.0.0.0:3128"}
  tlsPassthrough: {listen: "0.0.0.0:8443"}
  httpTransparent: {listen: "[::]:8080", upstreamPort: 8080}
  tcpForwards:
    - {listen: "0.0.0.0:5432", upstream: "DB.example.com.:5432"}
  tlsOrigination: {listen: "127.0.0.1:8081", hosts: ["api.example.com"]}
admin: "0.0.0.0:9809"
sources:
  kubernetes: true
  static:
    - {cidr: 10.231.0.0/24, namespace: team-a}
rules:
  - namespaces: [team-a]
    hosts: ["api.example.com", "*.example.org"]
    ports: [443, "8000-8100"]
    allowH2PriorKnowledge: true
  - namespaces: ["*"]
    cidrs: [10.0.0.0/8]
blockedCidrs: [10.96.0.0/12]
limits:
  headerTimeout: 2s
  idleTimeout: 1m
  requestBodyTimeout: 30s
drainTimeout: 5s
"#;

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(ParseError::Invalid { at, message }) => format!("{at}: {message}"),
        Err(ParseError::Syntax(e)) => format!("syntax: {e}"),
    }
}

#[test]
fn full_config() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.listeners.addresses().len(), 5);
    assert_eq!(c.listeners.tls_passthrough.as_ref().unwrap().upstream_port, 443);
    assert_eq!(c.listeners.http_transparent.as_ref().unwrap().upstream_port, 8080);
    assert_eq!(c.listeners.tcp_forwards[0].upstream, Upstream { host: "db.example.com".into(), port: 5432 });
    assert_eq!(c.listeners.tls_origination.as_ref().unwrap().upstream_port, 443);
    assert!(c.sources.kubernetes);
    assert_eq!(c.sources.table, vec![("10.231.0.0/24".parse().unwrap(), "team-a".to_string())]);
    assert_eq!(c.rules.len(), 2);
    assert_eq!(c.rules[1].namespaces, Namespaces::Any);
    assert_eq!(c.rules[0].ports.len(), 2);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.limits.max_headers, 64);
    assert_eq!(c.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.blocked_cidrs, vec!["10.96.0.0/12".parse::<IpNet>().unwrap()]);
    assert!(c.rules[0].allow_h2_prior_knowledge && !c.rules[1].allow_h2_prior_knowledge);
    assert_eq!(c.limits.request_body_timeout, Duration::from_secs(30));
    assert_eq!(c.limits.response_timeout, Duration::from_secs(60), "the default");
}

#[test]
fn errors_name_the_value() {
    let base = "listeners: {httpProxy: {listen: \"0.0.0.0:3128\"}}\nsources: {kubernetes: true}\n";
    assert!(err("listeners: {}\nsources: {kubernetes: true}").contains("no listener"));
    assert!(
        err("listeners: {httpProxy: {listen: \"nowhere\"}}\nsources: {kubernetes: true}")
            .contains("\"nowhere\"")
    );
    assert!(err("listeners: {httpProxy: {listen: \"0.0.0.0:3128\"}}").contains("no way to identify clients"));
    assert!(
        err(&format!("{base}rules: [{{namespaces: [a], hosts: [\"ex ample.com\"]}}]"))
            .contains("ex ample.com")
    );
    assert!(
        err(&format!("{base}rules: [{{namespaces: [a], hosts: [\"10.0.0.1\"]}}]"))
            .contains("put addresses under cidrs")
    );
    assert!(
        err(&format!("{base}rules: [{{namespaces: [a]}}]")).contains("rules[0]: a rule needs hosts or cidrs")
    );
    assert!(
        err(&format!("{base}rules: [{{namespaces: [\"*\", a], hosts: [x.com]}}]")).contains("list it alone")
    );
    assert!(
        err(&format!("{base}rules: [{{namespaces: [a], hosts: [x.com], ports: [70000]}}]")).contains("70000")
    );
    assert!(
        err(&format!("{base}limits: {{headerTimeout: soon}}")).contains("limits.headerTimeout: \"soon\"")
    );
    assert!(err(&format!("{base}limits: {{maxHeaderBytes: 100}}")).contains("minimum of 8192"));
    assert!(err(&format!("{base}admin: \"0.0.0.0:3128\"")).contains("used by two listeners"));
    assert!(err(&format!("{base}bogus: 1")).contains("unknown field `bogus`"));
    assert!(err(&format!("{base}blockedCidrs: [10.96.0.0/33]")).contains("blockedCidrs[0]"));
    assert!(
        err(&format!("{base}rules: [{{namespaces: [a], hosts: [x.com], allowH2PriorKnowledge: maybe}}]"))
            .contains("maybe")
    );
    assert!(
        err(&format!("{base}limits: {{requestBodyTimeout: 0s}}"))
            .contains("limits.requestBodyTimeout: \"0s\" is zero")
    );
    assert!(
        err(&format!("{base}limits: {{responseTimeout: forever}}"))
            .contains("limits.responseTimeout: \"forever\"")
    );
    assert!(
        err("listeners: {tcpForwards: [{listen: \"0.0.0.0:1\", upstream: \"db\"}]}\nsources: {kubernetes: true}")
            .contains("tcpForwards[0].upstream: \"db\" is not host:port")
    );
    assert!(
        err("listeners: {tlsOrigination: {listen: \"0.0.0.0:1\", hosts: [a.com], caFile: /nonexistent}}\nsources: {kubernetes: true}")
            .contains("/nonexistent is not a readable file")
    );
}

#[test]
fn upstream_literals_are_normalised() {
    let u = parse_upstream("[::ffff:10.0.0.1]:80", "x").unwrap();
    assert_eq!(u, Upstream { host: "10.0.0.1".into(), port: 80 });
    assert_eq!(u.name(), None);
    assert_eq!(parse_upstream("0x7f.1:22", "x").unwrap().host, "127.0.0.1");
}

#[test]
fn an_upstream_proxy_and_its_errors() {
    let base = "listeners: {httpProxy: {listen: \"0.0.0.0:3128\"}}\nsources: {kubernetes: true}\n";
    let c = parse(&format!(
        "{base}upstreamProxy:\n  address: \"Proxy.Corp.Example:3128\"\n  hosts: [\"*.example.com\"]\n  auth: {{usernameFile: /s/username, passwordFile: /s/password}}\n"
    ))
    .unwrap();
    let parent = c.upstream_proxy.unwrap();
    assert_eq!((parent.address.host.as_str(), parent.address.port), ("proxy.corp.example", 3128));
    assert_eq!(parent.hosts.len(), 1);
    let auth = parent.auth.unwrap();
    assert_eq!(auth.username_file, std::path::Path::new("/s/username"));

    let e = |extra: &str| err(&format!("{base}upstreamProxy: {extra}\n"));
    assert!(e("{address: \"proxy\"}").contains("upstreamProxy.address: \"proxy\" is not host:port"));
    assert!(
        e("{address: \"p:3128\", hosts: [10.0.0.1]}")
            .contains("upstreamProxy.hosts: \"10.0.0.1\" is an IP address")
    );
    assert!(e("{address: \"p:3128\", auth: {usernameFile: /u}}").contains("missing field `passwordFile`"));
    assert!(e("{address: \"p:3128\", typo: 1}").contains("unknown field `typo`"));
}

#[test]
fn readiness_checks_and_their_errors() {
    let base = "listeners: {httpProxy: {listen: \"0.0.0.0:3128\"}}\nsources: {kubernetes: true}\n";
    let c = parse(&format!(
        "{base}readiness:\n  upstreams: [{{address: \"db.example.com:5432\"}}, {{address: \"api.example.com:443\", tls: true}}]\n"
    ))
    .unwrap();
    let r = c.readiness.unwrap();
    assert_eq!((r.interval, r.timeout), (DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT));
    assert_eq!((r.upstreams[0].tls, r.upstreams[1].tls), (false, true));
    assert_eq!(r.upstreams[1].address.host, "api.example.com");

    let e = |extra: &str| err(&format!("{base}readiness: {extra}\n"));
    assert!(e("{upstreams: []}").contains("readiness.upstreams: name the upstreams"));
    assert!(
        e("{upstreams: [{address: db}]}").contains("readiness.upstreams[0].address: \"db\" is not host:port")
    );
    assert!(
        e("{upstreams: [{address: \"10.0.0.1:443\", tls: true}]}")
            .contains("readiness.upstreams[0]: a tls check verifies the certificate for a name; 10.0.0.1")
    );
    assert!(
        e("{upstreams: [{address: \"a.b:1\"}], interval: 1s, timeout: 2s}").contains("readiness.timeout")
    );
    assert!(e("{upstreams: [{address: \"a.b:1\"}], caFile: /nonexistent}").contains("readiness.caFile"));
}

//! The gateway's configuration file (`egress-agent gateway --config gw.yaml`, a ConfigMap in a
//! cluster):
//!
//! ```yaml
//! listeners:                       # each optional; at least one
//!   httpProxy: {listen: "0.0.0.0:3128"}            # CONNECT and absolute-form HTTP (HTTP(S)_PROXY)
//!   tlsPassthrough: {listen: "0.0.0.0:8443", upstreamPort: 443}   # routed by SNI, not terminated
//!   httpTransparent: {listen: "0.0.0.0:8080", upstreamPort: 80}   # routed by the Host header
//!   # either may add `steered: true`: the node agent steers pods' connections here (its log
//!   # lines say "steered": true)
//!   tcpForwards:                                   # fixed upstreams, no name on the wire
//!     - {listen: "0.0.0.0:5432", upstream: "db.example.com:5432"}
//!   tlsOrigination:                                # plain HTTP in, verified HTTPS out
//!     listen: "0.0.0.0:8081"
//!     hosts: ["api.example.com"]                   # which Host headers are originated
//!     upstreamPort: 443
//!     caFile: /etc/egressfw/upstream-ca.pem        # optional; default: the system roots
//! admin: "0.0.0.0:9809"            # /healthz, /readyz, /metrics
//! sources:                         # who a client is: its source address -> namespace
//!   kubernetes: true               # watch pods (pod IP -> namespace)
//!   static:                        # and/or a fixed table (standalone use, node ranges)
//!     - {cidr: 10.231.0.0/24, namespace: team-a}
//! policyResources: true            # also decide by ClusterEgressPolicy/EgressPolicy objects
//!                                  # (after these rules); default: sources.kubernetes
//! rules:                           # default deny; a request is allowed when one rule matches
//!   - namespaces: [team-a]         # "*": any identified namespace
//!     hosts: ["api.example.com", "*.example.org"]
//!     cidrs: [10.0.0.0/8]          # by address; the only way to reach non-public addresses
//!     ports: [443, "8000-8100"]    # omitted: any port
//!     allowH2PriorKnowledge: false # HTTP/2 without TLS inside a CONNECT tunnel to a name
//! blockedCidrs: [10.96.0.0/12]     # refused like private ranges (a rule's cidrs reopen them)
//! readiness:                       # optional: report ready only while these upstreams answer, so
//!   upstreams:                     # a gateway whose upstream is down leaves its Service
//!     - {address: "db.example.com:5432"}                   # a TCP connect
//!     - {address: "api.partner.example:443", tls: true}    # and a verified TLS handshake
//!   interval: 5s                   # the defaults
//!   timeout: 2s
//!   caFile: /etc/egressfw/upstream-ca.pem                  # for tls checks; default: system roots
//! upstreamProxy:                   # optional: an existing (corporate) proxy as the way out
//!   address: "10.20.0.5:3128"      # host:port
//!   hosts: ["*.example.com"]       # which allowed destinations go through it; omitted: all
//!   auth:                          # optional basic credentials, e.g. a mounted Secret of type
//!     usernameFile: /etc/egressfw/upstream-proxy/username    # kubernetes.io/basic-auth
//!     passwordFile: /etc/egressfw/upstream-proxy/password
//! limits:                          # all optional, these are the defaults
//!   maxConnections: 10000
//!   maxConnectionsPerSource: 1000  # per client address
//!   headerTimeout: 10s             # whole request head (slowloris), and the ClientHello
//!   idleTimeout: 5m                # a tunnel or keep-alive connection with no traffic
//!   connectTimeout: 5s             # upstream TCP connect (and TLS handshake when originating)
//!   requestBodyTimeout: 60s        # longest pause inside a forwarded request body
//!   responseTimeout: 60s           # longest upstream silence: before the response head, and
//!                                  # between response body chunks
//!   maxHeaderBytes: 16384
//!   maxHeaders: 64
//!   clientHelloMaxBytes: 16384
//!   maxObservations: 10000         # entries of the table of what each workload reached
//!                                  # (admin /observations); the least recently seen go first
//! drainTimeout: 30s                # on SIGTERM: stop accepting, let connections finish this long
//! ```
//!
//! Parsing is strict (unknown fields are errors) and every error names the value and where it
//! sits, so a bad ConfigMap edit is rejected with a message the operator can act on.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

pub use super::limits::Limits;
use super::{
    host::{self, HostName, HostPattern},
    limits::{RawLimits, parse_duration, parse_limits},
};
use crate::policy::config::{ParseError, PortRange, RawPort, invalid, parse_cidr, parse_port};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/egressfw/gateway.yaml";

#[derive(Debug, thiserror::Error)]
pub enum GatewayConfigError {
    #[error("reading gateway config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("gateway config {path}: {source}")]
    Syntax { path: String, source: serde_yaml::Error },
    #[error("gateway config {path}: {at}: {message}")]
    Invalid { path: String, at: String, message: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GatewayConfig {
    pub listeners: Listeners,
    pub admin: Option<SocketAddr>,
    pub sources: Sources,
    /// Watch the policy resources and decide by them where `rules` do not allow.
    pub policy_resources: bool,
    pub rules: Vec<Rule>,
    /// Addresses refused like non-public ones although they are public on the wire (a cloud's
    /// pod, Service or node ranges); a rule's `cidrs` can open them.
    pub blocked_cidrs: Vec<IpNet>,
    pub limits: Limits,
    pub drain_timeout: Duration,
    pub upstream_proxy: Option<UpstreamProxy>,
    pub readiness: Option<Readiness>,
}

/// Readiness that follows the upstreams: /readyz fails while any of them does not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub upstreams: Vec<UpstreamCheck>,
    pub interval: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamCheck {
    pub address: Upstream,
    /// A TLS handshake (certificate verified for the name) after the TCP connect.
    pub tls: bool,
}

pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A parent proxy: allowed connections to the destinations it covers leave through it, as HTTP
/// CONNECT tunnels (and plain HTTP as absolute-form requests), instead of being dialed directly.
/// The rules still decide first; the parent resolves the names it is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamProxy {
    pub address: Upstream,
    /// Empty: every allowed destination.
    pub hosts: Vec<HostPattern>,
    pub auth: Option<ProxyCredentials>,
}

/// Where the parent's basic credentials are: files, as a mounted Secret of type
/// `kubernetes.io/basic-auth` provides them. Read when the configuration is applied (at start
/// and on every reload, see `parent::Parent::new`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyCredentials {
    pub username_file: PathBuf,
    pub password_file: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listeners {
    pub http_proxy: Option<SocketAddr>,
    pub tls_passthrough: Option<Routed>,
    pub http_transparent: Option<Routed>,
    pub tcp_forwards: Vec<TcpForward>,
    pub tls_origination: Option<Origination>,
}

impl Listeners {
    /// Every listening address with the listener's name, for binding and for logs.
    pub fn addresses(&self) -> Vec<(SocketAddr, &'static str)> {
        let mut all = Vec::new();
        all.extend(self.http_proxy.map(|a| (a, "http_proxy")));
        all.extend(self.tls_passthrough.as_ref().map(|l| (l.listen, "tls_passthrough")));
        all.extend(self.http_transparent.as_ref().map(|l| (l.listen, "http_transparent")));
        all.extend(self.tcp_forwards.iter().map(|f| (f.listen, "tcp_forward")));
        all.extend(self.tls_origination.as_ref().map(|l| (l.listen, "tls_origination")));
        all
    }
}

/// A transparent listener: the destination name comes from the traffic, the port from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub listen: SocketAddr,
    pub upstream_port: u16,
    /// The node agent steers workloads' connections to this listener (issue 15): its access-log
    /// lines are marked `steered`.
    pub steered: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpForward {
    pub listen: SocketAddr,
    pub upstream: Upstream,
}

/// `host:port` where host is a name or an IP literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origination {
    pub listen: SocketAddr,
    pub hosts: Vec<HostPattern>,
    pub upstream_port: u16,
    /// PEM bundle to verify upstream certificates with; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    pub kubernetes: bool,
    pub table: Vec<(IpNet, String)>,
}

/// Which namespaces a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    Any,
    Named(BTreeSet<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub namespaces: Namespaces,
    pub hosts: Vec<HostPattern>,
    pub cidrs: Vec<IpNet>,
    /// Empty: any port.
    pub ports: Vec<PortRange>,
    /// HTTP/2 with prior knowledge (no TLS) inside a CONNECT tunnel to a name: its requests name
    /// their host in compressed headers the gateway does not read, so it is refused unless the
    /// rule that allows the tunnel says so.
    pub allow_h2_prior_knowledge: bool,
}

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGatewayConfig {
    listeners: RawListeners,
    #[serde(default)]
    admin: Option<String>,
    #[serde(default)]
    sources: RawSources,
    #[serde(default)]
    policy_resources: Option<bool>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    blocked_cidrs: Vec<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    drain_timeout: Option<String>,
    #[serde(default)]
    upstream_proxy: Option<RawUpstreamProxy>,
    #[serde(default)]
    readiness: Option<RawReadiness>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawReadiness {
    upstreams: Vec<RawUpstreamCheck>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamCheck {
    address: String,
    #[serde(default)]
    tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawUpstreamProxy {
    address: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    auth: Option<RawProxyAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProxyAuth {
    username_file: PathBuf,
    password_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListeners {
    #[serde(default)]
    http_proxy: Option<RawListen>,
    #[serde(default)]
    tls_passthrough: Option<RawRouted>,
    #[serde(default)]
    http_transparent: Option<RawRouted>,
    #[serde(default)]
    tcp_forwards: Vec<RawForward>,
    #[serde(default)]
    tls_origination: Option<RawOrigination>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRouted {
    listen: String,
    #[serde(default)]
    upstream_port: Option<RawPort>,
    #[serde(default)]
    steered: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: String,
    upstream: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOrigination {
    listen: String,
    hosts: Vec<String>,
    #[serde(default)]
    upstream_port: Option<RawPort>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSources {
    #[serde(default)]
    kubernetes: bool,
    #[serde(default, rename = "static")]
    table: Vec<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    cidr: String,
    namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    namespaces: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    allow_h2_prior_knowledge: bool,
}

pub fn load(path: &std::path::Path) -> Result<GatewayConfig, GatewayConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| GatewayConfigError::Read { path: path.display().to_string(), source })?;
    let shown = path.display().to_string();
    parse(&text).map_err(|e| match e {
        ParseError::Syntax(source) => GatewayConfigError::Syntax { path: shown, source },
        ParseError::Invalid { at, message } => GatewayConfigError::Invalid { path: shown, at, message },
    })
}

pub fn parse(text: &str) -> Result<GatewayConfig, ParseError> {
    let raw: RawGatewayConfig = serde_yaml::from_str(text).map_err(ParseError::Syntax)?;
    let listeners = parse_listeners(raw.listeners)?;
    let admin = raw.admin.as_deref().map(|a| parse_listen(a, "admin")).transpose()?;
    let mut seen = BTreeSet::new();
    for (addr, name) in listeners.addresses().into_iter().chain(admin.map(|a| (a, "admin"))) {
        if !seen.insert(addr) {
            return Err(invalid(name, format!("address {addr} is used by two listeners")));
        }
    }
    if listeners.addresses().is_empty() {
        return Err(invalid("listeners", "no listener is configured: the gateway would do nothing"));
    }
    let sources = parse_sources(&raw.sources)?;
    // In a cluster the resources are the namespaces' own way to ask; standalone has none.
    let policy_resources = raw.policy_resources.unwrap_or(sources.kubernetes);
    let rules = raw
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| parse_rule(r, &format!("rules[{i}]")))
        .collect::<Result<_, _>>()?;
    let blocked_cidrs = raw
        .blocked_cidrs
        .iter()
        .enumerate()
        .map(|(i, c)| parse_cidr(c, &format!("blockedCidrs[{i}]")))
        .collect::<Result<_, _>>()?;
    let limits = parse_limits(&raw.limits)?;
    let drain_timeout = raw
        .drain_timeout
        .as_deref()
        .map(|d| parse_duration(d, "drainTimeout"))
        .transpose()?
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    let upstream_proxy = raw.upstream_proxy.as_ref().map(parse_upstream_proxy).transpose()?;
    let readiness = raw.readiness.as_ref().map(parse_readiness).transpose()?;
    Ok(GatewayConfig {
        listeners,
        admin,
        sources,
        policy_resources,
        rules,
        blocked_cidrs,
        limits,
        drain_timeout,
        upstream_proxy,
        readiness,
    })
}

fn parse_readiness(raw: &RawReadiness) -> Result<Readiness, ParseError> {
    let at = "readiness";
    if raw.upstreams.is_empty() {
        return Err(invalid(
            format!("{at}.upstreams"),
            "name the upstreams readiness follows (or leave readiness out)",
        ));
    }
    let upstreams = raw
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let address = parse_upstream(&u.address, &format!("{at}.upstreams[{i}].address"))?;
            if u.tls && address.name().is_none() {
                return Err(invalid(
                    format!("{at}.upstreams[{i}]"),
                    format!(
                        "a tls check verifies the certificate for a name; {} is an address",
                        address.host
                    ),
                ));
            }
            Ok(UpstreamCheck { address, tls: u.tls })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let duration = |v: &Option<String>, key: &str, default| {
        v.as_deref()
            .map(|d| parse_duration(d, &format!("{at}.{key}")))
            .transpose()
            .map(|d| d.unwrap_or(default))
    };
    let interval = duration(&raw.interval, "interval", DEFAULT_CHECK_INTERVAL)?;
    let timeout = duration(&raw.timeout, "timeout", DEFAULT_CHECK_TIMEOUT)?;
    if timeout > interval {
        return Err(invalid(
            format!("{at}.timeout"),
            format!("{timeout:?} is longer than the interval ({interval:?})"),
        ));
    }
    if let Some(ca) = &raw.ca_file
        && !ca.is_file()
    {
        return Err(invalid(format!("{at}.caFile"), format!("{} is not a readable file", ca.display())));
    }
    Ok(Readiness { upstreams, interval, timeout, ca_file: raw.ca_file.clone() })
}

fn parse_upstream_proxy(raw: &RawUpstreamProxy) -> Result<UpstreamProxy, ParseError> {
    let at = "upstreamProxy";
    let address = parse_upstream(&raw.address, &format!("{at}.address"))?;
    let hosts = parse_patterns(&raw.hosts, &format!("{at}.hosts"))?;
    let auth = raw.auth.as_ref().map(|a| ProxyCredentials {
        username_file: a.username_file.clone(),
        password_file: a.password_file.clone(),
    });
    Ok(UpstreamProxy { address, hosts, auth })
}

fn parse_listeners(raw: RawListeners) -> Result<Listeners, ParseError> {
    let routed = |r: &RawRouted, at: &str, default_port: u16| -> Result<Routed, ParseError> {
        Ok(Routed {
            listen: parse_listen(&r.listen, &format!("{at}.listen"))?,
            upstream_port: single_port(r.upstream_port.as_ref(), &format!("{at}.upstreamPort"))?
                .unwrap_or(default_port),
            steered: r.steered,
        })
    };
    let tcp_forwards = raw
        .tcp_forwards
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let at = format!("listeners.tcpForwards[{i}]");
            Ok(TcpForward {
                listen: parse_listen(&f.listen, &format!("{at}.listen"))?,
                upstream: parse_upstream(&f.upstream, &format!("{at}.upstream"))?,
            })
        })
        .collect::<Result<_, ParseError>>()?;
    let tls_origination = raw
        .tls_origination
        .map(|o| {
            let at = "listeners.tlsOrigination";
            if o.hosts.is_empty() {
                return Err(invalid(format!("{at}.hosts"), "name at least one host to originate TLS to"));
            }
            if let Some(ca) = &o.ca_file
                && !ca.is_file()
            {
                return Err(invalid(
                    format!("{at}.caFile"),
                    format!("{} is not a readable file", ca.display()),
                ));
            }
            Ok(Origination {
                listen: parse_listen(&o.listen, &format!("{at}.listen"))?,
                hosts: parse_patterns(&o.hosts, &format!("{at}.hosts"))?,
                upstream_port: single_port(o.upstream_port.as_ref(), &format!("{at}.upstreamPort"))?
                    .unwrap_or(443),
                ca_file: o.ca_file,
            })
        })
        .transpose()?;
    Ok(Listeners {
        http_proxy: raw
            .http_proxy
            .map(|l| parse_listen(&l.listen, "listeners.httpProxy.listen"))
            .transpose()?,
        tls_passthrough: raw
            .tls_passthrough
            .map(|r| routed(&r, "listeners.tlsPassthrough", 443))
            .transpose()?,
        http_transparent: raw
            .http_transparent
            .map(|r| routed(&r, "listeners.httpTransparent", 80))
            .transpose()?,
        tcp_forwards,
        tls_origination,
    })
}

fn parse_sources(raw: &RawSources) -> Result<Sources, ParseError> {
    let table = raw
        .table
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let at = format!("sources.static[{i}]");
            let cidr = parse_cidr(&s.cidr, &format!("{at}.cidr"))?;
            if !crate::k8s::config::is_label_value(&s.namespace) {
                return Err(invalid(
                    format!("{at}.namespace"),
                    format!("{:?} is not a namespace name", s.namespace),
                ));
            }
            Ok((cidr, s.namespace.clone()))
        })
        .collect::<Result<Vec<_>, ParseError>>()?;
    if !raw.kubernetes && table.is_empty() {
        return Err(invalid(
            "sources",
            "no way to identify clients: set kubernetes: true or give a static table (every request would be denied)",
        ));
    }
    Ok(Sources { kubernetes: raw.kubernetes, table })
}

fn parse_rule(r: &RawRule, at: &str) -> Result<Rule, ParseError> {
    if r.namespaces.is_empty() {
        return Err(invalid(format!("{at}.namespaces"), "name the source namespaces, or \"*\" for any"));
    }
    let namespaces = if r.namespaces.iter().any(|n| n == "*") {
        if r.namespaces.len() > 1 {
            return Err(invalid(
                format!("{at}.namespaces"),
                "\"*\" already means every namespace; list it alone",
            ));
        }
        Namespaces::Any
    } else {
        for n in &r.namespaces {
            if !crate::k8s::config::is_label_value(n) {
                return Err(invalid(format!("{at}.namespaces"), format!("{n:?} is not a namespace name")));
            }
        }
        Namespaces::Named(r.namespaces.iter().cloned().collect())
    };
    if r.hosts.is_empty() && r.cidrs.is_empty() {
        return Err(invalid(at, "a rule needs hosts or cidrs (it would match nothing)"));
    }
    let hosts = parse_patterns(&r.hosts, &format!("{at}.hosts"))?;
    let cidrs = r.cidrs.iter().map(|c| parse_cidr(c, &format!("{at}.cidrs"))).collect::<Result<_, _>>()?;
    let ports = r.ports.iter().map(|p| parse_port(p, &format!("{at}.ports"))).collect::<Result<_, _>>()?;
    Ok(Rule { namespaces, hosts, cidrs, ports, allow_h2_prior_knowledge: r.allow_h2_prior_knowledge })
}

fn parse_patterns(raw: &[String], at: &str) -> Result<Vec<HostPattern>, ParseError> {
    raw.iter()
        .map(|h| {
            if super::ip_literal::parse(h).is_some() {
                return Err(invalid(at, format!("{h:?} is an IP address; put addresses under cidrs")));
            }
            HostPattern::parse(h).map_err(|e| invalid(at, e.to_string()))
        })
        .collect()
}

fn parse_listen(s: &str, at: &str) -> Result<SocketAddr, ParseError> {
    s.trim().parse().map_err(|_| invalid(at, format!("{s:?} is not an address:port like \"0.0.0.0:3128\"")))
}

fn single_port(p: Option<&RawPort>, at: &str) -> Result<Option<u16>, ParseError> {
    p.map(|p| {
        let r = parse_port(p, at)?;
        if r.first != r.last {
            return Err(invalid(at, format!("{p} is a range; give one port")));
        }
        Ok(r.first)
    })
    .transpose()
}

/// `host:port` or `[v6]:port`; the host is checked as a name or an IP literal.
fn parse_upstream(s: &str, at: &str) -> Result<Upstream, ParseError> {
    let bad = || invalid(at, format!("{s:?} is not host:port (like \"db.example.com:5432\")"));
    let (h, p) = s.trim().rsplit_once(':').ok_or_else(bad)?;
    let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let host = match super::ip_literal::parse(h) {
        Some(ip) => ip.to_string(),
        None => host::normalize(h).map_err(|e| invalid(at, e.to_string()))?.as_str().to_owned(),
    };
    Ok(Upstream { host, port })
}

impl Upstream {
    /// The name to match rules against, when the upstream is not an IP literal.
    pub fn name(&self) -> Option<HostName> {
        if super::ip_literal::parse(&self.host).is_some() { None } else { host::normalize(&self.host).ok() }
    }
}

#[cfg(test)]
mod tests;

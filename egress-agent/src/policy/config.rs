//! The standalone policy file: which cgroups are enforced and what each may reach.
//!
//! ```yaml
//! policies:
//!   - cgroup: demo/pod-a          # relative to the cgroup2 mount, or an absolute path under it
//!     mode: enforce               # enforce | audit
//!     gateways:
//!       - address: 10.10.0.2
//!         ports: [3128, 8443]
//!     dns: [10.10.0.3]            # UDP and TCP port 53 only
//!     extra:
//!       - cidr: 192.168.50.0/24
//!         protocol: tcp           # tcp | udp | icmp | any (default any) | gre | ipip | ipv6 | 0-254
//!                                 # (tunnels are never covered by `any`: name them, see README)
//!         ports: [443, "8000-8100"]
//!     interfaces:                 # optional: the tc layer on the workload's veth (host side)
//!       - name: veth-pod-a
//!         addresses: [10.10.0.7, fd00:10::7]   # the only sources allowed from it
//!     steer:                      # optional: TCP connects to these ports that nothing above
//!       - ports: [443]            # allows go to the gateway's listener instead of failing
//!         address: 10.10.0.2      # the listener (one of `gateways`); IPv6 sockets use
//!         address6: fd00:10::2    # address6, or ::ffff:<address> without it
//!         port: 8443
//! ```
//!
//! Parsing is strict (unknown fields are errors) and every error names the offending value and
//! where it sits, because a typo here silently narrowing or widening a policy is the worst outcome.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{Mode, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading policy file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("policy file {path}: {source}")]
    Syntax { path: String, source: serde_yaml::Error },
    #[error("policy file {path}: {at}: {message}")]
    Invalid { path: String, at: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub cgroup: String,
    pub mode: String,
    #[serde(default)]
    pub gateways: Vec<RawGateway>,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default)]
    pub extra: Vec<RawExtra>,
    #[serde(default)]
    pub interfaces: Vec<RawInterface>,
    #[serde(default)]
    pub steer: Vec<RawSteer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSteer {
    pub ports: Vec<RawPort>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub address6: Option<String>,
    pub port: RawPort,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInterface {
    pub name: String,
    pub addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub address: String,
    pub ports: Vec<RawPort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExtra {
    pub cidr: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub ports: Vec<RawPort>,
}

/// A port (`443`) or an inclusive range (`"8000-8100"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

impl fmt::Display for RawPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// A validated policy, still keyed by the cgroup path as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    pub cgroup: String,
    pub mode: Mode,
    pub gateways: Vec<(IpAddr, Vec<PortRange>)>,
    pub dns: Vec<IpAddr>,
    pub extra: Vec<ExtraSpec>,
    /// Host-side interfaces of the workload, for the tc layer (empty: socket hooks only).
    pub interfaces: Vec<InterfaceSpec>,
    /// Steered ports: original TCP port -> the gateway listener (see `egress_common::steer`).
    pub steer: BTreeMap<u16, SteerSpec>,
}

/// Where TCP connects to a steered port go: a gateway listener the policy already allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerSpec {
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    pub port: u16,
}

/// A workload's network interface as the node sees it, and the workload's addresses on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraSpec {
    pub cidr: IpNet,
    pub protocol: Protocol,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Reads and validates a policy file. Nothing is touched on error.
pub fn load(path: &Path) -> Result<Vec<PolicySpec>, ConfigError> {
    parse_file(path, &read(path)?)
}

pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })
}

/// Validates the text of the file at `path` (named in errors).
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<PolicySpec>, ConfigError> {
    let shown = path.display().to_string();
    parse(text).map_err(|e| match e {
        ParseError::Syntax(source) => ConfigError::Syntax { path: shown, source },
        ParseError::Invalid { at, message } => ConfigError::Invalid { path: shown, at, message },
    })
}

#[derive(Debug)]
pub enum ParseError {
    Syntax(serde_yaml::Error),
    Invalid { at: String, message: String },
}

pub(crate) fn invalid(at: impl Into<String>, message: impl Into<String>) -> ParseError {
    ParseError::Invalid { at: at.into(), message: message.into() }
}

pub fn parse(text: &str) -> Result<Vec<PolicySpec>, ParseError> {
    let raw: RawConfig = serde_yaml::from_str(text).map_err(ParseError::Syntax)?;
    let mut out = Vec::with_capacity(raw.policies.len());
    for (i, p) in raw.policies.into_iter().enumerate() {
        let at = format!("policies[{i}] (cgroup {:?})", p.cgroup);
        out.push(validate_policy(p, &at)?);
    }
    for (i, a) in out.iter().enumerate() {
        if let Some(b) = out[..i].iter().find(|b| b.cgroup == a.cgroup) {
            return Err(invalid(
                format!("policies[{i}]"),
                format!("cgroup {:?} already has a policy; give each cgroup one entry", b.cgroup),
            ));
        }
    }
    check_interfaces_unique(&out)?;
    Ok(out)
}

fn validate_policy(p: RawPolicy, at: &str) -> Result<PolicySpec, ParseError> {
    if p.cgroup.trim().is_empty() {
        return Err(invalid(at, "cgroup must not be empty"));
    }
    let mode = match p.mode.as_str() {
        "enforce" => Mode::Enforce,
        "audit" => Mode::Audit,
        other => {
            return Err(invalid(at, format!("mode {other:?} is not one of: enforce, audit")));
        }
    };
    let mut gateways = Vec::new();
    for (j, g) in p.gateways.into_iter().enumerate() {
        let at = format!("{at}.gateways[{j}]");
        let addr = parse_ip(&g.address, &at)?;
        if g.ports.is_empty() {
            return Err(invalid(&at, format!("gateway {} needs at least one port", g.address)));
        }
        let ports = g.ports.iter().map(|p| parse_port(p, &at)).collect::<Result<_, _>>()?;
        gateways.push((addr, ports));
    }
    let dns = p
        .dns
        .iter()
        .enumerate()
        .map(|(j, d)| parse_ip(d, &format!("{at}.dns[{j}]")))
        .collect::<Result<_, _>>()?;
    let extra = p
        .extra
        .into_iter()
        .enumerate()
        .map(|(j, e)| validate_extra(&e, &format!("{at}.extra[{j}]")))
        .collect::<Result<_, _>>()?;
    let interfaces = p
        .interfaces
        .iter()
        .enumerate()
        .map(|(j, i)| validate_interface(i, &format!("{at}.interfaces[{j}]")))
        .collect::<Result<_, _>>()?;
    let steer = validate_steer(&p.steer, &gateways, at)?;
    Ok(PolicySpec { cgroup: p.cgroup, mode, gateways, dns, extra, interfaces, steer })
}

/// Steered ports must be single ports, each steered once, to a listener the policy's own
/// gateways allow: a steered connection is judged as gateway traffic by every later check, so a
/// target the policy does not allow would only be dropped further on.
fn validate_steer(
    raw: &[RawSteer],
    gateways: &[(IpAddr, Vec<PortRange>)],
    at: &str,
) -> Result<BTreeMap<u16, SteerSpec>, ParseError> {
    let mut out = BTreeMap::new();
    for (j, r) in raw.iter().enumerate() {
        let at = format!("{at}.steer[{j}]");
        let single = |p: &RawPort| parse_single_port(p, &at);
        let port = single(&r.port)?;
        let address = match &r.address {
            Some(a) => match parse_ip(a, &at)? {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => {
                    return Err(invalid(&at, format!("address {a:?} is IPv6; put it in address6")));
                }
            },
            None => None,
        };
        let address6 = match &r.address6 {
            Some(a) => match parse_ip(a, &at)? {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => {
                    return Err(invalid(&at, format!("address6 {a:?} is IPv4; put it in address")));
                }
            },
            None => None,
        };
        if address.is_none() && address6.is_none() {
            return Err(invalid(&at, "steering needs the gateway listener's address, address6 or both"));
        }
        let covered = |ip: IpAddr| {
            gateways
                .iter()
                .any(|(g, ports)| *g == ip && ports.iter().any(|p| (p.first..=p.last).contains(&port)))
        };
        for ip in address.map(IpAddr::V4).into_iter().chain(address6.map(IpAddr::V6)) {
            if !covered(ip) {
                return Err(invalid(
                    &at,
                    format!("{ip} port {port} is not one of this policy's gateways; add it under gateways"),
                ));
            }
        }
        if r.ports.is_empty() {
            return Err(invalid(&at, "steer needs at least one original port"));
        }
        for p in &r.ports {
            let original = single(p)?;
            if out.insert(original, SteerSpec { address, address6, port }).is_some() {
                return Err(invalid(&at, format!("port {original} is steered twice")));
            }
        }
    }
    Ok(out)
}

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1), without '/', ':' or whitespace.
fn validate_interface(i: &RawInterface, at: &str) -> Result<InterfaceSpec, ParseError> {
    let name = i.name.as_str();
    let bad_char = name.chars().find(|c| c.is_whitespace() || *c == '/' || *c == ':');
    if name.is_empty() || name.len() > 15 || bad_char.is_some() || name == "." || name == ".." {
        return Err(invalid(
            at,
            format!(
                "interface name {name:?} is not a Linux interface name (1-15 bytes, no '/', ':' or spaces)"
            ),
        ));
    }
    if i.addresses.is_empty() {
        return Err(invalid(
            at,
            format!(
                "interface {name:?} needs the workload's addresses (frames from any other source are dropped)"
            ),
        ));
    }
    let mut addresses = Vec::with_capacity(i.addresses.len());
    for (k, a) in i.addresses.iter().enumerate() {
        let addr = parse_ip(a, &format!("{at}.addresses[{k}]"))?;
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
            return Err(invalid(at, format!("{addr} cannot be a workload's own address")));
        }
        addresses.push(addr);
    }
    Ok(InterfaceSpec { name: name.to_string(), addresses })
}

/// One extra CIDR with its protocol and ports (shared with the Kubernetes agent's config).
pub(crate) fn validate_extra(e: &RawExtra, at: &str) -> Result<ExtraSpec, ParseError> {
    let cidr = parse_cidr(&e.cidr, at)?;
    let protocol = parse_protocol(e.protocol.as_deref().unwrap_or("any"), at)?;
    let ports: Vec<PortRange> = e.ports.iter().map(|p| parse_port(p, at)).collect::<Result<_, _>>()?;
    if !ports.is_empty() && !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(invalid(at, "ports need protocol tcp or udp"));
    }
    Ok(ExtraSpec { cidr, protocol, ports })
}

/// A protocol by name, or any other by number. The tunnel protocols have names because a rule
/// for `any` does not cover them (see `egress_common::decide::is_encapsulation`).
fn parse_protocol(text: &str, at: &str) -> Result<Protocol, ParseError> {
    Ok(match text {
        "any" => Protocol::Any,
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        "ipip" => Protocol::Number(4),
        "ipv6" => Protocol::Number(41),
        "gre" => Protocol::Number(47),
        other => match other.parse::<u8>() {
            // 255 is reserved (the kernel tables use it for "any").
            Ok(n) if n < 255 => match n {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                n => Protocol::Number(n),
            },
            _ => {
                return Err(invalid(
                    at,
                    format!(
                        "protocol {other:?} is not one of: tcp, udp, icmp, any, gre, ipip, ipv6, or a number 0-254"
                    ),
                ));
            }
        },
    })
}

/// An interface or an address bound twice would make one workload's frames judged by
/// another's policy.
fn check_interfaces_unique(specs: &[PolicySpec]) -> Result<(), ParseError> {
    let mut names = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        for iface in &spec.interfaces {
            if let Some(prev) = names.insert(iface.name.as_str(), i) {
                return Err(invalid(
                    format!("policies[{i}]"),
                    format!("interface {:?} is already bound by policies[{prev}]", iface.name),
                ));
            }
            for a in &iface.addresses {
                if let Some(prev) = addrs.insert(*a, (i, iface.name.as_str())) {
                    return Err(invalid(
                        format!("policies[{i}]"),
                        format!(
                            "address {a} of interface {:?} is already bound to interface {:?} (policies[{}])",
                            iface.name, prev.1, prev.0
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn parse_ip(s: &str, at: &str) -> Result<IpAddr, ParseError> {
    s.trim().parse().map_err(|_| invalid(at, format!("{s:?} is not an IP address")))
}

pub(crate) fn parse_cidr(s: &str, at: &str) -> Result<IpNet, ParseError> {
    let s_trim = s.trim();
    let net: IpNet = match s_trim.parse() {
        Ok(n) => n,
        // A bare address means just that host.
        Err(_) => match s_trim.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(invalid(at, format!("{s:?} is not a CIDR (like 10.0.0.0/8)")));
            }
        },
    };
    if net.trunc() != net {
        return Err(invalid(at, format!("{s:?} has host bits set; did you mean {}?", net.trunc())));
    }
    Ok(net)
}

/// One port, not a range (steering: shared with the Kubernetes agent's config).
pub(crate) fn parse_single_port(p: &RawPort, at: &str) -> Result<u16, ParseError> {
    let range = parse_port(p, at)?;
    if range.first != range.last {
        return Err(invalid(at, format!("port {p} must be a single port, not a range")));
    }
    Ok(range.first)
}

pub(crate) fn parse_port(p: &RawPort, at: &str) -> Result<PortRange, ParseError> {
    let bad = || invalid(at, format!("port {p} is not a port (1-65535) or a range like \"8000-8100\""));
    let one = |n: i64| u16::try_from(n).ok().filter(|n| *n != 0);
    let (first, last) = match p {
        RawPort::Number(n) => {
            let n = one(*n).ok_or_else(bad)?;
            (n, n)
        }
        RawPort::Text(s) => match s.split_once('-') {
            Some((a, b)) => {
                let a = a.trim().parse::<i64>().ok().and_then(one).ok_or_else(bad)?;
                let b = b.trim().parse::<i64>().ok().and_then(one).ok_or_else(bad)?;
                (a, b)
            }
            None => {
                let n = s.trim().parse::<i64>().ok().and_then(one).ok_or_else(bad)?;
                (n, n)
            }
        },
    };
    if first > last {
        return Err(invalid(at, format!("port range {p} runs backwards")));
    }
    Ok(PortRange { first, last })
}

#[cfg(test)]
mod tests;

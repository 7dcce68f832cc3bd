//! The node agent's configuration file (a mounted ConfigMap):
//!
//! ```yaml
//! gateways:                              # what `egressfw.io/gateway=<name>` can name
//!   - name: default
//!     service: egressfw-system/egress-gateway   # namespace/name of the gateway's Service
//!     ports: [3128, 8443]                # Service ports; omitted: every port of the Service
//!     steer: [{port: 443, to: 8443}]     # optional: transparent steering to the Service
//!   - name: corporate                    # an existing proxy outside the cluster, by address
//!     addresses:
//!       - {address: 10.20.0.5, ports: [3128]}
//!     allowedNamespaces: {names: [legacy-billing]}   # who may select it (see gateway_access)
//!   - name: partners                     # a group: one gateway Deployment per upstream
//!     services:
//!       - {service: partners/api-gateway, ports: [8443]}
//!       - {service: partners/db-gateway}
//!     addresses:
//!       - {address: 10.20.0.9, ports: [443]}
//!     allowedNamespaces:
//!       selector: {matchLabels: {egressfw.io/partners: allowed}}
//! defaultGateway: default                # for namespaces without the gateway label, and for
//!                                        # those whose label names a gateway they may not use
//! dns:
//!   service: kube-system/kube-dns        # the default
//!   nodeLocal: 169.254.20.10             # optional node-local DNS cache address
//! extraCidrs:                            # optional, allowed for every enforced pod
//!   - cidr: 10.0.0.0/8
//!     protocol: tcp
//!     ports: [443]
//! podEvents: false                       # emit Kubernetes Events on pods for denials
//! ```
//!
//! Parsing is strict and errors name the value and where it sits, like the standalone file.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path};

use egress_common::addr::Destination;
use serde::Deserialize;

use super::gateway_access::{self, NamespaceAccess, RawAccess};
use crate::policy::config::{
    ExtraSpec, ParseError, PortRange, RawExtra, RawPort, invalid, parse_ip, parse_port, parse_single_port,
    validate_extra,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/egressfw/agent.yaml";
pub const DEFAULT_DNS_SERVICE: &str = "kube-system/kube-dns";

#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("reading agent config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("agent config {path}: {source}")]
    Syntax { path: String, source: serde_yaml::Error },
    #[error("agent config {path}: {at}: {message}")]
    Invalid { path: String, at: String, message: String },
}

/// A Service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One named gateway: what a namespace that names it may reach. Its members are Services (their
/// ClusterIPs and backends) and addresses outside the cluster (an existing proxy); a namespace
/// reaches every member and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    pub services: Vec<ServiceMember>,
    pub addresses: Vec<AddressMember>,
    /// Transparent steering: original TCP port -> the port of the gateway's one Service.
    pub steer: BTreeMap<u16, u16>,
    /// The namespaces that may select it; `None` for the default gateway, which admits all.
    pub allowed_namespaces: Option<NamespaceAccess>,
}

impl GatewayConfig {
    /// Whether namespace `name` with `labels` may select this gateway.
    pub fn admits(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.allowed_namespaces.as_ref().is_none_or(|a| a.admits(name, labels))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMember {
    pub service: ServiceRef,
    /// Service ports the pods may use; empty: every port of the Service.
    pub ports: Vec<PortRange>,
}

/// A gateway outside the cluster: reached at this address, on these ports only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressMember {
    pub address: IpAddr,
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub service: ServiceRef,
    pub node_local: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub gateways: BTreeMap<String, GatewayConfig>,
    pub default_gateway: String,
    pub dns: DnsConfig,
    pub extra: Vec<ExtraSpec>,
    pub pod_events: bool,
}

impl AgentConfig {
    /// Every Service the agent must watch.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRef> {
        self.gateways
            .values()
            .flat_map(|g| g.services.iter().map(|m| &m.service))
            .chain(std::iter::once(&self.dns.service))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAgentConfig {
    gateways: Vec<RawGateway>,
    #[serde(default)]
    default_gateway: Option<String>,
    #[serde(default)]
    dns: Option<RawDns>,
    #[serde(default)]
    extra_cidrs: Vec<RawExtra>,
    #[serde(default)]
    pod_events: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGateway {
    name: String,
    /// One Service (with `ports`): the common case, and the one steering can go to.
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    services: Vec<RawServiceMember>,
    #[serde(default)]
    addresses: Vec<RawAddressMember>,
    #[serde(default)]
    steer: Vec<RawSteer>,
    #[serde(default)]
    allowed_namespaces: Option<RawAccess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceMember {
    service: String,
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddressMember {
    address: String,
    #[serde(default)]
    ports: Vec<RawPort>,
}

/// `{port: 443, to: 8443}`: TCP connects to port 443 that nothing else allows go to the
/// gateway Service's port 8443.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSteer {
    port: RawPort,
    to: RawPort,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDns {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    node_local: Option<String>,
}

pub fn load(path: &Path) -> Result<AgentConfig, AgentConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| AgentConfigError::Read { path: path.display().to_string(), source })?;
    parse_file(path, &text)
}

pub fn parse_file(path: &Path, text: &str) -> Result<AgentConfig, AgentConfigError> {
    let shown = path.display().to_string();
    parse(text).map_err(|e| match e {
        ParseError::Syntax(source) => AgentConfigError::Syntax { path: shown, source },
        ParseError::Invalid { at, message } => AgentConfigError::Invalid { path: shown, at, message },
    })
}

pub fn parse(text: &str) -> Result<AgentConfig, ParseError> {
    let raw: RawAgentConfig = serde_yaml::from_str(text).map_err(ParseError::Syntax)?;
    let positions: BTreeMap<String, usize> =
        raw.gateways.iter().enumerate().map(|(i, g)| (g.name.clone(), i)).collect();
    if raw.gateways.is_empty() {
        return Err(invalid("gateways", "at least one gateway is needed: it is the only way out"));
    }
    let mut gateways = BTreeMap::new();
    for (i, g) in raw.gateways.into_iter().enumerate() {
        let at = format!("gateways[{i}] ({:?})", g.name);
        if !is_label_value(&g.name) {
            return Err(invalid(
                &at,
                format!(
                    "name {:?} cannot be a label value (letters, digits, '-', '_', '.'; at most 63)",
                    g.name
                ),
            ));
        }
        let gateway = parse_gateway(&g, &at)?;
        if gateways.insert(g.name.clone(), gateway).is_some() {
            return Err(invalid(at, format!("gateway name {:?} is used twice", g.name)));
        }
    }
    let default_gateway = match raw.default_gateway {
        Some(name) if gateways.contains_key(&name) => name,
        Some(name) => {
            let known: Vec<&str> = gateways.keys().map(String::as_str).collect();
            return Err(invalid(
                "defaultGateway",
                format!("{name:?} is not one of the gateways: {}", known.join(", ")),
            ));
        }
        None if gateways.len() == 1 => gateways.keys().next().cloned().unwrap_or_default(),
        None => {
            return Err(invalid("defaultGateway", "several gateways are configured; name the default one"));
        }
    };
    check_access(&gateways, &default_gateway, &positions)?;
    let raw_dns = raw.dns.unwrap_or_default();
    let dns = DnsConfig {
        service: parse_service(raw_dns.service.as_deref().unwrap_or(DEFAULT_DNS_SERVICE), "dns.service")?,
        node_local: raw_dns.node_local.as_deref().map(|a| parse_ip(a, "dns.nodeLocal")).transpose()?,
    };
    let extra = raw
        .extra_cidrs
        .into_iter()
        .enumerate()
        .map(|(i, e)| validate_extra(&e, &format!("extraCidrs[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(AgentConfig { gateways, default_gateway, dns, extra, pod_events: raw.pod_events })
}

/// A gateway's members and steering. `service` + `ports` is shorthand for one entry of
/// `services`.
fn parse_gateway(g: &RawGateway, at: &str) -> Result<GatewayConfig, ParseError> {
    let mut services = Vec::new();
    match &g.service {
        Some(service) => services.push(ServiceMember {
            service: parse_service(service, &format!("{at}.service"))?,
            ports: parse_ports(&g.ports, &format!("{at}.ports"))?,
        }),
        None if !g.ports.is_empty() => {
            return Err(invalid(
                format!("{at}.ports"),
                "ports go with service; under services and addresses each entry has its own",
            ));
        }
        None => {}
    }
    for (i, m) in g.services.iter().enumerate() {
        let at = format!("{at}.services[{i}]");
        services.push(ServiceMember {
            service: parse_service(&m.service, &format!("{at}.service"))?,
            ports: parse_ports(&m.ports, &format!("{at}.ports"))?,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = services.iter().find(|m| !seen.insert(&m.service)) {
        return Err(invalid(at, format!("Service {} is listed twice", twice.service)));
    }
    let addresses = g
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| parse_address(a, &format!("{at}.addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = addresses.iter().find(|a| !seen.insert(a.address)) {
        return Err(invalid(at, format!("address {} is listed twice", twice.address)));
    }
    if services.is_empty() && addresses.is_empty() {
        return Err(invalid(at, "a gateway needs a service, services or addresses: it is the only way out"));
    }
    let steer = if g.steer.is_empty() {
        BTreeMap::new()
    } else {
        match services.as_slice() {
            [only] => parse_steer(&g.steer, &only.ports, at)?,
            _ => {
                return Err(invalid(
                    format!("{at}.steer"),
                    format!(
                        "steering carries connections to the gateway's one Service, and this gateway has {}; steer to a gateway with a single service",
                        services.len()
                    ),
                ));
            }
        }
    };
    let allowed_namespaces = g
        .allowed_namespaces
        .as_ref()
        .map(|a| gateway_access::parse(a, &format!("{at}.allowedNamespaces")))
        .transpose()?;
    Ok(GatewayConfig { services, addresses, steer, allowed_namespaces })
}

/// The default gateway admits every namespace (it is where the others land); every other
/// gateway says which namespaces it admits, or a namespace owner could label their way to it.
fn check_access(
    gateways: &BTreeMap<String, GatewayConfig>,
    default: &str,
    positions: &BTreeMap<String, usize>,
) -> Result<(), ParseError> {
    for (name, g) in gateways {
        let at = format!("gateways[{}] ({name:?})", positions.get(name).copied().unwrap_or_default());
        match (&g.allowed_namespaces, name == default) {
            (Some(_), true) => {
                return Err(invalid(
                    format!("{at}.allowedNamespaces"),
                    "the default gateway admits every namespace (it is where a namespace lands whose label names a gateway it may not use); restrict another gateway, or make another one the default",
                ));
            }
            (None, false) => {
                return Err(invalid(
                    &at,
                    "allowedNamespaces is missing: say which namespaces may select this gateway with the egressfw.io/gateway label (names, a selector, or `selector: {}` for every namespace); the label is on the namespace, and its owner may be able to set it",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_ports(raw: &[RawPort], at: &str) -> Result<Vec<PortRange>, ParseError> {
    raw.iter().map(|p| parse_port(p, at)).collect()
}

/// Loopback, link-local (the cloud metadata service), multicast, broadcast or unspecified.
fn unreachable(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || v6.is_unicast_link_local()
        }
    }
}

/// An address outside the cluster that pods may reach on its ports: a unicast address a node
/// can route to. Link-local is refused too: it names the node's own link (the cloud metadata
/// service lives there), never a proxy elsewhere.
fn parse_address(a: &RawAddressMember, at: &str) -> Result<AddressMember, ParseError> {
    let address = parse_ip(&a.address, &format!("{at}.address"))?;
    // An IPv6 spelling of an IPv4 address (mapped, compatible, NAT64) is judged, by the kernel
    // and here, as the IPv4 address it carries: `::a9fe:a9fe` is the metadata service.
    if let IpAddr::V6(v6) = address
        && let Destination::V4(v4) = Destination::V6(v6.octets()).normalize()
    {
        let v4 = std::net::Ipv4Addr::from(v4);
        let message = if unreachable(IpAddr::V4(v4)) {
            format!(
                "{address} carries {v4}, which cannot be a gateway: not a unicast address a pod can reach"
            )
        } else {
            format!("{address} is an IPv6 spelling of the IPv4 address {v4}: write {v4}")
        };
        return Err(invalid(format!("{at}.address"), message));
    }
    if unreachable(address) {
        return Err(invalid(
            format!("{at}.address"),
            format!(
                "{address} cannot be a gateway: not a unicast address a pod can reach (loopback, link-local, multicast or unspecified)"
            ),
        ));
    }
    if a.ports.is_empty() {
        return Err(invalid(
            format!("{at}.ports"),
            format!(
                "give the ports of {address} that pods may reach (an address gateway has no Service to take them from)"
            ),
        ));
    }
    Ok(AddressMember { address, ports: parse_ports(&a.ports, &format!("{at}.ports"))? })
}

/// Steered ports, each once, to Service ports the pods may use (a steered connection is gateway
/// traffic to every later check).
fn parse_steer(raw: &[RawSteer], ports: &[PortRange], at: &str) -> Result<BTreeMap<u16, u16>, ParseError> {
    let mut out = BTreeMap::new();
    for (i, s) in raw.iter().enumerate() {
        let at = format!("{at}.steer[{i}]");
        let (port, to) = (parse_single_port(&s.port, &at)?, parse_single_port(&s.to, &at)?);
        if !ports.is_empty() && !ports.iter().any(|r| r.first <= to && to <= r.last) {
            return Err(invalid(
                &at,
                format!("port {to} is not one of this gateway's ports; add it under ports"),
            ));
        }
        if out.insert(port, to).is_some() {
            return Err(invalid(&at, format!("port {port} is steered twice")));
        }
    }
    Ok(out)
}

fn parse_service(s: &str, at: &str) -> Result<ServiceRef, ParseError> {
    match s.split_once('/') {
        Some((ns, name)) if is_dns_label(ns) && is_dns_label(name) => {
            Ok(ServiceRef { namespace: ns.to_owned(), name: name.to_owned() })
        }
        _ => Err(invalid(at, format!("{s:?} is not a Service reference like \"namespace/name\""))),
    }
}

/// RFC 1123 label: what namespace and Service names must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes label value (non-empty here, since it names something).
pub fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Invalid { at, message }) => format!("{at}: {message}"),
            Err(ParseError::Syntax(e)) => e.to_string(),
            Ok(c) => panic!("accepted: {c:?}"),
        }
    }

    #[test]
    fn full_config() {
        let c = parse(
            "gateways:\n  - name: default\n    service: egressfw-system/egress-gateway\n    ports: [3128, \"8443-8444\"]\n  - name: eu\n    service: gw/eu\n    allowedNamespaces: {selector: {}}\ndefaultGateway: default\ndns:\n  nodeLocal: 169.254.20.10\nextraCidrs:\n  - cidr: 10.0.0.0/8\n    protocol: tcp\n    ports: [443]\npodEvents: true\n",
        )
        .unwrap();
        assert_eq!(c.default_gateway, "default");
        assert_eq!(
            c.gateways["default"].services[0].ports,
            vec![PortRange { first: 3128, last: 3128 }, PortRange { first: 8443, last: 8444 }]
        );
        assert!(c.gateways["eu"].services[0].ports.is_empty());
        assert_eq!(c.dns.service, ServiceRef { namespace: "kube-system".into(), name: "kube-dns".into() });
        assert_eq!(c.dns.node_local, Some("169.254.20.10".parse().unwrap()));
        assert_eq!(c.extra.len(), 1);
        assert!(c.pod_events);
        assert_eq!(c.services().count(), 3);
    }

    #[test]
    fn single_gateway_is_the_default() {
        let c = parse("gateways: [{name: only, service: a/b}]").unwrap();
        assert_eq!(c.default_gateway, "only");
    }

    #[test]
    fn errors_name_the_value() {
        assert!(err("gateways: []").contains("at least one gateway"));
        assert!(err("gateways: [{name: a, service: nope}]").contains("\"nope\" is not a Service reference"));
        assert!(
            err("gateways: [{name: a, service: a/b}, {name: b, service: a/c}]").contains("name the default")
        );
        assert!(
            err("gateways: [{name: a, service: a/b}]\ndefaultGateway: zz").contains("\"zz\" is not one of")
        );
        assert!(err("gateways: [{name: a, service: a/b}, {name: a, service: a/c}]").contains("used twice"));
        assert!(err("gateways: [{name: 'a b', service: a/b}]").contains("cannot be a label value"));
        assert!(err("gateways: [{name: a, service: a/b, ports: [0]}]").contains("port 0"));
        assert!(err("gateways: [{name: a, service: a/b}]\ndns: {nodeLocal: x}").contains("dns.nodeLocal"));
        assert!(
            err("gateways: [{name: a, service: a/b}]\nextraCidrs: [{cidr: 10.0.0.1/8}]")
                .contains("host bits")
        );
        assert!(err("gateways: [{name: a, service: a/b}]\ntypo: 1").contains("unknown field `typo`"));
    }

    #[test]
    fn every_gateway_but_the_default_says_which_namespaces_may_select_it() {
        let two = |a: &str, b: &str| {
            format!(
                "gateways:\n  - {{name: main, service: a/b{a}}}\n  - {{name: corp, addresses: [{{address: 10.20.0.5, ports: [3128]}}]{b}}}\ndefaultGateway: main\n"
            )
        };
        let missing = err(&two("", ""));
        assert!(
            missing.starts_with("gateways[1] (\"corp\"): allowedNamespaces is missing")
                && missing.contains("selector: {}"),
            "{missing}"
        );
        let on_default =
            err(&two(", allowedNamespaces: {names: [shop]}", ", allowedNamespaces: {names: [shop]}"));
        assert!(
            on_default.starts_with(
                "gateways[0] (\"main\").allowedNamespaces: the default gateway admits every namespace"
            ),
            "{on_default}"
        );
        assert!(
            err(&two("", ", allowedNamespaces: {names: [Shop]}")).contains(
                "gateways[1] (\"corp\").allowedNamespaces.names[0]: \"Shop\" is not a namespace name"
            )
        );
        let c = parse(&two("", ", allowedNamespaces: {names: [shop]}")).unwrap();
        let none = BTreeMap::new();
        assert!(c.gateways["corp"].admits("shop", &none) && !c.gateways["corp"].admits("web", &none));
        assert!(c.gateways["main"].admits("web", &none), "the default gateway admits every namespace");
    }

    #[test]
    fn address_gateways_and_groups() {
        let c = parse(
            "gateways:\n  - name: corp\n    addresses:\n      - {address: 10.20.0.5, ports: [3128]}\n      - {address: \"fd00::5\", ports: [3128, \"8000-8001\"]}\n  - name: group\n    services: [{service: a/one, ports: [8443]}, {service: a/two}]\n    addresses: [{address: 10.20.0.9, ports: [443]}]\n    allowedNamespaces: {names: [shop]}\ndefaultGateway: corp\n",
        )
        .unwrap();
        let corp = &c.gateways["corp"];
        assert!(corp.services.is_empty());
        assert_eq!(corp.addresses[0].address, "10.20.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(
            corp.addresses[1].ports,
            vec![PortRange { first: 3128, last: 3128 }, PortRange { first: 8000, last: 8001 }]
        );
        let group = &c.gateways["group"];
        assert_eq!(group.services.len(), 2);
        assert_eq!(group.services[0].ports, vec![PortRange { first: 8443, last: 8443 }]);
        assert!(group.services[1].ports.is_empty());
        assert_eq!(group.addresses.len(), 1);
        // Both Services of the group and DNS are watched; an address has nothing to watch.
        assert_eq!(c.services().count(), 3);
    }

    #[test]
    fn an_address_is_judged_as_the_ipv4_address_it_carries() {
        let one = |address: &str| {
            err(&format!("gateways: [{{name: a, addresses: [{{address: \"{address}\", ports: [80]}}]}}]"))
        };
        // The metadata service spelled as IPv4-compatible, IPv4-mapped and NAT64 IPv6: the
        // kernel judges (and the node sends) each as 169.254.169.254.
        for spelling in ["::a9fe:a9fe", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"] {
            let e = one(spelling);
            assert!(e.contains("169.254.169.254"), "{spelling}: {e}");
            assert!(e.contains("cannot be a gateway"), "{spelling}: {e}");
        }
        let e = one("64:ff9b::10.0.0.1");
        assert!(e.contains("write 10.0.0.1"), "an ordinary address in another spelling is named: {e}");
    }

    #[test]
    fn address_and_group_errors_name_the_value() {
        let one = |member: &str| err(&format!("gateways: [{{name: a, {member}}}]"));
        assert!(
            one("addresses: [{address: 10.0.0.300, ports: [1]}]")
                .contains("gateways[0] (\"a\").addresses[0].address: \"10.0.0.300\" is not an IP address")
        );
        for bad in
            ["127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.1", "255.255.255.255", "::1", "fe80::1"]
        {
            let e = one(&format!("addresses: [{{address: \"{bad}\", ports: [1]}}]"));
            assert!(
                e.contains(&format!("{} cannot be a gateway", bad.parse::<IpAddr>().unwrap())),
                "{bad}: {e}"
            );
        }
        assert!(
            one("addresses: [{address: 10.0.0.1}]")
                .contains("addresses[0].ports: give the ports of 10.0.0.1")
        );
        assert!(
            one("addresses: [{address: 10.0.0.1, ports: [1]}, {address: 10.0.0.1, ports: [2]}]")
                .contains("address 10.0.0.1 is listed twice")
        );
        assert!(one("ports: [1]").contains("ports go with service"));
        assert!(one("steer: []").contains("a gateway needs a service, services or addresses"));
        assert!(one("services: [{service: a/b}, {service: a/b}]").contains("Service a/b is listed twice"));
        assert!(one("service: a/b, services: [{service: a/b}]").contains("Service a/b is listed twice"));
        assert!(one("services: [{service: a/b}, {service: a/c}], steer: [{port: 443, to: 8443}]").contains(
            "steer: steering carries connections to the gateway's one Service, and this gateway has 2"
        ));
        assert!(
            one("addresses: [{address: 10.0.0.1, ports: [1]}], steer: [{port: 443, to: 1}]")
                .contains("this gateway has 0")
        );
        assert!(one("services: [{service: a/b, port: [1]}]").contains("unknown field `port`"));
    }
}

//! What both kinds of policy say about a destination: names or networks, and ports. Checked by
//! the API server (CEL in the CRD), with the messages users see on `kubectl apply`.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One destination: either names or networks, never both (as the upstream peers are).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.domainNames) != has(self.networks)").message("a destination names either domainNames or networks, not both and not neither"))]
pub struct Destination {
    /// Host names as clients ask for them (CONNECT, SNI, Host). `*.example.com` matches one or
    /// more labels under example.com, never example.com itself. No bare `*`, no addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(n, n != '*')").message("a bare * would allow everything: name the domain, as in *.example.com"),
        validation = Rule::new("self.all(n, !n.matches('^[0-9.]+$') && !n.contains(':'))").message("domainNames takes names, not IP addresses: put addresses under networks"),
        validation = Rule::new("self.all(n, n.matches('^([*][.])?([a-z0-9]([-a-z0-9]*[a-z0-9])?[.])+[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))").message("a domain name is lowercase labels joined by dots (at least two), optionally starting with *."),
    )]
    pub domain_names: Option<Vec<DomainName>>,
    /// Addresses in CIDR notation (IPv4 or IPv6), for destinations reached without a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n))").message("networks takes CIDRs, as in 192.0.2.0/24 or 2001:db8::/32"))]
    pub networks: Option<Vec<Network>>,
}

/// A host name or `*.`-wildcard, as the API server checks it.
pub type DomainName = BoundedString;
/// A CIDR, as the API server checks it.
pub type Network = BoundedString;

/// A string no longer than a DNS name (bounds the cost of the CRD's CEL rules).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct BoundedString(#[schemars(length(max = 253))] pub String);

/// The transport protocol a rule's ports are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// A port, or a range of ports up to `endPort`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.endPort) || self.endPort >= self.port").message("endPort must not be below port"))]
pub struct PortSpec {
    #[serde(default)]
    pub protocol: Protocol,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<u16>,
}

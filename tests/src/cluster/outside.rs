//! The test cluster's "internet": a network namespace one veth away from the node, its default
//! route, holding the addresses tests serve from. Nothing leaves this machine: the node's
//! default route ends here, and this namespace has no route further out.
//!
//! ```text
//!   node (control plane's namespace)            outside (egfw-out-<name>)
//!   egfw-out  10.231.251.1/30  ---- veth ----   eth0  10.231.251.2/30
//!   default via 10.231.251.2                    lo    11.231.250.0/24 (hosts tests serve from)
//!                                               route 10.0.0.0/8 via 10.231.251.1
//! ```
//!
//! Its hosts are outside every private range, as the internet is: the gateway refuses private
//! ones by default.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::netns::NetNs;

const NODE_SIDE: &str = "10.231.251.1";
const OUTSIDE_SIDE: &str = "10.231.251.2";
/// The addresses the outside serves from; [`host`] names one.
pub const HOSTS_CIDR: &str = "11.231.250.0/24";

/// The `n`th address of [`HOSTS_CIDR`] (1-254).
pub fn host(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(11, 231, 250, n)
}

pub struct Outside {
    pub ns: NetNs,
}

impl Outside {
    /// Wires a new namespace `egfw-out-<name>` to `node` and routes the node's default there.
    pub fn create(node: &NetNs, name: &str) -> Result<Self> {
        let ns = NetNs::create(&format!("egfw-out-{name}"))?;
        node.ip(&["link", "add", "egfw-out", "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        node.ip(&["addr", "add", &format!("{NODE_SIDE}/30"), "dev", "egfw-out"])?;
        node.ip(&["link", "set", "egfw-out", "up"])?;
        node.ip(&["route", "add", "default", "via", OUTSIDE_SIDE])?;
        ns.ip(&["addr", "add", &format!("{OUTSIDE_SIDE}/30"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["addr", "add", HOSTS_CIDR, "dev", "lo"])?;
        ns.ip(&["route", "add", "10.0.0.0/8", "via", NODE_SIDE])?;
        Ok(Self { ns })
    }
}

//! A pod wired the way routed CNIs (Calico, Cilium, kindnet) wire them: its own network
//! namespace, a veth whose host side sits in the agent's namespace (the test's own, where the node
//! agent runs), a /32 host route to the pod through that veth, and proxy ARP so the pod's
//! default route via a link-local next hop works. The host side has the `.1` of the pod's /24 as
//! a /32, so everything the pod sends ends on this machine. Dropping it deletes the namespace,
//! which destroys the veth pair and its route.
//!
//! `create_bridged` wires one the way bridged CNIs (flannel's `cni0`, the `bridge` plugin) do
//! instead: the host side is a port of a bridge that holds the host address of the pod's /24, so
//! the node's route to the pod names the bridge, not the veth. Dropping it also deletes the
//! bridge.

use anyhow::Result;

use crate::netns::{NetNs, ip};

pub struct RoutedPod {
    pub ns: NetNs,
    /// Host-side interface name (in the test's namespace).
    pub host_side: String,
    pub addr: String,
    /// The host side's own address: a local destination for frames from the pod.
    pub host_addr: String,
    /// The bridge the host side is a port of, for a bridged pod: where `host_addr` is, and the
    /// destination MAC of frames to it.
    pub bridge: Option<String>,
}

impl RoutedPod {
    /// `addr` and `host_addr` are IPv4 addresses reserved for this test.
    pub fn create(tag: &str, addr: &str, host_addr: &str) -> Result<Self> {
        let ns = NetNs::create(&format!("eft{tag}-rpod"))?;
        let host_side = format!("eftr{tag}");
        let _ = ip(&["link", "del", &host_side]);
        ip(&["link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        let pod = Self { ns, host_side, addr: addr.into(), host_addr: host_addr.into(), bridge: None };
        ip(&["addr", "add", &format!("{host_addr}/32"), "dev", &pod.host_side])?;
        ip(&["link", "set", &pod.host_side, "up"])?;
        ip(&["route", "add", &format!("{addr}/32"), "dev", &pod.host_side])?;
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", pod.host_side), "1")?;
        pod.ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        pod.ns.ip(&["link", "set", "eth0", "up"])?;
        pod.ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
        pod.ns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
        Ok(pod)
    }

    /// A pod on a bridge: `addr` and `host_addr` are IPv4 addresses of a /24 reserved for this
    /// test; the bridge holds `host_addr`/24, the pod `addr`/24 with its default route via it.
    pub fn create_bridged(tag: &str, addr: &str, host_addr: &str) -> Result<Self> {
        let ns = NetNs::create(&format!("eft{tag}-bpod"))?;
        let (host_side, bridge) = (format!("eftr{tag}"), format!("eftb{tag}"));
        let _ = ip(&["link", "del", &host_side]);
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let pod = Self {
            ns,
            host_side,
            addr: addr.into(),
            host_addr: host_addr.into(),
            bridge: Some(bridge.clone()),
        };
        ip(&["link", "add", &pod.host_side, "type", "veth", "peer", "name", "eth0", "netns", &pod.ns.name])?;
        ip(&["link", "set", &pod.host_side, "master", &bridge])?;
        ip(&["link", "set", &pod.host_side, "up"])?;
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        pod.ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        pod.ns.ip(&["link", "set", "eth0", "up"])?;
        pod.ns.ip(&["route", "add", "default", "via", host_addr])?;
        Ok(pod)
    }

    /// The interface in the test's namespace that owns `host_addr`: the bridge, or the host side.
    pub fn host_device(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.host_side)
    }
}

impl Drop for RoutedPod {
    fn drop(&mut self) {
        if let Some(bridge) = &self.bridge {
            let _ = ip(&["link", "del", bridge]);
        }
    }
}

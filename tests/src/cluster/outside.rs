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
//! ones by default. [`Outside::serve`] runs `openssl s_server` on every one of them, with a
//! certificate for the names tests use signed by a CA of its own, and an HTTP server.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;

use super::{pki::Pki, supervisor::Supervisor};
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
    /// First: the servers stop before the namespace goes.
    procs: Supervisor,
    pub ns: NetNs,
}

impl Outside {
    /// Wires a new namespace `egfw-out-<name>` to `node` and routes the node's default there;
    /// servers' logs go to `dir`.
    pub fn create(node: &NetNs, name: &str, dir: &Path) -> Result<Self> {
        let ns = NetNs::create(&format!("egfw-out-{name}"))?;
        node.ip(&["link", "add", "egfw-out", "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        node.ip(&["addr", "add", &format!("{NODE_SIDE}/30"), "dev", "egfw-out"])?;
        node.ip(&["link", "set", "egfw-out", "up"])?;
        node.ip(&["route", "add", "default", "via", OUTSIDE_SIDE])?;
        ns.ip(&["addr", "add", &format!("{OUTSIDE_SIDE}/30"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["addr", "add", HOSTS_CIDR, "dev", "lo"])?;
        ns.ip(&["route", "add", "10.0.0.0/8", "via", NODE_SIDE])?;
        std::fs::create_dir_all(dir)?;
        Ok(Self { procs: Supervisor::new(dir), ns })
    }

    /// Leaves the namespace and its servers running (see [`super::node::Node::detach`]).
    pub fn detach(&mut self) {
        self.procs.detach();
        std::mem::forget(std::mem::replace(&mut self.ns, NetNs { name: String::new() }));
    }

    /// Serves HTTPS on port 443 of every outside address, as `names` (the first is the
    /// certificate's subject), and HTTP on port 80 (python's http.server, the files of `dir`);
    /// returns the CA that signed the certificate, for clients' `--cacert`.
    pub fn serve(&mut self, dir: &Path, names: &[&str]) -> Result<PathBuf> {
        let pki = Pki::create(dir, &[])?;
        pki.server("outside", names)?;
        let mut cmd = self.ns.command("openssl", None);
        cmd.current_dir(dir).args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            "443",
            "-cert",
            "outside.crt",
            "-key",
            "outside.key",
        ]);
        self.procs.spawn("https", cmd)?;
        let mut cmd = self.ns.command("python3", None);
        cmd.args(["-m", "http.server", "--bind", "0.0.0.0", "--directory"]).arg(dir).arg("80");
        self.procs.spawn("http", cmd)?;
        for (name, port) in [("https", 443), ("http", 80)] {
            let ns = &self.ns;
            self.procs.wait_for(
                &format!("the outside's {name} server"),
                Duration::from_secs(10),
                name,
                || {
                    ns.within(|| {
                        TcpStream::connect_timeout(&SocketAddr::from((host(1), port)), Duration::from_secs(1))
                            .is_ok()
                    })
                },
            )?;
        }
        Ok(dir.join("ca.crt"))
    }
}

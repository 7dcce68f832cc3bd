//! Plain TCP relays for the latency floor: a relay that only moves bytes between two sockets
//! (no request to parse, a fixed upstream) shows what one extra hop through a userspace process
//! costs on this machine, whatever the proxy. Two of them, measured like the routes:
//!
//! - the gateway's own static TCP forward (`tcpForwards`), in the same process as its HTTP
//!   proxy listener;
//! - socat, a process per connection that loops on poll(2), read(2) and write(2): about as
//!   little work per message as a userspace relay can do.

use std::{fs, net::SocketAddr, path::Path, process::Stdio};

use anyhow::{Context as _, Result};
use egress_tests::{
    gateway::UPSTREAM4,
    lab::{GATEWAY4, Lab},
};

use super::{proxies::Daemon, traffic::ECHO_PORT};

/// The gateway's static forward to the upstream's echo port.
pub const GATEWAY_FORWARD_PORT: u16 = 3130;
const SOCAT_PORT: u16 = 3131;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    GatewayForward,
    Socat,
}

impl Relay {
    pub const ALL: [Self; 2] = [Self::GatewayForward, Self::Socat];

    pub fn name(self) -> &'static str {
        match self {
            Self::GatewayForward => "egress gateway, `tcpForwards` listener",
            Self::Socat => "socat (a process per connection)",
        }
    }

    pub fn addr(self) -> SocketAddr {
        let port = match self {
            Self::GatewayForward => GATEWAY_FORWARD_PORT,
            Self::Socat => SOCAT_PORT,
        };
        egress_tests::sock(GATEWAY4, port)
    }
}

/// The `tcpForwards` entry of the gateway's benchmark configuration.
pub fn gateway_forward_config() -> String {
    format!(
        "  tcpForwards:\n    - {{listen: \"{GATEWAY4}:{GATEWAY_FORWARD_PORT}\", upstream: \"{UPSTREAM4}:{ECHO_PORT}\"}}\n"
    )
}

/// Starts socat in the gateway namespace and waits until it listens; killed when dropped.
pub fn start_socat(lab: &Lab, dir: &Path) -> Result<Daemon> {
    let log = dir.join("socat.log");
    let child = lab
        .gateway
        .command("socat", None)
        .arg(format!("TCP-LISTEN:{SOCAT_PORT},bind={GATEWAY4},reuseaddr,fork,backlog=1024,nodelay"))
        .arg(format!("TCP:{UPSTREAM4}:{ECHO_PORT},nodelay"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).context("creating socat's log")?)
        .spawn()
        .context("starting socat")?;
    let mut socat = Daemon(child);
    socat.wait_serving(lab, "socat", Relay::Socat.addr(), || true, dir)?;
    Ok(socat)
}

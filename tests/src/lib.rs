//! Harness for the integration tests: a simulated node built from network namespaces, cgroups
//! and veths, real clients (socat, curl, ping, hping3) run inside a "pod", and sniffers that
//! prove nothing arrived where nothing should. Every resource is removed on drop, including when
//! a test panics.
//!
//! Run through `cargo xtask test`, which builds the agent and passes its path in
//! `EGRESS_AGENT_BIN`. The tests need root; without it they fail, loudly.

pub mod agent;
pub mod client;
pub mod cluster;
pub mod cni;
pub mod fake_api;
pub mod fake_dns;
pub mod frames;
pub mod gateway;
pub mod kube_node;
pub mod lab;
pub mod listen;
pub mod netns;
pub mod parent_proxy;
pub mod preempt;
pub mod raw_bpf;
pub mod routed_pod;
pub mod sniff;

use std::{path::PathBuf, time::Duration};

/// How long to wait for something that should happen (an agent or gateway getting ready, a log
/// line appearing): `base`, stretched by `EGRESS_TEST_TIME_SCALE` where everything runs slower
/// (`cargo xtask vm` sets it under TCG emulation, where loading the programs alone takes seconds).
/// Only waits for an expected event are stretched; a test never passes by waiting longer.
pub fn patience(base: Duration) -> Duration {
    base * time_scale()
}

fn time_scale() -> u32 {
    match std::env::var("EGRESS_TEST_TIME_SCALE") {
        Err(_) => 1,
        Ok(v) => {
            v.parse().ok().filter(|&n| n >= 1).unwrap_or_else(|| {
                panic!("EGRESS_TEST_TIME_SCALE={v:?}: expected a whole number of at least 1")
            })
        }
    }
}

/// Fails the test (never skips it) when not running as root.
pub fn require_root() {
    // SAFETY: plain syscall.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces, cgroups and BPF links: run them as root (cargo xtask test)"
    );
}

/// A socket address from a host (IPv6 unbracketed, as the lab constants are) and a port.
pub fn sock(host: &str, port: u16) -> std::net::SocketAddr {
    let ip: std::net::IpAddr = host.parse().unwrap_or_else(|e| panic!("{host:?}: {e}"));
    std::net::SocketAddr::new(ip, port)
}

/// Programs the agent links to every enforced cgroup (sockops, the packet program, getpeername,
/// connect and sendmsg for each family): the count inspect and the pass logs report per pod.
pub const CGROUP_PROGRAMS: usize = 8;

pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("EGRESS_AGENT_BIN")
        .map(PathBuf::from)
        .expect("EGRESS_AGENT_BIN is not set: run the integration tests with `cargo xtask test`, which builds the agent first");
    assert!(path.is_file(), "EGRESS_AGENT_BIN={} does not exist", path.display());
    path
}

/// The agent built with another build stamp: "a different build" (see egress-ebpf's stamp.rs).
pub fn other_agent_bin() -> PathBuf {
    let path = std::env::var_os("EGRESS_AGENT_OTHER_BIN").map(PathBuf::from).expect(
        "EGRESS_AGENT_OTHER_BIN is not set: run the integration tests with `cargo xtask test`, which builds the agent a second time with another build stamp",
    );
    assert!(path.is_file(), "EGRESS_AGENT_OTHER_BIN={} does not exist", path.display());
    path
}

/// Polls `check` every 20 ms until it holds or `patience(base)` passes, and says whether it
/// held. The suite's one polling loop: every wait for a condition goes through it, directly or
/// through [`wait_until`], so the VM's time scale applies to all of them.
pub fn poll_until(base: Duration, mut check: impl FnMut() -> bool) -> bool {
    let limit = patience(base);
    let start = std::time::Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`poll_until`], failing the test, naming `what`, when the condition does not hold in time.
pub fn wait_until(what: &str, base: Duration, check: impl FnMut() -> bool) {
    assert!(poll_until(base, check), "timed out after {:?} waiting for {what}", patience(base));
}

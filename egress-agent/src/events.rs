//! Reads deny/audit events from the ring buffer and logs each as one structured line.
//!
//! The kernel already caps events per CPU per second; here a token bucket caps log lines so a
//! burst cannot flood the node's log pipeline, and what was held back is reported as a count.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use egress_common::{
    event::{ACTION_AUDITED, VerdictEvent},
    verdict::{Hook, Reason},
};
use tokio::io::unix::AsyncFd;

use crate::metrics::Owner;

/// Log lines per second in steady state, and the burst allowed above it.
const LINES_PER_SEC: f64 = 100.0;
const BURST: f64 = 500.0;
const SUPPRESSED_REPORT_EVERY: Duration = Duration::from_secs(10);

pub fn decode(bytes: &[u8]) -> Option<VerdictEvent> {
    if bytes.len() < size_of::<VerdictEvent>() {
        return None;
    }
    // SAFETY: VerdictEvent is plain old data and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<VerdictEvent>()) })
}

pub fn address(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        4 => "ipip".into(),
        41 => "ipv6".into(),
        47 => "gre".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
}

struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * LINES_PER_SEC).min(BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Logs events until the ring buffer fails. `owner_of` names the policy cgroups (pod, or path);
/// `also` sees every event, logged or not (the Kubernetes agent turns some into pod Events).
pub async fn run(
    ring: RingBuf<MapData>,
    owner_of: impl Fn(u64) -> Option<Owner>,
    mut also: impl FnMut(&VerdictEvent, Option<&Owner>),
) -> Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as the
    // AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the events ring buffer: {e}"))?;
    let mut bucket = TokenBucket { tokens: BURST, last: Instant::now() };
    let mut suppressed: HashMap<&'static str, u64> = HashMap::new();
    let mut last_report = Instant::now();
    loop {
        let mut guard = fd.readable_mut().await.context("waiting on the events ring buffer")?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = decode(&item) else { continue };
            let reason = Reason::from_u8(ev.reason).map_or("unknown", Reason::name);
            let owner = owner_of(ev.policy_cgroup_id);
            also(&ev, owner.as_ref());
            if bucket.take() {
                log_event(&ev, reason, &owner.unwrap_or_default());
            } else {
                *suppressed.entry(reason).or_default() += 1;
            }
        }
        guard.clear_ready();
        if !suppressed.is_empty() && last_report.elapsed() >= SUPPRESSED_REPORT_EVERY {
            for (reason, count) in suppressed.drain() {
                tracing::warn!(reason, count, "verdict events not logged (rate limit)");
            }
            last_report = Instant::now();
        }
    }
}

/// What the kernel did: `deny`, `audit`, or `would_steer` (audit mode reports a connect it
/// would have carried to the gateway as such).
pub fn action_name(ev: &VerdictEvent) -> &'static str {
    match (ev.action == ACTION_AUDITED, ev.reason == Reason::AllowSteered as u8) {
        (true, true) => "would_steer",
        (true, false) => "audit",
        (false, _) => "deny",
    }
}

fn log_event(ev: &VerdictEvent, reason: &str, owner: &Owner) {
    let action = action_name(ev);
    let hook = Hook::from_u8(ev.hook).map_or("unknown", Hook::name);
    let dst = address(ev.daddr, ev.family);
    tracing::warn!(
        target: "egressfw::verdict",
        action,
        reason,
        hook,
        protocol = %protocol_name(ev.protocol),
        dst = %dst,
        dport = ev.dport,
        src = %if ev.hook == Hook::SkbEgress as u8 || ev.hook == Hook::TcFromPod as u8 { address(ev.saddr, ev.family).to_string() } else { String::new() },
        sport = ev.sport,
        cgroup_id = ev.cgroup_id,
        policy_cgroup_id = ev.policy_cgroup_id,
        policy_cgroup = %owner.cgroup,
        namespace = %owner.namespace,
        pod = %owner.pod,
        "egress {action}"
    );
}

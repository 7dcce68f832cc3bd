//! The packet program on crafted packets, through BPF_PROG_TEST_RUN: the loaded object with its
//! real maps (pinned in a private directory), no traffic and no attachment.
//!
//! In a test run the kernel gives the packet a socket charged to the calling process's cgroup,
//! so the policy is keyed by this test process's own cgroup.

use std::{fs, os::unix::fs::MetadataExt as _};

use aya::{
    Ebpf,
    programs::{CgroupSkb, TestRun as _, TestRunOptions},
};
use egress_agent::{
    cgroup::cgroup2_mount,
    kernel::{bpffs::PinLayout, maps::KernelMaps, object},
    policy::{Mode, compile::compile, config::parse},
};
use egress_common::{maps::PROG_SKB_EGRESS, policy::CgroupPolicy, verdict::Reason};
use egress_tests::netns::NetNs;

const PASS: u32 = 1;
const DROP: u32 = 0;

const POLICY: &str = "
policies:
  - cgroup: self
    mode: MODE
    gateways: [{address: 10.0.0.3, ports: [3128]}, {address: 'fd00::3', ports: [3128]}]
    dns: [10.0.0.4]
";

/// Removes the private pin directory on drop, whatever happened after it was created.
struct PinGuard(PinLayout);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0.root);
    }
}

struct Loaded {
    ebpf: Ebpf,
    maps: KernelMaps,
    /// Test runs happen in here, "leaving" through a veth: the kernel's default device
    /// for a test run is loopback, which the program rightly lets through.
    netns: NetNs,
    ifindex: u32,
    // Last: dropped after the object and maps are closed.
    _pins: PinGuard,
}

/// (cgroup id, level) of this process's cgroup v2.
fn own_cgroup() -> (u64, u32) {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel =
        text.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line in /proc/self/cgroup");
    let rel = rel.trim_start_matches('/');
    let path = cgroup2_mount().unwrap().join(rel);
    let level = if rel.is_empty() { 0 } else { rel.split('/').count() as u32 };
    (fs::metadata(path).unwrap().ino(), level)
}

fn load(mode: &str) -> Loaded {
    egress_tests::require_root();
    let pins = PinLayout::new(format!("/sys/fs/bpf/egressfw-test-run-{}-{mode}", std::process::id()));
    let _ = fs::remove_dir_all(&pins.root);
    let pins = PinGuard(pins);
    pins.0.prepare().unwrap();
    let mut ebpf = object::load(&pins.0).unwrap();
    let mut maps = KernelMaps::from_ebpf(&mut ebpf).unwrap();
    let spec = &parse(&POLICY.replace("MODE", mode)).unwrap()[0];
    let (cgroup_id, level) = own_cgroup();
    maps.write_rules(7, &compile(spec).unwrap()).unwrap();
    let mode_value = if mode == "audit" { Mode::Audit } else { Mode::Enforce }.kernel_value();
    maps.policies.insert(cgroup_id, CgroupPolicy { policy_id: 7, mode: mode_value }, 0).unwrap();
    maps.set_level_mask(1 << level).unwrap();
    let netns = NetNs::create(&format!("eft{}run{mode}", std::process::id())).unwrap();
    // A veth pair rather than a dummy device: the dummy module is not on every kernel.
    netns.ip(&["link", "add", "out0", "type", "veth", "peer", "name", "out1"]).unwrap();
    netns.ip(&["link", "set", "out0", "up"]).unwrap();
    // SAFETY: a C string literal.
    let ifindex = netns.within(|| unsafe { libc::if_nametoindex(c"out0".as_ptr()) });
    assert_ne!(ifindex, 0);
    Loaded { ebpf, maps, netns, ifindex, _pins: pins }
}

/// The leading part of `struct __sk_buff` up to `ifindex` (offset 40), all else zero.
fn skb_ctx(ifindex: u32) -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

impl Loaded {
    fn run(&self, packet: &[u8]) -> u32 {
        let prog: &CgroupSkb = self.ebpf.program(PROG_SKB_EGRESS).unwrap().try_into().unwrap();
        let mut frame = vec![0u8; 12];
        let ethertype: u16 = if packet[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        self.run_frame(prog, &frame, self.ifindex)
    }

    fn run_frame(&self, prog: &CgroupSkb, frame: &[u8], ifindex: u32) -> u32 {
        let ctx = skb_ctx(ifindex);
        self.netns.within(|| {
            let opts =
                TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ..TestRunOptions::default() };
            prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
        })
    }

    fn count(&self, reason: Reason) -> u64 {
        self.maps.counters().unwrap()[reason as usize].applied
    }
}

/// IPv4 header (with `options` 4-byte words of options) + 20 bytes of TCP/UDP-ish header.
fn ipv4(dst: [u8; 4], protocol: u8, dport: u16, options: usize, frag_offset: u16) -> Vec<u8> {
    let ihl = 5 + options;
    let mut p = vec![0u8; ihl * 4 + 20];
    p[0] = 0x40 | ihl as u8;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6..8].copy_from_slice(&frag_offset.to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&[10, 0, 0, 2]);
    p[16..20].copy_from_slice(&dst);
    for o in 0..options * 4 {
        p[20 + o] = 1; // NOP options
    }
    p[ihl * 4..ihl * 4 + 2].copy_from_slice(&40000u16.to_be_bytes());
    p[ihl * 4 + 2..ihl * 4 + 4].copy_from_slice(&dport.to_be_bytes());
    p
}

/// IPv6 header, then extension headers given as (type, length in bytes incl. the 2-byte head), then L4.
fn ipv6(dst: &str, ext: &[(u8, usize)], protocol: u8, dport: u16) -> Vec<u8> {
    let dst: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[6] = ext.first().map_or(protocol, |e| e.0);
    p[7] = 64;
    p[8..24].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[24..40].copy_from_slice(&dst.octets());
    for (i, (kind, len)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(protocol, |e| e.0);
        let mut h = vec![0u8; *len];
        h[0] = next;
        h[1] = if *kind == 44 { 0 } else { (*len / 8 - 1) as u8 };
        p.extend_from_slice(&h);
    }
    let mut l4 = vec![0u8; 20];
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&l4);
    let payload = (p.len() - 40) as u16;
    p[4..6].copy_from_slice(&payload.to_be_bytes());
    p
}

#[test]
fn ipv4_packets_get_the_verdicts_of_the_policy() {
    let l = load("enforce");
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 0, 0)), PASS, "TCP to the gateway port");
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 22, 0, 0)), DROP, "another gateway port");
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 17, 3128, 0, 0)), DROP, "UDP to the gateway port");
    assert_eq!(l.run(&ipv4([10, 0, 0, 4], 17, 53, 0, 0)), PASS, "DNS over UDP");
    assert_eq!(l.run(&ipv4([10, 0, 0, 4], 6, 53, 0, 0)), PASS, "DNS over TCP");
    assert_eq!(l.run(&ipv4([10, 0, 0, 5], 17, 53, 0, 0)), DROP, "port 53 elsewhere");
    assert_eq!(l.run(&ipv4([10, 0, 0, 5], 1, 0, 0, 0)), DROP, "ICMP out");
    assert_eq!(l.run(&ipv4([10, 0, 0, 5], 253, 0, 0, 0)), DROP, "an experimental protocol");
    assert!(
        l.count(Reason::AllowGateway) >= 1
            && l.count(Reason::DenyPort) >= 2
            && l.count(Reason::DenyDestination) >= 3
    );
}

#[test]
fn ipv4_tricks_are_dropped() {
    let l = load("enforce");
    // Loose source routing would let the gateway's host forward it on.
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 2, 0)), DROP, "IP options");
    assert_eq!(l.count(Reason::DenySourceRoute), 1);
    // A later fragment carries no port to check.
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 0, 100)), DROP, "non-first fragment");
    assert_eq!(l.count(Reason::DenyFragment), 1);
    // A first fragment is judged by its ports.
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 0, 0x2000)), PASS, "first fragment (MF set)");
    // A tiny fragment: the TCP header is cut off, so no port can be checked.
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 0, 0)[..22]), DROP, "ports cut off");
    assert_eq!(l.count(Reason::DenyPort), 1);
    let mut bad = ipv4([10, 0, 0, 3], 6, 3128, 0, 0);
    bad[0] = 0x43;
    assert_eq!(l.run(&bad), DROP, "IHL below 5");
    // (The frame says IPv4; the bytes say version 5: judged by the bytes.)
    bad[0] = 0x55;
    assert_eq!(l.run(&bad), DROP, "unknown IP version");
    assert_eq!(l.count(Reason::DenyMalformed), 2);
}

#[test]
fn ipv6_packets_are_judged_through_extension_headers() {
    let l = load("enforce");
    assert_eq!(l.run(&ipv6("fd00::3", &[], 6, 3128)), PASS, "TCP to the gateway over IPv6");
    assert_eq!(l.run(&ipv6("fd00::3", &[], 6, 80)), DROP);
    assert_eq!(l.run(&ipv6("fd00::5", &[], 17, 53)), DROP);
    assert_eq!(
        l.run(&ipv6("fd00::3", &[(0, 8), (60, 16)], 6, 3128)),
        PASS,
        "hop-by-hop and destination options"
    );
    assert_eq!(l.run(&ipv6("fd00::3", &[(0, 8), (60, 16)], 6, 22)), DROP, "port found past the options");
    assert_eq!(l.run(&ipv6("fd00::3", &[(44, 8)], 6, 3128)), PASS, "atomic fragment");
    assert_eq!(l.run(&ipv6("fd00::3", &[(43, 24)], 6, 3128)), DROP, "routing header");
    assert_eq!(l.count(Reason::DenySourceRoute), 1);
    let endless: Vec<(u8, usize)> = (0..9).map(|_| (60, 8)).collect();
    assert_eq!(
        l.run(&ipv6("fd00::3", &endless, 6, 3128)),
        DROP,
        "more extension headers than the parser follows"
    );
}

#[test]
fn ipv4_mapped_and_nat64_destinations_are_judged_as_ipv4() {
    let l = load("enforce");
    assert_eq!(l.run(&ipv6("::ffff:10.0.0.3", &[], 6, 3128)), PASS, "the gateway, mapped");
    assert_eq!(l.run(&ipv6("::ffff:10.0.0.5", &[], 6, 3128)), DROP);
    assert_eq!(l.run(&ipv6("64:ff9b::10.0.0.4", &[], 17, 53)), PASS, "DNS through NAT64");
}

#[test]
fn audit_mode_passes_what_enforce_would_drop_and_counts_it() {
    let l = load("audit");
    assert_eq!(l.run(&ipv4([10, 0, 0, 5], 6, 80, 0, 0)), PASS);
    assert_eq!(l.maps.counters().unwrap()[Reason::DenyDestination as usize].audited, 1);
}

#[test]
fn loopback_is_judged_by_the_device_not_the_address() {
    let l = load("enforce");
    let prog: &CgroupSkb = l.ebpf.program(PROG_SKB_EGRESS).unwrap().try_into().unwrap();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ipv4([127, 0, 0, 1], 6, 80, 0, 0));
    assert_eq!(l.run_frame(prog, &frame, l.ifindex), DROP, "127.0.0.1 on a real device is spoofed");
    assert_eq!(l.count(Reason::DenyLoopbackSpoof), 1);
    const LOOPBACK_IFINDEX: u32 = 1;
    assert_eq!(l.run_frame(prog, &frame, LOOPBACK_IFINDEX), PASS, "on the loopback device");
}

#[test]
fn a_cgroup_with_links_but_no_policy_fails_closed() {
    let mut l = load("enforce");
    let (cgroup_id, _) = own_cgroup();
    l.maps.policies.remove(&cgroup_id).unwrap();
    assert_eq!(l.run(&ipv4([10, 0, 0, 3], 6, 3128, 0, 0)), DROP, "no policy found: deny");
    assert_eq!(l.count(Reason::DenyNoPolicy), 1);
}

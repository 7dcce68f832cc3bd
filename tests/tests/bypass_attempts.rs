//! Bypass attempts from the bypass catalogue (docs/BYPASSES.md) that the other suites do not
//! cover end to end, each proven on the receiving side by a sniffer. Where the same packet shape
//! towards an allowed destination is expected to arrive, the test shows that too, so it cannot
//! pass because the shape never left the pod at all.

use std::{fs::File, net::IpAddr};

use egress_tests::{
    agent::Agent,
    client::{refused, succeeded, udp_sendto},
    lab::{DNS4, DNS6, EXTERNAL4, EXTERNAL6, GATEWAY4, Lab, text},
    raw_bpf,
    sniff::Sniffer,
};

fn python(script: &str, args: &[&str]) -> (&'static str, Vec<String>) {
    let mut all = vec!["-c".to_string(), script.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    ("python3", all)
}

/// Everything the pod sent that reached `sniffer`, as (destination, protocol, port).
fn arrived(sniffer: &Sniffer) -> Vec<(IpAddr, u8, u16)> {
    sniffer.seen().iter().map(|s| (s.dst, s.protocol, s.dport)).collect()
}

/// TCP Fast Open sends the SYN, with data, from sendto(MSG_FASTOPEN): no connect() call.
const FAST_OPEN: &str = r"
import socket, sys
for family, host in [(socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])]:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.sendto(b'GET / HTTP/1.0\r\n\r\n', socket.MSG_FASTOPEN, (host, 80))
        print('sent')
    except OSError as e:
        print(e)
";

#[test]
fn tcp_fast_open_and_udp_443_go_nowhere() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    lab.pod.sysctl("net.ipv4.tcp_fastopen", "1").expect("sysctl");
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let out = lab.in_pod(python(FAST_OPEN, &[EXTERNAL4, EXTERNAL6]));
    assert!(out.status.success(), "the Fast Open client must run:\n{}", text(&out));
    // QUIC: UDP 443, to the external host and to the gateway (whose rule is TCP only).
    for host in [EXTERNAL4, EXTERNAL6, GATEWAY4] {
        let out = lab.in_pod(udp_sendto(host, 443));
        assert!(refused(&out), "UDP 443 to {host}:\n{}", text(&out));
    }
    assert_eq!(arrived(&sniffer), vec![], "Fast Open output:\n{}", text(&out));
}

/// ICMP echo through ping sockets (SOCK_DGRAM, IPPROTO_ICMP/ICMPV6): no raw socket needed.
const PING_SOCKETS: &str = r"
import socket, sys
for family, proto, kind, host in [
    (socket.AF_INET, socket.IPPROTO_ICMP, 8, sys.argv[1]),
    (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, sys.argv[2]),
]:
    s = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        s.sendto(bytes([kind, 0, 0, 0, 0, 1, 0, 1]) + b'ping', (host, 0))
        print('sent')
    except OSError as e:
        print(e)
";

#[test]
fn ping_sockets_broadcast_and_multicast_go_nowhere() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    // Any group may open ping sockets, as on distributions that allow unprivileged ping.
    lab.pod.sysctl("net.ipv4.ping_group_range", "0 2147483647").expect("sysctl");
    let sniff_ext = Sniffer::start(&lab.external, &Lab::pod_sources());
    let sniff_gw = Sniffer::start(&lab.gateway, &Lab::pod_sources());
    let out = lab.in_pod(python(PING_SOCKETS, &[EXTERNAL4, EXTERNAL6]));
    assert!(out.status.success(), "the ping-socket client must run:\n{}", text(&out));
    for host in ["255.255.255.255", "10.231.0.255", "224.0.0.1", "239.1.2.3", "ff02::1%eth0", "ff05::2"] {
        let out = lab.in_pod(udp_sendto(host, 9000));
        assert!(!succeeded(&out) || refused(&out), "UDP to {host}:\n{}", text(&out));
    }
    assert_eq!(arrived(&sniff_ext), vec![], "at the external host");
    assert_eq!(arrived(&sniff_gw), vec![], "at the gateway and DNS host");
}

#[test]
fn source_routes_and_fragments_from_raw_sockets_go_nowhere() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let sniff_ext = Sniffer::start(&lab.external, &Lab::pod_sources());
    let sniff_gw = Sniffer::start(&lab.gateway, &Lab::pod_sources());
    let hping = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // -I: hping3 finds the interface with a UDP connect() to port 11111, which is refused.
        all.extend(["-I", "eth0", "-c", "1", "-q"].map(String::from));
        let out = lab.in_pod(("hping3", all));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", text(&out));
        out
    };
    // The same UDP query to DNS arrives plainly: the shape is sound, only its options differ.
    let out = hping(&["--udp", "-p", "53", DNS4]);
    assert_eq!(
        arrived(&sniff_gw),
        vec![(DNS4.parse().unwrap(), 17, 53)],
        "a plain query to DNS arrives:\n{}\n{}",
        text(&out),
        agent.log_text()
    );
    sniff_gw.clear();
    // Loose and strict source routes through the external host, to DNS's allowed port.
    hping(&["--udp", "-p", "53", "--lsrr", EXTERNAL4, DNS4]);
    hping(&["--udp", "-p", "53", "--ssrr", EXTERNAL4, DNS4]);
    // Record-route and other IPv4 options on an allowed destination.
    hping(&["--udp", "-p", "53", "--rroute", DNS4]);
    // Fragments towards the external host: no fragment may arrive.
    hping(&["--udp", "-p", "9000", "-f", "-d", "300", EXTERNAL4]);
    assert_eq!(arrived(&sniff_ext), vec![], "at the external host");
    assert_eq!(arrived(&sniff_gw), vec![], "at the DNS host: options are source routing, or could carry it");
}

/// An IPv6 packet built whole (IPPROTO_RAW) to DNS's UDP 53 with the extension headers named on
/// the command line: `hop`, `dst` (8-byte options), `rt0` (a type-0 routing header through the
/// external host), repeated as given.
const IPV6_CHAIN: &str = r"
import socket, struct, sys
src, dst, via = sys.argv[1], sys.argv[2], sys.argv[3]
chain = sys.argv[4].split(',')
numbers = {'hop': 0, 'dst': 60, 'rt0': 43}
udp = struct.pack('!HHHH', 40000, 53, 12, 0) + b'dns?'
body, next_header = udp, 17
for name in reversed(chain):
    if name == 'rt0':
        hdr = struct.pack('!BBBBI', next_header, 2, 0, 1, 0) + socket.inet_pton(socket.AF_INET6, via)
    else:
        hdr = struct.pack('!BB', next_header, 0) + bytes([1, 4, 0, 0, 0, 0])
    body, next_header = hdr + body, numbers[name]
ip = struct.pack('!IHBB', 6 << 28, len(body), next_header, 64)
ip += socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
try:
    s.sendto(ip + body, (dst, 0))
    print('sent')
except OSError as e:
    print(e)
";

#[test]
fn ipv6_extension_header_chains_are_followed_and_routing_headers_denied() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let sniff_gw = Sniffer::start(&lab.gateway, &Lab::pod_sources());
    let send = |chain: &str| {
        let out = lab.in_pod(python(IPV6_CHAIN, &["fd00:231::2", DNS6, EXTERNAL6, chain]));
        assert!(out.status.success(), "the raw IPv6 client must run ({chain}):\n{}", text(&out));
    };
    // Options that route nothing: judged by the UDP header at the end of the chain.
    send("hop,dst");
    // (The sniffer reports the first next-header, hop-by-hop: 0.)
    assert_eq!(arrived(&sniff_gw), vec![(DNS6.parse().unwrap(), 0, 0)], "hop-by-hop and destination options");
    sniff_gw.clear();
    // A routing header (the next hop would forward it on), and a chain longer than any real one.
    send("hop,rt0");
    send("dst,dst,dst,dst,dst,dst,dst,dst,dst");
    assert_eq!(arrived(&sniff_gw), vec![], "routing headers and endless chains are dropped");
}

#[test]
fn a_program_attached_below_ours_cannot_override_it() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    // A container with CAP_BPF (or a tool on the node) attaches an allow-all packet program in
    // every mode, to a cgroup under the pod's and to the pod's own.
    let child = lab.pod_cgroup.join("sneaky");
    std::fs::create_dir_all(&child).expect("child cgroup");
    let allow_all = raw_bpf::load(raw_bpf::PROG_TYPE_CGROUP_SKB, 1).expect("loading an allow-all program");
    let child_dir = File::open(&child).expect("child cgroup");
    let pod_dir = File::open(&lab.pod_cgroup).expect("pod cgroup");
    for (dir, flags) in [(&child_dir, raw_bpf::F_ALLOW_MULTI), (&pod_dir, raw_bpf::F_ALLOW_MULTI)] {
        raw_bpf::prog_attach(&allow_all, dir, raw_bpf::ATTACH_CGROUP_INET_EGRESS, flags)
            .unwrap_or_else(|e| panic!("attaching with flags {flags}: {e}"));
    }
    // Exclusive or override attachments are refused where ours (multi) sits above.
    for flags in [0, raw_bpf::F_ALLOW_OVERRIDE] {
        let other = raw_bpf::load(raw_bpf::PROG_TYPE_CGROUP_SKB, 1).expect("loading");
        assert!(
            raw_bpf::prog_attach(&other, &pod_dir, raw_bpf::ATTACH_CGROUP_INET_EGRESS, flags).is_err(),
            "attaching with flags {flags} next to our multi-attached links must fail"
        );
    }
    for cgroup in [&child, &lab.pod_cgroup] {
        let out = lab.in_cgroup(cgroup, udp_sendto(EXTERNAL4, 9000));
        assert!(refused(&out), "from {}:\n{}", cgroup.display(), text(&out));
        let out = lab.in_cgroup(cgroup, python(FAST_OPEN, &[EXTERNAL4, EXTERNAL6]));
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(arrived(&sniffer), vec![], "ours still judges every packet");
}

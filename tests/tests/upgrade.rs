//! A program upgrade: another build of the agent (its programs differ, as after any image
//! update) takes over the pinned state of a running one, with the pod sending all along. The
//! cgroup links are replaced make-before-break (the new program is attached next to the old
//! one, then its pin renamed over the old pin), the tc programs in place (tcx: the link's program
//! swapped; clsact: the filter replaced at its handle). Nothing the pod may not send gets out
//! during the swap, and what it may send keeps flowing.

use std::{fs, io::Read as _, net::IpAddr, process::Stdio, time::Duration};

use egress_tests::{
    CGROUP_PROGRAMS,
    agent::Agent,
    frames,
    lab::{DNS4, EXTERNAL4, Lab, POD4, POD6},
    listen::Server,
    other_agent_bin,
    sniff::Sniffer,
    sock,
};

const RACE_SECONDS: f64 = 6.0;

/// For `RACE_SECONDS`: each round sends a packet-socket frame, a raw-socket UDP packet and an
/// ordinary datagram towards the external host (all forbidden; the socket hooks refuse the last
/// two with EPERM) and one datagram to DNS, whose echo it counts. Prints
/// `rounds allowed_replies` at the end.
fn racer_script(frame_hex: &str) -> String {
    format!(
        r#"
import socket, time
pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); pkt.bind(('eth0', 0))
frame = bytes.fromhex('{frame_hex}')
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.settimeout(0.2)
udp_header = (40001).to_bytes(2, 'big') + (9999).to_bytes(2, 'big') + (13).to_bytes(2, 'big') + b'\0\0' + b'exfil'
rounds = replies = 0
end = time.monotonic() + {RACE_SECONDS}
while time.monotonic() < end:
    rounds += 1
    pkt.send(frame)
    for s, data in ((raw, udp_header), (udp, b'exfil')):
        try:
            s.sendto(data, ('{EXTERNAL4}', 9999))
        except PermissionError:
            pass
    try:
        dns.sendto(b'q', ('{DNS4}', 53))
        dns.recv(16)
        replies += 1
    except (socket.timeout, PermissionError):
        pass
print(rounds, replies)
"#
    )
}

#[test]
fn another_build_takes_over_without_a_gap_while_the_pod_sends() {
    let lab = Lab::new();
    fs::write(lab.policy_path(), lab.policy_text_with_veth("enforce")).expect("policy");
    let mut old = Agent::start_build_on_node(&lab, &other_agent_bin());
    old.wait_for("tc layer applied", 1);
    let dns = Server::udp_echo(&lab.gateway, sock(DNS4, 53));
    let sniff = Sniffer::start(&lab.external, &[POD4.parse::<IpAddr>().unwrap(), POD6.parse().unwrap()]);
    let frame = frames::udp(
        frames::mac(&lab.pod, "eth0"),
        frames::mac(&lab.external, "eth0"),
        POD4.parse().unwrap(),
        EXTERNAL4.parse().unwrap(),
        9999,
        b"exfil",
    );
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let mut racer = lab
        .pod
        .command("python3", Some(&lab.pod_cgroup))
        .args(["-c", &racer_script(&hex)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the racer");

    // The upgrade, as the DaemonSet does it: the old agent stops, the new build starts and
    // takes over what is pinned, while the racer sends.
    egress_tests::wait_until("the racer's DNS queries answered", Duration::from_secs(5), || dns.hits() >= 5);
    old.kill9();
    let new = Agent::start_on_node(&lab);
    let applied = new.wait_for("policy applied", 1);
    assert_eq!(
        applied[0]["links_replaced"],
        CGROUP_PROGRAMS,
        "every cgroup link runs the new build: {}",
        new.log_text()
    );
    let tc = new.wait_for("tc layer applied", 1);
    let tc_swapped = tc[0]["links_replaced"].as_u64().unwrap() + tc[0]["links_adopted"].as_u64().unwrap();
    assert_eq!(tc_swapped, 2, "both tc programs swapped in place: {}", new.log_text());
    if tc[0]["mechanism"] == "tcx" {
        assert_eq!(tc[0]["links_replaced"], 2, "tcx links get the new build's programs: {}", new.log_text());
    }

    let status = racer.wait().expect("waiting for the racer");
    let mut out = String::new();
    racer.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    racer.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "the racer failed: {err}");
    let counts: Vec<u64> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
    let (rounds, replies) = (counts[0], counts[1]);
    assert!(rounds >= 100, "the racer kept sending through the swap: {out}");
    let leaked: Vec<_> = sniff.seen().into_iter().filter(|s| !s.is_link_housekeeping()).collect();
    assert_eq!(leaked, vec![], "nothing the pod may not send got out in {rounds} rounds");
    assert!(replies * 10 >= rounds * 9, "DNS kept answering through the swap: {replies} of {rounds}");
}

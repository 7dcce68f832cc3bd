//! The reply exemption lets an enforced workload answer whoever connected to it, and nothing
//! more: it covers TCP only (a listener's SYN-ACKs and the packets of connections the kernel
//! accepted), and it marks only connections that need it, so one pod cannot crowd the node-wide
//! table of marks with connections it makes to itself.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
};

use egress_tests::{
    agent::{self, Agent},
    lab::{EXTERNAL4, EXTERNAL6, Lab, POD4, POD6, text},
    sniff::Sniffer,
};

/// SCTP one-to-many sockets after listen(): in the LISTEN state value, while sendto() to a new
/// peer starts an association (INIT) and carries DATA. Prints "sent" or the error.
const SCTP_LISTENER_SENDS: &str = r"
import socket, sys
for family, peer in [(socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])]:
    s = socket.socket(family, socket.SOCK_SEQPACKET, socket.IPPROTO_SCTP)
    s.bind(('', 0))
    s.listen(8)
    try:
        s.sendto(b'exfiltrate', (peer, 9))
        print('sent')
    except OSError as e:
        print(e)
";

#[test]
#[ignore = "needs SCTP, which this host's kernel lacks: `cargo xtask vm` runs it on Debian's kernels"]
fn an_sctp_listener_cannot_send_to_a_forbidden_address() {
    let lab = Lab::new();
    let modprobe = std::process::Command::new("modprobe").arg("sctp").output().expect("running modprobe");
    assert!(
        modprobe.status.success(),
        "this test needs the kernel's SCTP support (`modprobe sctp` failed: {}); run it with `cargo xtask vm`",
        String::from_utf8_lossy(&modprobe.stderr).trim()
    );
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let out = lab.in_pod((
        "python3",
        vec!["-c".into(), SCTP_LISTENER_SENDS.into(), EXTERNAL4.into(), EXTERNAL6.into()],
    ));
    assert!(out.status.success(), "the SCTP client itself must run:\n{}", text(&out));
    let sctp: Vec<_> = sniffer.seen().into_iter().filter(|s| s.protocol == 132).collect();
    assert_eq!(sctp, vec![], "no SCTP chunk from a listening socket may arrive:\n{}", text(&out));
    let denial = agent.wait_until("egress deny", |e| e["protocol"] == "sctp" && e["dst"] == EXTERNAL4);
    assert_eq!(denial["hook"], "cgroup_skb/egress", "{denial}");
}

/// Listens on loopback and on the pod's own addresses; a child process in another cgroup (the
/// connect() hooks refuse the pod's own address, as a destination that is not loopback)
/// connects to each `count` times; every connection stays open. Prints "ready", then waits for
/// its input to close.
const LOOPBACK_CONNECTIONS: &str = r"
import os, socket, sys
count, pod4, pod6, other = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
listeners = []
for family, addr, dial in [
    (socket.AF_INET, '127.0.0.1', '127.0.0.1'),
    (socket.AF_INET, pod4, pod4),
    (socket.AF_INET6, '::1', '::1'),
    (socket.AF_INET6, pod6, pod6),
    (socket.AF_INET6, '::', '::ffff:127.0.0.1'),
]:
    l = socket.socket(family, socket.SOCK_STREAM)
    l.bind((addr, 0))
    l.listen(count)
    listeners.append((l, family, dial))
done_r, done_w = os.pipe()
if os.fork() == 0:
    with open(other + '/cgroup.procs', 'w') as f:
        f.write('0')
    held = []
    for l, family, dial in listeners:
        for _ in range(count):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.connect((dial, l.getsockname()[1]))
            held.append(c)
    os.write(done_w, b'x')
    sys.stdin.read()
    os._exit(0)
accepted = [l.accept()[0] for l, _, _ in listeners for _ in range(count)]
os.read(done_r, 1)
print('ready', flush=True)
sys.stdin.read()
";

/// Entries in the pinned passive-mark map.
fn marks_held(lab: &Lab) -> usize {
    let map = lab.pin_dir.join("maps/EGRESS_PASSIVE_V1");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool map dump {}:\n{}", map.display(), text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().map_or(0, Vec::len)
}

fn passive_marks(lab: &Lab) -> serde_json::Value {
    let out = agent::cli(lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect:\n{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["passive_marks"].clone()
}

/// Kills the held connections when dropped, so a failing assertion does not leave them.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn connections_over_loopback_take_no_reply_marks_and_marks_are_counted() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let child = lab
        .pod
        .command("python3", Some(&lab.pod_cgroup))
        .args(["-c", LOOPBACK_CONNECTIONS, "20", POD4, POD6])
        .arg(&lab.other_cgroup)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python3");
    let mut held = Held(child);
    let mut line = String::new();
    BufReader::new(held.0.stdout.take().expect("piped")).read_line(&mut line).expect("reading");
    assert_eq!(line.trim(), "ready", "the loopback connections did not open");
    assert_eq!(marks_held(&lab), 0, "100 accepted loopback connections are open; none needs a mark");
    assert_eq!(passive_marks(&lab)["marked"], 0);
    drop(held);

    // A peer outside connecting in does take a mark, counted, and released when it closes.
    let mut server = lab
        .pod
        .command("socat", Some(&lab.pod_cgroup))
        .args(["-T5", "TCP4-LISTEN:8080,reuseaddr", "SYSTEM:echo served"])
        .spawn()
        .expect("starting socat");
    egress_tests::listen::wait_listening(&lab.pod, 8080);
    let out = lab.external.run(None, "sh", &["-c", &format!("echo hi | socat -T2 - TCP4:{POD4}:8080")]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(String::from_utf8_lossy(&out.stdout).contains("served"), "{}", text(&out));
    egress_tests::wait_until("the mark to be released", std::time::Duration::from_secs(5), || {
        let m = passive_marks(&lab);
        m["marked"] == 1 && m["released"] == 1
    });
    assert_eq!(passive_marks(&lab)["evicted_in_use"], 0);
}

//! A scripted DNS server on UDP, for rebinding tests: each name has a list of IPv4 answers, one
//! per A query in turn (the last repeats), so the second lookup of a name can see another
//! address than the first. AAAA and other types get an empty NOERROR answer, names without a
//! script NXDOMAIN. TTL 0, as a rebinding attacker would set it. Stops on drop.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

const TYPE_A: u16 = 1;

struct Script {
    answers: Vec<Ipv4Addr>,
    /// A queries answered so far.
    asked: usize,
}

pub struct FakeDns {
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDns {
    /// Serves on `addr` (UDP) inside `ns`; returns once the socket is bound.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let scripts: Arc<Mutex<HashMap<String, Script>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, started) = mpsc::channel();
        let thread = ns.spawn({
            let (scripts, stop) = (scripts.clone(), stop.clone());
            move || {
                let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}/udp: {e}"));
                s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
                ready.send(()).expect("test waits");
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf)
                        && let Some(reply) = answer(&buf[..n], &scripts)
                    {
                        let _ = s.send_to(&reply, from);
                    }
                }
            }
        });
        started.recv_timeout(Duration::from_secs(5)).expect("fake DNS server did not start");
        Self { scripts, stop, thread: Some(thread) }
    }

    /// The A answers for `name`, one per query in turn; the last one repeats.
    pub fn script(&self, name: &str, answers: &[Ipv4Addr]) {
        assert!(!answers.is_empty(), "{name}: a script needs at least one answer");
        let script = Script { answers: answers.to_vec(), asked: 0 };
        self.scripts.lock().expect("scripts").insert(name.to_ascii_lowercase(), script);
    }

    /// How many A queries for `name` were answered.
    pub fn asked(&self, name: &str) -> usize {
        self.scripts.lock().expect("scripts").get(&name.to_ascii_lowercase()).map_or(0, |s| s.asked)
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to one query (RFC 1035 4.1), or `None` for what is not a query we can read.
fn answer(query: &[u8], scripts: &Mutex<HashMap<String, Script>>) -> Option<Vec<u8>> {
    let (name, question_end) = read_question(query)?;
    let qtype = u16::from_be_bytes([query[question_end - 4], query[question_end - 3]]);
    let mut scripts = scripts.lock().ok()?;
    let script = scripts.get_mut(&name);
    let found = script.is_some();
    let ip = match script {
        Some(s) if qtype == TYPE_A => {
            let ip = s.answers[s.asked.min(s.answers.len() - 1)];
            s.asked += 1;
            Some(ip)
        }
        _ => None,
    };
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    // QR, opcode 0, RD copied, RA; rcode NOERROR or NXDOMAIN.
    reply.push(0x80 | (query[2] & 0x01));
    reply.push(if found { 0x80 } else { 0x83 });
    reply.extend_from_slice(&[0, 1, 0, u8::from(ip.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let Some(ip) = ip {
        // A pointer to the question's name, type A, class IN, TTL 0, four bytes of address.
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// The question's name (lower case, no trailing dot) and where the question ends.
fn read_question(q: &[u8]) -> Option<(String, usize)> {
    // One question, no compression in it (a resolver sends none).
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*q.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let end = at + 4; // QTYPE, QCLASS
    (q.len() >= end).then(|| (labels.join("."), end))
}

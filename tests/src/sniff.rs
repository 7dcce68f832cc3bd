//! A packet sniffer inside a namespace: the proof that nothing arrived. It records every IPv4
//! and IPv6 packet seen on the namespace's interfaces whose source is one of the watched
//! addresses, whatever the protocol.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// 0 when the protocol has no ports.
    pub dport: u16,
    /// ICMPv6 type (0 for other protocols).
    pub icmp6_type: u8,
}

impl Seen {
    /// Neighbour discovery and multicast listener reports come from the kernel's own sockets,
    /// not from the workload; they are not traffic the policy governs. (Router advertisements
    /// and redirects are not among them: a host never sends those, so they are reported.)
    pub fn is_link_housekeeping(&self) -> bool {
        self.protocol == 58 && matches!(self.icmp6_type, 130..=133 | 135 | 136 | 143)
    }
}

pub struct Sniffer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// Starts sniffing in `ns` for packets from any of `sources`; returns once the socket is open.
    pub fn start(ns: &NetNs, sources: &[IpAddr]) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sources = sources.to_vec();
        let thread = ns.spawn({
            let seen = seen.clone();
            let stop = stop.clone();
            move || capture(&sources, &seen, &stop, &ready_tx)
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("sniffer socket did not open");
        Self { seen, stop, thread: Some(thread) }
    }

    /// What arrived so far, after giving in-flight packets a moment to land (longer on a slow
    /// VM: a check that nothing arrived must not end before a late packet could).
    pub fn seen(&self) -> Vec<Seen> {
        std::thread::sleep(crate::patience(Duration::from_millis(300)));
        self.seen
            .lock()
            .expect("sniffer lock")
            .iter()
            .filter(|s| !s.is_link_housekeeping())
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("sniffer lock").clear();
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn capture(sources: &[IpAddr], seen: &Mutex<Vec<Seen>>, stop: &AtomicBool, ready: &mpsc::Sender<()>) {
    // SAFETY: plain socket syscalls on a descriptor this function owns.
    let fd =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    ready.send(()).expect("test waits for the sniffer");
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        if let Some(s) = parse_frame(&buf[..n as usize]).filter(|s| sources.contains(&s.src)) {
            seen.lock().expect("sniffer lock").push(s);
        }
    }
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
}

fn parse_frame(f: &[u8]) -> Option<Seen> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let protocol = *ip.get(9)?;
            let src = IpAddr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            let dport = l4_port(protocol, ip.get(ihl..));
            Some(Seen { src, dst, protocol, dport, icmp6_type: 0 })
        }
        0x86dd => {
            let protocol = *ip.get(6)?;
            let src = IpAddr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            let l4 = ip.get(40..);
            let icmp6_type =
                if protocol == 58 { l4.and_then(|l| l.first().copied()).unwrap_or(0) } else { 0 };
            Some(Seen { src, dst, protocol, dport: l4_port(protocol, l4), icmp6_type })
        }
        _ => None,
    }
}

fn l4_port(protocol: u8, l4: Option<&[u8]>) -> u16 {
    match (protocol, l4) {
        (6 | 17 | 132, Some(l)) if l.len() >= 4 => u16::from_be_bytes([l[2], l[3]]),
        _ => 0,
    }
}

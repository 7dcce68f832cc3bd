//! Servers inside a namespace: a TCP server that answers HTTP and counts connections, and a UDP
//! server that echoes and counts datagrams. Both stop on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub struct Server {
    /// The peer of every connection accepted or datagram received, in order.
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// The test's own probe connections (`hits_before_probe`), which are not counted.
    probes: Mutex<Vec<SocketAddr>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Connections accepted (TCP) or datagrams received (UDP), probes included.
    pub fn hits(&self) -> usize {
        // A moment for late arrivals, longer on a slow VM (see `hits_before_probe` for the
        // exact count).
        std::thread::sleep(crate::patience(Duration::from_millis(200)));
        self.peers.lock().expect("peers").len()
    }

    /// Connections accepted before this call, without guessing how long a late one may take:
    /// opens one connection of its own to `addr` from `ns`, waits (bounded) until the server has
    /// accepted it, and returns how many it accepted before. A listener's accept queue is FIFO,
    /// so a connection that reached it before the probe has been counted by then.
    pub fn hits_before_probe(&self, ns: &NetNs, addr: SocketAddr) -> usize {
        let probe = ns.within(|| {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("probe connection to {addr}: {e}"));
            // Closed at once, so a server that reads after accepting is not held up by it.
            s.local_addr().expect("probe address")
        });
        let mut probes = self.probes.lock().expect("probes");
        probes.push(probe);
        let mut before = 0;
        crate::wait_until(&format!("{addr} to accept the probe connection"), Duration::from_secs(5), || {
            let peers = self.peers.lock().expect("peers");
            let Some(at) = peers.iter().position(|p| *p == probe) else { return false };
            before = peers[..at].iter().filter(|p| !probes.contains(p)).count();
            true
        });
        before
    }

    fn start(
        ns: &NetNs,
        body: impl FnOnce(Arc<Mutex<Vec<SocketAddr>>>, Arc<AtomicBool>, mpsc::Sender<()>) + Send + 'static,
    ) -> Self {
        let peers = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = ns.spawn({
            let (peers, stop) = (Arc::clone(&peers), stop.clone());
            move || body(peers, stop, tx)
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("server did not start");
        Self { peers, probes: Mutex::default(), stop, thread: Some(thread) }
    }

    pub fn tcp_http(ns: &NetNs, addr: SocketAddr) -> Self {
        Self::start(ns, move |peers, stop, ready| {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("test waits");
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        peers.lock().expect("peers").push(peer);
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    }

    /// Accepts TCP connections and keeps them open, discarding what arrives.
    pub fn tcp_sink(ns: &NetNs, addr: SocketAddr) -> Self {
        Self::start(ns, move |peers, stop, ready| {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("test waits");
            let mut open = Vec::new();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, peer)) = l.accept() {
                    peers.lock().expect("peers").push(peer);
                    let _ = s.set_nonblocking(true);
                    open.push(s);
                }
                for s in &mut open {
                    let _ = s.read(&mut buf);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    pub fn udp_echo(ns: &NetNs, addr: SocketAddr) -> Self {
        Self::start(ns, move |peers, stop, ready| {
            let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            ready.send(()).expect("test waits");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    peers.lock().expect("peers").push(from);
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until something in `ns` listens on TCP `port` (for servers started as processes, which
/// say nothing when they are ready); fails the test if nothing does in time.
pub fn wait_listening(ns: &NetNs, port: u16) {
    crate::wait_until(
        &format!("a TCP listener on port {port} in {}", ns.name),
        Duration::from_secs(5),
        || {
            let out = ns.run(None, "ss", &["-Htln", &format!("sport = :{port}")]);
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        },
    );
}

//! Servers inside a namespace: a TCP server that answers HTTP and counts connections, and a UDP
//! server that echoes and counts datagrams. Both stop on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub struct Server {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Connections accepted (TCP) or datagrams received (UDP).
    pub fn hits(&self) -> usize {
        std::thread::sleep(Duration::from_millis(200));
        self.hits.load(Ordering::SeqCst)
    }

    fn start(
        ns: &NetNs,
        body: impl FnOnce(Arc<AtomicUsize>, Arc<AtomicBool>, mpsc::Sender<()>) + Send + 'static,
    ) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = ns.spawn({
            let (hits, stop) = (hits.clone(), stop.clone());
            move || body(hits, stop, tx)
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("server did not start");
        Self { hits, stop, thread: Some(thread) }
    }

    pub fn tcp_http(ns: &NetNs, addr: SocketAddr) -> Self {
        Self::start(ns, move |hits, stop, ready| {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("test waits");
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        hits.fetch_add(1, Ordering::SeqCst);
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
        Self::start(ns, move |hits, stop, ready| {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("test waits");
            let mut open = Vec::new();
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = l.accept() {
                    hits.fetch_add(1, Ordering::SeqCst);
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
        Self::start(ns, move |hits, stop, ready| {
            let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            ready.send(()).expect("test waits");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    hits.fetch_add(1, Ordering::SeqCst);
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

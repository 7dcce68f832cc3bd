//! The traffic of `bench gateway`: one upstream server in the external namespace, and clients
//! in the pod namespace that reach it directly or through an HTTP proxy with CONNECT. Clients and
//! server are plain Rust sockets, so every path runs the very same code and only the hop in the
//! middle differs.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use egress_tests::{gateway::UPSTREAM4, netns::NetNs};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Echoes whatever arrives: tunnel churn, latency, idle tunnels.
pub const ECHO_PORT: u16 = 7000;
/// Reads a length (u64 LE), then that many bytes, then answers with the count: bulk throughput.
pub const SINK_PORT: u16 = 7001;
/// Every socket operation gives up after this, so a stuck proxy fails the run instead of
/// hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// What a ping carries. Not 22: a first byte of 22 makes the gateway read a TLS ClientHello
/// and check its SNI against the CONNECT target. Not a letter: the gateway reads a tunnel's
/// first bytes until it can tell whether they are an HTTP request (served and checked request
/// by request), and a lone letter could begin a method name (see `first_flight`).
const PING: u8 = b'#';
/// Round trips before the timed ones in [`latency`].
pub const WARM_UP_PINGS: usize = 200;

/// How a client reaches the upstream.
#[derive(Clone, Copy)]
pub enum Via {
    Direct,
    /// An HTTP proxy, asked with `CONNECT <upstream ip>:<port>`.
    Proxy(SocketAddr),
    /// A plain TCP relay to a fixed upstream port: no request, bytes only.
    Relay(SocketAddr),
}

fn upstream(port: u16) -> SocketAddr {
    SocketAddr::new(UPSTREAM4.parse().expect("literal"), port)
}

/// A connection to the upstream's `port`, through `via`, ready for payload.
pub fn open(via: Via, port: u16) -> io::Result<TcpStream> {
    let target = upstream(port);
    let first_hop = match via {
        Via::Direct => target,
        Via::Proxy(hop) | Via::Relay(hop) => hop,
    };
    let s = TcpStream::connect_timeout(&first_hop, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    if let Via::Proxy(_) = via {
        connect_through(&s, &target.to_string())?;
    }
    Ok(s)
}

/// Sends `CONNECT target` and reads the response head. The upstream only ever answers, so
/// nothing may follow the head yet; a read therefore never swallows tunnel bytes.
pub fn connect_through(mut s: &TcpStream, target: &str) -> io::Result<()> {
    // One write: with TCP_NODELAY, a formatted write would leave as several segments.
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut head = [0u8; 1024];
    let mut len = 0;
    loop {
        let n = s.read(&mut head[len..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection before answering CONNECT",
            ));
        }
        len += n;
        if let Some(end) = head[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]);
            let status_line = text.lines().next().unwrap_or_default();
            if status_line.split(' ').nth(1) != Some("200") {
                return Err(io::Error::other(format!("CONNECT {target} answered {status_line:?}")));
            }
            if end + 4 != len {
                return Err(io::Error::other("bytes after the CONNECT response before any were sent"));
            }
            return Ok(());
        }
        if len == head.len() {
            return Err(io::Error::other("CONNECT response head longer than 1 KiB"));
        }
    }
}

/// One byte there and back.
pub fn ping(mut s: &TcpStream) -> io::Result<()> {
    s.write_all(&[PING])?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back)?;
    if back[0] != PING {
        return Err(io::Error::other(format!("echo returned {:#04x}", back[0])));
    }
    Ok(())
}

/// Sends `mib` MiB through one connection to the sink; Gbit/s from the first byte sent to the
/// sink's acknowledgement of the last. The length goes first and the sink acknowledges after
/// that many bytes, because not every proxy relays a half-close (squid closes the tunnel).
pub fn bulk(via: Via, mib: u64) -> io::Result<f64> {
    let mut s = open(via, SINK_PORT)?;
    let total = mib << 20;
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    s.write_all(&total.to_le_bytes())?;
    for _ in 0..mib {
        s.write_all(&chunk)?;
    }
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let secs = started.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(ack);
    if got != total {
        return Err(io::Error::other(format!("the sink received {got} bytes of {total}")));
    }
    Ok(total as f64 * 8.0 / secs / 1e9)
}

/// Round-trip times (µs) of `pings` 1-byte messages in one connection, after a short warm-up.
pub fn latency(via: Via, pings: usize) -> io::Result<Vec<f64>> {
    let s = open(via, ECHO_PORT)?;
    for _ in 0..WARM_UP_PINGS {
        ping(&s)?;
    }
    let mut rtts = Vec::with_capacity(pings);
    for _ in 0..pings {
        let t = Instant::now();
        ping(&s)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(rtts)
}

/// Tunnel churn: how many open-echo-close cycles `threads` clients complete in `seconds`.
pub struct Churn {
    pub done: u64,
    pub per_second: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

pub fn churn(via: Via, seconds: f64, threads: usize) -> Churn {
    // Dropping the stream closes it (FIN): the proxy sees an ordinary close.
    churn_of(|| open(via, ECHO_PORT).and_then(|s| ping(&s)), seconds, threads)
}

/// How many `cycle`s `threads` clients complete in `seconds`, each thread calling it in a loop.
pub fn churn_of(cycle: impl Fn() -> io::Result<()> + Sync, seconds: f64, threads: usize) -> Churn {
    let cycle = &cycle;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let per_thread: Vec<(u64, u64, Option<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                // Scoped threads start in the calling thread's network namespace.
                scope.spawn(move || {
                    let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
                    while Instant::now() < deadline {
                        match cycle() {
                            Ok(()) => done += 1,
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    (done, errors, first_error)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("churn client panicked")).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let done = per_thread.iter().map(|t| t.0).sum::<u64>();
    Churn {
        done,
        per_second: done as f64 / secs,
        errors: per_thread.iter().map(|t| t.1).sum(),
        first_error: per_thread.into_iter().find_map(|t| t.2),
    }
}

/// `n` established tunnels, each after one echo (so every proxy has reached its relaying
/// state), to be held open by the caller.
pub fn idle(via: Via, n: usize) -> io::Result<Vec<TcpStream>> {
    (0..n)
        .map(|i| {
            let s = open(via, ECHO_PORT).map_err(|e| io::Error::new(e.kind(), format!("tunnel {i}: {e}")))?;
            ping(&s)?;
            Ok(s)
        })
        .collect()
}

/// The upstream: an echo and a sink listener on the external host's public address, on one
/// tokio thread inside the external namespace. Stopped on drop.
pub struct Upstream {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(ns: &NetNs) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread = ns.spawn(move || {
            if let Err(e) = serve(&ready_tx, stop_rx) {
                let _ = ready_tx.send(Err(e));
            }
        });
        let mut upstream = Self { stop: Some(stop_tx), thread: Some(thread) };
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => Ok(upstream),
            Ok(Err(e)) => {
                upstream.stop();
                Err(e).with_context(|| format!("starting the upstream server on {UPSTREAM4}"))
            }
            Err(_) => {
                upstream.stop();
                anyhow::bail!("the upstream server on {UPSTREAM4} did not start")
            }
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(ready: &mpsc::Sender<io::Result<()>>, stop: tokio::sync::oneshot::Receiver<()>) -> io::Result<()> {
    // Bound here, on the thread that entered the namespace; the runtime below runs on it too.
    let ip: IpAddr = UPSTREAM4.parse().expect("literal");
    let bind = |port| -> io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind((ip, port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let (echo, sink) = (bind(ECHO_PORT)?, bind(SINK_PORT)?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let echo = tokio::net::TcpListener::from_std(echo)?;
        let sink = tokio::net::TcpListener::from_std(sink)?;
        let _ = ready.send(Ok(()));
        tokio::select! {
            () = accept_loop(echo, echo_conn) => {}
            () = accept_loop(sink, sink_conn) => {}
            _ = stop => {}
        }
        Ok(())
    })
}

async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handle(s));
            }
            // Out of descriptors and the like: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn echo_conn(mut s: tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sink_conn(mut s: tokio::net::TcpStream) {
    let mut len = [0u8; 8];
    if s.read_exact(&mut len).await.is_err() {
        return;
    }
    let total = u64::from_le_bytes(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < total {
        let want = buf.len().min((total - got) as usize);
        match s.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n as u64,
        }
    }
    let _ = s.write_all(&got.to_le_bytes()).await;
}

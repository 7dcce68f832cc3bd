//! The gateway's worker threads: a single-threaded tokio runtime on each, and a copy of every
//! listener per worker (SO_REUSEPORT), so a connection is accepted, authorised and relayed on
//! one thread from its first byte to its last. No task moves between threads and no thread
//! wakes another to share work (a work-stealing runtime wakes idle workers for new tasks,
//! which on a busy node costs wake-ups that do nothing useful). The kernel spreads new
//! connections over the copies by their addresses; Envoy and nginx's `reuseport` work the
//! same way.
//!
//! The process's control (signals, reloads, admin endpoint, drain) runs on the main thread's
//! own runtime and reaches the workers through their handles.

use std::{net::SocketAddr, thread::JoinHandle};

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each idle until given listeners.
    pub fn start(n: usize) -> Result<Self> {
        let stop = CancellationToken::new();
        let mut workers = Self { handles: Vec::new(), threads: Vec::new(), stop: stop.clone() };
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a gateway worker's runtime")?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("gateway-worker-{i}"))
                // Tasks of a current-thread runtime run only inside its block_on. Leaving it
                // drops the runtime, and with it every task still there.
                .spawn(move || runtime.block_on(stop.cancelled()))
                .context("starting a gateway worker thread")?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Ends every worker and waits for the threads; tasks still running are dropped.
    pub fn stop(mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // An error return from `run` must not leave threads serving behind it.
        self.stop.cancel();
    }
}

/// The threads to start by default: the CPUs this process may use (which counts a cgroup's CPU
/// quota, so a pod limited to two CPUs gets two workers on a 64-core node).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `copies` listening sockets on `addr`, one per worker. Several copies share the port with
/// SO_REUSEPORT; a single one binds it alone, as any other server would.
pub fn bind_copies(addr: SocketAddr, copies: usize) -> Result<Vec<std::net::TcpListener>> {
    (0..copies.max(1))
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if copies > 1 {
                socket.set_reuse_port(true)?;
            }
            if addr.is_ipv6() {
                // `[::]` also takes IPv4 clients (as mapped addresses, which identities normalise).
                socket.set_only_v6(false)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .collect()
}

//! Moves bytes between a client and its upstream once a tunnel is allowed.
//!
//! Small messages are copied through a buffer that belongs to the worker thread, not the tunnel;
//! bulk transfers go socket -> pipe -> socket with splice(2), so they never enter this process.
//! An idle tunnel holds no buffer (its task, and pipes only if it ever moved bulk data), and
//! bulk costs no copies in userspace. Each direction ends with a half-close, so protocols that shut down
//! one side (HTTP/1.0 clients, `nc -q`) keep working; a tunnel with no traffic either way for
//! the idle timeout is closed.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncWriteExt as _, Interest},
    net::TcpStream,
};

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
}

/// How a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their sending half (or one side reset the connection).
    Closed,
    Idle,
    /// The gateway is shutting down and the drain deadline passed.
    Cancelled,
}

/// The largest chunk one splice moves, and the pipe size asked for in bulk mode.
const CHUNK: usize = 1 << 20;

/// Relays until both directions finish, the tunnel idles out, or `cancel` fires. `first_up`
/// holds bytes the gateway already read from the client (a peeked ClientHello, bytes after a
/// CONNECT head); they are sent upstream first.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    first_up: Vec<u8>,
    idle: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> (Moved, Ended) {
    let activity = Activity::new();
    let mut moved = Moved::default();
    if !first_up.is_empty() {
        if write_all(upstream, &first_up).await.is_err() {
            return (moved, Ended::Closed);
        }
        moved.up = first_up.len() as u64;
    }
    // Not kept for the tunnel's lifetime.
    drop(first_up);
    let up_count = AtomicU64::new(0);
    let down_count = AtomicU64::new(0);
    let both = async {
        let (a, b) = tokio::join!(
            one_way(client, upstream, &up_count, &activity),
            one_way(upstream, client, &down_count, &activity)
        );
        if let Err(e) = a.and(b) {
            tracing::debug!(error = %e, "tunnel ended with an error");
        }
    };
    let ended = tokio::select! {
        () = both => Ended::Closed,
        () = activity.idle_for(idle) => Ended::Idle,
        () = cancel.cancelled() => Ended::Cancelled,
    };
    moved.up += up_count.load(Ordering::Relaxed);
    moved.down += down_count.load(Ordering::Relaxed);
    (moved, ended)
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction, until EOF; then half-close `to`. Errors (a reset) also end the direction, and
/// the other one with it.
///
/// Small messages (requests, handshakes, interactive traffic) go through one read and one
/// write with a buffer borrowed from the worker thread, which holds nothing between messages.
/// The first read that fills that buffer marks a bulk transfer: from then on the direction
/// splices through its own pipe, enlarged so that each pair of calls moves up to 1 MiB.
async fn one_way(from: &TcpStream, to: &TcpStream, count: &AtomicU64, activity: &Activity) -> io::Result<()> {
    let result = async {
        let mut bulk = None;
        loop {
            if let Some((pipe_r, pipe_w)) = &bulk {
                if !splice_once(from, to, pipe_r, pipe_w, count, activity).await? {
                    return Ok(());
                }
                continue;
            }
            from.readable().await?;
            let step = SMALL.with(|buf| copy_small(from, to, &mut buf.borrow_mut()[..]));
            match step {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(Small { read: 0, .. }) => return Ok(()),
                Ok(Small { read, unwritten }) => {
                    activity.touch();
                    count.fetch_add((read - unwritten.len()) as u64, Ordering::Relaxed);
                    // The receiver is slower than the sender: keep the rest until it drains.
                    write_all(to, &unwritten).await?;
                    count.fetch_add(unwritten.len() as u64, Ordering::Relaxed);
                    if read == SMALL_BUF {
                        bulk = Some(bulk_pipe()?);
                    }
                }
            }
        }
    }
    .await;
    // SAFETY: shutdown(2) on a socket fd this stream owns; the stream stays valid.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    if result.is_err() {
        // Wake the other direction: its peer will not send anything useful any more.
        // SAFETY: as above.
        unsafe { libc::shutdown(from.as_raw_fd(), libc::SHUT_RD) };
    }
    result
}

/// The per-thread buffer for small messages.
const SMALL_BUF: usize = 16 * 1024;

thread_local! {
    static SMALL: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; SMALL_BUF].into_boxed_slice());
}

struct Small {
    read: usize,
    /// What the receiving socket did not take at once (usually nothing).
    unwritten: Vec<u8>,
}

/// One non-blocking read and an immediate write of what it got.
fn copy_small(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> io::Result<Small> {
    let read = from.try_read(buf)?;
    let written = match to.try_write(&buf[..read]) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    Ok(Small { read, unwritten: buf[written..read].to_vec() })
}

/// Splices one chunk from `from` through the pipe into `to`; `false` at EOF.
async fn splice_once(
    from: &TcpStream,
    to: &TcpStream,
    pipe_r: &OwnedFd,
    pipe_w: &OwnedFd,
    count: &AtomicU64,
    activity: &Activity,
) -> io::Result<bool> {
    let n = from.async_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)).await?;
    if n == 0 {
        return Ok(false);
    }
    activity.touch();
    let mut left = n;
    while left > 0 {
        let m = to.async_io(Interest::WRITABLE, || splice(pipe_r.as_raw_fd(), to.as_raw_fd(), left)).await?;
        left -= m;
        count.fetch_add(m as u64, Ordering::Relaxed);
        activity.touch();
    }
    Ok(true)
}

/// A pipe for a bulk direction, enlarged to [`CHUNK`] where the system allows (pipe pages are
/// only allocated while data sits in them; over the per-user pipe budget it stays at 64 KiB).
fn bulk_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe()?;
    // SAFETY: fcntl on a pipe fd we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds that stay open for the call; null offsets (streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// The last time bytes moved, for the idle timeout.
/// When something last moved: tunnels idle out, and a forwarded request waits for its response,
/// counting from it. Starts "now".
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Writes everything and flushes: for short replies (status lines, TLS alerts) before closing.
pub async fn reply_and_close(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(&client_side, &upstream_side, b"hello ".to_vec(), Duration::from_secs(5), &cancel).await
        });
        let big = vec![7u8; 1 << 20];
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 6 + big.len());
        assert_eq!(&got[..6], b"hello ");
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let (moved, ended) = relay.await.unwrap();
        assert_eq!(moved, Moved { up: 6 + (1 << 20), down: 3 });
        assert_eq!(ended, Ended::Closed);
    }

    #[tokio::test]
    async fn idle_tunnels_close() {
        let (_client, client_side) = pair().await;
        let (upstream_side, _server) = pair().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let t = Instant::now();
        let (_, ended) =
            relay(&client_side, &upstream_side, Vec::new(), Duration::from_millis(200), &cancel).await;
        assert_eq!(ended, Ended::Idle);
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}

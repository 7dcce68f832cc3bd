//! The client socket as hyper reads it, with every byte also fed to the request [`Framer`], so
//! the framing the client sent is judged before hyper normalises it away. Bytes the gateway read
//! before hyper took over (the start of a request inside a CONNECT tunnel) come first.

use std::{
    io::IoSlice,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::Framer;

/// Bytes read from and written to the client, for the access-log line of a tunnel that carried
/// HTTP.
#[derive(Default)]
pub struct IoCounts {
    pub read: AtomicU64,
    pub written: AtomicU64,
}

pub struct Sniffed<T> {
    pub inner: T,
    pub framer: Arc<Mutex<Framer>>,
    /// Read already, not yet handed to hyper.
    pub pending: Vec<u8>,
    pub moved: Arc<IoCounts>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = if self.pending.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.drain(..n);
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            self.moved.read.fetch_add(new.len() as u64, Ordering::Relaxed);
            if let Ok(mut f) = self.framer.lock() {
                f.feed(new);
            }
        }
        polled
    }
}

impl<T> Sniffed<T> {
    fn count_written(&self, polled: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = polled {
            self.moved.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count_written(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count_written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

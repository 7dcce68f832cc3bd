//! Bodies of forwarded HTTP requests and responses as they pass through the gateway: their
//! bytes are counted, the access-log line is written when the response body ends, and a body
//! that stops flowing ends with an error. Without that idle timer a client dripping its
//! request body, or an upstream that stalls mid-response, would hold a connection slot (of
//! `maxConnectionsPerSource`, `maxConnections`) for as long as it liked.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::{connection::Connection, relay::Activity};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

pub fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

/// The error a body ends with when nothing came for its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdle(Duration);

/// What one forwarded exchange shares between its two bodies and the wait for the response.
#[derive(Default)]
pub struct Exchange {
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Set when the request body stalled, so a failed send is answered 408, not 502.
    pub request_stalled: AtomicBool,
    /// Any progress either way: the wait for the response head counts from the last of it, so a
    /// long upload that keeps moving is not cut by the response timeout.
    pub activity: Activity,
}

/// Writes a forwarded request's access-log line when its response body ends (or is dropped),
/// so the line has the bytes and the full duration.
pub struct Finisher {
    /// The request, finished (logged and counted) when the response body is done.
    pub conn: Option<Connection>,
    pub exchange: Arc<Exchange>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.record.bytes_up = self.exchange.up.load(Ordering::Relaxed);
            conn.record.bytes_down = self.exchange.down.load(Ordering::Relaxed);
            conn.finish();
        }
    }
}

/// A body that counts its data bytes, errs after `idle` without a frame, and (a response body)
/// finishes the record when it is done.
pub struct Counted {
    inner: Incoming,
    exchange: Arc<Exchange>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    done: Option<Finisher>,
}

impl Counted {
    /// The request body: counted up, a stall marks the exchange.
    pub fn request(inner: Incoming, exchange: Arc<Exchange>, idle: Duration) -> Self {
        Self { inner, exchange, idle, timer: Box::pin(tokio::time::sleep(idle)), done: None }
    }

    /// The response body: counted down, and `done` writes the record at the end.
    pub fn response(inner: Incoming, done: Finisher, idle: Duration) -> Self {
        let exchange = done.exchange.clone();
        Self { inner, exchange, idle, timer: Box::pin(tokio::time::sleep(idle)), done: Some(done) }
    }

    fn count(&self, n: usize) {
        let counter = if self.done.is_some() { &self.exchange.down } else { &self.exchange.up };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.exchange.activity.touch();
    }

    fn stalled(&mut self) -> BoxError {
        match self.done.as_mut().and_then(|d| d.conn.as_mut()) {
            // The upstream stopped mid-response: what came was passed on, the rest never will be.
            Some(conn) => conn.record.fail("response_timeout"),
            None => self.exchange.request_stalled.store(true, Ordering::Relaxed),
        }
        self.done.take();
        Box::new(BodyIdle(self.idle))
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.count(data.len());
                }
                let idle = this.idle;
                this.timer.as_mut().reset(Instant::now() + idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(this.stalled()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

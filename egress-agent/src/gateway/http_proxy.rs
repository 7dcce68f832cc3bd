//! The HTTP listeners, on hyper: the proxy port (CONNECT tunnels and absolute-form forwarding),
//! the transparent HTTP port (routed by Host) and the TLS origination port (plain HTTP in,
//! HTTPS out), and plain HTTP/1 inside a CONNECT tunnel. Every request is authorised on its own,
//! also on a kept-alive connection; an upstream connection is reused only for the same
//! destination after the new request passed.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, client::conn::http1::SendRequest, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};

use super::{
    connect_tunnel::{self, Connected},
    connection::{Connection, Hop},
    forward_body::{Body, Counted, Exchange, Finisher, empty, full},
    framing::Framer,
    policy::{Deny, Target},
    refusal::Refusal,
    slots::Slot,
    sniffed_io::{IoCounts, Sniffed},
};

mod rewrite;
mod route;

use rewrite::{rewrite_request, strip_hop_by_hop};

/// Which HTTP listener a connection came in on.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `HTTP_PROXY`/`HTTPS_PROXY` clients: CONNECT and absolute-form requests.
    Proxy,
    /// Origin-form requests routed by Host; this port when Host has none.
    Transparent { default_port: u16 },
    /// Origin-form requests routed by Host, sent on over verified TLS.
    Originate,
    /// Plain HTTP/1 inside a CONNECT tunnel: Host must name the tunnel's target.
    Tunneled,
}

impl Mode {
    pub fn listener(self) -> &'static str {
        match self {
            Self::Proxy | Self::Tunneled => "http_proxy",
            Self::Transparent { .. } => "http_transparent",
            Self::Originate => "tls_origination",
        }
    }
}

/// One client connection: the target step of each request, by this listener's rules.
struct Conn {
    /// The client: its identity, and where requests are logged from. Requests are connections
    /// of their own ([`Connection::request`]).
    client: Connection,
    mode: Mode,
    requests: AtomicUsize,
    /// The connection's slot under the cap; a CONNECT tunnel takes it along, since the tunnel
    /// outlives the HTTP connection.
    slot: std::sync::Mutex<Option<Slot>>,
    /// The framing verdict of each request, judged from the raw bytes (see `framing`).
    framer: Arc<std::sync::Mutex<Framer>>,
    pool: Mutex<Option<Pooled>>,
    /// `Mode::Tunneled`: the CONNECT target and port every request must name.
    tunnel: Option<(Target, u16)>,
}

/// The upstream connection of the previous request, kept for the next one to the same place.
struct Pooled {
    target: Target,
    port: u16,
    upstream: Option<SocketAddr>,
    /// The parent proxy it goes through (a tunnel through it, or the parent itself), as the
    /// access log shows it: a kept connection serves a later request only while that is still
    /// the parent, so a reload to another parent never sends its credentials to this one.
    via: Option<Arc<str>>,
    /// A connection to the parent itself: requests go in absolute form, with its credentials.
    absolute_form: bool,
    sender: SendRequest<Body>,
}

/// Serves one client connection until it closes, errs, or the drain deadline passes.
pub async fn serve(mut conn: Connection, stream: TcpStream, mode: Mode) {
    if let Err(deny) = conn.admit() {
        return refuse_connection(conn, stream, deny).await;
    }
    let _ = stream.set_nodelay(true);
    serve_conn(Conn::new(conn, mode), stream, Vec::new()).await;
}

/// Serves the plain HTTP/1 a client sent inside a CONNECT tunnel (`first`: what was read of it
/// already) as forwarded requests, each checked: Host must name the tunnel's target. The
/// tunnel's upstream connection serves the first request. The caller (`tunnel`) holds the
/// connection's slot. Returns the bytes read from and written to the client.
///
/// Boxed with its `Send` spelled out: serving HTTP leads back here (a CONNECT whose tunnel
/// carries HTTP), and the compiler cannot infer that of a future that contains itself.
pub fn serve_tunneled(
    tunnel_conn: &Connection,
    client: TcpStream,
    first: Vec<u8>,
    tunnel: Connected,
) -> Pin<Box<dyn Future<Output = (u64, u64)> + Send>> {
    let mut conn = Conn::new(tunnel_conn.request(Mode::Tunneled.listener()), Mode::Tunneled);
    let upstream = tunnel_conn.record.upstream;
    let via = tunnel_conn.record.via.clone();
    Box::pin(async move {
        if let Ok(sender) = handshake(tunnel.upstream).await {
            conn.pool = Mutex::new(Some(Pooled {
                target: tunnel.target.clone(),
                port: tunnel.port,
                upstream,
                via,
                absolute_form: false,
                sender,
            }));
        }
        conn.tunnel = Some((tunnel.target, tunnel.port));
        serve_conn(conn, client, first).await
    })
}

impl Conn {
    fn new(mut client: Connection, mode: Mode) -> Self {
        let slot = client.take_slot();
        let framer = Framer::new(client.live.limits.max_header_bytes);
        Self {
            client,
            mode,
            requests: AtomicUsize::new(0),
            slot: std::sync::Mutex::new(slot),
            framer: Arc::new(std::sync::Mutex::new(framer)),
            pool: Mutex::new(None),
            tunnel: None,
        }
    }
}

/// Serves until the connection ends; returns the bytes read from and written to the client.
async fn serve_conn(conn: Conn, stream: TcpStream, pending: Vec<u8>) -> (u64, u64) {
    let conn = Arc::new(conn);
    let gateway = conn.client.gateway().clone();
    let limits = conn.client.live.limits;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        })
    };
    let moved = Arc::new(IoCounts::default());
    let io = Sniffed { inner: stream, framer: conn.framer.clone(), pending, moved: moved.clone() };
    let mut served = Box::pin(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = &mut served => break r,
            // Draining: finish the request in flight, then close instead of keeping alive. A
            // tunnel opened before the drain may finish, as byte tunnels do (until the deadline).
            () = gateway.drain.cancelled(), if !closing && conn.tunnel.is_none() => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            () = gateway.cancel.cancelled() => break Ok(()),
        }
    };
    // The service, and with it every other reference to the connection, goes with hyper's.
    drop(served);
    let counts = (moved.read.load(Ordering::Relaxed), moved.written.load(Ordering::Relaxed));
    // Errors before any request was read are refusals worth a log line; after that, a timeout
    // is just an idle keep-alive connection closing.
    let Err(e) = result else { return counts };
    let first = conn.requests.load(Ordering::Relaxed) == 0;
    let reason = if e.is_parse_too_large() {
        Deny::HeaderTooLarge
    } else if e.is_parse() || e.is_parse_status() {
        Deny::BadRequest
    } else if e.is_timeout() && first {
        Deny::HeaderTimeout
    } else {
        tracing::debug!(error = %e, "client connection ended with an error");
        return counts;
    };
    let client = match Arc::try_unwrap(conn) {
        Ok(conn) => {
            // The line is written before the slot is freed: a drain that sees no connection
            // left flushes the log, and this line must already be in it.
            let mut client = conn.client;
            client.hold(conn.slot.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
            client
        }
        Err(conn) => conn.client.request(conn.mode.listener()),
    };
    client.refuse(reason.into());
    counts
}

/// Answers a connection that gets no slot (cap reached, draining) with 503 (429 for the
/// per-client cap) and closes it.
async fn refuse_connection(mut conn: Connection, mut stream: TcpStream, deny: Deny) {
    let status = status_for(deny.into());
    conn.record.status = Some(status.as_u16());
    let body = format!("egress gateway: {}\n", deny.name());
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nX-Egressfw-Reason: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        deny.name()
    );
    super::relay::reply_and_close(&mut stream, head.as_bytes()).await;
    conn.refuse(deny.into());
}

impl Conn {
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut rc = self.client.request(self.mode.listener());
        rc.record.method = Some(req.method().to_string());
        // What the client asked for, as sent, until the checks below produce the normalised form.
        rc.record.authority = match (self.mode, req.uri().authority()) {
            (Mode::Proxy, Some(a)) => Some(a.to_string()),
            _ => req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned),
        };
        let (target, port) = match self.destination(&req, &rc.live) {
            Ok(d) => d,
            Err(deny) => return self.refuse(rc, deny.into()),
        };
        rc.record.authority = Some(format!("{target}:{port}"));
        if req.method() != Method::CONNECT {
            return self.forward(req, rc, target, port).await;
        }
        match rc.dial(&target, port).await {
            Ok(up) => {
                let tunnel = Connected {
                    upstream: up.stream,
                    target,
                    port,
                    allow_h2_prior_knowledge: up.grant.allow_h2_prior_knowledge,
                };
                rc.hold(self.slot.lock().ok().and_then(|mut s| s.take()));
                tokio::spawn(connect_tunnel::after_connect(rc, req, tunnel));
                Response::new(empty())
            }
            Err(refusal) => self.refuse(rc, refusal),
        }
    }

    /// Forwards a plain HTTP request (absolute-form or routed by Host) and streams the answer.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        mut rc: Connection,
        target: Target,
        port: u16,
    ) -> Response<Body> {
        let mut pool = self.pool.lock().await;
        // The new request is authorised like any other; only then may a kept connection serve it.
        let reusable = match pool.as_mut() {
            Some(p) if p.target == target && p.port == port && !p.sender.is_closed() => {
                match rc.authorise(&target, port) {
                    Ok(grant) => {
                        // The kept connection's address is judged again too (a reload may have
                        // closed the range it is in, or changed the parent proxy).
                        let still_dialable = if let Some(via) = &p.via {
                            still_through_parent(&rc, &grant, &target, via)
                        } else {
                            p.upstream.is_some_and(|a| {
                                rc.live
                                    .policy
                                    .dialable(&grant, &target, &[a.ip()])
                                    .is_ok_and(|d| d == [a.ip()])
                            })
                        };
                        rc.record.allow(grant.matched);
                        rc.record.upstream = p.upstream;
                        rc.record.via.clone_from(&p.via);
                        still_dialable && p.sender.ready().await.is_ok()
                    }
                    Err(deny) => return self.refuse(rc, deny.into()),
                }
            }
            _ => false,
        };
        if !reusable {
            *pool = None;
            match self.open(&mut rc, &target, port).await {
                Ok(p) => *pool = Some(p),
                Err(refusal) => return self.refuse(rc, refusal),
            }
        }
        let Some(p) = pool.as_mut() else { unreachable!("set above") };

        let exchange = Arc::new(Exchange::default());
        let limits = rc.live.limits;
        let parent = if p.absolute_form { rc.live.parent.as_deref() } else { None };
        rewrite_request(&mut req, &target, port, self.mode, parent);
        let req = req.map(|b| Counted::request(b, exchange.clone(), limits.request_body_timeout).boxed());
        // The upstream may stay silent for responseTimeout after the last request bytes moved
        // (a long upload that keeps moving is not cut).
        let sent = tokio::select! {
            r = p.sender.send_request(req) => r.map_err(|e| {
                tracing::debug!(error = %e, "upstream request failed");
                if exchange.request_stalled.load(Ordering::Relaxed) {
                    Refusal::RequestBodyTimeout
                } else {
                    Refusal::ConnectFailed
                }
            }),
            () = exchange.activity.idle_for(limits.response_timeout) => Err(Refusal::ResponseTimeout),
        };
        let response = match sent {
            Ok(r) => r,
            Err(refusal) => {
                *pool = None;
                return self.refuse(rc, refusal);
            }
        };
        rc.record.status = Some(response.status().as_u16());
        let mut response = response.map(|b| {
            let done = Finisher { conn: Some(rc), exchange };
            Counted::response(b, done, limits.response_timeout).boxed()
        });
        strip_hop_by_hop(response.headers_mut());
        // The client's hop is ours: an HTTP/1.0 upstream must not make hyper close the client
        // connection (hyper re-frames the body for the client).
        *response.version_mut() = http::Version::HTTP_11;
        response
    }

    /// A new upstream connection (checked dial, then TLS when originating) with its HTTP/1 client.
    async fn open(&self, rc: &mut Connection, target: &Target, port: u16) -> Result<Pooled, Refusal> {
        // Plain HTTP goes to a parent proxy as absolute-form requests; originated TLS needs a
        // tunnel through it.
        let hop = if matches!(self.mode, Mode::Originate) { Hop::Tunnel } else { Hop::Forward };
        let dialed = rc.dial_as(target, port, hop).await?;
        let via = if dialed.via_parent { rc.record.via.clone() } else { None };
        let absolute_form = dialed.via_parent && hop == Hop::Forward;
        let tcp = dialed.stream;
        let upstream = rc.record.upstream;
        let live = rc.live.clone();
        let sender = match (self.mode, &live.originator, target) {
            (Mode::Originate, Some(originator), Target::Name(name)) => {
                let tls = tokio::time::timeout(live.limits.connect_timeout, originator.handshake(tcp, name))
                    .await
                    .map_err(|_| Refusal::ConnectTimeout)?
                    .map_err(|e| {
                        tracing::info!(host = %name, error = %e, "upstream TLS handshake failed");
                        Refusal::TlsFailed
                    })?;
                handshake(tls).await?
            }
            _ => handshake(tcp).await?,
        };
        Ok(Pooled { target: target.clone(), port, upstream, via, absolute_form, sender })
    }

    /// A denial or failure: logged and counted now, answered with a status and the reason.
    fn refuse(&self, mut rc: Connection, refusal: Refusal) -> Response<Body> {
        let status = status_for(refusal);
        rc.record.status = Some(status.as_u16());
        rc.refuse(refusal);
        let mut r = Response::new(full(format!("egress gateway: {}\n", refusal.reason())));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-egressfw-reason", HeaderValue::from_static(refusal.reason()));
        // Framing or request errors leave the connection in an unknown state, and an unread
        // request body would be taken for the next request: close it. Inside a tunnel the
        // client asked for one host only; one that asks for another gets no second try.
        if self.tunnel.is_some()
            || matches!(
                refusal,
                Refusal::Deny(Deny::AmbiguousFraming | Deny::BadRequest | Deny::BadTarget)
                    | Refusal::RequestBodyTimeout
            )
        {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// A kept connection through parent `via` may serve an allowed request while `via` is still the
/// parent and covers the target (a reload may have changed either) and, for an IP literal, the
/// ranges still allow the address.
fn still_through_parent(
    rc: &Connection,
    grant: &crate::gateway::policy::Grant,
    target: &Target,
    via: &Arc<str>,
) -> bool {
    let covered = rc.live.parent.as_ref().is_some_and(|p| p.shown == *via && p.covers(target));
    covered
        && match target {
            Target::Ip(ip) => rc.live.policy.dialable(grant, target, &[*ip]).is_ok(),
            Target::Name(_) => true,
        }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Body>, Refusal>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|_| Refusal::ConnectFailed)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

pub fn status_for(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::Deny(d) => match d {
            Deny::BadRequest | Deny::BadTarget | Deny::AmbiguousFraming => StatusCode::BAD_REQUEST,
            Deny::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Deny::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Deny::TooManyConnections | Deny::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Deny::SourceLimit => StatusCode::TOO_MANY_REQUESTS,
            Deny::ResolveFailed => StatusCode::BAD_GATEWAY,
            _ => StatusCode::FORBIDDEN,
        },
        Refusal::ConnectFailed
        | Refusal::TlsFailed
        | Refusal::ParentUnreachable
        | Refusal::ParentRefused(_) => StatusCode::BAD_GATEWAY,
        Refusal::ConnectTimeout | Refusal::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
        Refusal::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
    }
}

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
    access_log::Record,
    forward_body::{Body, Counted, Exchange, Finisher, empty, full},
    framing::Framer,
    policy::{Deny, Target},
    shared::{Admitted, Live, Refusal, Shared},
    sniffed_io::{IoCounts, Sniffed},
    tunnel,
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

/// One client connection.
struct Conn {
    shared: Arc<Shared>,
    source: SocketAddr,
    namespace: Option<String>,
    mode: Mode,
    requests: AtomicUsize,
    /// The connection's slot under the cap; a CONNECT tunnel takes it along, since the tunnel
    /// outlives the HTTP connection.
    slot: std::sync::Mutex<Option<Admitted>>,
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
    sender: SendRequest<Body>,
}

/// Serves one client connection until it closes, errs, or the drain deadline passes.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, source: SocketAddr, mode: Mode) {
    let live = shared.live();
    let slot = match shared.admit(&live.limits, source.ip()) {
        Ok(slot) => slot,
        Err(deny) => return refuse_connection(&shared, stream, source, mode, deny).await,
    };
    let _ = stream.set_nodelay(true);
    let mut record = Record::new(mode.listener(), source);
    let namespace = shared.identify(source, &mut record);
    let conn = Conn::new(&shared, &live, source, namespace, mode, Some(slot));
    serve_conn(conn, stream, Vec::new(), record).await;
}

/// Serves the plain HTTP/1 a client sent inside a CONNECT tunnel (`first`: what was read of it
/// already) as forwarded requests, each checked: Host must name `target:port`. The tunnel's
/// upstream connection serves the first request. The caller holds the connection's slot.
/// Returns the bytes read from and written to the client.
///
/// Boxed with its `Send` spelled out: serving HTTP leads back here (a CONNECT whose tunnel
/// carries HTTP), and the compiler cannot infer that of a future that contains itself.
pub fn serve_tunneled(
    shared: Arc<Shared>,
    client: TcpStream,
    first: Vec<u8>,
    upstream: (TcpStream, Option<SocketAddr>),
    target: Target,
    port: u16,
    record: &Record,
) -> Pin<Box<dyn Future<Output = (u64, u64)> + Send>> {
    let (source, namespace) = (record.source, record.namespace.clone());
    Box::pin(async move {
        let live = shared.live();
        let mut conn = Conn::new(&shared, &live, source, namespace, Mode::Tunneled, None);
        if let Ok(sender) = handshake(upstream.0).await {
            conn.pool =
                Mutex::new(Some(Pooled { target: target.clone(), port, upstream: upstream.1, sender }));
        }
        conn.tunnel = Some((target, port));
        serve_conn(conn, client, first, Record::new(Mode::Tunneled.listener(), source)).await
    })
}

impl Conn {
    fn new(
        shared: &Arc<Shared>,
        live: &Live,
        source: SocketAddr,
        namespace: Option<String>,
        mode: Mode,
        slot: Option<Admitted>,
    ) -> Self {
        Self {
            shared: shared.clone(),
            source,
            namespace,
            mode,
            requests: AtomicUsize::new(0),
            slot: std::sync::Mutex::new(slot),
            framer: Arc::new(std::sync::Mutex::new(Framer::new(live.limits.max_header_bytes))),
            pool: Mutex::new(None),
            tunnel: None,
        }
    }
}

/// Serves until the connection ends; returns the bytes read from and written to the client.
async fn serve_conn(conn: Conn, stream: TcpStream, pending: Vec<u8>, mut record: Record) -> (u64, u64) {
    let conn = Arc::new(conn);
    let shared = conn.shared.clone();
    let live = shared.live();
    let source = conn.source;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(live.limits.header_timeout)
        .max_buf_size(live.limits.max_header_bytes)
        .max_headers(live.limits.max_headers)
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
    let served = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(served);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = &mut served => break r,
            // Draining: finish the request in flight, then close instead of keeping alive. A
            // tunnel opened before the drain may finish, as byte tunnels do (until the deadline).
            () = shared.drain.cancelled(), if !closing && conn.tunnel.is_none() => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            () = shared.cancel.cancelled() => break Ok(()),
        }
    };
    // Errors before any request was read are refusals worth a log line; after that, a timeout
    // is just an idle keep-alive connection closing.
    if let Err(e) = result {
        let first = conn.requests.load(Ordering::Relaxed) == 0;
        let reason = if e.is_parse_too_large() {
            Some(Deny::HeaderTooLarge)
        } else if e.is_parse() || e.is_parse_status() {
            Some(Deny::BadRequest)
        } else if e.is_timeout() && first {
            Some(Deny::HeaderTimeout)
        } else {
            None
        };
        match reason {
            Some(deny) => {
                record.deny(deny.name());
                shared.finish(&mut record);
            }
            None => tracing::debug!(%source, error = %e, "client connection ended with an error"),
        }
    }
    (moved.read.load(Ordering::Relaxed), moved.written.load(Ordering::Relaxed))
}

/// Answers a connection that gets no slot (cap reached, draining) with 503 (429 for the
/// per-client cap) and closes it.
async fn refuse_connection(
    shared: &Shared,
    mut stream: TcpStream,
    source: SocketAddr,
    mode: Mode,
    deny: Deny,
) {
    let mut record = Record::new(mode.listener(), source);
    shared.identify(source, &mut record);
    record.deny(deny.name());
    let status = status_for(deny.into());
    record.status = Some(status.as_u16());
    let body = format!("egress gateway: {}\n", deny.name());
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nX-Egressfw-Reason: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        deny.name()
    );
    super::relay::reply_and_close(&mut stream, head.as_bytes()).await;
    shared.finish(&mut record);
}

impl Conn {
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut record = Record::new(self.mode.listener(), self.source);
        record.namespace.clone_from(&self.namespace);
        record.method = Some(req.method().to_string());
        // What the client asked for, as sent, until the checks below produce the normalised form.
        record.authority = match (self.mode, req.uri().authority()) {
            (Mode::Proxy, Some(a)) => Some(a.to_string()),
            _ => req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned),
        };
        let live = self.shared.live();
        let (target, port) = match self.destination(&req, &live) {
            Ok(d) => d,
            Err(deny) => return self.refuse(record, deny.into()),
        };
        record.authority = Some(format!("{target}:{port}"));
        if req.method() == Method::CONNECT {
            return match self.shared.dial(&live, self.namespace.as_deref(), &target, port, &mut record).await
            {
                Ok((upstream, grant)) => {
                    let shared = self.shared.clone();
                    let slot = self.slot.lock().ok().and_then(|mut s| s.take());
                    let tunnel = tunnel::Connected {
                        upstream,
                        target,
                        port,
                        limits: live.limits,
                        allow_h2_prior_knowledge: grant.allow_h2_prior_knowledge,
                    };
                    tokio::spawn(async move {
                        tunnel::after_connect(shared, req, tunnel, record).await;
                        drop(slot);
                    });
                    Response::new(empty())
                }
                Err(refusal) => self.refuse(record, refusal),
            };
        }
        self.forward(req, record, &live, target, port).await
    }

    /// Forwards a plain HTTP request (absolute-form or routed by Host) and streams the answer.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        mut record: Record,
        live: &Live,
        target: Target,
        port: u16,
    ) -> Response<Body> {
        let mut pool = self.pool.lock().await;
        // The new request is authorised like any other; only then may a kept connection serve it.
        let reusable = match pool.as_mut() {
            Some(p) if p.target == target && p.port == port && !p.sender.is_closed() => {
                match live.policy.authorize(self.namespace.as_deref(), &target, port) {
                    Ok(grant) => {
                        // The kept connection's address is judged again too (a reload may have
                        // closed the range it is in).
                        let still_dialable = p.upstream.is_some_and(|a| {
                            live.policy.dialable(&grant, &target, &[a.ip()]).is_ok_and(|d| d == [a.ip()])
                        });
                        record.allow(grant.matched);
                        record.upstream = p.upstream;
                        still_dialable && p.sender.ready().await.is_ok()
                    }
                    Err(deny) => return self.refuse(record, deny.into()),
                }
            }
            _ => false,
        };
        if !reusable {
            *pool = None;
            match self.open(live, &target, port, &mut record).await {
                Ok(p) => *pool = Some(p),
                Err(refusal) => return self.refuse(record, refusal),
            }
        }
        let Some(p) = pool.as_mut() else { unreachable!("set above") };

        let exchange = Arc::new(Exchange::default());
        let limits = live.limits;
        rewrite_request(&mut req, &target, port, self.mode);
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
                return self.refuse(record, refusal);
            }
        };
        record.status = Some(response.status().as_u16());
        let mut response = response.map(|b| {
            let done = Finisher { shared: self.shared.clone(), record: Some(record), exchange };
            Counted::response(b, done, limits.response_timeout).boxed()
        });
        strip_hop_by_hop(response.headers_mut());
        // The client's hop is ours: an HTTP/1.0 upstream must not make hyper close the client
        // connection (hyper re-frames the body for the client).
        *response.version_mut() = http::Version::HTTP_11;
        response
    }

    /// A new upstream connection (checked dial, then TLS when originating) with its HTTP/1 client.
    async fn open(
        &self,
        live: &Live,
        target: &Target,
        port: u16,
        record: &mut Record,
    ) -> Result<Pooled, Refusal> {
        let (tcp, _) = self.shared.dial(live, self.namespace.as_deref(), target, port, record).await?;
        let upstream = record.upstream;
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
        Ok(Pooled { target: target.clone(), port, upstream, sender })
    }

    /// A denial or failure: logged and counted now, answered with a status and the reason.
    fn refuse(&self, mut record: Record, refusal: Refusal) -> Response<Body> {
        refusal.note(&mut record);
        let status = status_for(refusal);
        record.status = Some(status.as_u16());
        self.shared.finish(&mut record);
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
        Refusal::ConnectFailed | Refusal::TlsFailed => StatusCode::BAD_GATEWAY,
        Refusal::ConnectTimeout | Refusal::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
        Refusal::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
    }
}

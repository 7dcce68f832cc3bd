//! The HTTP listeners, on hyper: the proxy port (CONNECT tunnels and absolute-form forwarding),
//! the transparent HTTP port (routed by Host) and the TLS origination port (plain HTTP in,
//! HTTPS out). Every request is authorised on its own, also on a kept-alive connection; an
//! upstream connection is reused only for the same destination after the new request passed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{body::Incoming, client::conn::http1::SendRequest, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};

use super::{
    access_log::Record,
    framing::Framer,
    policy::{Deny, Policy, Target},
    shared::{Admitted, Live, Refusal, Shared},
    sniffed_io::Sniffed,
    target, tunnel,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Which HTTP listener a connection came in on.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `HTTP_PROXY`/`HTTPS_PROXY` clients: CONNECT and absolute-form requests.
    Proxy,
    /// Origin-form requests routed by Host; this port when Host has none.
    Transparent { default_port: u16 },
    /// Origin-form requests routed by Host, sent on over verified TLS.
    Originate,
}

impl Mode {
    pub fn listener(self) -> &'static str {
        match self {
            Self::Proxy => "http_proxy",
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
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        source,
        namespace,
        mode,
        requests: AtomicUsize::new(0),
        slot: std::sync::Mutex::new(Some(slot)),
        framer: Arc::new(std::sync::Mutex::new(Framer::new(live.limits.max_header_bytes))),
        pool: Mutex::new(None),
    });
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
    let io = Sniffed { inner: stream, framer: conn.framer.clone() };
    let served = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(served);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = &mut served => break r,
            // Draining: finish the request in flight, then close instead of keeping alive.
            () = shared.drain.cancelled(), if !closing => {
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
                Ok(upstream) => {
                    let shared = self.shared.clone();
                    let limits = live.limits;
                    let slot = self.slot.lock().ok().and_then(|mut s| s.take());
                    tokio::spawn(async move {
                        tunnel::after_connect(shared, req, upstream, target, limits, record).await;
                        drop(slot);
                    });
                    Response::new(empty())
                }
                Err(refusal) => self.refuse(record, refusal),
            };
        }
        self.forward(req, record, &live, target, port).await
    }

    /// Where the request goes, by this listener's rules, with every consistency check.
    fn destination(&self, req: &Request<Incoming>, live: &Live) -> Result<(Target, u16), Deny> {
        let headers = req.headers();
        // As sent (hyper has already resolved some ambiguities away), then as parsed. No
        // verdict means the framer lost track of the stream: refuse rather than guess.
        let sent = self.framer.lock().ok().and_then(|mut f| f.next_verdict());
        sent.unwrap_or(Err(target::TargetError::BadRequest))?;
        target::check_framing(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))?;
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = hosts.next().map(HeaderValue::as_bytes);
        if hosts.next().is_some() {
            return Err(Deny::BadRequest);
        }
        let uri = req.uri().to_string();
        let method = req.method().as_str();
        if let Mode::Proxy = self.mode {
            let t = target::proxy_target(method, &uri)?;
            if !t.connect {
                target::check_host_agrees(host, &t.target, t.port, 80)?;
            }
            return Ok((t.target, t.port));
        }
        if req.method() == Method::CONNECT {
            return Err(Deny::BadRequest);
        }
        // Origin-form: the Host header names the destination. An absolute URI must agree.
        let host = std::str::from_utf8(host.ok_or(Deny::BadRequest)?).map_err(|_| Deny::BadRequest)?;
        let (t, host_port) = target::parse_authority(host.trim())?;
        if req.uri().authority().is_some() {
            let abs = target::proxy_target(method, &uri)?;
            if abs.target != t || host_port.is_some_and(|p| p != abs.port) {
                return Err(Deny::TargetMismatch);
            }
        }
        match self.mode {
            Mode::Transparent { default_port } => Ok((t, host_port.unwrap_or(default_port))),
            Mode::Originate => {
                let originator = live.originator.as_ref().ok_or(Deny::NotOriginated)?;
                match &t {
                    Target::Name(name) if originator.originates(name) => Ok((t, originator.upstream_port)),
                    _ => Err(Deny::NotOriginated),
                }
            }
            Mode::Proxy => unreachable!("handled above"),
        }
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
                            Policy::dialable(&grant, &target, &[a.ip()]).is_ok_and(|d| d == [a.ip()])
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

        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        rewrite_request(&mut req, &target, port, self.mode);
        let req = req.map(|b| Counted::new(b, up.clone(), None).boxed());
        let response = match p.sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "upstream request failed");
                *pool = None;
                return self.refuse(record, Refusal::ConnectFailed);
            }
        };
        record.status = Some(response.status().as_u16());
        let mut response = response.map(|b| {
            let done = Finisher { shared: self.shared.clone(), record: Some(record), up, down: down.clone() };
            Counted::new(b, down, Some(done)).boxed()
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
        let tcp = self.shared.dial(live, self.namespace.as_deref(), target, port, record).await?;
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
        // Framing or request errors leave the connection in an unknown state: close it.
        if matches!(refusal, Refusal::Deny(Deny::AmbiguousFraming | Deny::BadRequest | Deny::BadTarget)) {
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
        Refusal::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// Origin-form target, Host set to the checked destination, hop-by-hop headers (and the
/// client's proxy credentials) removed.
fn rewrite_request(req: &mut Request<Incoming>, target: &Target, port: u16, mode: Mode) {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if let Ok(uri) = path.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    strip_hop_by_hop(req.headers_mut());
    let default = if matches!(mode, Mode::Originate) { 443 } else { 80 };
    let host = if port == default { target.to_string() } else { format!("{target}:{port}") };
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// RFC 9110 7.6.1: headers for this hop only, plus the ones `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for h in named {
        headers.remove(h.as_str());
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(h);
    }
}

pub fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

/// Writes a forwarded request's access-log line when its response body ends (or is dropped),
/// so the line has the bytes and the full duration.
struct Finisher {
    shared: Arc<Shared>,
    record: Option<Record>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.bytes_up = self.up.load(Ordering::Relaxed);
            r.bytes_down = self.down.load(Ordering::Relaxed);
            self.shared.finish(&mut r);
        }
    }
}

/// A body that counts its data bytes (and finishes a record when it is done).
struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
    done: Option<Finisher>,
}

impl Counted {
    fn new(inner: Incoming, count: Arc<AtomicU64>, done: Option<Finisher>) -> Self {
        Self { inner, count, done }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => {
                self.done.take();
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

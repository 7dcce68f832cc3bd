//! Allowed tunnels: CONNECT after the 200, SNI passthrough and TCP forwards all end here. Also
//! the check of what a client sends first inside a CONNECT tunnel, and the ClientHello reader
//! the TLS listener shares with it.

use std::{sync::Arc, time::Duration};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncReadExt as _, net::TcpStream};

use super::{
    access_log::Record,
    client_hello::{self, AlertDescription, ClientHello, HelloError, Progress},
    config::Limits,
    first_flight::{self, FirstFlight},
    http_proxy,
    policy::{Deny, Target},
    relay::{self, Ended},
    shared::Shared,
    sniffed_io::Sniffed,
};

/// Relays an allowed connection to the end and writes its access-log line.
pub async fn run(
    shared: Arc<Shared>,
    client: TcpStream,
    upstream: TcpStream,
    first_up: Vec<u8>,
    limits: Limits,
    mut record: Record,
) {
    let gauge = shared.metrics.tunnel_gauge(record.listener);
    gauge.inc();
    let (moved, ended) =
        relay::relay(&client, &upstream, first_up, limits.idle_timeout, &shared.cancel).await;
    gauge.dec();
    record.bytes_up = moved.up;
    record.bytes_down = moved.down;
    record.end = Some(match ended {
        Ended::Closed => "closed",
        Ended::Idle => "idle_timeout",
        Ended::Cancelled => "drain_deadline",
    });
    shared.finish(&mut record);
}

/// A CONNECT the gateway has allowed and dialed, waiting for the client's first bytes.
pub struct Connected {
    pub upstream: TcpStream,
    pub target: Target,
    pub port: u16,
    pub limits: Limits,
    /// A granting rule allows HTTP/2 with prior knowledge in this tunnel.
    pub allow_h2_prior_knowledge: bool,
}

/// What the tunnel carries, once its first bytes are checked.
enum Inside {
    /// Relayed as bytes: TLS whose ClientHello names the target, an allowed HTTP/2 preface, a
    /// protocol where the server speaks first, or anything that is not HTTP.
    Bytes,
    /// Plain HTTP/1: served request by request, each one checked (see `http_proxy`).
    Http1,
}

/// After `200` to a CONNECT: takes the raw client socket back from hyper, checks what the client
/// sends first (see `check_first_flight`), then relays or serves it.
pub async fn after_connect(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    tunnel: Connected,
    mut record: Record,
) {
    let parts = match hyper::upgrade::on(req).await.map(|u| u.downcast::<TokioIo<Sniffed<TcpStream>>>()) {
        Ok(Ok(parts)) => parts,
        Ok(Err(_)) | Err(_) => {
            record.fail("upgrade_failed");
            shared.finish(&mut record);
            return;
        }
    };
    let mut client = parts.io.into_inner().inner;
    let mut first = parts.read_buf.to_vec();
    // The drain deadline also ends a tunnel still waiting for its first bytes.
    let checked = tokio::select! {
        r = check_first_flight(&mut client, &tunnel, &mut first, &mut record) => r,
        () = shared.cancel.cancelled() => Err("drain_deadline"),
    };
    match checked {
        Err("drain_deadline") => {
            record.end = Some("drain_deadline");
            shared.finish(&mut record);
        }
        Err(reason) => {
            record.deny(reason);
            shared.finish(&mut record);
        }
        Ok(Inside::Bytes) => run(shared, client, tunnel.upstream, first, tunnel.limits, record).await,
        Ok(Inside::Http1) => {
            // Each request inside gets its own line; the tunnel's comes at its end, with the
            // bytes the client sent and got.
            let gauge = shared.metrics.tunnel_gauge(record.listener);
            gauge.inc();
            let upstream = (tunnel.upstream, record.upstream);
            let (up, down) = http_proxy::serve_tunneled(
                shared.clone(),
                client,
                first,
                upstream,
                tunnel.target,
                tunnel.port,
                &record,
            )
            .await;
            gauge.dec();
            record.bytes_up = up;
            record.bytes_down = down;
            record.end = Some(if shared.cancel.is_cancelled() { "drain_deadline" } else { "closed" });
            shared.finish(&mut record);
        }
    }
}

/// Domain fronting through CONNECT: a tunnel opened for `allowed.example` whose traffic asks a
/// shared front (a CDN) for `forbidden.example`. When the client speaks first, what it says
/// must not name another host: a TLS ClientHello must carry the CONNECT host as its SNI (an
/// SNI at all, for a tunnel to a name); plain HTTP/1 is served request by request with Host
/// checked; HTTP/2 with prior knowledge (whose host is in compressed headers) only where a rule
/// allows it. Protocols where the server speaks first (SSH, SMTP) are left alone.
async fn check_first_flight(
    client: &mut TcpStream,
    tunnel: &Connected,
    first: &mut Vec<u8>,
    record: &mut Record,
) -> Result<Inside, &'static str> {
    let limits = &tunnel.limits;
    // Wait for the first bytes from either side; read the client's (they are relayed first).
    while first.is_empty() {
        tokio::select! {
            r = client.readable() => if r.is_err() { return Ok(Inside::Bytes) },
            _ = tunnel.upstream.readable() => return Ok(Inside::Bytes),
            () = tokio::time::sleep(limits.idle_timeout) => return Err("idle_before_first_byte"),
        }
        let mut buf = vec![0u8; 4096];
        match client.try_read(&mut buf) {
            Ok(0) => return Ok(Inside::Bytes),
            Ok(n) => {
                buf.truncate(n);
                *first = buf;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(Inside::Bytes),
        }
    }
    // A request line may come a byte at a time: read until the bytes tell, within the limits
    // of a request head.
    let kind =
        tokio::time::timeout(limits.header_timeout, read_until_known(client, first, limits.max_header_bytes))
            .await
            .unwrap_or(Err(Deny::HeaderTimeout.name()))?;
    let to_name = matches!(tunnel.target, Target::Name(_));
    match kind {
        FirstFlight::Tls => {}
        FirstFlight::Http1 => return Ok(Inside::Http1),
        FirstFlight::H2PriorKnowledge if to_name && !tunnel.allow_h2_prior_knowledge => {
            relay::reply_and_close(client, &h2_refusal()).await;
            return Err(Deny::H2PriorKnowledge.name());
        }
        FirstFlight::H2PriorKnowledge | FirstFlight::Other | FirstFlight::NeedMore => {
            return Ok(Inside::Bytes);
        }
    }
    let hello =
        match read_client_hello(client, first, limits.client_hello_max_bytes, limits.header_timeout).await {
            Ok(h) => h,
            Err(failure) => {
                failure.alert(client).await;
                return Err(failure.reason());
            }
        };
    record.sni.clone_from(&hello.server_name);
    if let Err(deny) = sni_verdict(&hello, Some(&tunnel.target)) {
        send_alert(client, deny_alert(deny)).await;
        return Err(deny.name());
    }
    Ok(Inside::Bytes)
}

/// Reads into `first` until [`first_flight::classify`] can tell what it is. `NeedMore` back
/// means the client closed its side first (what it sent is relayed: it cannot finish a request).
async fn read_until_known(
    client: &mut TcpStream,
    first: &mut Vec<u8>,
    max: usize,
) -> Result<FirstFlight, &'static str> {
    loop {
        match first_flight::classify(first) {
            FirstFlight::NeedMore if first.len() >= max => return Err(Deny::HeaderTooLarge.name()),
            FirstFlight::NeedMore => {}
            known => return Ok(known),
        }
        let start = first.len();
        first.resize(start + 4096, 0);
        let n = client.read(&mut first[start..]).await.unwrap_or(0);
        first.truncate(start + n);
        if n == 0 {
            return Ok(FirstFlight::NeedMore);
        }
    }
}

/// What an HTTP/2 server says to refuse a connection: its SETTINGS (the server preface), then
/// GOAWAY with HTTP_1_1_REQUIRED (RFC 9113 7), so the client can retry over HTTP/1.1.
fn h2_refusal() -> [u8; 26] {
    let mut out = [0u8; 26];
    // SETTINGS: length 0, type 4, no flags, stream 0.
    out[3] = 4;
    // GOAWAY: length 8, type 7, stream 0; last stream 0, error code 0xd.
    out[9..13].copy_from_slice(&[0, 0, 8, 7]);
    out[25] = 0xd;
    out
}

/// The TLS alert for a refused ClientHello.
pub fn deny_alert(deny: Deny) -> AlertDescription {
    match deny {
        Deny::NoServerName | Deny::BadTarget => AlertDescription::UnrecognizedName,
        _ => AlertDescription::AccessDenied,
    }
}

/// Checks a ClientHello's server name: present unless `connect_target` is an IP tunnel, and
/// (for a tunnel to a name) the same name.
pub fn sni_verdict(hello: &ClientHello, connect_target: Option<&Target>) -> Result<Option<Target>, Deny> {
    // Encrypted Client Hello is judged by its outer (public) name, which a rule must allow
    // like any other: real ECH then reaches only providers whose public name is allowed, and
    // browsers that send GREASE ECH (no real inner hello) keep working.
    // Through the same IP-literal reading as every other target: an SNI of `10.0.0.1` is an
    // address and needs a CIDR rule, never a host pattern.
    let sni = hello.server_name.as_deref().map(Target::parse).transpose()?;
    match (connect_target, &sni) {
        // A CONNECT to a name: the SNI must be that name. Without one, a shared front picks the
        // site by other means (a default, or the inner name of real ECH): unknowable here.
        (Some(t @ Target::Name(_)), Some(s)) if s != t => Err(Deny::TargetMismatch),
        (Some(Target::Name(_)), None) => Err(Deny::NoServerName),
        (Some(_), _) => Ok(sni),
        (None, None) => Err(Deny::NoServerName),
        (None, Some(_)) => Ok(sni),
    }
}

/// Why no ClientHello could be read.
pub enum HelloFailure {
    Bad(HelloError),
    Timeout,
    Closed,
}

impl HelloFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bad(e) => e.reason(),
            Self::Timeout => Deny::HeaderTimeout.name(),
            Self::Closed => "closed_before_client_hello",
        }
    }

    /// Tells a TLS client why, when it can understand the answer.
    pub async fn alert(&self, client: &mut TcpStream) {
        if let Self::Bad(e) = self
            && let Some(desc) = e.alert()
        {
            send_alert(client, desc).await;
        }
    }
}

/// Reads until `buf` holds a whole ClientHello, within `max` bytes and `timeout` overall.
pub async fn read_client_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<ClientHello, HelloFailure> {
    let read = async {
        loop {
            match client_hello::parse(buf, max) {
                Ok(Progress::Done(hello)) => return Ok(hello),
                Err(e) => return Err(HelloFailure::Bad(e)),
                Ok(Progress::NeedMore) => {}
            }
            let room = max.saturating_sub(buf.len()).max(1);
            let start = buf.len();
            buf.resize(start + room.min(4096), 0);
            let n = client.read(&mut buf[start..]).await.map_err(|_| HelloFailure::Closed)?;
            buf.truncate(start + n);
            if n == 0 {
                return Err(HelloFailure::Closed);
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(HelloFailure::Timeout))
}

pub async fn send_alert(client: &mut TcpStream, desc: AlertDescription) {
    relay::reply_and_close(client, &client_hello::alert(desc)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: Option<&str>, ech: bool) -> ClientHello {
        ClientHello { server_name: name.map(str::to_owned), alpn: Vec::new(), legacy_version: 0x0303, ech }
    }

    #[test]
    fn sni_verdicts() {
        let api = Target::parse("api.example.com").unwrap();
        let ip = Target::parse("11.0.0.1").unwrap();
        // Encrypted Client Hello is judged by its outer name, like any SNI: GREASE ECH carries the
        // real name there, and real ECH reaches only a provider whose public name is allowed.
        assert_eq!(sni_verdict(&hello(Some("api.example.com"), true), None), Ok(Some(api.clone())));
        assert_eq!(sni_verdict(&hello(Some("api.example.com"), true), Some(&api)), Ok(Some(api.clone())));
        assert_eq!(sni_verdict(&hello(Some("cdn.example.net"), true), Some(&api)), Err(Deny::TargetMismatch));
        // No SNI: refused on the TLS port and in a tunnel to a name; fine in a tunnel to an address.
        assert_eq!(sni_verdict(&hello(None, false), None), Err(Deny::NoServerName));
        assert_eq!(sni_verdict(&hello(None, false), Some(&api)), Err(Deny::NoServerName));
        assert_eq!(sni_verdict(&hello(None, false), Some(&ip)), Ok(None));
    }

    #[test]
    fn h2_refusal_is_settings_then_goaway_http_1_1_required() {
        let r = h2_refusal();
        assert_eq!(&r[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(&r[9..18], &[0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&r[18..], &[0, 0, 0, 0, 0, 0, 0, 0xd]);
    }
}

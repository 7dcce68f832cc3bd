//! Inside a CONNECT tunnel, after the `200`: the client's first bytes are checked against the
//! tunnel's target (domain fronting), then the tunnel is relayed as bytes or served as plain
//! HTTP, request by request.

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncReadExt as _, net::TcpStream};

use super::{
    access_log::Record,
    config::Limits,
    connection::Connection,
    first_flight::{self, FirstFlight},
    http_proxy,
    policy::{Deny, Target},
    relay,
    sniffed_io::Sniffed,
    tls_hello::{deny_alert, read_client_hello, send_alert, sni_verdict},
};

/// A CONNECT the gateway has allowed and dialed, waiting for the client's first bytes.
pub struct Connected {
    pub upstream: TcpStream,
    pub target: Target,
    pub port: u16,
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
pub async fn after_connect(mut conn: Connection, req: Request<Incoming>, tunnel: Connected) {
    let parts = match hyper::upgrade::on(req).await.map(|u| u.downcast::<TokioIo<Sniffed<TcpStream>>>()) {
        Ok(Ok(parts)) => parts,
        Ok(Err(_)) | Err(_) => {
            conn.record.fail("upgrade_failed");
            return conn.finish();
        }
    };
    let mut client = parts.io.into_inner().inner;
    let mut first = parts.read_buf.to_vec();
    let limits = conn.live.limits;
    let cancel = conn.gateway().cancel.clone();
    // The drain deadline also ends a tunnel still waiting for its first bytes.
    let checked = tokio::select! {
        r = check_first_flight(&mut client, &tunnel, &limits, &mut first, &mut conn.record) => r,
        () = cancel.cancelled() => Err("drain_deadline"),
    };
    match checked {
        Err("drain_deadline") => {
            conn.record.end = Some("drain_deadline");
            conn.finish();
        }
        Err(reason) => {
            conn.record.deny(reason);
            conn.finish();
        }
        Ok(Inside::Bytes) => conn.relay(client, tunnel.upstream, first).await,
        Ok(Inside::Http1) => {
            // Each request inside gets its own line; the tunnel's comes at its end, with the
            // bytes the client sent and got.
            let gauge = conn.gateway().metrics.tunnel_gauge(conn.record.listener);
            gauge.inc();
            let (up, down) = http_proxy::serve_tunneled(&conn, client, first, tunnel).await;
            gauge.dec();
            conn.record.bytes_up = up;
            conn.record.bytes_down = down;
            conn.record.end = Some(if cancel.is_cancelled() { "drain_deadline" } else { "closed" });
            conn.finish();
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
    limits: &Limits,
    first: &mut Vec<u8>,
    record: &mut Record,
) -> Result<Inside, &'static str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2_refusal_is_settings_then_goaway_http_1_1_required() {
        let r = h2_refusal();
        assert_eq!(&r[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(&r[9..18], &[0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&r[18..], &[0, 0, 0, 0, 0, 0, 0, 0xd]);
    }
}

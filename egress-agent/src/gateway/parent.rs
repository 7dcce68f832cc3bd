//! The parent proxy (`upstreamProxy`): where a corporate proxy is the only way out, the gateway
//! decides as always and then, instead of resolving and dialing the destination, asks the parent
//! for it. Tunnels (CONNECT, SNI passthrough, TCP forwards, TLS origination) become a CONNECT to
//! the parent; plain HTTP requests go to it in absolute form (`http_proxy`). Either way the
//! parent resolves the name, so the gateway cannot check the addresses it reaches; IP literals
//! are still checked against the ranges before they are handed on.

use std::{net::SocketAddr, sync::Arc};

use base64::Engine as _;
use http::HeaderValue;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    config::{Upstream, UpstreamProxy},
    host::HostPattern,
    policy::Target,
    refusal::Refusal,
};

/// The parent's answer to CONNECT must fit in this; a parent that sends more is broken.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
const MAX_RESPONSE_HEADERS: usize = 32;

pub struct Parent {
    address: Upstream,
    hosts: Vec<HostPattern>,
    /// `Basic ...`, sent on every CONNECT and forwarded request.
    authorization: Option<HeaderValue>,
    /// `host:port`, for the access log's `via`.
    pub shown: Arc<str>,
}

impl Parent {
    pub fn new(config: &UpstreamProxy) -> Self {
        let authorization = config.auth.as_ref().and_then(|c| {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
            let mut value = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        let shown = match config.address.host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]:{}", config.address.port),
            Err(_) => format!("{}:{}", config.address.host, config.address.port),
        };
        Self {
            address: config.address.clone(),
            hosts: config.hosts.clone(),
            authorization,
            shown: shown.into(),
        }
    }

    /// Whether connections to `target` go through the parent: every target when no hosts are
    /// listed, otherwise the names that match (an IP literal never matches a name pattern).
    pub fn covers(&self, target: &Target) -> bool {
        match target {
            _ if self.hosts.is_empty() => true,
            Target::Name(name) => self.hosts.iter().any(|p| p.matches(name)),
            Target::Ip(_) => false,
        }
    }

    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// A connection to the parent itself (its name, if it has one, from the gateway's resolver).
    pub async fn connect(&self) -> Result<(TcpStream, SocketAddr), Refusal> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.address.host.as_str(), self.address.port))
            .await
            .map_err(|e| {
                tracing::warn!(parent = %self.shown, error = %e, "the parent proxy's name does not resolve");
                Refusal::ParentUnreachable
            })?
            .collect();
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, addr));
                }
                Err(e) => tracing::debug!(parent = %addr, error = %e, "parent proxy connect failed"),
            }
        }
        Err(Refusal::ParentUnreachable)
    }

    /// A tunnel to `target:port` through the parent: CONNECT, and its answer read to the end of
    /// its head and no further, so nothing the destination sends first is lost.
    pub async fn tunnel(&self, target: &Target, port: u16) -> Result<(TcpStream, SocketAddr), Refusal> {
        let (mut stream, addr) = self.connect().await?;
        let authority = format!("{target}:{port}");
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = &self.authorization {
            request.push_str("Proxy-Authorization: ");
            request.push_str(auth.to_str().unwrap_or_default());
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|_| Refusal::ParentUnreachable)?;
        let head = read_head(&mut stream).await?;
        let status = response_status(&head)?;
        if !(200..300).contains(&status) {
            tracing::info!(parent = %self.shown, %authority, status, "the parent proxy refused the tunnel");
            return Err(Refusal::ParentRefused(status));
        }
        Ok((stream, addr))
    }
}

/// Reads a response head without reading past it: peeks at what has arrived, takes up to the
/// blank line if it is there, otherwise takes everything (all of it head) and waits for more.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Refusal> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| Refusal::ParentUnreachable)?;
        if n == 0 {
            return Err(Refusal::ParentUnreachable);
        }
        // The blank line may straddle what was taken before and what is peeked now.
        let from = head.len().saturating_sub(3);
        let mut seen = head[from..].to_vec();
        seen.extend_from_slice(&buf[..n]);
        let take = match seen.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => end + 4 - (head.len() - from),
            None => n,
        };
        let at = head.len();
        head.resize(at + take, 0);
        stream.read_exact(&mut head[at..]).await.map_err(|_| Refusal::ParentUnreachable)?;
        if head.ends_with(b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(Refusal::ParentRefused(0));
        }
    }
}

/// The status code of a complete response head; a head that is not HTTP counts as a refusal
/// with status 0.
fn response_status(head: &[u8]) -> Result<u16, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => response.code.ok_or(Refusal::ParentRefused(0)),
        _ => Err(Refusal::ParentRefused(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_head_is_read_to_the_blank_line_and_no_further() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // The head in pieces, the blank line split, then the destination's first bytes.
            for piece in
                [&b"HTTP/1.1 200 Connection established\r\n"[..], b"Via: x\r\n\r", b"\nSSH-2.0-hello"]
            {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            s
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head = read_head(&mut client).await.unwrap();
        assert_eq!(head, b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n");
        assert_eq!(response_status(&head), Ok(200));
        let mut rest = [0u8; 13];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"SSH-2.0-hello", "the destination's bytes stay in the stream");
        drop(server.await);
    }

    #[test]
    fn a_head_that_is_not_http_is_a_refusal() {
        assert_eq!(response_status(b"SSH-2.0\r\n\r\n"), Err(Refusal::ParentRefused(0)));
        assert_eq!(response_status(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"), Ok(407));
    }
}

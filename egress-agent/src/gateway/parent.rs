//! The parent proxy (`upstreamProxy`): where a corporate proxy is the only way out, the gateway
//! decides as always and then, instead of resolving and dialing the destination, asks the parent
//! for it. Tunnels (CONNECT, SNI passthrough, TCP forwards, TLS origination) become a CONNECT to
//! the parent; plain HTTP requests go to it in absolute form (`http_proxy`). Either way the
//! parent resolves the name, so the gateway cannot check the addresses it reaches; IP literals
//! are still checked against the ranges before they are handed on.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context as _, Result, bail};
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
    /// Reads the credentials (if any): a file that cannot be read, or holds more than one line
    /// of printable text, fails the configuration, naming the file, and the previous one stays.
    pub fn new(config: &UpstreamProxy) -> Result<Self> {
        let authorization = config
            .auth
            .as_ref()
            .map(|c| {
                let username = read_secret(&c.username_file, "usernameFile")?;
                if username.contains(':') {
                    bail!(
                        "upstreamProxy.auth.usernameFile: the user name in {} contains ':', which basic credentials cannot carry",
                        c.username_file.display()
                    );
                }
                let password = read_secret(&c.password_file, "passwordFile")?;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
                let mut value = HeaderValue::from_str(&format!("Basic {token}"))?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let shown = match config.address.host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]:{}", config.address.port),
            Err(_) => format!("{}:{}", config.address.host, config.address.port),
        };
        Ok(Self {
            address: config.address.clone(),
            hosts: config.hosts.clone(),
            authorization,
            shown: shown.into(),
        })
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

    /// A connection to the parent itself (its name, if it has one, from the gateway's resolver,
    /// as a fully qualified name: see `absolute`).
    pub async fn connect(&self) -> Result<(TcpStream, SocketAddr), Refusal> {
        let name = absolute(&self.address.host);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.address.port))
            .await
            .map_err(|e| {
                tracing::warn!(
                    parent = %self.shown,
                    resolved_as = %name,
                    error = %e,
                    "the parent proxy's name does not resolve as a fully qualified name (no search domains, no /etc/hosts); give its address if only /etc/hosts knows it"
                );
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

/// The parent's name as the resolver must take it: fully qualified (a trailing dot), so the
/// search list never makes `proxy.corp` into `proxy.corp.svc.cluster.local`, a Service any
/// tenant who owns a namespace named `corp` can create, which would then receive every CONNECT
/// with the parent's credentials. (glibc then skips /etc/hosts too.) Addresses stay as they are.
fn absolute(host: &str) -> String {
    if host.parse::<std::net::IpAddr>().is_ok() || host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    }
}

/// One line of a mounted Secret file (a trailing newline is not part of it). Control characters
/// could split the header the value goes into, so they are refused.
fn read_secret(path: &Path, key: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("upstreamProxy.auth.{key}: {} cannot be read", path.display()))?;
    let value = text.strip_suffix('\n').map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if value.is_empty() || value.chars().any(char::is_control) {
        bail!("upstreamProxy.auth.{key}: {} must hold one line of printable text", path.display());
    }
    Ok(value.to_owned())
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
    fn credentials_are_read_from_files_and_bad_ones_name_the_file() {
        use crate::gateway::config::{ProxyCredentials, Upstream};
        let dir = std::env::temp_dir().join(format!("egressfw-parent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (user, pass) = (dir.join("username"), dir.join("password"));
        std::fs::write(&user, "egress\n").unwrap();
        std::fs::write(&pass, "s3cret: with colon").unwrap();
        let config = |username_file: &Path| UpstreamProxy {
            address: Upstream { host: "proxy.corp.example".into(), port: 3128 },
            hosts: Vec::new(),
            auth: Some(ProxyCredentials {
                username_file: username_file.to_owned(),
                password_file: pass.clone(),
            }),
        };
        let parent = Parent::new(&config(&user)).unwrap();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("egress:s3cret: with colon")
        );
        assert_eq!(parent.authorization().unwrap().to_str().unwrap(), expected);
        assert_eq!(&*parent.shown, "proxy.corp.example:3128");

        let err = |path: &Path| format!("{:#}", Parent::new(&config(path)).err().unwrap());
        let missing = err(&dir.join("nope"));
        assert!(
            missing.contains("upstreamProxy.auth.usernameFile") && missing.contains("nope cannot be read"),
            "{missing}"
        );
        std::fs::write(&user, "a:b").unwrap();
        assert!(err(&user).contains("contains ':'"));
        std::fs::write(&user, "two\nlines\n").unwrap();
        assert!(err(&user).contains("one line of printable text"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_parents_name_is_resolved_as_a_fully_qualified_name() {
        assert_eq!(absolute("proxy.corp"), "proxy.corp.");
        assert_eq!(absolute("proxy.corp.example."), "proxy.corp.example.");
        assert_eq!(absolute("10.20.0.5"), "10.20.0.5");
        assert_eq!(absolute("fd00::5"), "fd00::5");
    }

    #[test]
    fn a_head_that_is_not_http_is_a_refusal() {
        assert_eq!(response_status(b"SSH-2.0\r\n\r\n"), Err(Refusal::ParentRefused(0)));
        assert_eq!(response_status(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"), Ok(407));
    }
}

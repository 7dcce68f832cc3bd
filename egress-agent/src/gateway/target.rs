//! Where a request wants to go, read from what is on the wire: CONNECT authorities, absolute
//! URIs and Host headers, normalised (case, trailing dot, IP-literal forms), checked against each
//! other (no domain fronting), and the request's body framing checked for ambiguity (no request
//! smuggling through the gateway).
//!
//! Depends only on `std`, `httparse` and its sibling modules, so the fuzz targets compile it
//! without the rest of the agent.

use std::{fmt, net::IpAddr};

use super::{
    host::{self, HostName},
    ip_literal,
};

/// A destination host: a checked name or a normalised IP literal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Name(HostName),
    Ip(IpAddr),
}

impl Target {
    /// A name or an IP literal in any accepted form (see `ip_literal`), checked.
    pub fn parse(raw: &str) -> Result<Self, TargetError> {
        match ip_literal::parse(raw) {
            Some(ip) => Ok(Self::Ip(ip)),
            None => host::normalize(raw).map(Self::Name).map_err(|_| TargetError::BadTarget),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(h) => h.fmt(f),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => ip.fmt(f),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    /// Unparseable host or port.
    BadTarget,
    /// Not a request this listener can serve (wrong form, missing Host, bad HTTP).
    BadRequest,
    /// Content-Length with Transfer-Encoding, or more than one Content-Length.
    AmbiguousFraming,
    /// Two sources of the destination (CONNECT/URI, Host, SNI) disagree.
    TargetMismatch,
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`. The port is `None` when absent.
pub fn parse_authority(s: &str) -> Result<(Target, Option<u16>), TargetError> {
    let bad = TargetError::BadTarget;
    if s.is_empty() || s.contains(['@', '/', '?', '#', ' ']) {
        return Err(bad);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(bad)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(bad)?),
        };
        (&s[..inside.len() + 2], port)
    } else {
        match s.rsplit_once(':') {
            // More than one colon without brackets: a bare IPv6 address, which has no port.
            Some((h, _)) if h.contains(':') => (s, None),
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = port
        .map(|p| {
            // Digits only: `+80`, ` 80` and `0x50` are not ports.
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad);
            }
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or(bad)
        })
        .transpose()?;
    Ok((Target::parse(host)?, port))
}

/// The body framing must be unambiguous: one Content-Length, or Transfer-Encoding without one.
/// (hyper already refuses conflicting lengths; this refuses what it would tolerate.)
pub fn check_framing<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<(), TargetError> {
    let (mut lengths, mut te) = (0, false);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1 + value.iter().filter(|b| **b == b',').count();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
        }
    }
    if lengths > 1 || (te && lengths > 0) { Err(TargetError::AmbiguousFraming) } else { Ok(()) }
}

/// The Host header, when present, must name the same destination as the request target.
pub fn check_host_agrees(
    host_header: Option<&[u8]>,
    target: &Target,
    port: u16,
    default_port: u16,
) -> Result<(), TargetError> {
    let Some(raw) = host_header else {
        return Ok(());
    };
    let s = std::str::from_utf8(raw).map_err(|_| TargetError::BadRequest)?;
    let (h, p) = parse_authority(s.trim())?;
    if h == *target && p.unwrap_or(default_port) == port { Ok(()) } else { Err(TargetError::TargetMismatch) }
}

/// What a proxy request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTarget {
    pub connect: bool,
    pub target: Target,
    pub port: u16,
}

/// Reads a proxy request's destination from its target: `CONNECT host:port` (port required) or
/// an absolute `http://` URI (port 80 by default). HTTPS URIs must use CONNECT.
pub fn proxy_target(method: &str, uri: &str) -> Result<RequestTarget, TargetError> {
    if method == "CONNECT" {
        let (target, port) = parse_authority(uri)?;
        return Ok(RequestTarget { connect: true, target, port: port.ok_or(TargetError::BadTarget)? });
    }
    let rest = strip_scheme(uri, "http://").ok_or(TargetError::BadRequest)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (target, port) = parse_authority(authority)?;
    Ok(RequestTarget { connect: false, target, port: port.unwrap_or(80) })
}

fn strip_scheme<'a>(uri: &'a str, scheme: &str) -> Option<&'a str> {
    let head = uri.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme).then(|| &uri[scheme.len()..])
}

/// Parses a proxy request head (as the HTTP proxy listener receives it) and applies every check
/// above. `Ok(None)`: the head is incomplete. The entry point of the `request_head` fuzz target.
pub fn from_head_bytes(buf: &[u8]) -> Result<Option<RequestTarget>, TargetError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(_) => return Err(TargetError::BadRequest),
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(TargetError::BadRequest);
    };
    let pairs = || req.headers.iter().map(|h| (h.name, h.value));
    check_framing(pairs())?;
    let t = proxy_target(method, path)?;
    let mut hosts = pairs().filter(|(n, _)| n.eq_ignore_ascii_case("host"));
    let host = hosts.next().map(|(_, v)| v);
    if hosts.next().is_some() {
        return Err(TargetError::BadRequest);
    }
    if !t.connect {
        check_host_agrees(host, &t.target, t.port, 80)?;
    }
    Ok(Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Target {
        Target::Name(host::normalize(s).unwrap())
    }

    fn ip(s: &str) -> Target {
        Target::Ip(s.parse().unwrap())
    }

    #[test]
    fn authorities() {
        let ok: &[(&str, Target, Option<u16>)] = &[
            ("Example.COM.:443", name("example.com"), Some(443)),
            ("example.com", name("example.com"), None),
            ("[::1]:8080", ip("::1"), Some(8080)),
            ("[::ffff:127.0.0.1]", ip("127.0.0.1"), None),
            ("2130706433:80", ip("127.0.0.1"), Some(80)),
            ("0x7f.1:22", ip("127.0.0.1"), Some(22)),
            ("::1", ip("::1"), None),
        ];
        for (s, t, p) in ok {
            assert_eq!(parse_authority(s), Ok((t.clone(), *p)), "{s}");
        }
        for bad in [
            "",
            ":80",
            "a.com:",
            "a.com:0",
            "a.com:65536",
            "a.com:+80",
            "user@a.com:80",
            "[::1",
            "[::1]x",
            "a b:80",
        ] {
            assert_eq!(parse_authority(bad), Err(TargetError::BadTarget), "{bad:?}");
        }
    }

    #[test]
    fn heads_table() {
        use TargetError::*;
        type Expected = Result<(bool, Target, u16), TargetError>;
        let cases: &[(&str, Expected)] = &[
            ("CONNECT a.com:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", Ok((true, name("a.com"), 443))),
            ("CONNECT a.com HTTP/1.1\r\n\r\n", Err(BadTarget)),
            ("GET http://a.com/x HTTP/1.1\r\nHost: a.com\r\n\r\n", Ok((false, name("a.com"), 80))),
            (
                "GET HTTP://A.com:8080/x HTTP/1.1\r\nHost: a.com:8080\r\n\r\n",
                Ok((false, name("a.com"), 8080)),
            ),
            ("GET http://a.com/ HTTP/1.1\r\nHost: b.com\r\n\r\n", Err(TargetMismatch)),
            ("GET http://a.com/ HTTP/1.1\r\nHost: a.com:81\r\n\r\n", Err(TargetMismatch)),
            ("GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n", Err(BadRequest)),
            ("GET https://a.com/ HTTP/1.1\r\n\r\n", Err(BadRequest)),
            ("GET /x HTTP/1.1\r\nHost: a.com\r\n\r\n", Err(BadRequest)),
            (
                "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(AmbiguousFraming),
            ),
            (
                "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                Err(AmbiguousFraming),
            ),
            ("POST http://a.com/ HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", Err(AmbiguousFraming)),
            ("GET http://0177.0.0.1/ HTTP/1.1\r\n\r\n", Ok((false, ip("127.0.0.1"), 80))),
            ("GARBAGE\r\n\r\n", Err(BadRequest)),
        ];
        for (head, want) in cases {
            let got = from_head_bytes(head.as_bytes()).map(|t| t.map(|t| (t.connect, t.target, t.port)));
            assert_eq!(got, want.clone().map(Some), "{head:?}");
        }
        assert_eq!(from_head_bytes(b"CONNECT a.com:443 HTTP/1.1\r\nHo"), Ok(None));
    }
}

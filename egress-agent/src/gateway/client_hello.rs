//! Reads a TLS ClientHello without terminating TLS: the SNI passthrough listener peeks the
//! client's first bytes, takes the server name, decides, and then relays those same bytes
//! untouched. Only the fields the decision needs are read (SNI, ALPN, whether ECH is offered);
//! everything else is length-checked and skipped.
//!
//! This file depends on `std` and `thiserror` only: the fuzz crate (`fuzz/`) compiles it by
//! `#[path]` without the rest of the agent.
//!
//! The parser is restartable: [`parse`] is called again with everything read so far after each
//! read. Every check runs in byte order as soon as its bytes are there, so a decision taken on a
//! prefix is the decision the whole input would get (the fuzz target checks exactly that).

use std::collections::HashSet;

/// Enough for any ClientHello seen in practice (a few hundred bytes, about 1.5 KiB with a
/// post-quantum key share) with room for large session tickets, while keeping what an
/// unauthenticated client can make the gateway buffer small.
pub const DEFAULT_MAX_BYTES: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
/// RFC 8446 5.1: a TLSPlaintext fragment is at most 2^14 bytes.
const MAX_FRAGMENT: usize = 1 << 14;
/// DNS names are at most 255 octets on the wire; anything longer is not a host name, and the
/// cap keeps the name that ends up in logs and errors short.
const MAX_SERVER_NAME: usize = 255;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const CONTENT_HEARTBEAT: u8 = 24;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// draft-ietf-tls-esni: encrypted_client_hello.
const EXT_ECH: u16 = 0xfe0d;
/// RFC 6066 3: the only NameType defined.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the gateway needs from a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI host name exactly as sent (case kept; the caller normalises). `None` when the
    /// client sent no server_name extension. Only `[A-Za-z0-9._-]`, so an IPv4 literal such as
    /// `10.0.0.1` (which RFC 6066 forbids but some clients send) does come through: the caller
    /// runs every name through the IP-literal check anyway.
    pub server_name: Option<String>,
    /// The ALPN protocol names offered, in the client's order (empty when not offered).
    pub alpn: Vec<Vec<u8>>,
    /// The version field of the ClientHello body (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// The client offers Encrypted Client Hello. The name above is then the outer (public) name:
    /// the gateway judges that name like any SNI (see `tunnel::sni_verdict`), since browsers send
    /// GREASE ECH with the real name outside, and real ECH only reaches an allowed public name.
    pub ech: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The ClientHello is not complete yet: read more and call [`parse`] again with everything.
    NeedMore,
    Done(ClientHello),
}

#[derive(thiserror::Error, Debug, PartialEq, Eq, Clone)]
pub enum HelloError {
    #[error(
        "the client did not start with a TLS record; is it speaking plain text (HTTP?) to the TLS passthrough port?"
    )]
    NotTls,
    #[error("the client sent an SSLv2-format hello, which no TLS version the gateway relays uses")]
    Sslv2Hello,
    #[error("the client's first TLS record has content type {0}, not handshake (22)")]
    NotHandshake(u8),
    #[error("the client's first TLS handshake message has type {0}, not ClientHello (1)")]
    NotClientHello(u8),
    #[error(
        "the ClientHello needs at least {needed} bytes, more than the {limit}-byte limit (raise the gateway's ClientHello limit if this client is legitimate)"
    )]
    TooLarge { needed: usize, limit: usize },
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("malformed ClientHello: extension {0} appears twice (RFC 8446 4.2 forbids it)")]
    DuplicateExtension(u16),
    #[error("the ClientHello's server name (SNI) {0}")]
    BadServerName(SniProblem),
}

/// Why a server_name extension was refused. The name is shown escaped and at most
/// [`MAX_SERVER_NAME`] bytes long.
#[derive(thiserror::Error, Debug, PartialEq, Eq, Clone)]
pub enum SniProblem {
    #[error("list is empty")]
    EmptyList,
    #[error("list has more than one name (RFC 6066 allows one host_name)")]
    MoreThanOneName,
    #[error("has name type {0}, not host_name (0)")]
    NotHostNameType(u8),
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long, more than a DNS name can be (255)")]
    TooLong(usize),
    #[error(
        "{0:?} has a character that is not a letter, digit, '.', '-' or '_' (IP addresses and IDNs other than xn-- punycode are not host names)"
    )]
    BadCharacter(String),
}

impl HelloError {
    /// A stable snake_case label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::Sslv2Hello => "sslv2_hello",
            Self::NotHandshake(_) => "not_handshake",
            Self::NotClientHello(_) => "not_client_hello",
            Self::TooLarge { .. } => "client_hello_too_large",
            Self::Malformed(_) => "malformed_client_hello",
            Self::DuplicateExtension(_) => "duplicate_extension",
            Self::BadServerName(_) => "bad_server_name",
        }
    }

    /// The alert to send before closing, when the client is speaking TLS at all. A client that
    /// is not (plain text, SSLv2) would only see garbage, and a hello too large to read has not
    /// been understood well enough to answer.
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            Self::NotTls | Self::Sslv2Hello | Self::TooLarge { .. } => None,
            Self::NotHandshake(_) | Self::NotClientHello(_) => Some(AlertDescription::UnexpectedMessage),
            Self::Malformed(_) => Some(AlertDescription::DecodeError),
            Self::DuplicateExtension(_) => Some(AlertDescription::IllegalParameter),
            Self::BadServerName(_) => Some(AlertDescription::UnrecognizedName),
        }
    }
}

/// TLS alert descriptions (RFC 8446 6) the gateway sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    UnexpectedMessage = 10,
    IllegalParameter = 47,
    /// Policy denies the destination.
    AccessDenied = 49,
    DecodeError = 50,
    /// The upstream could not be reached.
    InternalError = 80,
    /// No SNI, or a name the gateway does not serve.
    UnrecognizedName = 112,
}

/// A fatal alert record to write before closing a connection the gateway refuses. Sent in
/// plain text, which is correct before the handshake: the record version is 0x0303 as RFC 8446
/// 5.1 asks for every record after the first ClientHello.
pub fn alert(desc: AlertDescription) -> [u8; 7] {
    const FATAL: u8 = 2;
    [CONTENT_ALERT, 3, 3, 0, 2, FATAL, desc as u8]
}

/// Parses the ClientHello at the start of `buf`, which holds everything read from the client
/// so far. Returns [`Progress::NeedMore`] while it is incomplete, and [`HelloError::TooLarge`]
/// as soon as the records announced need more than `max_bytes`, so a caller that reads until
/// `NeedMore` stops never buffers more than `max_bytes`. Bytes after the record that ends the
/// ClientHello (a ChangeCipherSpec, early data) are left alone.
pub fn parse(buf: &[u8], max_bytes: usize) -> Result<Progress, HelloError> {
    let too_large = |needed: usize| HelloError::TooLarge { needed, limit: max_bytes };
    // The handshake message, reassembled from the fragments of the records read so far.
    let mut handshake = Vec::new();
    // Start of the next record in `buf`.
    let mut pos: usize = 0;
    // Handshake bytes announced by the record headers read so far.
    let mut announced = 0;
    // Header plus body of the ClientHello, once its handshake header has been read.
    let mut hello_len: Option<usize> = None;
    loop {
        // At a record boundary with the ClientHello still incomplete: at least one more record
        // (header and a byte) is needed, or the rest of a message whose length is known.
        let missing = hello_len.unwrap_or(HANDSHAKE_HEADER).saturating_sub(announced).max(1);
        let needed = pos.saturating_add(RECORD_HEADER).saturating_add(missing);
        if needed > max_bytes {
            return Err(too_large(needed));
        }

        let header = buf.get(pos..).unwrap_or_default();
        let header = &header[..header.len().min(RECORD_HEADER)];
        check_record_header(header, pos == 0)?;
        let &[_, _, _, len_hi, len_lo] = header else {
            return Ok(Progress::NeedMore);
        };
        let fragment_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if fragment_len == 0 {
            // RFC 8446 5.1: zero-length handshake fragments must not be sent.
            return Err(HelloError::Malformed("a handshake record is empty"));
        }
        if fragment_len > MAX_FRAGMENT {
            return Err(HelloError::Malformed("a record is longer than 2^14 bytes"));
        }
        let record_end = pos + RECORD_HEADER + fragment_len;
        if record_end > max_bytes {
            return Err(too_large(record_end));
        }
        announced += fragment_len;
        if hello_len.is_some_and(|len| announced > len) {
            return Err(boundary_error());
        }

        let fragment = &buf[pos + RECORD_HEADER..record_end.min(buf.len())];
        handshake.extend_from_slice(fragment);
        if hello_len.is_none() {
            if let Some(&msg_type) = handshake.first()
                && msg_type != HANDSHAKE_CLIENT_HELLO
            {
                return Err(HelloError::NotClientHello(msg_type));
            }
            if let Some(&[_, a, b, c]) = handshake.get(..HANDSHAKE_HEADER) {
                let len = HANDSHAKE_HEADER + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
                if announced > len {
                    return Err(boundary_error());
                }
                let needed =
                    if len > announced { record_end + RECORD_HEADER + (len - announced) } else { record_end };
                if needed > max_bytes {
                    return Err(too_large(needed));
                }
                hello_len = Some(len);
            }
        }

        if record_end > buf.len() {
            return Ok(Progress::NeedMore);
        }
        if let Some(len) = hello_len
            && handshake.len() == len
        {
            return parse_body(&handshake[HANDSHAKE_HEADER..]).map(Progress::Done);
        }
        pos = record_end;
    }
}

/// RFC 8446 5.1: a message that precedes a key change must end at a record boundary, and the
/// client sends nothing else before the server answers its first ClientHello.
fn boundary_error() -> HelloError {
    HelloError::Malformed("the record that ends the ClientHello carries more data")
}

/// Checks the bytes of a record header that have arrived (up to 5), in order.
fn check_record_header(header: &[u8], first: bool) -> Result<(), HelloError> {
    if let Some(&content_type) = header.first() {
        match content_type {
            CONTENT_HANDSHAKE => {}
            // SSLv2 framing: a two-byte length with the top bit set.
            _ if first && content_type & 0x80 != 0 => return Err(HelloError::Sslv2Hello),
            CONTENT_CHANGE_CIPHER_SPEC | CONTENT_ALERT | CONTENT_APPLICATION_DATA | CONTENT_HEARTBEAT
                if first =>
            {
                return Err(HelloError::NotHandshake(content_type));
            }
            _ if first => return Err(HelloError::NotTls),
            // Handshake messages must not be interleaved with other record types (RFC 8446 5.1).
            _ => return Err(HelloError::Malformed("another record type interrupts the ClientHello")),
        }
    }
    // legacy_record_version: 0x0300 (SSLv3) up to 0x0304; in practice 0x0301 or 0x0303.
    if let Some(&major) = header.get(1)
        && major != 3
    {
        return Err(bad_version(first));
    }
    if let Some(&minor) = header.get(2)
        && minor > 4
    {
        return Err(bad_version(first));
    }
    Ok(())
}

fn bad_version(first: bool) -> HelloError {
    if first { HelloError::NotTls } else { HelloError::Malformed("a record version is not 3.0 to 3.4") }
}

/// The ClientHello body (RFC 8446 4.1.2; RFC 5246 7.4.1.2 for the optional extensions).
fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(body);
    let legacy_version = r.u16("the ClientHello ends inside its version")?;
    r.take(32, "the ClientHello ends inside its random")?;
    let session_id = r.vec8("the session id runs past the end of the ClientHello")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("the session id is longer than 32 bytes"));
    }
    let suites = r.vec16("the cipher suite list runs past the end of the ClientHello")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("the cipher suite list is empty or has an odd length"));
    }
    let compression = r.vec8("the compression method list runs past the end of the ClientHello")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("the compression method list is empty"));
    }
    let mut hello = ClientHello { server_name: None, alpn: Vec::new(), legacy_version, ech: false };
    // Before TLS 1.3 the extension block may be absent altogether.
    if r.0.is_empty() {
        return Ok(hello);
    }
    let extensions = r.vec16("the extension list runs past the end of the ClientHello")?;
    if !r.0.is_empty() {
        return Err(HelloError::Malformed("bytes follow the extension list"));
    }
    let mut seen = HashSet::new();
    let mut r = Reader(extensions);
    while !r.0.is_empty() {
        let ext_type = r.u16("an extension header is cut short")?;
        let data = r.vec16("an extension runs past the end of the extension list")?;
        // A second server_name could otherwise carry the name the upstream really uses.
        if !seen.insert(ext_type) {
            return Err(HelloError::DuplicateExtension(ext_type));
        }
        match ext_type {
            EXT_SERVER_NAME => hello.server_name = Some(server_name(data)?),
            EXT_ALPN => hello.alpn = alpn(data)?,
            EXT_ECH => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// RFC 6066 3: `ServerName server_name_list<1..2^16-1>`, each `NameType name_type` and
/// `HostName host_name<1..2^16-1>`.
fn server_name(data: &[u8]) -> Result<String, HelloError> {
    let mut r = Reader(data);
    let list = r.vec16("the server name list runs past the end of its extension")?;
    if !r.0.is_empty() {
        return Err(HelloError::Malformed("bytes follow the server name list"));
    }
    if list.is_empty() {
        return Err(HelloError::BadServerName(SniProblem::EmptyList));
    }
    let mut r = Reader(list);
    let name_type = r.u8("a server name entry is cut short")?;
    let name = r.vec16("a server name runs past the end of its list")?;
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(HelloError::BadServerName(SniProblem::NotHostNameType(name_type)));
    }
    if !r.0.is_empty() {
        return Err(HelloError::BadServerName(SniProblem::MoreThanOneName));
    }
    if name.is_empty() {
        return Err(HelloError::BadServerName(SniProblem::Empty));
    }
    if name.len() > MAX_SERVER_NAME {
        return Err(HelloError::BadServerName(SniProblem::TooLong(name.len())));
    }
    // The same alphabet as host::normalize, so what passes here is a name, never a path, a
    // port, an IPv6 literal or bytes a log line would misrender.
    if !name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
        return Err(HelloError::BadServerName(SniProblem::BadCharacter(
            String::from_utf8_lossy(name).into_owned(),
        )));
    }
    Ok(name.iter().map(|&b| char::from(b)).collect())
}

/// RFC 7301 3.1: `ProtocolName protocol_name_list<2..2^16-1>`, each `opaque<1..2^8-1>`.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader(data);
    let list = r.vec16("the ALPN list runs past the end of its extension")?;
    if !r.0.is_empty() {
        return Err(HelloError::Malformed("bytes follow the ALPN list"));
    }
    if list.is_empty() {
        return Err(HelloError::Malformed("the ALPN list is empty"));
    }
    let mut r = Reader(list);
    let mut protocols = Vec::new();
    while !r.0.is_empty() {
        let protocol = r.vec8("an ALPN protocol name runs past the end of its list")?;
        if protocol.is_empty() {
            return Err(HelloError::Malformed("an ALPN protocol name is empty"));
        }
        protocols.push(protocol.to_vec());
    }
    Ok(protocols)
}

/// Big-endian reads that fail, naming the field, instead of running past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, short: &'static str) -> Result<&'a [u8], HelloError> {
        let Some((head, rest)) = self.0.split_at_checked(n) else {
            return Err(HelloError::Malformed(short));
        };
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, short: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, short)?[0])
    }

    fn u16(&mut self, short: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, short)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, short: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(short)?;
        self.take(usize::from(n), short)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, short: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(short)?;
        self.take(usize::from(n), short)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

    use super::*;

    const MAX: usize = DEFAULT_MAX_BYTES;

    /// The first flight of a real client: rustls writes its ClientHello as one record.
    fn rustls_flight(name: &str, alpn: &[&[u8]], sni: bool) -> Vec<u8> {
        let (_, flight) = rustls_client(name, alpn, sni);
        flight
    }

    fn rustls_client(name: &str, alpn: &[&[u8]], sni: bool) -> (ClientConnection, Vec<u8>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = sni;
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).unwrap();
        }
        (conn, flight)
    }

    /// The handshake message of a flight made of exactly one handshake record.
    fn handshake_of(flight: &[u8]) -> &[u8] {
        assert_eq!(flight[0], CONTENT_HANDSHAKE);
        let len = usize::from(u16::from_be_bytes([flight[3], flight[4]]));
        assert_eq!(flight.len(), RECORD_HEADER + len, "one record only");
        &flight[RECORD_HEADER..]
    }

    /// Frames a handshake message into records of the given sizes (the last size repeats).
    fn frame(handshake: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = handshake;
        let mut sizes = sizes.iter().copied();
        let mut size = 0;
        while !rest.is_empty() {
            size = sizes.next().unwrap_or(size);
            let (fragment, tail) = rest.split_at(size.min(rest.len()));
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
            out.extend_from_slice(fragment);
            rest = tail;
        }
        out
    }

    fn one_record(handshake: &[u8]) -> Vec<u8> {
        frame(handshake, &[MAX_FRAGMENT])
    }

    fn prefixed16(data: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    fn handshake_message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut out = vec![msg_type, len[1], len[2], len[3]];
        out.extend_from_slice(body);
        out
    }

    /// A ClientHello body with a 32-byte session id, one cipher suite, null compression and
    /// the given raw extension block (`None`: no block at all).
    fn body(extension_block: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0x11; 32]);
        b.push(32);
        b.extend_from_slice(&[0x22; 32]);
        b.extend_from_slice(&[0, 2, 0x13, 0x01]);
        b.extend_from_slice(&[1, 0]);
        if let Some(block) = extension_block {
            b.extend_from_slice(&prefixed16(block));
        }
        b
    }

    /// Offset in [`body`]'s output where the extension list's length starts.
    const EXTENSIONS_AT: usize = 2 + 32 + 1 + 32 + 2 + 2 + 2;

    fn extensions(list: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (ext_type, data) in list {
            out.extend_from_slice(&ext_type.to_be_bytes());
            out.extend_from_slice(&prefixed16(data));
        }
        out
    }

    fn sni_entries(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&prefixed16(name));
        }
        (EXT_SERVER_NAME, prefixed16(&list))
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        sni_entries(&[(NAME_TYPE_HOST_NAME, name)])
    }

    fn alpn_ext(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend_from_slice(p);
        }
        (EXT_ALPN, prefixed16(&list))
    }

    /// A one-record flight holding a hand-made ClientHello with these extensions.
    fn hand_flight(list: &[(u16, Vec<u8>)]) -> Vec<u8> {
        one_record(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body(Some(&extensions(list)))))
    }

    fn parse_max(buf: &[u8]) -> Result<Progress, HelloError> {
        parse(buf, MAX)
    }

    fn done(buf: &[u8]) -> ClientHello {
        match parse_max(buf) {
            Ok(Progress::Done(hello)) => hello,
            other => panic!("expected a ClientHello, got {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> HelloError {
        match parse_max(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn rustls_hello_gives_its_server_name() {
        let hello = done(&rustls_flight("api.example.com", &[], true));
        assert_eq!(hello.server_name.as_deref(), Some("api.example.com"));
        assert!(hello.alpn.is_empty());
        assert_eq!(hello.legacy_version, 0x0303);
        assert!(!hello.ech);
    }

    #[test]
    fn rustls_hello_gives_its_alpn_in_order() {
        let hello = done(&rustls_flight("example.com", &[b"h2", b"http/1.1"], true));
        assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(hello.server_name.as_deref(), Some("example.com"));
    }

    #[test]
    fn no_sni_is_not_an_error() {
        // With SNI turned off, and for an IP address (rustls never sends those as SNI).
        assert_eq!(done(&rustls_flight("example.com", &[], false)).server_name, None);
        assert_eq!(done(&rustls_flight("192.0.2.1", &[], true)).server_name, None);
        let hello = done(&hand_flight(&[alpn_ext(&[b"h2"])]));
        assert_eq!((hello.server_name, hello.alpn), (None, vec![b"h2".to_vec()]));
    }

    #[test]
    fn hello_without_an_extension_block() {
        let flight = one_record(&handshake_message(HANDSHAKE_CLIENT_HELLO, &body(None)));
        assert_eq!(
            done(&flight),
            ClientHello { server_name: None, alpn: Vec::new(), legacy_version: 0x0303, ech: false }
        );
    }

    #[test]
    fn one_byte_at_a_time_needs_more_until_the_last() {
        for flight in [
            rustls_flight("example.com", &[b"h2"], true),
            frame(handshake_of(&rustls_flight("example.com", &[], true)), &[3, 50]),
        ] {
            let whole = done(&flight);
            for end in 0..flight.len() {
                assert_eq!(parse_max(&flight[..end]), Ok(Progress::NeedMore), "prefix of {end} bytes");
            }
            assert_eq!(done(&flight), whole);
        }
    }

    #[test]
    fn hello_split_across_records() {
        let flight = rustls_flight("split.example.com", &[b"h2"], true);
        let whole = done(&flight);
        let handshake = handshake_of(&flight);
        // Two records; the handshake header itself split; one byte per record.
        for sizes in [&[100][..], &[2, 500], &[1]] {
            let split = frame(handshake, sizes);
            assert!(split.len() > flight.len());
            assert_eq!(done(&split), whole, "record sizes {sizes:?}");
        }
    }

    #[test]
    fn bytes_after_the_hello_records_are_left_alone() {
        let mut flight = rustls_flight("example.com", &[], true);
        let whole = done(&flight);
        // TLS 1.3 middlebox compatibility ChangeCipherSpec, then early data.
        flight.extend_from_slice(&[CONTENT_CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1]);
        flight.extend_from_slice(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 3, 9, 9, 9]);
        assert_eq!(done(&flight), whole);
    }

    #[test]
    fn the_record_that_ends_the_hello_must_end_with_it() {
        let mut handshake = handshake_of(&rustls_flight("example.com", &[], true)).to_vec();
        handshake.extend_from_slice(&handshake_message(2, &[0; 8]));
        assert_eq!(err(&one_record(&handshake)), boundary_error());
        // Known from the record header alone, before the rest arrives.
        let flight = one_record(&handshake);
        assert_eq!(parse_max(&flight[..RECORD_HEADER + HANDSHAKE_HEADER]), Err(boundary_error()));
        // The same when the record that overshoots is not the first.
        let flight = frame(&handshake, &[10, 16384]);
        assert_eq!(parse_max(&flight[..2 * RECORD_HEADER + 10]), Err(boundary_error()));
    }

    #[test]
    fn size_cap() {
        let flight = rustls_flight("example.com", &[], true);
        assert!(matches!(parse(&flight, flight.len()), Ok(Progress::Done(_))), "exactly at the cap");
        assert_eq!(
            parse(&flight, flight.len() - 1),
            Err(HelloError::TooLarge { needed: flight.len(), limit: flight.len() - 1 })
        );
        // A handshake header announcing 1 MiB is refused as soon as it arrives.
        let big = [CONTENT_HANDSHAKE, 3, 1, 0x10, 0, HANDSHAKE_CLIENT_HELLO, 0x10, 0, 0];
        assert_eq!(parse_max(&big[..8]), Ok(Progress::NeedMore));
        assert_eq!(parse_max(&big), Err(HelloError::TooLarge { needed: 0x10_0000 + 4 + 10, limit: MAX }));
        // A record that alone goes past the cap is refused from its header.
        let record = [CONTENT_HANDSHAKE, 3, 1, 0x40, 0];
        assert_eq!(parse(&record, 1000), Err(HelloError::TooLarge { needed: 5 + 0x4000, limit: 1000 }));
        // One-byte records: every header counts. Three records in, the next header and byte
        // cannot fit; four in, the handshake length says at least one more header and the rest.
        let handshake_len = handshake_of(&flight).len();
        let tiny = frame(handshake_of(&flight), &[1]);
        assert!(matches!(parse(&tiny, tiny.len()), Ok(Progress::Done(_))));
        assert_eq!(parse(&tiny[..18], 23), Err(HelloError::TooLarge { needed: 24, limit: 23 }));
        let limit = handshake_len + 24;
        assert_eq!(parse(&tiny[..24], limit), Err(HelloError::TooLarge { needed: limit + 1, limit }));
        assert_eq!(parse(&tiny[..24], limit + 1), Ok(Progress::NeedMore));
    }

    #[test]
    fn need_more_only_below_the_cap() {
        // A caller that stops at NeedMore never holds more than the cap.
        let flight = frame(handshake_of(&rustls_flight("example.com", &[], true)), &[1, 7]);
        let limit = 200;
        for end in 0..=flight.len() {
            if let Ok(Progress::NeedMore) = parse(&flight[..end], limit) {
                assert!(end < limit, "NeedMore with {end} bytes and a {limit}-byte cap");
            }
        }
    }

    #[test]
    fn not_tls_at_all() {
        assert_eq!(err(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"), HelloError::NotTls);
        assert_eq!(err(b"G"), HelloError::NotTls);
        assert_eq!(err(b"SSH-2.0-OpenSSH_9.6\r\n"), HelloError::NotTls);
        // A handshake type byte, then a version that is not 3.x.
        assert_eq!(err(&[CONTENT_HANDSHAKE, 2]), HelloError::NotTls);
        assert_eq!(err(&[CONTENT_HANDSHAKE, 3, 9]), HelloError::NotTls);
        // SSLv2 CLIENT-HELLO framing, as very old clients send.
        assert_eq!(err(&[0x80, 0x2e, 0x01, 0x00, 0x02]), HelloError::Sslv2Hello);
        assert_eq!(parse_max(&[]), Ok(Progress::NeedMore));
        assert_eq!(parse_max(&[CONTENT_HANDSHAKE, 3, 1, 0]), Ok(Progress::NeedMore));
    }

    #[test]
    fn other_records_and_messages_first() {
        assert_eq!(err(&[CONTENT_APPLICATION_DATA, 3, 3, 0, 1, 0]), HelloError::NotHandshake(23));
        assert_eq!(err(&[CONTENT_ALERT, 3, 3]), HelloError::NotHandshake(21));
        assert_eq!(err(&[CONTENT_CHANGE_CIPHER_SPEC]), HelloError::NotHandshake(20));
        // A ServerHello, decided from its first byte.
        assert_eq!(err(&[CONTENT_HANDSHAKE, 3, 3, 0, 40, 2]), HelloError::NotClientHello(2));
        // A record of another type between two fragments of the hello.
        let mut flight = frame(handshake_of(&rustls_flight("example.com", &[], true)), &[10]);
        flight.splice(15..15, [CONTENT_CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1]);
        assert!(matches!(err(&flight), HelloError::Malformed(m) if m.contains("interrupts")));
    }

    #[test]
    fn bad_records() {
        assert!(
            matches!(err(&[CONTENT_HANDSHAKE, 3, 1, 0, 0]), HelloError::Malformed(m) if m.contains("empty"))
        );
        assert!(matches!(
            err(&[CONTENT_HANDSHAKE, 3, 1, 0x40, 1]),
            HelloError::Malformed(m) if m.contains("2^14")
        ));
        // A zero-length record in the middle, and a later record with a bad version.
        let mut flight = frame(handshake_of(&rustls_flight("example.com", &[], true)), &[10]);
        let second = flight.clone();
        flight.splice(15..15, [CONTENT_HANDSHAKE, 3, 1, 0, 0]);
        assert!(matches!(err(&flight), HelloError::Malformed(m) if m.contains("empty")));
        let mut flight = second;
        flight[16] = 4;
        assert!(matches!(err(&flight), HelloError::Malformed(m) if m.contains("version")));
    }

    #[test]
    fn every_cut_of_the_body_is_malformed_except_before_the_extensions() {
        let full = body(Some(&extensions(&[sni(b"example.com"), alpn_ext(&[b"h2"])])));
        assert!(done(&one_record(&handshake_message(1, &full))).server_name.is_some());
        for cut in 0..full.len() {
            let flight = one_record(&handshake_message(1, &full[..cut]));
            let result = parse_max(&flight);
            if cut == EXTENSIONS_AT {
                assert!(matches!(result, Ok(Progress::Done(_))), "cut at {cut}: {result:?}");
            } else {
                assert!(matches!(result, Err(HelloError::Malformed(_))), "cut at {cut}: {result:?}");
            }
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let list = extensions(&[sni(b"example.com"), alpn_ext(&[b"h2", b"http/1.1"])]);
        let good = body(Some(&list));
        let sni_at = EXTENSIONS_AT + 2;
        let alpn_at = sni_at + 4 + 2 + 3 + 11;
        // Low byte of each length field, named.
        let fields = [
            ("session id", 34),
            ("cipher suites", 68),
            ("compression methods", 71),
            ("extension list", EXTENSIONS_AT + 1),
            ("server_name extension", sni_at + 3),
            ("server name list", sni_at + 5),
            ("host name", sni_at + 8),
            ("alpn extension", alpn_at + 3),
            ("alpn list", alpn_at + 5),
            ("first protocol", alpn_at + 6),
            ("second protocol", alpn_at + 9),
        ];
        for (field, at) in fields {
            for delta in [1u8, 0xff] {
                let mut bad = good.clone();
                bad[at] = bad[at].wrapping_add(delta);
                let result = parse_max(&one_record(&handshake_message(1, &bad)));
                assert!(result.is_err(), "{field} length off by {delta:+}: {result:?}");
            }
        }
        // The same fields unchanged parse, so the offsets above point where they should.
        let hello = done(&one_record(&handshake_message(1, &good)));
        assert_eq!(hello.server_name.as_deref(), Some("example.com"));
        assert_eq!(hello.alpn.len(), 2);
        // The handshake length itself: one less, and the hello ends mid-message.
        let mut handshake = handshake_message(1, &good);
        handshake[3] -= 1;
        handshake.pop();
        assert!(matches!(err(&one_record(&handshake)), HelloError::Malformed(_)));
    }

    #[test]
    fn bounded_fields_are_checked() {
        // Well-formed lengths, but values the RFC rules out.
        let with = |session_id: &[u8], suites: &[u8], compression: &[u8]| {
            let mut b = vec![3, 3];
            b.extend_from_slice(&[0; 32]);
            b.push(u8::try_from(session_id.len()).unwrap());
            b.extend_from_slice(session_id);
            b.extend_from_slice(&prefixed16(suites));
            b.push(u8::try_from(compression.len()).unwrap());
            b.extend_from_slice(compression);
            parse_max(&one_record(&handshake_message(HANDSHAKE_CLIENT_HELLO, &b)))
        };
        assert!(matches!(with(&[7; 32], &[0x13, 1], &[0]), Ok(Progress::Done(_))));
        assert!(matches!(with(&[], &[0x13, 1], &[0]), Ok(Progress::Done(_))));
        let malformed = |r: Result<Progress, HelloError>, what: &str| {
            assert!(matches!(&r, Err(HelloError::Malformed(m)) if m.contains(what)), "{what}: {r:?}");
        };
        malformed(with(&[7; 33], &[0x13, 1], &[0]), "longer than 32");
        malformed(with(&[], &[0x13, 1, 0x13], &[0]), "odd length");
        malformed(with(&[], &[], &[0]), "cipher suite list is empty");
        malformed(with(&[], &[0x13, 1], &[]), "compression method list is empty");
    }

    #[test]
    fn duplicate_extensions_are_refused() {
        assert_eq!(
            err(&hand_flight(&[sni(b"a.example"), alpn_ext(&[b"h2"]), sni(b"b.example")])),
            HelloError::DuplicateExtension(EXT_SERVER_NAME)
        );
        assert_eq!(
            err(&hand_flight(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])])),
            HelloError::DuplicateExtension(EXT_ALPN)
        );
        assert_eq!(
            err(&hand_flight(&[(0x002b, vec![2, 3, 4]), (0x002b, vec![2, 3, 4])])),
            HelloError::DuplicateExtension(0x002b)
        );
    }

    #[test]
    fn server_name_must_be_one_plain_host_name() {
        let bad = |list: &[(u16, Vec<u8>)]| match err(&hand_flight(list)) {
            HelloError::BadServerName(problem) => problem,
            other => panic!("expected a server name problem, got {other:?}"),
        };
        assert_eq!(bad(&[sni(b"")]), SniProblem::Empty);
        assert_eq!(bad(&[sni(b"exa mple.com")]), SniProblem::BadCharacter("exa mple.com".into()));
        assert_eq!(bad(&[sni(b"::1")]), SniProblem::BadCharacter("::1".into()));
        assert_eq!(bad(&[sni(b"[2001:db8::1]")]), SniProblem::BadCharacter("[2001:db8::1]".into()));
        assert_eq!(bad(&[sni(b"example.com:443")]), SniProblem::BadCharacter("example.com:443".into()));
        assert_eq!(
            bad(&[sni(b"evil.com\0.good.com")]),
            SniProblem::BadCharacter("evil.com\0.good.com".into())
        );
        assert_eq!(bad(&[sni("bücher.de".as_bytes())]), SniProblem::BadCharacter("bücher.de".into()));
        assert_eq!(bad(&[sni(&[b'a'; 256])]), SniProblem::TooLong(256));
        assert_eq!(bad(&[sni_entries(&[(1, b"example.com")])]), SniProblem::NotHostNameType(1));
        assert_eq!(bad(&[sni_entries(&[(0, b"a.example"), (0, b"b.example")])]), SniProblem::MoreThanOneName);
        assert_eq!(bad(&[sni_entries(&[])]), SniProblem::EmptyList);
        // Case is kept (the caller normalises); 255 bytes is still a name; an IPv4 literal
        // passes through to the caller's IP-literal check.
        assert_eq!(done(&hand_flight(&[sni(b"Example.COM.")])).server_name.as_deref(), Some("Example.COM."));
        assert!(done(&hand_flight(&[sni(&[b'a'; 255])])).server_name.is_some());
        assert_eq!(done(&hand_flight(&[sni(b"10.0.0.1")])).server_name.as_deref(), Some("10.0.0.1"));
        // The message names the value, escaped.
        let e = err(&hand_flight(&[sni(b"a\nb")])).to_string();
        assert!(e.contains(r#""a\nb""#), "{e}");
    }

    #[test]
    fn alpn_must_be_well_formed() {
        assert!(
            matches!(err(&hand_flight(&[alpn_ext(&[])])), HelloError::Malformed(m) if m.contains("ALPN list is empty"))
        );
        assert!(matches!(
            err(&hand_flight(&[alpn_ext(&[b"h2", b""])])),
            HelloError::Malformed(m) if m.contains("protocol name is empty")
        ));
    }

    #[test]
    fn ech_is_reported_with_the_outer_name() {
        let hello = done(&hand_flight(&[sni(b"public.example"), (EXT_ECH, vec![0, 1, 2, 3])]));
        assert!(hello.ech);
        assert_eq!(hello.server_name.as_deref(), Some("public.example"));
    }

    #[test]
    fn alerts_are_records_a_real_client_understands() {
        assert_eq!(alert(AlertDescription::UnrecognizedName), [21, 3, 3, 0, 2, 2, 112]);
        assert_eq!(alert(AlertDescription::AccessDenied), [21, 3, 3, 0, 2, 2, 49]);
        for (ours, theirs) in [
            (AlertDescription::UnrecognizedName, rustls::AlertDescription::UnrecognisedName),
            (AlertDescription::AccessDenied, rustls::AlertDescription::AccessDenied),
        ] {
            let (mut conn, _) = rustls_client("example.com", &[], true);
            conn.read_tls(&mut &alert(ours)[..]).unwrap();
            assert_eq!(conn.process_new_packets().unwrap_err(), rustls::Error::AlertReceived(theirs));
        }
    }

    #[test]
    fn reasons_are_stable_labels() {
        let cases = [
            (HelloError::NotTls, "not_tls"),
            (HelloError::Sslv2Hello, "sslv2_hello"),
            (HelloError::NotHandshake(23), "not_handshake"),
            (HelloError::NotClientHello(2), "not_client_hello"),
            (HelloError::TooLarge { needed: 2, limit: 1 }, "client_hello_too_large"),
            (HelloError::Malformed("x"), "malformed_client_hello"),
            (HelloError::DuplicateExtension(0), "duplicate_extension"),
            (HelloError::BadServerName(SniProblem::Empty), "bad_server_name"),
        ];
        for (e, label) in cases {
            assert_eq!(e.reason(), label, "{e}");
        }
        assert_eq!(
            HelloError::TooLarge { needed: 20000, limit: 16384 }.to_string(),
            "the ClientHello needs at least 20000 bytes, more than the 16384-byte limit \
             (raise the gateway's ClientHello limit if this client is legitimate)"
        );
    }
}

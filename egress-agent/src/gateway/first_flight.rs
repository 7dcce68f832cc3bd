//! What a client sends first inside a CONNECT tunnel, told from the bytes read so far: a TLS
//! ClientHello, an HTTP/2 prior-knowledge preface, an HTTP/1 request, or anything else. Pure,
//! so the tunnel can ask again after each read (a request head may arrive split across reads).
//!
//! Depends only on `std`, so the fuzz targets can compile it without the rest of the agent.

/// RFC 9113 3.4: what an HTTP/2 client sends first when it knows the server speaks HTTP/2.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longer than any registered method (`BASELINE-CONTROL`, `UPDATEREDIRECTREF`).
const MAX_METHOD: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstFlight {
    /// Not enough bytes to tell yet.
    NeedMore,
    Tls,
    H2PriorKnowledge,
    /// A method token and a space: an HTTP/1 request, or near enough that a server may take it
    /// for one. Judged as HTTP (a parser refuses what is not), never relayed unchecked.
    Http1,
    /// Anything else (SSH's banner, database protocols): relayed as bytes.
    Other,
}

pub fn classify(buf: &[u8]) -> FirstFlight {
    if buf.first() == Some(&22) {
        return FirstFlight::Tls;
    }
    // Servers skip empty lines before a request line (RFC 9112 2.2; nginx skips any number),
    // so "\r\n\r\nGET ..." is a request too. The caller bounds how long it waits for more.
    let blank = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    let rest = &buf[blank..];
    if rest.is_empty() {
        return FirstFlight::NeedMore;
    }
    // "PRI " is also a method token and a space: the preface is told apart first.
    let n = rest.len().min(H2_PREFACE.len());
    if blank == 0 && rest[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { FirstFlight::H2PriorKnowledge } else { FirstFlight::NeedMore };
    }
    // Letters, `-` and `_` only: every method in use, but not SSH's "SSH-2.0-..." banner.
    for (i, b) in rest.iter().enumerate() {
        match b {
            b' ' | b'\t' if i > 0 => return FirstFlight::Http1,
            b if (b.is_ascii_alphabetic() || *b == b'-' || *b == b'_') && i < MAX_METHOD => {}
            _ => return FirstFlight::Other,
        }
    }
    FirstFlight::NeedMore
}

#[cfg(test)]
mod tests {
    use super::{FirstFlight::*, *};

    #[test]
    fn each_kind() {
        let cases: &[(&[u8], FirstFlight)] = &[
            (b"", NeedMore),
            (b"\x16\x03\x01", Tls),
            (b"GET / HTTP/1.1\r\n", Http1),
            (b"G", NeedMore),
            (b"GE", NeedMore),
            (b"GET", NeedMore),
            (b"\r\nPOST /x HTTP/1.1", Http1),
            (b"\r\n", NeedMore),
            (b"get / HTTP/1.1", Http1),
            (b"M-SEARCH * HTTP/1.1", Http1),
            (b"GET\t/ HTTP/1.1", Http1),
            (b"PRI", NeedMore),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (H2_PREFACE, H2PriorKnowledge),
            // Not the preface after all: a request with the method PRI.
            (b"PRI * HTTP/1.1\r\n", Http1),
            (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu\r\n", Other),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Other),
            (b" GET / HTTP/1.1", Other),
            (b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET ", Http1),
            (&[b'A'; 40], Other),
        ];
        for (bytes, want) in cases {
            assert_eq!(classify(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn every_prefix_of_a_request_is_need_more_or_http1() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for end in 1..req.len() {
            let got = classify(&req[..end]);
            assert!(matches!(got, NeedMore | Http1), "{end}: {got:?}");
        }
    }
}

//! Request framing as the client sent it, seen before hyper parses it.
//!
//! hyper resolves `Content-Length` + `Transfer-Encoding` itself (it drops the length and
//! decodes chunked), so by the time a request reaches the gateway's handler the ambiguity is
//! gone from the headers, though a server behind another proxy might have read the message
//! differently. The gateway refuses such requests outright, so it follows the byte stream
//! itself: it finds each request head, judges its framing, and skips the body by that same
//! framing to find the next head. One verdict per request, in order; the handler takes them
//! in the same order. If the framer loses track, it stops producing verdicts and the handler
//! refuses (fail closed).
//!
//! Depends only on `std`, `httparse` and `target` (for the fuzz target `request_stream`).

use std::collections::VecDeque;

use super::target::{TargetError, check_framing};

/// The longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// The most header fields a head may have (the gateway's `maxHeaders` is capped to this).
pub const MAX_HEADERS: usize = 256;

#[derive(Debug)]
pub struct Framer {
    state: State,
    /// The head (or line) being accumulated.
    buf: Vec<u8>,
    max_head: usize,
    verdicts: VecDeque<Result<(), TargetError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after chunk data; how many of its bytes are still due.
    ChunkEnd(u8),
    Trailers,
    /// After CONNECT: no more HTTP on this connection.
    Tunnel,
    /// Lost track (malformed framing): no more verdicts.
    Lost,
}

impl Framer {
    pub fn new(max_head: usize) -> Self {
        Self { state: State::Head, buf: Vec::new(), max_head, verdicts: VecDeque::new() }
    }

    /// The verdict of the next request, in order. `None` when the framer has none (lost track,
    /// or the head was not complete): the caller must refuse.
    pub fn next_verdict(&mut self) -> Option<Result<(), TargetError>> {
        self.verdicts.pop_front()
    }

    /// Everything read from the client, in order.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Tunnel | State::Lost => return,
                State::Head => self.head(bytes),
                State::Body(left) => {
                    let n = (bytes.len() as u64).min(left);
                    self.state = if n == left { State::Head } else { State::Body(left - n) };
                    &bytes[n as usize..]
                }
                State::ChunkSize => self.line(bytes, Self::chunk_size),
                State::ChunkData(left) => {
                    let n = (bytes.len() as u64).min(left);
                    self.state = if n == left { State::ChunkEnd(2) } else { State::ChunkData(left - n) };
                    &bytes[n as usize..]
                }
                State::ChunkEnd(due) => {
                    let expected: &[u8] = if due == 2 { b"\r\n" } else { b"\n" };
                    if bytes[0] != expected[0] {
                        self.state = State::Lost;
                        return;
                    }
                    self.state = if due == 2 { State::ChunkEnd(1) } else { State::ChunkSize };
                    &bytes[1..]
                }
                State::Trailers => self.line(bytes, Self::trailer),
            };
        }
    }

    /// Accumulates a head until its blank line, then judges it.
    fn head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        // Empty lines before a request line are tolerated (RFC 9112 2.2), as hyper does.
        let bytes = if self.buf.is_empty() {
            let skip = bytes.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
            &bytes[skip..]
        } else {
            bytes
        };
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        let from = start.saturating_sub(3);
        let Some(end) = self.buf[from..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| from + p + 4)
        else {
            if self.buf.len() > self.max_head {
                self.state = State::Lost;
            }
            return &[];
        };
        let rest = &bytes[end - start..];
        let head = std::mem::take(&mut self.buf);
        self.judge(&head[..end]);
        rest
    }

    fn judge(&mut self, head: &[u8]) {
        // httparse (and so hyper) also accepts a bare LF as a line end; the framer does not, so
        // the two can never disagree on where a head ends: a head with one gets no verdict.
        let bare_lf = head.iter().enumerate().any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
        // On the stack: this runs for every request head.
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if bare_lf || !matches!(req.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()) {
            self.state = State::Lost;
            return;
        }
        let verdict = check_framing(req.headers.iter().map(|h| (h.name, h.value)));
        let header =
            |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        self.state = if verdict.is_err() {
            // Refused and the connection closed: nothing after it is read as HTTP.
            State::Lost
        } else if req.method == Some("CONNECT") {
            State::Tunnel
        } else if header("transfer-encoding").is_some() {
            State::ChunkSize
        } else if let Some(len) = header("content-length") {
            match std::str::from_utf8(len).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(0) => State::Head,
                Some(n) => State::Body(n),
                None => State::Lost,
            }
        } else {
            State::Head
        };
        self.verdicts.push_back(verdict);
    }

    /// Accumulates one CRLF-terminated line, then hands it to `done`.
    fn line<'a>(&mut self, bytes: &'a [u8], done: fn(&mut Self, &[u8])) -> &'a [u8] {
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => {
                self.buf.extend_from_slice(&bytes[..i]);
                let line = std::mem::take(&mut self.buf);
                // Chunk-size and trailer lines end in CRLF; hyper ends trailer lines only there.
                match line.strip_suffix(b"\r") {
                    Some(line) => done(self, line),
                    None => self.state = State::Lost,
                }
                &bytes[i + 1..]
            }
            None => {
                self.buf.extend_from_slice(bytes);
                if self.buf.len() > MAX_LINE {
                    self.state = State::Lost;
                }
                &[]
            }
        }
    }

    fn chunk_size(&mut self, line: &[u8]) {
        let hex = line.split(|b| *b == b';').next().unwrap_or_default();
        let hex = std::str::from_utf8(hex).map(str::trim).unwrap_or("x");
        self.state = match u64::from_str_radix(hex, 16) {
            Ok(0) => State::Trailers,
            Ok(n) if !hex.is_empty() && !hex.starts_with('+') => State::ChunkData(n),
            _ => State::Lost,
        };
    }

    fn trailer(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.state = State::Head;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], step: usize) -> Vec<Option<Result<(), TargetError>>> {
        let mut f = Framer::new(16 * 1024);
        for piece in stream.chunks(step) {
            f.feed(piece);
        }
        std::iter::from_fn(|| f.next_verdict().map(Some)).collect()
    }

    #[test]
    fn follows_bodies_to_the_next_head_in_any_split() {
        let stream =
            b"\r\nPOST http://a/ HTTP/1.1\r\nContent-Length: 30\r\n\r\nGET http://b/ HTTP/1.1\r\n\r\n0123\
POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET http://c/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let v = verdicts(stream, step);
            // The fake head inside the first body is skipped: three heads, the last refused.
            assert_eq!(
                v,
                vec![Some(Ok(())), Some(Ok(())), Some(Err(TargetError::AmbiguousFraming))],
                "step {step}"
            );
        }
    }

    #[test]
    fn cl_with_te_in_either_order_is_refused() {
        for head in [
            &b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert_eq!(verdicts(head, 5), vec![Some(Err(TargetError::AmbiguousFraming))]);
        }
    }

    #[test]
    fn bare_line_feeds_are_never_trusted() {
        // httparse accepts bare LF; a second head hidden behind one must not earn a verdict.
        let hidden = b"GET http://a/ HTTP/1.1\nHost: a\n\nGET http://b/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(verdicts(hidden, 7), vec![]);
        let trailer = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\n\nGET http://x/ HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(trailer, 5), vec![Some(Ok(()))]);
    }

    #[test]
    fn lost_track_gives_no_verdicts() {
        let bad_chunk = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(bad_chunk, 4), vec![Some(Ok(()))]);
        let after_connect = b"CONNECT a:443 HTTP/1.1\r\n\r\nGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts(after_connect, 4), vec![Some(Ok(()))]);
        let mut f = Framer::new(64);
        f.feed(&[b'a'; 100]);
        assert_eq!(f.next_verdict(), None);
    }
}

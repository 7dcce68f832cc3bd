//! Protocol upgrades on forwarded plain HTTP (`Upgrade: h2c` with `HTTP2-Settings`, `Upgrade:
//! websocket`): after a switch the gateway would relay bytes it no longer reads, so a client
//! could name any host behind an allowed one. The gateway strips `Upgrade` and the headers
//! `Connection` names before forwarding, so an upstream that honours upgrades never switches;
//! one that answers 101 anyway gets nothing relayed after it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use egress_tests::{
    gateway::{GatewayLab, PROXY_PORT, TRANSPARENT_PORT, base_config, read_reply, wait_until},
    lab::GATEWAY4,
    netns::NetNs,
};

/// switch.example.test in the gateway's hosts file.
const SWITCH4: &str = "11.231.0.8";
/// Switches when asked to (an honest h2c or WebSocket server).
const HONEST_PORT: u16 = 8000;
/// Answers 101 to every request.
const ALWAYS_PORT: u16 = 8001;

/// What an upstream saw: every request head, and every byte after a 101 it sent.
#[derive(Default)]
struct Seen {
    heads: Vec<String>,
    switched: Vec<u8>,
    accepted: usize,
    finished: usize,
}

/// An upstream that speaks the protocols a client might switch to; one thread per connection.
struct Switcher {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Switcher {
    fn start(ns: &NetNs, addr: SocketAddr, always: bool) -> Self {
        let seen = Arc::<Mutex<Seen>>::default();
        let stop = Arc::new(AtomicBool::new(false));
        let l = ns.within(|| TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        l.set_nonblocking(true).expect("nonblocking");
        let thread = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            seen.lock().expect("seen").accepted += 1;
                            let seen = seen.clone();
                            std::thread::spawn(move || switch(s, &seen, always));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        });
        Self { seen, stop, thread: Some(thread) }
    }

    /// Waits (bounded) until every connection the upstream accepted has ended.
    fn settled(&self) -> std::sync::MutexGuard<'_, Seen> {
        wait_until("the upstream's connections to end", Duration::from_secs(8), || {
            let s = self.seen.lock().expect("seen");
            s.accepted == s.finished
        });
        self.seen.lock().expect("seen")
    }
}

impl Drop for Switcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One upstream connection: a request head, then 101 and a record of what follows (until the
/// gateway closes, or 3 s of silence), or a plain 200.
fn switch(mut s: TcpStream, seen: &Mutex<Seen>, always: bool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let head = read_head(&mut s);
    let asked = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("upgrade").then(|| value.trim().to_string())
    });
    seen.lock().expect("seen").heads.push(head);
    if let Some(protocol) = asked.or(always.then(|| "websocket".to_string())) {
        let _ = write!(
            s,
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        );
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            seen.lock().expect("seen").switched.extend_from_slice(&buf[..n]);
        }
    } else {
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nnot switched\n");
    }
    seen.lock().expect("seen").finished += 1;
}

/// Reads up to the end of a request or response head (or until the peer stops).
fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") && matches!(s.read(&mut buf), Ok(1)) {
        got.push(buf[0]);
    }
    String::from_utf8_lossy(&got).to_string()
}

/// An HTTP/2 client's first flight for `authority` after an h2c switch: the preface, empty
/// SETTINGS, and a GET on stream 1 whose :authority is a literal (no Huffman coding).
fn h2_request(authority: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, u8::try_from(authority.len()).expect("short name")];
    block.extend_from_slice(authority.as_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let len = u32::try_from(block.len()).expect("short block").to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], 1, 0x05, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    out
}

/// Sends a GET for `target` with `host` and `upgrade_headers` to the gateway's `port`, then
/// `after` as if the switch had happened. Returns the head of the reply to the upgrade request,
/// and everything the client got after it.
fn attempt(port: u16, target: &str, host: &str, upgrade_headers: &str, after: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect((GATEWAY4, port)).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    write!(s, "GET {target} HTTP/1.1\r\nHost: {host}\r\n{upgrade_headers}\r\n").expect("the upgrade request");
    let head = read_head(&mut s);
    // The gateway may have closed already; a client trying to smuggle tries anyway.
    let _ = s.write_all(after);
    let (rest, _) = read_reply(&mut s, Duration::from_secs(3));
    (head, String::from_utf8_lossy(&rest).to_string())
}

const H2C: &str =
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
const WEBSOCKET: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
const ELSEWHERE: &str = "forbidden.example.test";

#[test]
fn upgrades_never_switch_and_nothing_after_a_101_reaches_the_upstream() {
    let g = GatewayLab::new();
    let ext = &g.lab.external;
    ext.ip(&["addr", "add", &format!("{SWITCH4}/24"), "dev", "eth0"]).expect("upstream address");
    let honest = Switcher::start(ext, egress_tests::sock(SWITCH4, HONEST_PORT), false);
    let always = Switcher::start(ext, egress_tests::sock(SWITCH4, ALWAYS_PORT), true);
    let config = base_config(&g.ca, 100).replace(
        "  - namespaces: [team-b]",
        &format!(
            "  - namespaces: [team-a]\n    hosts: [switch.example.test]\n    ports: [{HONEST_PORT}, {ALWAYS_PORT}]\n  - namespaces: [team-b]"
        ),
    );
    let gw = g.start(&config);
    let h2_elsewhere = h2_request(ELSEWHERE);
    let http_elsewhere = format!("GET / HTTP/1.1\r\nHost: {ELSEWHERE}\r\n\r\n");
    // (what the client asks for, its upgrade headers, what it sends as if switched). "plain"
    // asks for nothing: an upstream's unasked-for 101 must not open a relay either.
    let kinds: [(&str, &str, &[u8]); 3] = [
        ("h2c", H2C, &h2_elsewhere),
        ("websocket", WEBSOCKET, http_elsewhere.as_bytes()),
        ("plain", "", http_elsewhere.as_bytes()),
    ];
    for (upstream, upstream_port) in [(&honest, HONEST_PORT), (&always, ALWAYS_PORT)] {
        let host = format!("switch.example.test:{upstream_port}");
        let absolute = format!("http://{host}/");
        for (kind, upgrade_headers, after) in kinds {
            for (port, target) in [(PROXY_PORT, absolute.as_str()), (TRANSPARENT_PORT, "/")] {
                let name = format!("{kind} to {host} through port {port}");
                let (head, rest) = g.in_pod(|| attempt(port, target, &host, upgrade_headers, after));
                if upstream_port == HONEST_PORT {
                    // Asked to switch, an honest upstream would have: it was not asked. What the
                    // client sends next is a new request to the gateway (refused) or garbage.
                    assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head:?}");
                    assert!(
                        rest.starts_with("not switched\n") && !rest.contains(" 101 "),
                        "{name}: {rest:?}"
                    );
                } else {
                    // The unasked-for 101 reaches the client, and the connection ends there: the
                    // gateway relays nothing either way.
                    assert!(head.starts_with("HTTP/1.1 101"), "{name}: {head:?}");
                    assert!(rest.is_empty(), "{name}: after the 101: {rest:?}");
                }
                let seen = upstream.settled();
                assert!(seen.switched.is_empty(), "{name}: relayed after a switch: {:?}", seen.switched);
                let last = seen.heads.last().unwrap_or_else(|| panic!("{name}: the upstream got no request"));
                for header in ["upgrade:", "http2-settings:"] {
                    assert!(
                        !last.to_ascii_lowercase().contains(header),
                        "{name}: {header} forwarded:\n{last}"
                    );
                }
                assert!(seen.heads.iter().all(|h| !h.contains(ELSEWHERE)), "{name}: {:?}", seen.heads);
            }
        }
    }
    // Only switch.example.test was ever let through.
    for line in gw.access_lines() {
        if line["decision"] == "allow" {
            assert!(
                line["authority"].as_str().is_some_and(|a| a.starts_with("switch.example.test:")),
                "{line}"
            );
        }
    }
}

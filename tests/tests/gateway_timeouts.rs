//! Forwarded HTTP cannot hold a connection slot forever: a client that stops sending its
//! request body, an upstream that never answers, and one that stops in the middle of its
//! response body are each cut after their idle timeout, and the freed slots serve others.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use egress_tests::{
    gateway::{GatewayLab, PROXY_PORT, UPSTREAM4, base_config, read_reply, status_and_body, wait_until},
    lab::{GATEWAY4, POD4},
};

/// An upstream that never answers.
const SILENT_PORT: u16 = 7001;
/// An upstream that sends a response head and part of the body, then nothing.
const STALLING_PORT: u16 = 7002;
/// The upstreams stop accepting after this, whatever happens to the test.
const UPSTREAM_LIFETIME: Duration = Duration::from_secs(20);

/// Serves `port` on the external host: reads each request head and answers with `reply`
/// (possibly nothing), then holds the connection open until the upstream's lifetime ends.
fn stalled_upstream(g: &GatewayLab, port: u16, reply: &'static [u8]) -> JoinHandle<()> {
    let listener = g.lab.external.within(|| TcpListener::bind((UPSTREAM4, port))).expect("bind the upstream");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let end = Instant::now() + UPSTREAM_LIFETIME;
        let mut held = Vec::new();
        while Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(reply);
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
}

/// Sends `request` from the pod through the proxy port and reads until the gateway closes
/// (or 6 s pass): the reply and how long the gateway kept the connection.
fn send(g: &GatewayLab, request: &'static [u8]) -> JoinHandle<(String, Duration)> {
    g.lab.pod.spawn(move || {
        let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect to the proxy port");
        s.write_all(request).expect("write");
        let started = Instant::now();
        let (got, _) = read_reply(&mut s, Duration::from_secs(6));
        (String::from_utf8_lossy(&got).to_string(), started.elapsed())
    })
}

#[test]
fn stalled_bodies_and_upstreams_give_their_slots_back() {
    let g = GatewayLab::new();
    let _silent = stalled_upstream(&g, SILENT_PORT, b"");
    let _stalling =
        stalled_upstream(&g, STALLING_PORT, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
    let config = base_config(&g.ca, 2)
        .replace("ports: [80, 443, 7000]", "ports: [80, 443, 7000, 7001, 7002]")
        .replace(
            "  connectTimeout: 2s",
            "  connectTimeout: 2s\n  requestBodyTimeout: 500ms\n  responseTimeout: 1500ms",
        );
    let gw = g.start(&config);
    let curl =
        || {
            status_and_body(&g.curl(
                POD4,
                &["--proxy", &format!("http://{GATEWAY4}:{PROXY_PORT}"), "http://api.example.test/"],
            ))
            .0
        };

    // Both slots (maxConnections: 2): a client that stops sending its body, and a request to an
    // upstream that never answers.
    let dripping = send(
        &g,
        b"POST http://api.example.test:7001/ HTTP/1.1\r\nHost: api.example.test:7001\r\nContent-Length: 100\r\n\r\nab",
    );
    let waiting =
        send(&g, b"GET http://api.example.test:7001/ HTTP/1.1\r\nHost: api.example.test:7001\r\n\r\n");
    wait_until("both slots taken", Duration::from_secs(5), || curl() == 503);
    // Others are served again once the stalled exchanges are cut.
    wait_until("a client served after the stalled ones", Duration::from_secs(5), || curl() == 200);

    let (reply, held) = dripping.join().expect("dripping client");
    assert!(reply.starts_with("HTTP/1.1 408"), "a stalled request body: {reply:?}");
    assert!(held < Duration::from_secs(3), "the stalled body held its slot for {held:?}");
    gw.wait_access("stalled request body", |v| v["reason"] == "request_body_timeout");

    let (reply, held) = waiting.join().expect("waiting client");
    assert!(reply.starts_with("HTTP/1.1 504"), "an upstream that never answers: {reply:?}");
    assert!(held < Duration::from_secs(4), "the silent upstream held the slot for {held:?}");
    gw.wait_access("silent upstream", |v| v["reason"] == "response_timeout");

    // A response body that stops: what came is passed on, then the connection is cut.
    let (reply, held) =
        send(&g, b"GET http://api.example.test:7002/ HTTP/1.1\r\nHost: api.example.test:7002\r\n\r\n")
            .join()
            .expect("client of the stalling upstream");
    assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("0123456789"), "{reply:?}");
    assert!(held < Duration::from_secs(4), "the stalled response body held the slot for {held:?}");
    gw.wait_access("stalled response body", |v| v["reason"] == "response_timeout" && v["status"] == 200);
}

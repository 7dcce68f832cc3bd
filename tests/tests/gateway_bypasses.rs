//! Ways around the gateway's checks, each shown to fail by what it would have reached: a
//! resolver that rebinds a name between lookups, a CONNECT to a port no rule allows, and
//! loopback spelled as IP literals that only `inet_aton` reads. Every upstream that must stay
//! untouched is a counting listener, and its count is read behind a probe connection of the
//! test's own (accepts are FIFO), so a late dial cannot hide. (Protocol upgrades are in
//! `gateway_upgrades.rs`.)

use std::net::{Ipv4Addr, SocketAddr};

use egress_tests::{
    fake_dns::FakeDns,
    gateway::{
        Gateway, GatewayLab, PROXY_PORT, TRANSPARENT_PORT, UPSTREAM4, base_config, connect_tunnel,
        raw_request, wait_until,
    },
    listen::Server,
    sock,
};

/// The access-log line written after the first `before` ones.
fn next_line(gw: &Gateway, before: usize, what: &str) -> serde_json::Value {
    wait_until(&format!("the access-log line for {what}"), std::time::Duration::from_secs(5), || {
        gw.access_lines().len() > before
    });
    gw.access_lines().swap_remove(before)
}

/// Sends `request` (without its final blank line: `Connection: close` is added so the gateway
/// closes after answering) from the pod; returns the reply and the access-log line it caused.
fn refused_or_served(g: &GatewayLab, gw: &Gateway, port: u16, request: &str) -> (String, serde_json::Value) {
    let before = gw.access_lines().len();
    let full = format!("{request}Connection: close\r\n\r\n");
    let (reply, _) = g.in_pod(|| raw_request(port, full.as_bytes()));
    (reply, next_line(gw, before, request))
}

/// Public "internet" host the rebinding names first resolve to, and the metadata service they
/// rebind to; both in the external namespace, on a port python's wildcard servers leave free.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(11, 231, 0, 7);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const REBIND_PORT: u16 = 8000;

#[test]
fn dns_rebinding_cannot_move_the_dial_off_the_checked_address() {
    let g = GatewayLab::new();
    let (ext, gw_ns) = (&g.lab.external, &g.lab.gateway);
    for a in [format!("{PUBLIC}/24"), format!("{METADATA}/32")] {
        ext.ip(&["addr", "add", &a, "dev", "eth0"]).expect("external address");
    }
    gw_ns.ip(&["route", "add", &format!("{METADATA}/32"), "dev", "eth0"]).expect("route to metadata");
    let (public_addr, metadata_addr) =
        (SocketAddr::from((PUBLIC, REBIND_PORT)), SocketAddr::from((METADATA, REBIND_PORT)));
    let public = Server::tcp_http(ext, public_addr);
    let metadata = Server::tcp_http(ext, metadata_addr);
    // The gateway's resolv.conf names 127.0.0.1 (GatewayLab): the scripted server answers there,
    // for names that are not in its hosts file. TTL 0, a new answer on every lookup.
    let dns = FakeDns::start(gw_ns, sock("127.0.0.1", 53));
    dns.script("get.rebind.example.test", &[PUBLIC, METADATA]);
    dns.script("connect.rebind.example.test", &[PUBLIC, METADATA]);
    dns.script("back.rebind.example.test", &[METADATA, PUBLIC]);
    let config = base_config(&g.ca, 100).replace(
        "  - namespaces: [team-b]",
        &format!(
            "  - namespaces: [team-a]\n    hosts: [\"*.rebind.example.test\"]\n    ports: [{REBIND_PORT}]\n  - namespaces: [team-b]"
        ),
    );
    let gw = g.start(&config);
    let metadata_untouched = |when: &str| {
        assert_eq!(
            metadata.hits_before_probe(ext, metadata_addr),
            0,
            "{when}: the gateway dialed the rebound address"
        );
    };

    // Public first, metadata on every later lookup: the one lookup is checked and dialed. A
    // gateway that looked the name up again to connect would reach the metadata listener.
    let name = format!("get.rebind.example.test:{REBIND_PORT}");
    let (reply, line) =
        refused_or_served(&g, &gw, PROXY_PORT, &format!("GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n"));
    assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"), "{reply}");
    assert_eq!(line["upstream"], public_addr.to_string(), "{line}");
    assert_eq!(dns.asked("get.rebind.example.test"), 1, "one lookup per dial");
    assert_eq!(public.hits_before_probe(ext, public_addr), 1);
    metadata_untouched("GET, public answer first");
    // The next dial looks the name up again and gets the metadata address: refused, undialed.
    let (reply, line) =
        refused_or_served(&g, &gw, PROXY_PORT, &format!("GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n"));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!((&line["decision"], &line["reason"]), (&"deny".into(), &"blocked_metadata".into()), "{line}");
    metadata_untouched("GET, rebound to metadata");

    // The same through CONNECT: the tunnel is connected to the address that was checked, and
    // what the client sends through it goes there.
    let name = format!("connect.rebind.example.test:{REBIND_PORT}");
    let reply = g.in_pod(|| {
        use std::io::Write as _;
        let mut s = connect_tunnel(&name);
        write!(s, "GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n")
            .expect("request in the tunnel");
        let (got, _) = egress_tests::gateway::read_reply(&mut s, std::time::Duration::from_secs(3));
        String::from_utf8_lossy(&got).to_string()
    });
    assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"), "{reply}");
    assert_eq!(gw.line_for(&name)["upstream"], public_addr.to_string());
    assert_eq!(dns.asked("connect.rebind.example.test"), 1, "one lookup per dial");
    assert_eq!(public.hits_before_probe(ext, public_addr), 2);
    metadata_untouched("CONNECT, public answer first");

    // The other way round: metadata first is refused, and nothing is dialed for it; the next
    // lookup's public answer is then served (the gateway follows the resolver, once per dial).
    let name = format!("back.rebind.example.test:{REBIND_PORT}");
    let (reply, line) =
        refused_or_served(&g, &gw, PROXY_PORT, &format!("CONNECT {name} HTTP/1.1\r\nHost: {name}\r\n"));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(line["reason"], "blocked_metadata", "{line}");
    assert_eq!(public.hits_before_probe(ext, public_addr), 2, "nothing dialed for a refused lookup");
    metadata_untouched("CONNECT, metadata answer first");
    let (reply, _) =
        refused_or_served(&g, &gw, PROXY_PORT, &format!("GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n"));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(public.hits_before_probe(ext, public_addr), 3);
    metadata_untouched("the end");
}

#[test]
fn connect_to_a_port_no_rule_allows_is_refused_before_any_dial() {
    let g = GatewayLab::new();
    let ssh_addr = sock(UPSTREAM4, 22);
    let ssh = Server::tcp_sink(&g.lab.external, ssh_addr);
    let with_ports = |ports: &str| {
        base_config(&g.ca, 100).replace("    ports: [80, 443, 7000]\n", &format!("    ports: [{ports}]\n"))
    };
    let gw = g.start(&with_ports("443"));
    let (reply, line) = refused_or_served(
        &g,
        &gw,
        PROXY_PORT,
        "CONNECT api.example.test:22 HTTP/1.1\r\nHost: api.example.test:22\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(line["authority"], "api.example.test:22", "{line}");
    assert_eq!((&line["decision"], &line["reason"]), (&"deny".into(), &"not_allowed".into()), "{line}");
    assert!(line["upstream"].is_null(), "{line}");
    assert_eq!(ssh.hits_before_probe(&g.lab.external, ssh_addr), 0, "the gateway dialed port 22");
    // The host itself is allowed, on its port.
    drop(g.in_pod(|| connect_tunnel("api.example.test:443")));
    drop(gw);

    // The listener does see the gateway's dial when a rule allows the port: the zero above is
    // the gateway's refusal, not a listener that cannot be reached.
    let _gw = g.start(&with_ports("22, 443"));
    drop(g.in_pod(|| connect_tunnel("api.example.test:22")));
    assert_eq!(ssh.hits_before_probe(&g.lab.external, ssh_addr), 1);
}

/// 127.0.0.1 as `inet_aton` (curl, Python, many HTTP stacks) reads it.
const LOOPBACK_SPELLINGS: &[&str] = &["2130706433", "0x7f.1", "017700000001", "127.1", "0177.0.0.1"];

#[test]
fn loopback_spelled_as_any_ip_literal_is_refused() {
    let g = GatewayLab::new();
    let local_addr = sock("127.0.0.1", 80);
    let local = Server::tcp_http(&g.lab.gateway, local_addr);
    // team-a may also reach a public range by address, so literals are judged by the address
    // they denote: read as names, they would be refused for a different reason and logged as
    // written.
    let by_address = |cidr: &str| {
        base_config(&g.ca, 100).replace(
            "    ports: [80, 443, 7000]\n",
            &format!("    cidrs: [{cidr}]\n    ports: [80, 443, 7000]\n"),
        )
    };
    let gw = g.start(&by_address("11.231.0.0/24"));
    for spelling in LOOPBACK_SPELLINGS {
        let attempts = [
            (PROXY_PORT, format!("CONNECT {spelling}:80 HTTP/1.1\r\nHost: {spelling}:80\r\n")),
            (PROXY_PORT, format!("GET http://{spelling}/ HTTP/1.1\r\nHost: {spelling}\r\n")),
            (TRANSPARENT_PORT, format!("GET / HTTP/1.1\r\nHost: {spelling}\r\n")),
        ];
        for (port, request) in &attempts {
            let (reply, line) = refused_or_served(&g, &gw, *port, request);
            let first = request.lines().next().unwrap_or_default();
            assert!(reply.starts_with("HTTP/1.1 403"), "{first} (port {port}): {reply}");
            assert_eq!(
                line["authority"], "127.0.0.1:80",
                "{first}: judged as the address it denotes: {line}"
            );
            assert_eq!(
                (&line["decision"], &line["reason"]),
                (&"deny".into(), &"not_allowed".into()),
                "{line}"
            );
            assert!(line["upstream"].is_null(), "{line}");
        }
    }
    assert_eq!(local.hits_before_probe(&g.lab.gateway, local_addr), 0, "the gateway dialed its loopback");
    drop(gw);

    // The same spelling, with a rule that opens 127.0.0.1 by name: the gateway dials it and the
    // listener counts it, so the zero above is the refusal, not a listener out of reach.
    let gw = g.start(&by_address("127.0.0.1/32"));
    let (reply, line) =
        refused_or_served(&g, &gw, PROXY_PORT, "GET http://0x7f.1/ HTTP/1.1\r\nHost: 0x7f.1\r\n");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(line["upstream"], "127.0.0.1:80", "{line}");
    assert_eq!(local.hits_before_probe(&g.lab.gateway, local_addr), 1);
}

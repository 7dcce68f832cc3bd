//! What an enforced workload can and cannot reach, proven on the receiving side.

use egress_tests::{
    agent::Agent,
    client::{curl, hping_icmp, hping_raw, ping, raw6, refused, succeeded, tcp, udp_request, udp_sendto},
    lab::{DNS4, DNS6, EXTERNAL4, EXTERNAL6, GATEWAY_PORT, GATEWAY4, GATEWAY6, Lab, text},
    listen::Server,
    sniff::Sniffer,
    sock,
};

#[test]
fn direct_tcp_udp_and_icmp_to_an_external_host_are_refused_and_never_arrive() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let udp = Server::udp_echo(&lab.external, sock(EXTERNAL4, 9000));
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());

    for (what, out) in [
        ("tcp connect", lab.in_pod(tcp(EXTERNAL4, 80))),
        ("udp sendto", lab.in_pod(udp_sendto(EXTERNAL4, 9000))),
        ("udp connect", lab.in_pod(udp_request(EXTERNAL4, 9000))),
        ("ping", lab.in_pod(ping(EXTERNAL4))),
        ("raw icmp echo", lab.in_pod(hping_icmp(EXTERNAL4))),
    ] {
        assert!(refused(&out), "{what} to {EXTERNAL4} should fail with EPERM:\n{}", text(&out));
    }
    assert_eq!(sniffer.seen(), vec![], "nothing from the pod may reach the external host");
    assert_eq!((web.hits(), udp.hits()), (0, 0));

    // Each refusal is reported as a structured deny event naming the destination.
    let events = agent.wait_for("egress deny", 5);
    assert!(
        events.iter().any(|e| e["dst"] == EXTERNAL4
            && e["dport"] == 80
            && e["hook"] == "cgroup/connect4"
            && e["reason"] == "deny_destination"),
        "deny events: {events:#?}"
    );
    assert!(events.iter().any(|e| e["hook"] == "cgroup/sendmsg4" && e["dport"] == 9000), "{events:#?}");
    assert!(
        events.iter().any(|e| e["hook"] == "cgroup_skb/egress" && e["protocol"] == "icmp"),
        "{events:#?}"
    );
}

#[test]
fn the_gateway_port_is_reachable_and_nothing_else_on_the_gateway() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let proxy = Server::tcp_http(&lab.gateway, sock(GATEWAY4, GATEWAY_PORT));
    let ssh = Server::tcp_http(&lab.gateway, sock(GATEWAY4, 22));
    let sniffer = Sniffer::start(&lab.gateway, &Lab::pod_sources());

    let out = lab.in_pod(curl(&format!("http://{GATEWAY4}:{GATEWAY_PORT}/")));
    assert!(succeeded(&out), "the gateway port must be reachable:\n{}", text(&out));
    assert_eq!(proxy.hits(), 1);

    let out = lab.in_pod(tcp(GATEWAY4, 22));
    assert!(refused(&out), "another TCP port on the gateway:\n{}", text(&out));
    let out = lab.in_pod(udp_sendto(GATEWAY4, GATEWAY_PORT));
    assert!(refused(&out), "UDP to the gateway port (TCP only):\n{}", text(&out));
    let out = lab.in_pod(ping(GATEWAY4));
    assert!(refused(&out), "ICMP to the gateway:\n{}", text(&out));
    assert_eq!(ssh.hits(), 0);
    let stray: Vec<_> =
        sniffer.seen().into_iter().filter(|s| s.dport != GATEWAY_PORT || s.protocol != 6).collect();
    assert_eq!(stray, vec![], "only TCP to the gateway port may arrive");
}

#[test]
fn dns_is_reachable_on_udp_and_tcp_53_only() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let dns_udp = Server::udp_echo(&lab.gateway, sock(DNS4, 53));
    let dns_tcp = Server::tcp_http(&lab.gateway, sock(DNS4, 53));
    let other = Server::udp_echo(&lab.gateway, sock(DNS4, 54));
    let ext53 = Server::udp_echo(&lab.external, sock(EXTERNAL4, 53));

    let out = lab.in_pod(udp_request(DNS4, 53));
    assert!(
        succeeded(&out) && String::from_utf8_lossy(&out.stdout).contains("hello"),
        "UDP 53 to DNS:\n{}",
        text(&out)
    );
    let out = lab.in_pod(tcp(DNS4, 53));
    assert!(succeeded(&out), "TCP 53 to DNS:\n{}", text(&out));
    assert_eq!((dns_udp.hits(), dns_tcp.hits()), (1, 1));

    assert!(refused(&lab.in_pod(udp_sendto(DNS4, 54))), "DNS address, port 54");
    assert!(refused(&lab.in_pod(udp_sendto(EXTERNAL4, 53))), "port 53 on a non-DNS address");
    assert_eq!((other.hits(), ext53.hits()), (0, 0));
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_judged() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let web4 = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let web6 = Server::tcp_http(&lab.external, sock(EXTERNAL6, 80));
    let proxy6 = Server::tcp_http(&lab.gateway, sock(GATEWAY6, GATEWAY_PORT));
    let dns6 = Server::udp_echo(&lab.gateway, sock(DNS6, 53));
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());

    assert!(refused(&lab.in_pod(tcp(EXTERNAL6, 80))), "TCP over IPv6");
    assert!(refused(&lab.in_pod(udp_sendto(EXTERNAL6, 80))), "UDP over IPv6");
    assert!(refused(&lab.in_pod(ping(EXTERNAL6))), "ICMPv6");
    // The kernel sends ::ffff:a.b.c.d as IPv4 from an IPv6 socket; judged as the IPv4 address.
    let out = lab.in_pod(tcp(&format!("::ffff:{EXTERNAL4}"), 80));
    assert!(refused(&out), "IPv4-mapped IPv6:\n{}", text(&out));
    assert_eq!(sniffer.seen(), vec![]);
    assert_eq!((web4.hits(), web6.hits()), (0, 0));

    let out = lab.in_pod(curl(&format!("http://[{GATEWAY6}]:{GATEWAY_PORT}/")));
    assert!(succeeded(&out), "the gateway over IPv6:\n{}", text(&out));
    assert_eq!(proxy6.hits(), 1);
    assert!(succeeded(&lab.in_pod(udp_request(DNS6, 53))), "DNS over IPv6");
    assert_eq!(dns6.hits(), 1);
}

#[test]
fn raw_socket_packets_are_dropped_by_the_packet_program() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let sniff_ext = Sniffer::start(&lab.external, &Lab::pod_sources());
    let sniff_gw = Sniffer::start(&lab.gateway, &Lab::pod_sources());

    // Raw sockets never pass through connect()/sendmsg() hooks: only cgroup_skb sees them.
    let out = lab.in_pod(hping_raw(EXTERNAL4));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", text(&out));
    let _ = lab.in_pod(hping_raw(GATEWAY4));
    let out = lab.in_pod(raw6(EXTERNAL6));
    assert!(refused(&out), "raw IPv6 send:\n{}", text(&out));
    assert_eq!(sniff_ext.seen(), vec![]);
    assert_eq!(
        sniff_gw.seen(),
        vec![],
        "a raw protocol-253 packet to the gateway address is not TCP {GATEWAY_PORT}"
    );

    let events = agent.wait_for("egress deny", 3);
    let skb: Vec<_> =
        events.iter().filter(|e| e["hook"] == "cgroup_skb/egress" && e["protocol"] == "253").collect();
    assert!(skb.len() >= 3, "raw packets must be reported by the packet program: {events:#?}");
}

#[test]
fn a_cgroup_without_policy_is_untouched() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let out = lab.in_other_cgroup(curl(&format!("http://{EXTERNAL4}/")));
    assert!(succeeded(&out), "same network namespace, other cgroup:\n{}", text(&out));
    assert!(succeeded(&lab.in_other_cgroup(ping(EXTERNAL4))));
    let _ = lab.in_other_cgroup(hping_raw(EXTERNAL4));
    assert_eq!(web.hits(), 1);
    // The sniffer the other tests rely on does see this traffic.
    let seen = sniffer.seen();
    for protocol in [6, 1, 253] {
        assert!(seen.iter().any(|s| s.protocol == protocol), "protocol {protocol} not seen: {seen:?}");
    }
    // ...while the enforced cgroup in the same namespace is refused.
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))));
}

#[test]
fn audit_mode_lets_traffic_through_and_reports_it() {
    let lab = Lab::new();
    lab.write_policy("audit");
    let agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let out = lab.in_pod(curl(&format!("http://{EXTERNAL4}/")));
    assert!(succeeded(&out), "audit mode passes:\n{}", text(&out));
    assert_eq!(web.hits(), 1);
    let audits = agent.wait_for("egress audit", 2);
    assert!(
        audits
            .iter()
            .any(|e| e["dst"] == EXTERNAL4 && e["hook"] == "cgroup/connect4" && e["action"] == "audit"),
        "{audits:#?}"
    );
    assert!(
        audits.iter().any(|e| e["hook"] == "cgroup_skb/egress"),
        "the packets are audited too: {audits:#?}"
    );
}

#[test]
fn a_cgroup_created_under_the_policy_later_is_enforced_from_its_first_packet() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let child = lab.pod_cgroup.join("new-container").join("nested");
    std::fs::create_dir_all(&child).unwrap();
    let out = lab.in_cgroup(&child, tcp(EXTERNAL4, 80));
    assert!(refused(&out), "{}", text(&out));
    let _ = lab.in_cgroup(&child, hping_raw(EXTERNAL4));
    assert_eq!(sniffer.seen(), vec![]);
    assert_eq!(web.hits(), 0);
}

#[test]
fn sockets_opened_before_the_policy_are_cut_off_by_the_packet_program() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _sink = Server::tcp_sink(&lab.external, sock(EXTERNAL4, 7000));
    let _udp = Server::udp_echo(&lab.external, sock(EXTERNAL4, 9000));
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    // Connected before any program exists: connect() was never judged.
    let mut streams = Vec::new();
    for remote in [format!("TCP4:{EXTERNAL4}:7000"), format!("UDP4:{EXTERNAL4}:9000")] {
        let script = format!("while :; do echo x; sleep 0.1; done | socat - {remote}");
        streams.push(lab.pod.command("sh", Some(&lab.pod_cgroup)).args(["-c", &script]).spawn().unwrap());
    }
    egress_tests::wait_until(
        "both flows reaching the external host",
        std::time::Duration::from_secs(5),
        || {
            let seen = sniffer.seen();
            seen.iter().any(|s| s.protocol == 6) && seen.iter().any(|s| s.protocol == 17)
        },
    );

    let _agent = Agent::start(&lab);
    std::thread::sleep(std::time::Duration::from_millis(200));
    sniffer.clear();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(sniffer.seen(), vec![], "the established flows must stop at the policy");
    for mut s in streams {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn a_server_in_the_enforced_cgroup_still_answers_whoever_connects_to_it() {
    // Kubelet probes and Service clients connect in; the replies must flow while the server
    // itself still cannot connect out.
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let mut server = lab
        .pod
        .command("socat", Some(&lab.pod_cgroup))
        .args(["-T10", "TCP4-LISTEN:8080,reuseaddr,fork", "SYSTEM:echo served"])
        .spawn()
        .expect("starting socat");
    egress_tests::listen::wait_listening(&lab.pod, 8080);
    // -T bounds inactivity only (an answer ends it at once): generous, since under load the
    // server's fork and exec of `echo` can take seconds.
    let out = lab.external.run(None, "sh", &["-c", "echo hi | socat -T10 - TCP4:10.231.0.2:8080"]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        succeeded(&out) && String::from_utf8_lossy(&out.stdout).contains("served"),
        "a client outside must get the server's reply:\n{}\nagent log:\n{}",
        text(&out),
        agent.log_text()
    );
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))), "the pod still cannot connect out");
    // The same from a UDP "server": not a connection the kernel tracks, so replies stay denied.
    let sniffer = Sniffer::start(&lab.external, &Lab::pod_sources());
    let out = lab.in_pod(udp_sendto(EXTERNAL4, 9000));
    assert!(refused(&out), "{}", text(&out));
    assert_eq!(sniffer.seen(), vec![]);
}

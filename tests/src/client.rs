//! Real clients, as argument lists for `Lab::in_pod` and friends. Each tries once, with short
//! timeouts, so a denied attempt fails fast and an allowed one proves itself.

/// Whether a client reported that the kernel refused the syscall (EPERM).
pub fn refused(out: &std::process::Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && err.contains("Operation not permitted")
}

pub fn succeeded(out: &std::process::Output) -> bool {
    out.status.success()
}

/// socat address for a host and port, bracketing IPv6.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// `echo hello | socat ...`: sends a line, prints the reply (socat errors reach stderr).
fn socat_with_input(remote: &str) -> (&'static str, Vec<String>) {
    ("sh", vec!["-c".into(), format!("echo hello | socat -T2 - '{remote}'")])
}

/// TCP connect() and a short exchange (socat).
pub fn tcp(host: &str, port: u16) -> (&'static str, Vec<String>) {
    let family = if host.contains(':') { "TCP6" } else { "TCP4" };
    socat_with_input(&format!("{family}:{},connect-timeout=2", host_port(host, port)))
}

/// One UDP datagram with sendto() on an unconnected socket (socat UDP-SENDTO).
pub fn udp_sendto(host: &str, port: u16) -> (&'static str, Vec<String>) {
    let family = if host.contains(':') { "UDP6-SENDTO" } else { "UDP4-SENDTO" };
    (
        "socat",
        vec![
            "-T1".into(),
            "-u".into(),
            "SYSTEM:echo hello".into(),
            format!("{family}:{}", host_port(host, port)),
        ],
    )
}

/// A UDP request on a connected socket, waiting up to 2 s for the reply (socat UDP-CONNECT).
pub fn udp_request(host: &str, port: u16) -> (&'static str, Vec<String>) {
    let family = if host.contains(':') { "UDP6" } else { "UDP4" };
    socat_with_input(&format!("{family}:{}", host_port(host, port)))
}

/// One ICMP echo (iputils ping; it first connect()s a UDP probe socket to find its source).
pub fn ping(host: &str) -> (&'static str, Vec<String>) {
    ("ping", vec!["-n".into(), "-c1".into(), "-W1".into(), host.into()])
}

/// One raw IPv4 packet with IP protocol 253 (experimental), built by hping3 on a raw socket.
pub fn hping_raw(host: &str) -> (&'static str, Vec<String>) {
    (
        "hping3",
        vec!["--rawip".into(), "-H".into(), "253".into(), "-c".into(), "1".into(), "-q".into(), host.into()],
    )
}

/// One ICMP echo request built by hping3 on a raw socket (no connect() probe first).
pub fn hping_icmp(host: &str) -> (&'static str, Vec<String>) {
    ("hping3", vec!["--icmp".into(), "-c".into(), "1".into(), "-q".into(), host.into()])
}

/// One raw IPv6 packet with next header 253, sent by Python on a SOCK_RAW socket.
pub fn raw6(host: &str) -> (&'static str, Vec<String>) {
    raw_ip(host, 253)
}

/// One raw IP packet of `protocol` (either family, by the address), sent by Python on a
/// SOCK_RAW socket; the payload is 20 bytes of zeros, the size of an inner IPv4 header.
pub fn raw_ip(host: &str, protocol: u8) -> (&'static str, Vec<String>) {
    let family = if host.contains(':') { "AF_INET6" } else { "AF_INET" };
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.{family}, socket.SOCK_RAW, {protocol})\ntry:\n    s.sendto(bytes(20), ('{host}', 0))\nexcept OSError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n"
    );
    ("python3", vec!["-c".into(), script])
}

/// An HTTP GET with curl (`-v` so a refused connect() shows its errno).
pub fn curl(url: &str) -> (&'static str, Vec<String>) {
    ("curl", vec!["-sSv".into(), "--max-time".into(), "3".into(), "-g".into(), url.into()])
}

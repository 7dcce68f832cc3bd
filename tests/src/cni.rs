//! The agent binary run as the `egressfw` CNI plugin, the way a container runtime runs a chained
//! plugin: `CNI_*` variables in the environment, the network configuration (with the network
//! plugin's result as `prevResult`) on stdin, the result or a CNI error on stdout.

use std::{
    io::Write as _,
    net::UdpSocket,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{netns::NetNs, routed_pod::RoutedPod};

/// The pod a CNI ADD is for.
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// The network plugin's result for a routed pod: its address on eth0.
pub fn prev_result(pod: &RoutedPod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.ns.path()}],
        "ips": [{"address": format!("{}/32", pod.addr), "interface": 0}],
    })
}

/// Runs the plugin with `command` (ADD, DEL, CHECK, VERSION) for `pod`'s eth0.
pub fn run(command: &str, pins: &Path, state: &Path, ns: &NetNs, pod: &PodRef<'_>, prev: &Value) -> Output {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "egressfw",
        "pinDir": pins,
        "stateDir": state,
        "prevResult": prev,
    });
    let mut child = Command::new(crate::agent_bin())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.uid))
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the agent binary as a CNI plugin");
    child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("writing the config");
    child.wait_with_output().expect("waiting for the plugin")
}

/// ADD, asserting that it succeeded and passed the network plugin's result on unchanged.
pub fn add(pins: &Path, state: &Path, pod: &RoutedPod, who: &PodRef<'_>) -> Output {
    let prev = prev_result(pod);
    let out = run("ADD", pins, state, &pod.ns, who, &prev);
    assert!(
        out.status.success(),
        "CNI ADD for {}/{} failed:\n{}",
        who.namespace,
        who.name,
        crate::lab::text(&out)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD prints a JSON result");
    assert_eq!(result, prev, "the plugin passes the network plugin's result on");
    out
}

/// A UDP socket on the routed pod's host-side address: what arrives there crossed the veth.
pub struct Arrivals {
    socket: UdpSocket,
}

impl Arrivals {
    pub fn listen(pod: &RoutedPod, port: u16) -> Self {
        let socket = UdpSocket::bind((pod.host_addr.as_str(), port)).expect("binding the arrival counter");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
        Self { socket }
    }

    /// Datagrams received since the last call (waits 200 ms after the last one).
    pub fn count(&self) -> usize {
        let mut buf = [0u8; 64];
        let mut n = 0;
        while self.socket.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// Sends `count` copies of `frame` out of the pod's eth0 through a packet socket, as fast as one
/// process can, starting at once: the racer a container started right after ADD would be.
pub fn flood(ns: &NetNs, frame: &[u8], count: usize) {
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\ns.bind(('eth0', 0))\nf = bytes.fromhex('{hex}')\nfor _ in range({count}):\n    s.send(f)\n"
    );
    let out = ns.run(None, "python3", &["-c", &script]);
    assert!(out.status.success(), "the packet-socket racer failed: {}", crate::lab::text(&out));
}

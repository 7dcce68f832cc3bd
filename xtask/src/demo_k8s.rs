//! Second part of `cargo xtask demo`: the Kubernetes node agent on the same kind of simulated
//! node, with an in-process fake API server standing in for the cluster. A namespace is
//! labelled, and its running pod loses direct egress within milliseconds while the gateway, DNS
//! and incoming probes keep working; unlabelling releases it.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_tests::{
    client,
    kube_node::{KubeNode, eventually},
    lab::{DNS4, EXTERNAL4, GATEWAY_PORT, GATEWAY4, Lab, POD4},
    listen::Server,
    sniff::Sniffer,
};

use crate::demo::{describe, sock};

const WEB: &str = "0f5e2d3c-1b4a-4c5d-8e7f-a1b2c3d4e5f6";
const PROBE_PORT: u16 = 8080;

struct Row {
    what: String,
    expect_allowed: bool,
    run: Box<dyn Fn(&KubeNode) -> std::process::Output>,
}

/// Returns how many rows did not behave as expected.
pub fn run() -> Result<usize> {
    println!("\n=== Part 2: the Kubernetes node agent (egress-agent run) ===\n");
    let node = KubeNode::new();
    node.add_pod("shop", "web", WEB);
    node.create_pod_cgroup(WEB);
    let _proxy = Server::tcp_http(&node.lab.gateway, sock(&format!("{GATEWAY4}:{GATEWAY_PORT}")));
    let _dns = Server::udp_echo(&node.lab.gateway, sock(&format!("{DNS4}:53")));
    let _web = Server::tcp_http(&node.lab.external, sock(&format!("{EXTERNAL4}:80")));
    let _app = PodServer::start(&node)?;
    println!(
        "Fake API server at {} with namespace shop (no label), pod shop/web on node-1, Service egress/gw \
         (backend {GATEWAY4}:{GATEWAY_PORT}) and kube-system/kube-dns (backend {DNS4}).",
        node.api.url()
    );
    let agent =
        node.try_start_agent().map_err(|log| anyhow::anyhow!("the node agent did not start:\n{log}"))?;
    println!("Node agent ready (GET /readyz -> 200).\n");

    let sniffer = Sniffer::start(&node.lab.external, &Lab::pod_sources());
    println!("{:<14} {:<48} {:<34} AT {EXTERNAL4}", "NAMESPACE", "ATTEMPT FROM POD shop/web", "CLIENT SAW");
    let mut surprises = table_row(&node, &sniffer, "no label", &direct(true))?;

    let pin = last_link_pin(&node)?;
    let t0 = Instant::now();
    node.label("shop", &[("egressfw.io/mode", "enforce")]);
    println!("\n$ kubectl label namespace shop egressfw.io/mode=enforce");
    if !eventually(5, || pin.exists()) {
        bail!("the pod was not enforced within 5 s:\n{}", agent.log_text());
    }
    println!("pod shop/web enforced {:.1} ms after the label change\n", t0.elapsed().as_secs_f64() * 1000.0);
    for row in [direct(false), gateway(), dns(), probe()] {
        surprises += table_row(&node, &sniffer, "enforce", &row)?;
    }
    let metric = node.metric(&["egressfw_denials_total", "namespace=\"shop\"", "pod=\"web\""]);
    println!("\n/metrics: egressfw_denials_total{{namespace=\"shop\",pod=\"web\",...}} = {metric}");

    node.label("shop", &[]);
    println!("\n$ kubectl label namespace shop egressfw.io/mode-");
    if !eventually(5, || !pin.exists()) {
        bail!("the pod was not released within 5 s");
    }
    surprises += table_row(&node, &sniffer, "label removed", &direct(true))?;
    drop(agent);
    Ok(surprises)
}

fn direct(expect_allowed: bool) -> Row {
    Row {
        what: format!("HTTP straight to {EXTERNAL4}:80"),
        expect_allowed,
        run: Box::new(|n| n.in_pod(WEB, client::curl(&format!("http://{EXTERNAL4}/")))),
    }
}

fn gateway() -> Row {
    Row {
        what: format!("HTTP to the gateway backend {GATEWAY4}:{GATEWAY_PORT}"),
        expect_allowed: true,
        run: Box::new(|n| n.in_pod(WEB, client::curl(&format!("http://{GATEWAY4}:{GATEWAY_PORT}/")))),
    }
}

fn dns() -> Row {
    Row {
        what: format!("DNS query to CoreDNS {DNS4}:53"),
        expect_allowed: true,
        run: Box::new(|n| n.in_pod(WEB, client::udp_request(DNS4, 53))),
    }
}

fn probe() -> Row {
    Row {
        what: format!("probe from {EXTERNAL4} to :{PROBE_PORT}, replies back"),
        expect_allowed: true,
        run: Box::new(|n| {
            let cmd = format!("echo probe | socat -T2 - TCP4:{POD4}:{PROBE_PORT}");
            n.lab.external.run(None, "sh", &["-c", &cmd])
        }),
    }
}

/// Prints one attempt; returns 1 if it did not behave as expected.
fn table_row(node: &KubeNode, sniffer: &Sniffer, mode: &str, row: &Row) -> Result<usize> {
    sniffer.clear();
    let out = (row.run)(node);
    let ok = client::succeeded(&out) == row.expect_allowed;
    let arrived = sniffer.seen().len();
    let mark = if ok { "" } else { "   <-- UNEXPECTED" };
    let external = if arrived > 0 { format!("{arrived} packets") } else { "nothing".into() };
    println!("{mode:<14} {:<48} {:<34} {external}{mark}", row.what, describe(&out));
    Ok(usize::from(!ok))
}

fn last_link_pin(node: &KubeNode) -> Result<PathBuf> {
    let dir = node.pod_cgroup(WEB);
    let id = fs::metadata(&dir).with_context(|| format!("cgroup {}", dir.display()))?.ino();
    Ok(node.lab.pin_dir.join("links").join(id.to_string()).join("egress_sendmsg6"))
}

/// The pod's own application: a TCP server in the pod's container cgroup, answering probes.
struct PodServer(Child);

impl PodServer {
    fn start(node: &KubeNode) -> Result<Self> {
        let child = node
            .lab
            .pod
            .command("socat", Some(&node.pod_cgroup(WEB).join("ctr")))
            .args(["-T5", &format!("TCP4-LISTEN:{PROBE_PORT},reuseaddr,fork"), "SYSTEM:echo ok"])
            .spawn()
            .context("starting the pod's server (socat)")?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self(child))
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

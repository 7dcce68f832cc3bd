//! The gateway and the policy resources on a real API server, without a kubelet (the gateway
//! runs as a process in the control plane's network namespace; its replicas' pods are objects
//! the test creates and marks Ready):
//! - a policy change applies to new connections while an open tunnel keeps the decision it
//!   was made with;
//! - each replica writes the generation it applies to `status.replicas`, and `Programmed`
//!   counts the serving replicas: a Ready peer that has not reported holds it at Pending, a
//!   replica whose pod is gone leaves the count and the list, a refused generation is Invalid.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use egress_tests::{
    cluster::{
        API_ADDR, ControlPlane, TempDir,
        plane_gateway::{PlaneGateway, connect},
    },
    lab::text,
};

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where the echo server listens, in the plane's namespace (the Admin policy passes it).
const ECHO_PORT: u16 = 9;

/// A control plane with the CRDs, namespace team-a, and an Admin policy that passes
/// `API_ADDR:9` to every namespace.
fn plane(tag: &str, dir: &TempDir) -> ControlPlane {
    egress_tests::require_root();
    let plane = ControlPlane::start(&format!("{tag}{}", std::process::id() % 100_000), &dir.0)
        .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
    let crds = egress_tests::cluster::e2e::deploy_dir().join("base/crds/egressfw.io.yaml");
    ok(&plane.kubectl(&["apply", "-f", &crds.display().to_string()]), "installing the CRDs");
    for crd in ["clusteregresspolicies.egressfw.io", "egresspolicies.egressfw.io"] {
        ok(
            &plane.kubectl(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=30s"]),
            "the CRD to be established",
        );
    }
    ok(&plane.kubectl(&["create", "namespace", "team-a"]), "creating team-a");
    apply(&plane, &delegation(""));
    plane
}

fn apply(plane: &ControlPlane, manifest: &str) {
    ok(&plane.kubectl_with_input(&["apply", "-f", "-"], manifest), "kubectl apply");
}

/// Admin: `API_ADDR:9` passed to every namespace (`extra`: more of the subject's selector).
fn delegation(extra: &str) -> String {
    format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {{name: delegate}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{{extra}}}}}\n  egress:\n    - {{name: echo, action: Pass, to: [{{networks: [{API_ADDR}/32]}}], ports: [{{port: {ECHO_PORT}}}]}}\n"
    )
}

/// team-a accepts the delegated address.
fn team_policy() -> String {
    format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: echo, namespace: team-a}}\nspec:\n  podSelector: {{}}\n  egress:\n    - {{name: echo, action: Accept, to: [{{networks: [{API_ADDR}/32]}}], ports: [{{port: {ECHO_PORT}}}]}}\n"
    )
}

/// Echoes every connection's bytes back until dropped.
struct Echo(Arc<AtomicBool>);

impl Echo {
    fn start(plane: &ControlPlane) -> Self {
        let listener = plane
            .ns
            .within(|| TcpListener::bind((API_ADDR, ECHO_PORT)))
            .unwrap_or_else(|e| panic!("binding the echo server: {e}"));
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let mut reader = conn.try_clone().expect("a second handle");
                            let _ = std::io::copy(&mut reader, &mut conn);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self(stop)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends `line` through `tunnel` and reads what comes back.
fn echoed(tunnel: &mut TcpStream, line: &str) -> String {
    tunnel.write_all(line.as_bytes()).expect("writing into the tunnel");
    let mut back = vec![0u8; line.len()];
    match tunnel.read_exact(&mut back) {
        Ok(()) => String::from_utf8_lossy(&back).into_owned(),
        Err(e) => format!("<{e}>"),
    }
}

#[test]
fn a_policy_change_applies_to_new_connections_and_open_tunnels_keep_theirs() {
    let dir = TempDir::new("pol-tunnel");
    let plane = plane("ptun", &dir);
    let _echo = Echo::start(&plane);
    let agent = egress_tests::agent_bin();
    let gateway = PlaneGateway::start(&plane, &agent, &dir.0, "gateway", 13128, &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let target = format!("{API_ADDR}:{ECHO_PORT}");
    let status = || plane.ns.within(|| connect(&gateway.proxy, &target).map(|(s, _)| s).unwrap_or(0));
    let until = |want: u16, step: &str| {
        let mut last = 0;
        let reached = egress_tests::poll_until(Duration::from_secs(20), || {
            last = status();
            last == want
        });
        assert!(reached, "{step}: the gateway answered {last}, not {want}; its log:\n{}", gateway.log());
    };
    until(403, "delegated, but team-a accepts nothing yet");

    apply(&plane, &team_policy());
    until(200, "team-a's Accept");
    let (opened, mut tunnel) = plane.ns.within(|| connect(&gateway.proxy, &target)).expect("a CONNECT");
    assert_eq!(opened, 200);
    assert_eq!(echoed(&mut tunnel, "before\n"), "before\n");

    ok(&plane.kubectl(&["delete", "egresspolicy", "echo", "-n", "team-a"]), "deleting team-a's policy");
    until(403, "team-a's Accept deleted");
    // The tunnel opened under the Accept is not cut by its deletion.
    assert_eq!(echoed(&mut tunnel, "after\n"), "after\n", "the open tunnel lost its decision");
}

/// A gateway replica's pod, as the API server has it (no kubelet runs it): `hash` is its
/// revision (pod-template-hash), `ready` its Ready condition.
fn replica_pod(plane: &ControlPlane, name: &str, hash: &str, labels: &str) {
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: egressfw-system, labels: {{{labels}, pod-template-hash: '{hash}'}}}}\nspec:\n  containers: [{{name: gateway, image: egress-agent}}]\n"
    );
    // The controller-manager creates the namespace's default service account, which admission
    // waits for, shortly after the namespace.
    let mut last = String::new();
    let created = egress_tests::poll_until(Duration::from_secs(20), || {
        let out = plane.kubectl_with_input(&["apply", "-f", "-"], &pod);
        last = text(&out);
        out.status.success()
    });
    assert!(created, "creating pod {name}: {last}");
}

fn set_ready(plane: &ControlPlane, name: &str, ready: bool) {
    let patch = format!(
        "{{\"status\":{{\"conditions\":[{{\"type\":\"Ready\",\"status\":\"{}\"}}]}}}}",
        if ready { "True" } else { "False" }
    );
    ok(
        &plane.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            "egressfw-system",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]),
        "setting a pod's Ready condition",
    );
}

#[test]
fn each_replica_reports_what_it_applies_and_programmed_counts_the_serving_ones() {
    let dir = TempDir::new("pol-replicas");
    let plane = plane("prep", &dir);
    ok(&plane.kubectl(&["create", "namespace", "egressfw-system"]), "creating egressfw-system");
    let gateway_labels = "app.kubernetes.io/name: egress-gateway";
    replica_pod(&plane, "gw-a", "1", gateway_labels);
    replica_pod(&plane, "gw-b", "1", gateway_labels);
    // Another revision of the same Deployment, not Ready yet; and another workload.
    replica_pod(&plane, "gw-c", "2", gateway_labels);
    replica_pod(&plane, "agent-x", "1", "app.kubernetes.io/name: egress-agent");
    for pod in ["gw-a", "gw-b", "agent-x"] {
        set_ready(&plane, pod, true);
    }
    let agent = egress_tests::agent_bin();
    let replica = |name: &str, port: u16| {
        let env = [("POD_NAME", name), ("POD_NAMESPACE", "egressfw-system")];
        PlaneGateway::start(&plane, &agent, &dir.0, name, port, &env).unwrap_or_else(|e| panic!("{e:#}"))
    };
    let a = replica("gw-a", 13128);
    let b = replica("gw-b", 13138);
    let logs = || {
        let log = |name: &str| std::fs::read_to_string(dir.0.join(format!("{name}.log"))).unwrap_or_default();
        format!("gw-a:\n{}\ngw-b:\n{}", log("gw-a"), log("gw-b"))
    };

    let get = |path: &str| {
        let out =
            plane.kubectl(&["get", "clusteregresspolicy", "delegate", "-o", &format!("jsonpath={path}")]);
        ok(&out, "reading the policy's status")
    };
    let programmed = "{.status.conditions[?(@.type==\"Programmed\")].status} {.status.conditions[?(@.type==\"Programmed\")].message}";
    let expect = |want: &str, entries: &str, step: &str| {
        let mut last = (String::new(), String::new());
        let reached = egress_tests::poll_until(Duration::from_secs(20), || {
            last =
                (get(programmed), get("{.status.replicas[*].name}={.status.replicas[*].appliedGeneration}"));
            last.0.trim() == want && last.1.trim() == entries
        });
        assert!(
            reached,
            "{step}: Programmed and status.replicas are {last:?}, want {want:?} and {entries:?}\n{}",
            logs()
        );
    };
    expect("True all 2 gateway replicas apply generation 1", "gw-a gw-b=1 1", "two replicas");

    set_ready(&plane, "gw-c", true);
    expect(
        "False 2 of 3 gateway replicas apply generation 1; gw-c has not reported",
        "gw-a gw-b=1 1",
        "a third replica Ready without a gateway behind it",
    );
    ok(&plane.kubectl(&["delete", "pod", "gw-c", "-n", "egressfw-system", "--wait=false"]), "deleting gw-c");
    expect("True all 2 gateway replicas apply generation 1", "gw-a gw-b=1 1", "gw-c gone");

    // A new generation: both apply it.
    apply(&plane, &delegation("matchLabels: {kubernetes.io/metadata.name: team-a}"));
    expect("True all 2 gateway replicas apply generation 2", "gw-a gw-b=2 2", "generation 2");

    // gw-b stops and its pod goes: its entry goes with it, and gw-a counts itself alone.
    drop(b);
    ok(&plane.kubectl(&["delete", "pod", "gw-b", "-n", "egressfw-system", "--wait=false"]), "deleting gw-b");
    expect("True the gateway's one replica applies generation 2", "gw-a=2", "gw-b gone");

    // A generation the gateway cannot use: Programmed says what stays in force.
    apply(
        &plane,
        &delegation(
            "matchExpressions: [{key: kubernetes.io/metadata.name, operator: Near, values: [team-a]}]",
        ),
    );
    expect("False generation 3 is refused; gw-a applies generation 2", "gw-a=2", "generation 3 refused");
    drop(a);
}

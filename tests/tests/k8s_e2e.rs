//! End to end on a real single-node Kubernetes (tests/src/cluster): the control plane, a kubelet
//! with containerd and runc, real pods on a routed or bridged pod network, images assembled
//! locally, and deploy/ applied exactly as the README says.

use egress_tests::{
    cluster::{
        e2e::{ALLOWED, Cluster, DENIED, Flood, GATEWAY_PODS, SYSTEM, allow_rule, ok},
        node::{NodeShape, POD_CIDR, PodNetwork},
        outside,
    },
    lab::text,
};

#[test]
fn a_pod_runs_on_the_node_and_runs_the_client_tools() {
    let cluster = Cluster::start("e2e-pod", NodeShape::default());
    cluster.run_pod("client", "default");
    let ip = ok(&cluster.kubectl(&["get", "pod", "client", "-o", "jsonpath={.status.podIP}"]), "pod IP");
    let prefix = POD_CIDR.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "pod IP {ip} outside {POD_CIDR}");
    let curl = ok(&cluster.exec("client", "default", &["curl", "--version"]), "curl in the pod");
    assert!(curl.starts_with("curl "), "{curl}");
}

#[test]
fn deploy_installs_the_cni_plugin_and_the_agent_and_gateway_become_ready() {
    let cluster = Cluster::start("e2e-deploy", NodeShape::default());
    cluster.deploy();

    // The init container chained the plugin into the node's real conflist, last.
    let conflist = std::fs::read_to_string(cluster.node.dir.join("cni-conf/10-egfw-test.conflist")).unwrap();
    let conflist: serde_json::Value = serde_json::from_str(&conflist).unwrap();
    let types: Vec<&str> =
        conflist["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types.last(), Some(&"egressfw"), "plugins in the conflist: {types:?}");
    assert!(
        cluster.node.dir.join("cni-bin/egressfw").is_file(),
        "the plugin binary is not in the node's CNI bin directory"
    );

    // The gateway is ready behind its Service.
    let ready = ok(
        &cluster.kubectl(&[
            "get",
            "endpointslices",
            "-n",
            SYSTEM,
            "-l",
            "kubernetes.io/service-name=egress-gateway",
            "-o",
            "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}",
        ]),
        "the gateway Service's endpoints",
    );
    assert!(!ready.trim().is_empty(), "no ready endpoint behind the egress-gateway Service");
}

#[test]
fn an_enforced_pod_reaches_the_outside_only_through_the_gateway_and_only_where_allowed() {
    enforced_pod(PodNetwork::Routed, "e2e-enforce");
}

#[test]
fn an_enforced_pod_on_a_bridge_reaches_the_outside_only_through_the_gateway() {
    enforced_pod(PodNetwork::Bridged, "e2e-enforce-bridged");
}

fn enforced_pod(network: PodNetwork, tag: &str) {
    let cluster = Cluster::enforcing(tag, NodeShape { network, ..NodeShape::default() });
    cluster.run_pod("client", "team-a");
    let proxy = format!("http://{}:3128", cluster.gateway_ip());
    let curl = |args: &[&str]| cluster.curl("client", "team-a", args);

    // Straight to the outside's HTTP server: refused by the kernel at connect (EPERM, where the
    // server itself would accept: k8s_e2e_shapes shows an unenforced pod getting the page).
    assert_eq!(
        cluster.tcp_connect("client", "team-a", 80),
        "EPERM",
        "a direct connection from an enforced pod"
    );
    // Unmodified HTTPS is steered to the gateway (TCP 443): by name it is judged like a proxied
    // request, and a bare address (no SNI) does not get through.
    let steered = curl(&[&format!("https://{ALLOWED}/")]);
    assert_eq!(
        String::from_utf8_lossy(&steered.stdout),
        "200 000",
        "unmodified curl to {ALLOWED}: {}",
        text(&steered)
    );
    for target in [format!("https://{DENIED}/"), format!("https://{}/", outside::host(5))] {
        let refused = curl(&["--insecure", &target]);
        assert!(!refused.status.success(), "unmodified curl to {target} got through: {}", text(&refused));
    }
    // The steered socket reports the peer it asked for, not the gateway.
    let peer = cluster.python(
        "client",
        "team-a",
        &format!(
            "import socket; s = socket.create_connection(('{ALLOWED}', 443), 5); print(s.getpeername()[0])"
        ),
    );
    assert_eq!(ok(&peer, "getpeername of a steered socket").trim(), outside::host(5).to_string());
    // UDP to 443 (QUIC) is not steered: refused at send.
    assert_eq!(cluster.udp_to_443("client", "team-a"), "EPERM");
    // Through the gateway's Service to an allowed name: the outside's page.
    let allowed = curl(&["-x", &proxy, &format!("https://{ALLOWED}/")]);
    assert!(allowed.status.success(), "through the gateway to {ALLOWED}: {}", text(&allowed));
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "200 200");
    // A name the namespace may not reach: the gateway answers the CONNECT with 403.
    let denied = curl(&["-x", &proxy, &format!("https://{DENIED}/")]);
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout),
        "000 403",
        "through the gateway to {DENIED}: {}",
        text(&denied)
    );

    // The gateway knew the pod by its real address: its access log names the namespace.
    let logs =
        ok(&cluster.kubectl(&["logs", "-n", SYSTEM, "-l", GATEWAY_PODS, "--tail=-1"]), "the gateway's logs");
    for (host, verdict) in [(ALLOWED, "allowed"), (DENIED, "denied")] {
        let line = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.to_string().contains(host) && v["namespace"] == "team-a");
        assert!(
            line.is_some(),
            "no access-log line for {host} ({verdict}) naming namespace team-a in:\n{logs}"
        );
    }

    // From the first instant (init container first): datagrams and hand-built frames to the
    // outside. Nothing arrives from the enforced namespace; from one that is not, both do.
    let flood = Flood::DEFAULT;
    let sniffer = Flood::sniffer(&cluster);
    let flooded = flood.run_to_completion(&cluster, "team-a");
    let got = flood.arrived(&sniffer);
    assert!(
        got.is_empty(),
        "{} packets of the enforced pod arrived outside (ports {got:?}); the pod said:\n{flooded}",
        got.len()
    );
    ok(&cluster.kubectl(&["create", "namespace", "free"]), "creating a namespace");
    let flooded = flood.run_to_completion(&cluster, "free");
    let got = flood.arrived(&sniffer);
    for port in [flood.dgram_port, flood.frame_port] {
        assert!(
            got.contains(&port),
            "nothing on port {port} arrived from the unenforced pod (the check could not fail); it said:\n{flooded}"
        );
    }
}

/// The gateway's ConfigMap edited, nothing restarted: the kubelet updates the mounted file (by
/// swapping the volume's `..data` link) and the gateway applies the new rules to new
/// connections; its pods stay the same ones.
#[test]
fn a_gateway_configmap_edit_applies_without_a_restart() {
    let cluster = Cluster::enforcing("e2e-reload", NodeShape::default());
    cluster.run_pod("client", "team-a");
    let proxy = format!("http://{}:3128", cluster.gateway_ip());
    let connect = |host: &str| {
        let out = cluster.curl("client", "team-a", &["-x", &proxy, &format!("https://{host}/")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(connect(DENIED), "000 403", "before the edit");
    let pods = || {
        cluster.get(
            &["pods", "-l", GATEWAY_PODS],
            SYSTEM,
            "{range .items[*]}{.metadata.uid}/{.status.containerStatuses[0].restartCount} {end}",
        )
    };
    let before = pods();

    cluster.edit_gateway_rules(&allow_rule("team-a", &[ALLOWED, DENIED]));
    // The kubelet refreshes ConfigMap volumes on its pod sync (every 10 s on this node).
    let mut last = String::new();
    let applied = egress_tests::poll_until(std::time::Duration::from_secs(90), || {
        last = connect(DENIED);
        last == "200 200"
    });
    assert!(
        applied,
        "the edited rules never applied without a restart (last: {last}); the gateway's log:\n{}",
        text(&cluster.kubectl(&["logs", "-n", SYSTEM, "-l", GATEWAY_PODS, "--tail=20"]))
    );
    assert_eq!(pods(), before, "the gateway's pods were replaced or restarted");
    assert_eq!(connect(ALLOWED), "200 200", "the rule that was there before still applies");
}

/// The policy resources on the real API server, as the deployed gateway reads them: a namespace's
/// own EgressPolicy opens a host only while a ClusterEgressPolicy passes that host to it (by the
/// namespace's labels), an Admin Deny outranks it, and an edit the gateway cannot use keeps the
/// last good generation in force. Every change applies to new connections, nothing restarts,
/// and the objects' status says what became of them (Accepted, Programmed by both replicas and
/// by a replacement replica, PartiallyEffective). A Baseline decides only where nothing before
/// it did. In audit mode what nothing decides goes through, reported.
#[test]
fn policy_resources_open_only_what_the_platform_delegated() {
    let cluster = Cluster::enforcing("e2e-policies", NodeShape::default());
    cluster.run_pod("client", "team-a");
    let proxy = format!("http://{}:3128", cluster.gateway_ip());
    let connect = || {
        let out = cluster.curl("client", "team-a", &["-x", &proxy, &format!("https://{DENIED}/")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let gateway_log = || text(&cluster.kubectl(&["logs", "-n", SYSTEM, "-l", GATEWAY_PODS, "--tail=30"]));
    // Polls until the host answers `want` (the change has reached the gateway).
    let expect = |want: &str, step: &str| {
        let started = std::time::Instant::now();
        let mut last = String::new();
        let reached = egress_tests::poll_until(std::time::Duration::from_secs(30), || {
            last = connect();
            last == want
        });
        assert!(
            reached,
            "{step}: {DENIED} answered {last:?}, not {want:?}; the gateway's log:\n{}",
            gateway_log()
        );
        eprintln!("{step}: {want} after {:.1?}", started.elapsed());
    };
    let label = |value: &str| {
        ok(&cluster.kubectl(&["label", "namespace", "team-a", value, "--overwrite"]), "labelling")
    };
    // Polls until `condition` of the object says `status` with a message containing `says`.
    let condition = |object: &[&str], namespace: &str, condition: &str, status: &str, says: &str| {
        let at = format!(".status.conditions[?(@.type==\"{condition}\")]");
        let path = format!("{{{at}.status}} {{{at}.message}}");
        let mut last = String::new();
        let reached = egress_tests::poll_until(std::time::Duration::from_secs(30), || {
            last = cluster.get(object, namespace, &path);
            last.starts_with(&format!("{status} ")) && last.contains(says)
        });
        assert!(
            reached,
            "{object:?} {condition}: {last:?}, want {status} saying {says:?}; the gateway's log:\n{}",
            gateway_log()
        );
    };
    let team = ["egresspolicy", "partner"];
    expect("000 403", "no policy yet");

    cluster.apply(&delegation(), "the platform's delegation");
    cluster.apply(&team_policy(), "team-a's own policy");
    label("egress=self-service");
    expect("200 200", "delegated to team-a, which accepts it");
    condition(&team, "team-a", "Accepted", "True", "applies this generation");
    condition(&team, "team-a", "Programmed", "True", "all 2 gateway replicas apply generation 1");
    condition(&team, "team-a", "PartiallyEffective", "False", "within what the Admin tier delegates");
    let replicas = || {
        let names = cluster.get(&["pods", "-l", GATEWAY_PODS], SYSTEM, "{.items[*].metadata.name}");
        let mut names: Vec<String> = names.split_whitespace().map(str::to_owned).collect();
        names.sort();
        names
    };
    // Each replica reports its own entry; a replica replaced leaves, its successor joins.
    let entries = || {
        let names = cluster.get(&team, "team-a", "{.status.replicas[*].name}");
        let mut names: Vec<String> = names.split_whitespace().map(str::to_owned).collect();
        names.sort();
        names
    };
    assert_eq!(entries(), replicas(), "status.replicas names the gateway's pods");
    let gone = replicas()[0].clone();
    ok(
        &cluster.kubectl(&["delete", "pod", "-n", SYSTEM, &gone, "--wait=false"]),
        "deleting a gateway replica",
    );
    let mut last = Vec::new();
    let settled = egress_tests::poll_until(std::time::Duration::from_secs(90), || {
        let now = replicas();
        last = entries();
        now.len() == 2 && !now.contains(&gone) && last == now
    });
    assert!(settled, "status.replicas is {last:?} after {gone} was replaced; the pods are {:?}", replicas());
    condition(&team, "team-a", "Programmed", "True", "all 2 gateway replicas apply generation 1");
    label("egress-");
    expect("000 403", "team-a no longer in the delegation (its label removed)");
    // Its author sees why, on the object.
    condition(
        &team,
        "team-a",
        "PartiallyEffective",
        "True",
        &format!("rule \"partner\": {DENIED} is not delegated to namespace team-a by any Admin Pass"),
    );
    label("egress=self-service");
    expect("200 200", "labelled again");
    condition(&team, "team-a", "PartiallyEffective", "False", "within what the Admin tier delegates");

    cluster.apply(&admin_deny("In"), "an Admin Deny at a higher priority");
    expect("000 403", "the Admin Deny outranks the delegation");
    let log = gateway_log();
    assert!(
        log.contains("denied_by_policy") && log.contains("ClusterEgressPolicy/no-partner#partner"),
        "the access log does not name the Deny that decided:\n{log}"
    );

    // An operator the API server lets through (the schema cannot list them) but the gateway
    // cannot evaluate: both replicas say so, and the Deny's first generation stays in force.
    cluster.apply(&admin_deny("Near"), "a Deny the gateway cannot use");
    let replicas =
        cluster.get(&["pods", "-l", GATEWAY_PODS], SYSTEM, "{range .items[*]}{.metadata.name} {end}");
    for pod in replicas.split_whitespace() {
        let mut seen = String::new();
        let refused = egress_tests::poll_until(std::time::Duration::from_secs(30), || {
            seen = text(&cluster.kubectl(&["logs", "-n", SYSTEM, pod]));
            seen.contains("policy refused") && seen.contains("generation 1 stays in force")
        });
        assert!(refused, "gateway {pod} never reported the unusable Deny; its log:\n{seen}");
    }
    for _ in 0..4 {
        assert_eq!(connect(), "000 403", "the last good Deny was dropped with its bad edit");
    }
    condition(&["clusteregresspolicy", "no-partner"], "", "Accepted", "False", "generation 1 stays in force");
    condition(&["clusteregresspolicy", "no-partner"], "", "Programmed", "False", "generation 2 is refused");
    let programmed = cluster.get(
        &["clusteregresspolicy", "no-partner"],
        "",
        "{.status.conditions[?(@.type==\"Programmed\")].message}",
    );
    assert_eq!(
        programmed.matches("applies generation 1").count(),
        2,
        "both replicas keep generation 1: {programmed}"
    );

    ok(&cluster.kubectl(&["delete", "clusteregresspolicy", "no-partner"]), "deleting the Deny");
    expect("200 200", "the Deny deleted");

    // Baseline decides only what nothing before it did: its Deny loses to team-a's Accept,
    // and decides once that Accept is gone; its Accept opens what nothing else decides.
    cluster.apply(&baseline("Deny"), "a Baseline Deny");
    condition(&["clusteregresspolicy", "fallback"], "", "Programmed", "True", "apply generation 1");
    expect("200 200", "team-a's Accept comes before the Baseline Deny");
    ok(&cluster.kubectl(&["delete", "egresspolicy", "partner", "-n", "team-a"]), "deleting team-a's policy");
    expect("000 403", "the Baseline Deny, with team-a's Accept deleted");
    let log = gateway_log();
    assert!(
        log.contains("denied_by_policy") && log.contains("ClusterEgressPolicy/fallback#partner"),
        "the access log does not name the Baseline Deny that decided:\n{log}"
    );
    cluster.apply(&baseline("Accept"), "the Baseline turned Accept");
    expect("200 200", "the Baseline Accept, where nothing else decides");
    ok(&cluster.kubectl(&["delete", "clusteregresspolicy", "fallback"]), "deleting the Baseline");
    expect("000 403", "nothing decides (enforce)");

    // Audit mode: what no rule decides is let through at the gateway and reported with what
    // enforcing would have said.
    label("egressfw.io/mode=audit");
    expect("200 200", "team-a in audit mode");
    let log = gateway_log();
    assert!(
        log.contains(r#""reason":"audit""#)
            && log.contains(r#""audit":"not_allowed""#)
            && log.contains(r#""passed":"ClusterEgressPolicy/self-service#partner""#),
        "the access log does not report the audited connection, and the Pass it went through:\n{log}"
    );

    // What team-a reached, recommended as a policy: both replicas' observations, read through
    // the API server's pod proxy, checked against the cluster's policy objects.
    let out = cluster
        .egress_agent(&["recommend", "--namespace", "team-a"])
        .output()
        .expect("running egress-agent recommend");
    let recommended = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "recommend: {}", String::from_utf8_lossy(&out.stderr));
    for says in [
        "# Observed by gateway pod egress-gateway-".to_owned(),
        "# Policy objects from the cluster.".to_owned(),
        format!("hosts seen: {DENIED} ("),
        format!("- domainNames: [\"{DENIED}\"]\n      ports:\n        - {{protocol: TCP, port: 443}}"),
    ] {
        assert!(recommended.contains(&says), "no {says:?} in:\n{recommended}");
    }
    assert_eq!(recommended.matches("# Observed by gateway pod").count(), 2, "both replicas:\n{recommended}");
    assert!(!recommended.contains("# Outside what the Admin tier delegates"), "delegated:\n{recommended}");

    // The recommendation replayed against the cluster's objects: what enforce refuses today
    // (team-a accepts nothing), the proposal allows; nothing is newly denied, so exit 0.
    let proposal = cluster.dir.0.join("recommended.yaml");
    std::fs::write(&proposal, recommended.as_bytes()).expect("writing the recommendation");
    let out = cluster
        .egress_agent(&["diff", "--namespace", "team-a", "-f", &proposal.display().to_string()])
        .output()
        .expect("running egress-agent diff");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "diff: {table}{}", String::from_utf8_lossy(&out.stderr));
    let row =
        table.lines().find(|l| l.contains(&format!("{DENIED}:443"))).unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.starts_with("Pod/client ")
            && row.contains("denied   allowed *")
            && row.contains("EgressPolicy/team-a/recommended#"),
        "{row}\n{table}"
    );
}

/// Admin: namespaces labelled `egress=self-service` may allow DENIED on 443 for themselves.
fn delegation() -> String {
    format!(
        r"apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {{name: self-service}}
spec:
  tier: Admin
  priority: 50
  subject: {{namespaces: {{matchLabels: {{egress: self-service}}}}}}
  egress:
    - {{name: partner, action: Pass, to: [{{domainNames: ['{DENIED}']}}], ports: [{{port: 443}}]}}
"
    )
}

/// Baseline: `action` DENIED for team-a.
fn baseline(action: &str) -> String {
    format!(
        r"apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {{name: fallback}}
spec:
  tier: Baseline
  priority: 10
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: team-a}}}}}}
  egress:
    - {{name: partner, action: {action}, to: [{{domainNames: ['{DENIED}']}}]}}
"
    )
}

/// team-a accepts DENIED on 443 for all its pods (within the delegation, all of it).
fn team_policy() -> String {
    format!(
        r"apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata: {{name: partner, namespace: team-a}}
spec:
  podSelector: {{}}
  egress:
    - {{name: partner, action: Accept, to: [{{domainNames: ['{DENIED}']}}], ports: [{{port: 443}}]}}
"
    )
}

/// Admin, ahead of the delegation: DENIED is denied to every namespace (`operator`: of the
/// subject's selector, `In` or one the gateway cannot evaluate).
fn admin_deny(operator: &str) -> String {
    format!(
        r"apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {{name: no-partner}}
spec:
  tier: Admin
  priority: 10
  subject: {{namespaces: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: {operator}, values: [team-a]}}]}}}}
  egress:
    - {{name: partner, action: Deny, to: [{{domainNames: ['{DENIED}']}}]}}
"
    )
}

//! deploy/ against a real Kubernetes API server (Kubernetes built from its Go modules, see
//! tests/src/cluster): `kubectl apply -k deploy/` exactly as the README says, the shipped RBAC as
//! the real authorizer evaluates it, and the shipped ValidatingAdmissionPolicy refusing a
//! namespace owner's change to the `egressfw.io/*` labels. The node agent itself runs against it
//! with the token of the ServiceAccount deploy/ ships, so a verb missing from its ClusterRole
//! keeps it from becoming ready. The node side (kubelet, containerd, pods) is not part of this
//! suite yet.

use std::{path::Path, process::Output, time::Duration};

use egress_tests::{
    agent::{self, Agent},
    cluster::{API_ADDR, API_PORT, ControlPlane, TempDir},
    lab::{Lab, text},
    patience,
};

fn start(dir: &TempDir) -> ControlPlane {
    ControlPlane::start(&format!("t{}", std::process::id() % 100_000), &dir.0)
        .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"))
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn can_i(plane: &ControlPlane, who: &str, verb: &str, resource: &str) -> bool {
    let out = plane.kubectl(&["auth", "can-i", verb, resource, "--as", who, "--all-namespaces"]);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[test]
fn deploy_applies_and_its_rbac_and_admission_policy_hold_on_a_real_api_server() {
    let dir = TempDir::new("realapi");
    let plane = start(&dir);
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");

    // As the README says: kubectl's own kustomize, the real API server's validation.
    let applied =
        ok(&plane.kubectl(&["apply", "-k", &deploy.display().to_string()]), "kubectl apply -k deploy/");
    for object in [
        "namespace/egressfw-system",
        "daemonset.apps/egress-agent",
        "deployment.apps/egress-gateway",
        "service/egress-gateway",
        "validatingadmissionpolicy.admissionregistration.k8s.io/egressfw-namespace-labels",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/egressfw-namespace-labels",
    ] {
        assert!(applied.contains(&format!("{object} created")), "{object} not created:\n{applied}");
    }
    // Applying again changes no object's spec (kubectl reports the PodDisruptionBudget and the
    // admission policy "configured" every time: it always sends their selector and rule lists,
    // whose patch strategy is replace, and the server finds nothing to change). Generations, not
    // resource versions: controllers write the workloads' and the policy's status meanwhile.
    let versions = || {
        ok(
            &plane.kubectl(&[
                "get",
                "-k",
                &deploy.display().to_string(),
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.generation} {end}",
            ]),
            "reading the objects' versions",
        )
    };
    let before = versions();
    ok(&plane.kubectl(&["apply", "-k", &deploy.display().to_string()]), "second apply");
    assert_eq!(versions(), before, "a second apply changed stored objects");

    // RBAC as the real authorizer evaluates the shipped roles and bindings.
    let agent = "system:serviceaccount:egressfw-system:egress-agent";
    for resource in ["namespaces", "pods", "services", "endpointslices.discovery.k8s.io"] {
        for verb in ["get", "list", "watch"] {
            assert!(can_i(&plane, agent, verb, resource), "the agent may not {verb} {resource}");
        }
    }
    for resource in ["events", "events.events.k8s.io"] {
        for verb in ["create", "patch"] {
            assert!(can_i(&plane, agent, verb, resource), "the agent may not {verb} {resource}");
        }
    }
    for (verb, resource) in
        [("get", "secrets"), ("create", "pods"), ("patch", "namespaces"), ("delete", "pods")]
    {
        assert!(!can_i(&plane, agent, verb, resource), "the agent may {verb} {resource}: more than it needs");
    }
    let gateway = "system:serviceaccount:egressfw-system:egress-gateway";
    // Its watches: pods (identities), namespaces (their labels) and the policy resources, whose
    // status (only) it writes.
    for resource in ["clusteregresspolicies.egressfw.io", "egresspolicies.egressfw.io"] {
        let out = plane.kubectl(&[
            "auth",
            "can-i",
            "patch",
            resource,
            "--subresource=status",
            "--as",
            gateway,
            "--all-namespaces",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "yes",
            "the gateway may not patch {resource}/status"
        );
    }
    for resource in ["pods", "namespaces", "clusteregresspolicies.egressfw.io", "egresspolicies.egressfw.io"]
    {
        for verb in ["get", "list", "watch"] {
            assert!(can_i(&plane, gateway, verb, resource), "the gateway may not {verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("patch", "namespaces"),
        ("create", "events"),
        ("update", "egresspolicies.egressfw.io"),
        ("delete", "clusteregresspolicies.egressfw.io"),
    ] {
        assert!(!can_i(&plane, gateway, verb, resource), "the gateway may {verb} {resource}");
    }

    // A namespace owner who may edit namespaces, but is no egressfw-namespace-labeller.
    let owner_role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: namespace-editor\nrules:\n- apiGroups: [\"\"]\n  resources: [namespaces]\n  verbs: [get, list, patch, update]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: alice-edits-namespaces\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: namespace-editor}\nsubjects:\n- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}\n";
    ok(&plane.kubectl_with_input(&["apply", "-f", "-"], owner_role), "the namespace owner's role");
    ok(&plane.kubectl(&["create", "namespace", "team-a"]), "create namespace team-a");
    ok(
        &plane.kubectl(&["label", "namespace", "team-a", "egressfw.io/mode=enforce"]),
        "the platform team labels it",
    );
    let as_alice = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--as", "alice"]);
        plane.kubectl(&all)
    };
    // The policy takes effect once the API server has loaded it: until then the change goes
    // through, and is put back before the next try.
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(60));
    let refused = loop {
        let out = as_alice(&["label", "namespace", "team-a", "egressfw.io/mode=off", "--overwrite"]);
        if !out.status.success() {
            break text(&out);
        }
        ok(
            &plane.kubectl(&["label", "namespace", "team-a", "egressfw.io/mode=enforce", "--overwrite"]),
            "put back",
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the admission policy never refused the namespace owner"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        refused.contains("egressfw-namespace-labels") && refused.contains("set by the platform team"),
        "refused by the shipped policy, with its message: {refused}"
    );
    let removal = as_alice(&["label", "namespace", "team-a", "egressfw.io/mode-"]);
    assert!(!removal.status.success() && text(&removal).contains("removing one"), "{}", text(&removal));
    let created = plane.kubectl_with_input(
        &["create", "-f", "-", "--as", "alice"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-b\n  labels: {egressfw.io/mode: \"off\"}\n",
    );
    assert!(!created.status.success(), "a new namespace cannot start labelled: {}", text(&created));
    // Other labels are the owner's to change.
    ok(&as_alice(&["label", "namespace", "team-a", "team=payments"]), "an ordinary label");

    // Bound to the shipped labeller role, the same person may.
    ok(
        &plane.kubectl(&[
            "create",
            "clusterrolebinding",
            "alice-labels",
            "--clusterrole",
            "egressfw-namespace-labeller",
            "--user",
            "alice",
        ]),
        "binding the labeller role",
    );
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(30));
    while !as_alice(&["label", "namespace", "team-a", "egressfw.io/mode=audit", "--overwrite"])
        .status
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "the labeller role never let the change through");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mode = ok(
        &plane.kubectl(&[
            "get",
            "namespace",
            "team-a",
            "-o",
            "jsonpath={.metadata.labels.egressfw\\.io/mode}",
        ]),
        "read back",
    );
    assert_eq!(mode, "audit");
}

/// The agent binary, run as `egress-agent run` on this machine (in the control plane's network
/// namespace, where the API server is) with the shipped configuration and the shipped
/// ServiceAccount's token: it becomes ready only if every watch it needs is allowed. The same
/// agent with one verb taken from its ClusterRole does not, and says why.
#[test]
fn the_agent_becomes_ready_with_the_rbac_deploy_ships_and_not_without_it() {
    let dir = TempDir::new("realapi-agent");
    let plane = start(&dir);
    // The agent pins under the host's bpffs, as on a node; nothing else in this suite mounts it.
    egress_tests::kube_node::ensure_host_bpffs();
    let lab = Lab::new();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    ok(&plane.kubectl(&["apply", "-k", &deploy.display().to_string()]), "kubectl apply -k deploy/");
    // Cluster DNS, as every cluster has it (the agent's configuration names it).
    ok(
        &plane.kubectl(&[
            "create",
            "service",
            "clusterip",
            "kube-dns",
            "-n",
            "kube-system",
            "--tcp",
            "53:53",
        ]),
        "kube-dns",
    );

    let config = lab.dir.join("agent.yaml");
    let shipped = ok(
        &plane.kubectl(&[
            "get",
            "configmap",
            "egress-agent-config",
            "-n",
            "egressfw-system",
            "-o",
            "jsonpath={.data.agent\\.yaml}",
        ]),
        "the shipped agent configuration",
    );
    std::fs::write(&config, shipped).unwrap();
    let token = ok(
        &plane.kubectl(&["create", "token", "egress-agent", "-n", "egressfw-system", "--duration", "1h"]),
        "token",
    );
    let kubeconfig = lab.dir.join("agent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{API_ADDR}:{API_PORT}\n    certificate-authority: {}\nusers:\n- name: egress-agent\n  user:\n    token: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: egress-agent}}\ncurrent-context: c\n",
            plane.dir.join("pki/ca.crt").display(),
            token.trim()
        ),
    )
    .unwrap();
    let pods_root = lab.base_cgroup.join("kubepods");
    for qos in ["burstable", "besteffort"] {
        std::fs::create_dir_all(pods_root.join(qos)).unwrap();
    }
    let run_agent = |http_port: u16| {
        let mut cmd = agent::command_for(&lab, &egress_tests::agent_bin(), &lab.pin_dir);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--node-name", "node-1", "--http-addr", &format!("127.0.0.1:{http_port}")])
            .arg("--pods-cgroup")
            .arg(pods_root.strip_prefix(&lab.cgroup_root).unwrap())
            .arg("--cni-state-dir")
            .arg(lab.dir.join("cni"))
            .env("KUBECONFIG", &kubeconfig);
        in_namespace(&mut cmd, &plane);
        let ns = &plane.ns;
        let ready = move |_: &Agent| ns.within(|| readyz(http_port));
        Agent::spawn(&lab, cmd, ready)
    };
    let agent = run_agent(19_801)
        .unwrap_or_else(|log| panic!("the agent did not become ready with the shipped RBAC:\n{log}"));
    drop(agent);
    let _ = agent::cli(&lab, &["teardown"]);

    // The same agent, its ClusterRole without `watch` on EndpointSlices (how it follows the
    // gateway's and DNS's backends): never ready, and its log names the refusal.
    let rules =
        ok(&plane.kubectl(&["get", "clusterrole", "egressfw-agent", "-o", "json"]), "the agent's role");
    let mut role: serde_json::Value = serde_json::from_str(&rules).unwrap();
    for rule in role["rules"].as_array_mut().unwrap() {
        if rule["resources"].as_array().unwrap().iter().any(|r| r == "endpointslices") {
            rule["verbs"] = serde_json::json!(["get", "list"]);
        }
    }
    ok(&plane.kubectl_with_input(&["replace", "-f", "-"], &role.to_string()), "narrowing the role");
    match run_agent(19_802) {
        Ok(agent) => panic!("ready without watch on endpointslices:\n{}", agent.log_text()),
        Err(log) => assert!(
            log.contains("endpointslices") && log.contains("forbidden"),
            "the agent's log names the refused watch:\n{log}"
        ),
    }
}

/// Makes `cmd` run in the control plane's network namespace.
fn in_namespace(cmd: &mut std::process::Command, plane: &ControlPlane) {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let netns = std::fs::File::open(plane.ns.path()).expect("the control plane's namespace");
    // SAFETY: only setns between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether the agent's `/readyz` answers 200 (run inside the control plane's namespace).
fn readyz(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

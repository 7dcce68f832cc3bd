//! The policy resources (issue 26) on a real API server: the CRDs deploy/ ships install, good
//! objects are accepted, and the API server itself refuses bad ones (OpenAPI schema and CEL in
//! the CRDs) with the message a user sees on `kubectl apply`. App teams may manage
//! `EgressPolicy` in their namespace through the built-in `edit` role, and not
//! `ClusterEgressPolicy`. `egress-agent explain` reads the objects from the API server and says
//! how the gateway would decide.

use std::process::Output;

use egress_tests::{
    cluster::{ControlPlane, TempDir, e2e::deploy_dir},
    lab::text,
};

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const GOOD_CLUSTER_POLICY: &str = r#"apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata:
  name: platform
spec:
  tier: Admin
  priority: 10
  subject:
    namespaces: {}
  egress:
    - name: no-paste-sites
      action: Deny
      to:
        - domainNames: ["pastebin.com", "*.pastebin.com"]
    - name: github-is-delegated
      action: Pass
      to:
        - domainNames: ["*.github.com", "github.com"]
      ports:
        - port: 443
    - name: metadata
      action: Deny
      to:
        - networks: ["169.254.169.254/32", "fd00:ec2::254/128"]
"#;

const GOOD_NAMESPACE_POLICY: &str = r#"apiVersion: egressfw.io/v1alpha1
kind: EgressPolicy
metadata:
  name: ci
  namespace: team-a
spec:
  podSelector:
    matchLabels: {app: ci}
  egress:
    - name: github-api
      action: Accept
      to:
        - domainNames: ["api.github.com"]
      ports:
        - {protocol: TCP, port: 443}
      via: TlsPassthrough
"#;

/// `GOOD_NAMESPACE_POLICY` with one line replaced.
fn namespace_policy_with(from: &str, to: &str) -> String {
    assert!(GOOD_NAMESPACE_POLICY.contains(from), "{from}");
    GOOD_NAMESPACE_POLICY.replacen(from, to, 1).replace("name: ci\n", "name: bad\n")
}

fn cluster_policy_with(from: &str, to: &str) -> String {
    assert!(GOOD_CLUSTER_POLICY.contains(from), "{from}");
    GOOD_CLUSTER_POLICY.replacen(from, to, 1).replace("name: platform\n", "name: bad\n")
}

#[test]
fn the_policy_crds_install_accept_good_objects_and_refuse_bad_ones_with_clear_messages() {
    egress_tests::require_root();
    let dir = TempDir::new("crds");
    let plane = ControlPlane::start(&format!("c{}", std::process::id() % 100_000), &dir.0)
        .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));
    ok(&plane.kubectl(&["apply", "-k", &deploy_dir().display().to_string()]), "kubectl apply -k deploy/");
    for crd in ["clusteregresspolicies.egressfw.io", "egresspolicies.egressfw.io"] {
        ok(
            &plane.kubectl(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=30s"]),
            "the CRD to be established",
        );
    }
    ok(&plane.kubectl(&["create", "namespace", "team-a"]), "creating a namespace");
    for good in [GOOD_CLUSTER_POLICY, GOOD_NAMESPACE_POLICY] {
        ok(&plane.kubectl_with_input(&["apply", "-f", "-"], good), "applying a valid policy");
    }

    explain_reads_the_objects_from_the_api_server(&plane, &dir);

    let refused: Vec<(&str, String, &str)> = vec![
        (
            "a bare *",
            namespace_policy_with(r#"["api.github.com"]"#, r#"["*"]"#),
            "a bare * would allow everything",
        ),
        (
            "an address as a name",
            namespace_policy_with(r#"["api.github.com"]"#, r#"["192.0.2.1"]"#),
            "domainNames takes names, not IP addresses",
        ),
        (
            "an IPv6 address as a name",
            namespace_policy_with(r#"["api.github.com"]"#, r#"["2001:db8::1"]"#),
            "domainNames takes names, not IP addresses",
        ),
        (
            "a name with upper case and a wildcard inside",
            namespace_policy_with(r#"["api.github.com"]"#, r#"["Api.GitHub.com", "a.*.example.com"]"#),
            "a domain name is lowercase labels joined by dots",
        ),
        (
            "names and networks in one destination",
            namespace_policy_with(
                r#"- domainNames: ["api.github.com"]"#,
                r#"- {domainNames: ["api.github.com"], networks: ["192.0.2.0/24"]}"#,
            ),
            "a destination names either domainNames or networks",
        ),
        (
            "a network that is no CIDR",
            cluster_policy_with(r#"["169.254.169.254/32", "fd00:ec2::254/128"]"#, r#"["10.0.0.0/33"]"#),
            "networks takes CIDRs",
        ),
        ("a port out of range", namespace_policy_with("port: 443}", "port: 70000}"), "65535"),
        (
            "a range that ends before it starts",
            namespace_policy_with("port: 443}", "port: 443, endPort: 80}"),
            "endPort must not be below port",
        ),
        (
            "Pass in the Baseline tier",
            cluster_policy_with("tier: Admin", "tier: Baseline"),
            "it exists only in the Admin tier",
        ),
        (
            "a namespace policy that denies",
            namespace_policy_with("action: Accept", "action: Deny"),
            r#"supported values: "Accept""#,
        ),
        (
            "two rules with one name",
            cluster_policy_with("name: metadata", "name: no-paste-sites"),
            "every rule needs a name of its own",
        ),
        ("a priority above 1000", cluster_policy_with("priority: 10", "priority: 2000"), "1000"),
    ];
    let mut wrong = Vec::new();
    for (what, manifest, message) in &refused {
        let out = plane.kubectl_with_input(&["apply", "-f", "-"], manifest);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() || !said.contains(message) {
            wrong.push(format!("{what}: expected a refusal saying {message:?}, got: {}", text(&out)));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // App teams: the built-in `edit` role, bound in their namespace, covers EgressPolicy there
    // (aggregated), not ClusterEgressPolicy.
    ok(
        &plane.kubectl(&[
            "create",
            "rolebinding",
            "alice-edit",
            "--clusterrole=edit",
            "--user=alice",
            "-n",
            "team-a",
        ]),
        "binding edit",
    );
    let can_i = |verb: &str, resource: &str, namespace: &str| {
        let out = plane.kubectl(&["auth", "can-i", verb, resource, "--as", "alice", "-n", namespace]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    // Aggregation is done by the controller-manager: give it a moment.
    egress_tests::wait_until(
        "edit to aggregate the EgressPolicy rules",
        std::time::Duration::from_secs(30),
        || can_i("create", "egresspolicies.egressfw.io", "team-a"),
    );
    assert!(can_i("delete", "egresspolicies.egressfw.io", "team-a"));
    assert!(!can_i("create", "egresspolicies.egressfw.io", "default"), "only where edit is bound");
    assert!(!can_i("create", "clusteregresspolicies.egressfw.io", "team-a"), "the platform's resource");
    let status = plane.kubectl(&[
        "auth",
        "can-i",
        "update",
        "egresspolicies.egressfw.io",
        "--subresource=status",
        "--as",
        "alice",
        "-n",
        "team-a",
    ]);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "no", "status is egressfw's to write");

    the_policy_example_applies_and_explains(&plane);
    admission_warns_about_what_a_policy_cannot_change(&plane);
}

/// deploy/base/admission/policy-checks.yaml on the real API server: `kubectl apply` warns (and
/// still applies) an EgressPolicy in a namespace that is not opted in, and a ClusterEgressPolicy
/// whose subject selects namespaces by labels the namespace-labels policy does not guard.
fn admission_warns_about_what_a_policy_cannot_change(plane: &ControlPlane) {
    // Whether applying `manifest` succeeds, and the warning kubectl prints, if any.
    let apply = |manifest: &str| {
        let out = plane.kubectl_with_input(&["apply", "-f", "-"], manifest);
        assert!(out.status.success(), "a warning must not refuse: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.lines().filter(|l| l.starts_with("Warning: ")).collect::<Vec<_>>().join("\n")
    };
    ok(&plane.kubectl(&["create", "namespace", "team-c"]), "creating a namespace not opted in");
    let policy = GOOD_NAMESPACE_POLICY.replace("namespace: team-a", "namespace: team-c");
    // The admission policies came with deploy/ at the start: poll, they load in the background.
    let mut warning = String::new();
    let warned = egress_tests::poll_until(std::time::Duration::from_secs(15), || {
        warning = apply(&policy);
        !warning.is_empty()
    });
    assert!(warned, "no warning for an EgressPolicy in a namespace that is not opted in");
    assert!(
        warning.contains("namespace team-c is not opted in to egressfw (its label egressfw.io/mode is not enforce or audit)"),
        "{warning}"
    );
    ok(&plane.kubectl(&["label", "namespace", "team-c", "egressfw.io/mode=audit"]), "opting team-c in");
    let quiet = apply(&policy.replace("port: 443}", "port: 8443}"));
    assert_eq!(quiet, "", "an opted-in namespace's policy draws no warning");

    let subject = |selector: &str| {
        GOOD_CLUSTER_POLICY.replace("name: platform\n", "name: subject\n").replace("namespaces: {}", selector)
    };
    let warning = apply(&subject(
        "namespaces: {matchLabels: {egress: self-service}, matchExpressions: [{key: team, operator: In, values: [a]}]}",
    ));
    assert!(
        warning.contains("subject.namespaces selects by egress, team, a label that egressfw-namespace-labels does not guard"),
        "{warning}"
    );
    for guarded in [
        "namespaces: {matchLabels: {egressfw.io/egress: self-service}}",
        "namespaces: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [team-a]}]}",
        "namespaces: {}",
    ] {
        assert_eq!(apply(&subject(guarded)), "", "{guarded} draws no warning");
    }
}

/// deploy/examples/self-service-egress/ as its README says (`kubectl apply -k`, after deploy/):
/// the API server takes every object, and explain reads the team's rules inside and outside the
/// platform's bounds from it (its pod from the earlier step carries app=ci).
fn the_policy_example_applies_and_explains(plane: &ControlPlane) {
    let example = deploy_dir().join("examples/self-service-egress");
    ok(
        &plane.kubectl(&["apply", "-k", &example.display().to_string()]),
        "kubectl apply -k the policy example",
    );
    let explain = |host: &str| {
        let mut cmd = plane.ns.command(&egress_tests::agent_bin().display().to_string(), None);
        cmd.args(["explain", "--namespace", "team-a", "--pod", "runner", "--host", host])
            .env("KUBECONFIG", &plane.admin_kubeconfig);
        let out = cmd.output().expect("running egress-agent explain");
        (out.status.code(), text(&out))
    };
    for (host, status, says) in [
        ("api.github.com", 0, "ALLOWED by EgressPolicy/team-a/ci#github-api"),
        ("objects.githubusercontent.com", 2, "DENIED: no rule decides it"),
        ("pastebin.com", 2, "DENIED by ClusterEgressPolicy/platform#no-paste-sites"),
    ] {
        let (got, output) = explain(host);
        assert!(
            got == Some(status) && output.contains(says),
            "explain {host}: exit {got:?}, want {says:?} in:\n{output}"
        );
    }
}

/// `egress-agent explain` against the API server (its kubeconfig), with and without the
/// gateway's file: the exit status says allowed (0) or denied (2), the text names the rules.
fn explain_reads_the_objects_from_the_api_server(plane: &ControlPlane, dir: &TempDir) {
    ok(&plane.kubectl(&["label", "namespace", "team-a", "team=a"]), "labelling team-a");
    let gateway_file = dir.0.join("gateway.yaml");
    std::fs::write(
        &gateway_file,
        "listeners: {httpProxy: {listen: \"127.0.0.1:3128\"}}\nsources: {kubernetes: true}\nrules:\n  - {namespaces: [team-a], hosts: [pastebin.com]}\n",
    )
    .unwrap();
    let explain = |args: &[&str]| {
        let mut cmd = plane.ns.command(&egress_tests::agent_bin().display().to_string(), None);
        cmd.arg("explain").args(args).env("KUBECONFIG", &plane.admin_kubeconfig);
        let out = cmd.output().expect("running egress-agent explain");
        (out.status.code(), text(&out))
    };
    // A pod (it stays Pending: this cluster has no node) whose labels explain reads.
    ok(
        &plane.kubectl(&[
            "run",
            "runner",
            "-n",
            "team-a",
            "--image=egfw.test/none",
            "--labels=app=ci",
            "--restart=Never",
        ]),
        "creating a pod",
    );
    let gateway_file = gateway_file.display().to_string();
    let team_a = ["--namespace", "team-a"];
    let cases: [(Vec<&str>, i32, &str); 4] = [
        (
            [&team_a[..], &["--host", "api.github.com", "--pod", "runner", "--via", "TlsPassthrough"]]
                .concat(),
            0,
            "ALLOWED by EgressPolicy/team-a/ci#github-api",
        ),
        // The namespace's rule is for TLS passthrough only.
        (
            [&team_a[..], &["--host", "api.github.com", "--port", "443", "--pod", "runner"]].concat(),
            2,
            "DENIED: no rule decides it",
        ),
        (
            [&team_a[..], &["--host", "pastebin.com"]].concat(),
            2,
            "DENIED by ClusterEgressPolicy/platform#no-paste-sites",
        ),
        (
            [&team_a[..], &["--host", "pastebin.com", "--gateway-config", &gateway_file]].concat(),
            0,
            "ALLOWED by the gateway file's rule pastebin.com",
        ),
    ];
    for (args, status, says) in cases {
        let (got, output) = explain(&args);
        assert!(
            got == Some(status) && output.contains(says),
            "explain {args:?}: exit {got:?} (want {status}), want {says:?} in:\n{output}"
        );
    }
    let (_, output) = explain(&[&team_a[..], &["--host", "api.github.com", "--pod", "runner"]].concat());
    assert!(output.contains("namespace labels: kubernetes.io/metadata.name=team-a, team=a"), "{output}");
    assert!(output.contains("pod labels: app=ci"), "the pod's labels, from the API server:\n{output}");
    let (got, output) = explain(&[&team_a[..], &["--host", "api.github.com", "--pod", "gone"]].concat());
    assert!(
        got == Some(1) && output.contains("pod team-a/gone not found"),
        "a missing pod: exit {got:?}\n{output}"
    );
    let (got, output) = explain(&[&team_a[..], &["--host", "api.github.com", "--via", "Carrier"]].concat());
    assert!(got == Some(1) && output.contains("--via \"Carrier\""), "a bad --via: exit {got:?}\n{output}");
}

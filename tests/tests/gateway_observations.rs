//! The gateway's observations (admin `/observations`): what each namespace's clients reached,
//! counted by outcome, with first and last seen, from real curl requests through the proxy; a
//! table bounded by `limits.maxObservations` forgets the least recently seen and counts it (in
//! the JSON and as metrics).

use egress_tests::{
    gateway::{ADMIN_PORT, GatewayLab, PROXY_PORT, base_config, http_get},
    lab::{GATEWAY4, POD4},
    sock,
};
use serde_json::Value;

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[test]
fn the_gateway_counts_what_each_namespace_reached_within_its_bound() {
    let g = GatewayLab::new();
    let config = base_config(&g.ca, 100).replace("limits:\n", "limits:\n  maxObservations: 2\n");
    let gw = g.start(&config);
    let proxy = format!("http://{GATEWAY4}:{PROXY_PORT}");
    let get = |url: &str| {
        let out = g.curl(POD4, &["--proxy", &proxy, url]);
        String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned()
    };
    assert_eq!(get("http://api.example.test/"), "200");
    assert_eq!(get("http://api.example.test/?again"), "200");
    assert_eq!(get("http://forbidden.example.test/"), "403");
    // Every request has been logged, so it has been counted (both happen as it finishes).
    gw.wait_lines(3);

    let observations = |query: &str| -> Value {
        // From the gateway's own node (no workload): the pod itself is refused, below.
        let url = format!("/observations{query}");
        let (status, body) = g.lab.gateway.within(|| http_get(sock("127.0.0.1", ADMIN_PORT), &url));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    let seen = observations("?namespace=team-a");
    assert_eq!(seen["persistent"], false, "a restart forgets them, and says so: {seen}");
    assert_eq!((seen["entries"].as_u64(), seen["evicted"].as_u64()), (Some(2), Some(0)), "{seen}");
    let entry = |host: &str| -> Value {
        seen["observations"]
            .as_array()
            .and_then(|a| a.iter().find(|o| o["host"] == host))
            .cloned()
            .unwrap_or_else(|| panic!("no {host} in {seen}"))
    };
    let api = entry("api.example.test");
    assert_eq!(
        (&api["port"], &api["came"], &api["allowed"], &api["denied"], &api["workload"]),
        (&Value::from(80), &Value::from("proxy"), &Value::from(2), &Value::from(0), &Value::from("-")),
        "{api}"
    );
    assert_eq!(api["lastRule"], "api.example.test", "{api}");
    let forbidden = entry("forbidden.example.test");
    assert_eq!(
        (&forbidden["denied"], &forbidden["lastReason"]),
        (&Value::from(1), &Value::from("not_allowed"))
    );
    assert_eq!(observations("?namespace=team-b")["observations"], Value::Array(Vec::new()));

    // A third destination in a table of two: the least recently seen (api) goes, counted.
    assert_eq!(get("http://www.example.test/"), "200");
    gw.wait_lines(4);
    let seen = observations("");
    let hosts: Vec<&str> =
        seen["observations"].as_array().unwrap().iter().filter_map(|o| o["host"].as_str()).collect();
    assert_eq!(hosts, ["www.example.test", "forbidden.example.test"], "most recent first: {seen}");
    assert_eq!(seen["evicted"], 1, "{seen}");
    let (_, metrics) = g.admin_get("/metrics");
    assert_eq!(metric(&metrics, "egressfw_gateway_observations"), 2.0);
    assert_eq!(metric(&metrics, "egressfw_gateway_observations_evicted_total"), 1.0);
    assert!(metric(&metrics, "egressfw_gateway_observations_bytes") > 0.0);

    // `egress-agent recommend` from the admin endpoint, and from the same answer saved to a file.
    let agent = egress_tests::agent_bin().display().to_string();
    // A workload may not read what the namespaces reach: team-a's pod is refused, by name.
    let (status, body) = g.admin_get("/observations?namespace=team-b");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("is a workload of namespace team-a"), "{body}");
    let refused = g.lab.pod.run(
        None,
        &agent,
        &["recommend", "--namespace", "team-a", "--from", &format!("http://{GATEWAY4}:{ADMIN_PORT}")],
    );
    assert!(!refused.status.success(), "recommend from the pod must fail");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Nor the decisions as they come (observe's /events).
    let (status, body) = g.admin_get("/events");
    assert_eq!(status, 403, "{body}");
    let admin = format!("http://127.0.0.1:{ADMIN_PORT}");
    // `egress-agent observe` from the admin endpoint: every decision of team-a, in order,
    // with what decided it.
    let out = g.lab.gateway.run(None, &agent, &["observe", "-n", "team-a", "--from", &admin]);
    let stream = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "observe: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stream.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "four requests of team-a:\n{stream}");
    for (row, (verdict, host)) in rows.iter().zip([
        ("allow", "api.example.test:80"),
        ("allow", "api.example.test:80"),
        ("deny", "forbidden.example.test:80"),
        ("allow", "www.example.test:80"),
    ]) {
        assert!(
            row.contains(" gateway ") && row.contains(&format!(" {verdict} ")) && row.contains(host),
            "{row}\n{stream}"
        );
    }
    let json =
        g.lab.gateway.run(None, &agent, &["observe", "--verdict", "deny", "-o", "json", "--from", &admin]);
    let denied: Vec<Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(
        (&denied[0]["destination"], &denied[0]["reason"]),
        (&Value::from("forbidden.example.test:80"), &Value::from("not_allowed"))
    );
    let out = g.lab.gateway.run(None, &agent, &["recommend", "--namespace", "team-a", "--from", &admin]);
    assert!(out.status.success(), "recommend: {}", String::from_utf8_lossy(&out.stderr));
    let recommended = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("recommend:\n{recommended}");
    for says in [
        "# egress-agent recommend --namespace team-a: 2 destinations seen, 1 rule;",
        &format!("# Observed by {admin} since "),
        "1 older entry was forgotten (the table is bounded)",
        "# Policy objects from nowhere",
        "    # 2 connections (1 allowed, 0 audited, 1 denied, 0 failed) from -",
        "hosts seen: forbidden.example.test (1), www.example.test (1)",
        "    - name: example-test-80\n      action: Accept\n      to:\n        - domainNames: [\"forbidden.example.test\", \"www.example.test\"]\n      ports:\n        - {protocol: TCP, port: 80}",
    ] {
        assert!(recommended.contains(says), "no {says:?} in:\n{recommended}");
    }
    assert!(
        !recommended.contains("# Outside what the Admin tier delegates"),
        "without the policy objects nothing is said about the bounds:\n{recommended}"
    );
    let policy: egress_agent::crd::EgressPolicy = serde_yaml::from_str(
        recommended.split("---\n").nth(1).unwrap_or_else(|| panic!("no object in:\n{recommended}")),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{recommended}"));
    egress_agent::gateway::tiers::Tiers::check_namespaced(&policy).unwrap_or_else(|e| panic!("{e}"));

    let saved = g.dir().join("observations.json");
    std::fs::write(&saved, observations("?namespace=team-a").to_string()).unwrap();
    let out = g.lab.gateway.run(
        None,
        &agent,
        &["recommend", "--namespace", "team-a", "--observations", &saved.display().to_string()],
    );
    let from_file = String::from_utf8_lossy(&out.stdout);
    assert!(
        from_file.contains("- domainNames: [\"forbidden.example.test\", \"www.example.test\"]"),
        "{from_file}"
    );

    // `egress-agent diff`: the platform passes *.example.test, team-a's own policy accepts both
    // names. The recommendation changes nothing (its rule comes after team-a's, unused); a
    // proposal without www refuses what was seen, and the exit status says so.
    let objects = g.dir().join("objects.yaml");
    let both = own(r#"["forbidden.example.test", "www.example.test"]"#);
    std::fs::write(&objects, format!("{PLATFORM}---\n{both}")).unwrap();
    let proposal = g.dir().join("recommended.yaml");
    std::fs::write(&proposal, recommended.as_bytes()).unwrap();
    let stricter = g.dir().join("stricter.yaml");
    std::fs::write(&stricter, own(r#"["forbidden.example.test"]"#)).unwrap();
    let diff = |proposed: &std::path::Path| {
        let (proposed, objects) = (proposed.display().to_string(), objects.display().to_string());
        let args =
            ["diff", "--namespace", "team-a", "-f", &proposed, "--from", &admin, "--policy-file", &objects];
        let out = g.lab.gateway.run(None, &agent, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = diff(&proposal);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("2 flows: 0 newly denied, 0 newly allowed, 2 unchanged"), "{text}");
    assert!(
        text.contains(
            "Proposed rules no flow is decided by: EgressPolicy/team-a/recommended#example-test-80."
        ),
        "{text}"
    );
    let (code, text) = diff(&stricter);
    eprintln!("diff of the stricter proposal:\n{text}");
    assert_eq!(code, Some(2), "{text}");
    let first = text.lines().find(|l| l.starts_with("- ")).unwrap_or_else(|| panic!("no row in:\n{text}"));
    assert!(
        first.contains("www.example.test:80")
            && first.contains("allowed  denied *")
            && first.contains(
                "nothing allows it (not_allowed; passed by ClusterEgressPolicy/platform#test-names)"
            ),
        "the newly denied flow comes first, named: {first}\n{text}"
    );
    assert!(text.contains("2 flows: 1 newly denied, 0 newly allowed, 1 unchanged"), "{text}");
    // Without a namespace it is the object `kubectl apply -n team-a` would replace: the same.
    let unplaced = g.dir().join("stricter-unplaced.yaml");
    std::fs::write(&unplaced, own(r#"["forbidden.example.test"]"#).replace(", namespace: team-a", ""))
        .unwrap();
    let (code, text) = diff(&unplaced);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("2 flows: 1 newly denied"), "{text}");
    drop(gw);
}

const PLATFORM: &str = "apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: platform}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - {name: test-names, action: Pass, to: [{domainNames: ['*.example.test']}]}
";

/// team-a's own policy, accepting `names` on port 80.
fn own(names: &str) -> String {
    format!(
        "apiVersion: egressfw.io/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: own, namespace: team-a}}\nspec:\n  podSelector: {{}}\n  egress:\n    - {{name: web, action: Accept, to: [{{domainNames: {names}}}], ports: [{{port: 80}}]}}\n"
    )
}

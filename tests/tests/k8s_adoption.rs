//! From audit to enforce on a real single-node Kubernetes (tests/src/cluster), as the README's
//! "Adopting egressfw" walkthrough runs it: a namespace in `audit` whose pod reaches three hosts
//! through the gateway and one address directly; `observe` shows both kinds of verdict per pod;
//! `recommend` proposes exactly the three hosts, with evidence, and names the direct address
//! from the node agent's observations; `diff` passes the proposal and fails a stricter one,
//! naming the flow; applied and switched to `enforce`, the same traffic works and the direct
//! flow is refused. A real Prometheus scrapes the agent and the gateway all along: every query
//! of deploy/monitoring's dashboard returns series, and the alerts evaluate (the bypass attempt
//! fires).

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use egress_tests::{
    cluster::{
        e2e::{AGENT_PODS, ALLOWED, Cluster, DENIED, GATEWAY_PODS, SYSTEM, THIRD, deploy_dir, ok},
        node::NodeShape,
        outside,
        prometheus::Prometheus,
    },
    lab::text,
};

const HOSTS: [&str; 3] = [ALLOWED, DENIED, THIRD];

#[test]
fn an_audited_namespace_is_observed_recommended_diffed_and_enforced() {
    let mut cluster = Cluster::start("e2e-adopt", NodeShape::default());
    cluster.outside_and_dns();
    cluster.deploy();
    cluster.opt_in("shop", "audit");
    cluster.run_pod("client", "shop");
    let ips = |selector: &str, port: u16| -> Vec<String> {
        let ips = cluster.get(&["pods", "-l", selector], SYSTEM, "{range .items[*]}{.status.podIP} {end}");
        ips.split_whitespace().map(|ip| format!("{ip}:{port}")).collect()
    };
    let targets = [("egress-agent", ips(AGENT_PODS, 9808)), ("egress-gateway", ips(GATEWAY_PODS, 9809))];
    let monitoring = deploy_dir().join("monitoring");
    let prometheus =
        Prometheus::start(&cluster.plane.ns, &cluster.dir.0, &targets, &monitoring.join("alerts.yaml"))
            .unwrap_or_else(|e| panic!("{e:#}"));
    let proxy = format!("http://{}:3128", cluster.gateway_ip());
    let direct = format!("http://{}/", outside::host(5));
    let through_gateway = |host: &str| {
        let out = cluster.curl("client", "shop", &["-x", &proxy, &format!("https://{host}/")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Audit: nothing allows these, and all of it goes through, reported.
    for host in HOSTS {
        assert_eq!(through_gateway(host), "200 200", "{host} through the gateway, audited");
    }
    let out = cluster.curl("client", "shop", &[&direct]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 000", "{direct} directly, audited: {}", text(&out));

    // One stream per pod: the kernel's audit of the direct connection and the gateway's of
    // the three hosts, ordered by time.
    let observed = ok(&operator(&cluster, &["observe", "--namespace", "shop"]), "egress-agent observe");
    let lines: Vec<&str> = observed.lines().filter(|l| l.contains("shop/client")).collect();
    let kernel = format!("{}:80/tcp", outside::host(5));
    assert!(
        lines.iter().any(|l| l.contains(" kernel ") && l.contains(" audit ") && l.contains(&kernel)),
        "no kernel audit of {kernel} in:\n{observed}"
    );
    for host in HOSTS {
        assert!(
            lines.iter().any(|l| l.contains(" gateway ")
                && l.contains(" audit ")
                && l.contains(&format!("{host}:443"))
                && l.contains("enforce: not_allowed")),
            "no gateway audit of {host} in:\n{observed}"
        );
    }
    let times: Vec<&str> = lines.iter().map(|l| l.split_whitespace().next().unwrap_or_default()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not ordered by time:\n{observed}");

    // --follow: a verdict made after the backlog came out comes out too, as a JSON line.
    let mut follow = KillOnDrop(
        cluster
            .egress_agent(&[
                "observe",
                "-n",
                "shop",
                "--source",
                "kernel",
                "--follow",
                "-o",
                "json",
                "--interval",
                "200ms",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running observe --follow"),
    );
    let mut lines = BufReader::new(follow.0.stdout.take().expect("piped stdout")).lines();
    let mut next_event = || -> serde_json::Value {
        let line = lines.next().expect("observe --follow ended").expect("reading observe's output");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(
            (event["source"].as_str(), event["namespace"].as_str()),
            (Some("kernel"), Some("shop")),
            "{line}"
        );
        event
    };
    let backlog = next_event();
    assert_eq!(backlog["destination"], format!("{}:80", outside::host(5)), "{backlog}");
    // Port 81: nothing listens there; audit lets the connect out, the outside refuses it.
    let later = format!("{}:81", outside::host(5));
    assert_eq!(cluster.tcp_connect("client", "shop", 81), "ECONNREFUSED");
    let started = Instant::now();
    let fresh = loop {
        let event = next_event();
        if event["destination"] == later.as_str() {
            break event;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no verdict about {later} from observe --follow"
        );
    };
    assert_eq!(
        (fresh["pod"].as_str(), fresh["verdict"].as_str()),
        (Some("client"), Some("audit")),
        "{fresh}"
    );
    drop(follow);

    // The platform delegates the three hosts to namespaces that ask for self-service.
    cluster.apply(&delegation(), "the platform's delegation");
    ok(&cluster.kubectl(&["label", "namespace", "shop", "egress=self-service"]), "labelling");

    // The recommendation: the three hosts, each with its evidence, within what the platform
    // delegates; the direct address named from the node agent's observations, not a rule.
    let out = operator(&cluster, &["recommend", "--namespace", "shop"]);
    let recommended = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "recommend: {}", String::from_utf8_lossy(&out.stderr));
    for host in HOSTS {
        let rule =
            format!("- domainNames: [\"{host}\"]\n      ports:\n        - {{protocol: TCP, port: 443}}");
        assert!(recommended.contains(&rule), "no rule for {host} in:\n{recommended}");
        assert!(
            recommended.contains(&format!("hosts seen: {host} (")),
            "no evidence for {host} in:\n{recommended}"
        );
    }
    assert_eq!(recommended.matches("action: Accept").count(), 3, "exactly the three hosts:\n{recommended}");
    assert!(!recommended.contains("# Outside what the Admin tier delegates"), "delegated:\n{recommended}");
    assert!(
        recommended.contains("# Observed by agent pod egress-agent-"),
        "the agent was not read:\n{recommended}"
    );
    let named = format!("#   {}:80/tcp: ", outside::host(5));
    assert!(
        recommended.lines().any(|l| l.starts_with(&named) && l.contains("from Pod/client")),
        "the direct address is not named:\n{recommended}"
    );
    let proposal = cluster.dir.0.join("recommended.yaml");
    std::fs::write(&proposal, &recommended).unwrap();
    let diff = |file: &std::path::Path| {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        operator_in(&cluster, &["diff", "--namespace", "shop", "-f", &name], file.parent().unwrap())
    };
    let out = diff(&proposal);
    let table = text(&out);
    assert_eq!(out.status.code(), Some(0), "diff of the recommendation:\n{table}");
    assert!(table.contains("3 flows: 0 newly denied, 3 newly allowed"), "{table}");
    assert!(table.contains("# Namespace shop is in audit mode"), "{table}");

    // The namespace applies the recommendation as it came out.
    ok(
        &cluster.kubectl(&["apply", "-n", "shop", "-f", &proposal.display().to_string()]),
        "applying the recommendation",
    );
    let mut accepted = String::new();
    let took = egress_tests::poll_until(Duration::from_secs(30), || {
        accepted = cluster.get(
            &["egresspolicy", "recommended"],
            "shop",
            "{.status.conditions[?(@.type==\"Accepted\")].status} {.status.conditions[?(@.type==\"PartiallyEffective\")].status}",
        );
        accepted == "True False"
    });
    assert!(
        took,
        "the recommendation is not accepted and fully effective (Accepted, PartiallyEffective): {accepted}"
    );
    // Still audit: a port no rule allows goes through, to nothing (the dashboard's upstream
    // errors).
    let failed = cluster.curl("client", "shop", &["-x", &proxy, &format!("https://{THIRD}:444/")]);
    assert!(!failed.status.success(), "nothing listens on {THIRD}:444: {}", text(&failed));

    // Stricter than what runs now: the flow to THIRD would be newly denied, named first; exit 2.
    let stricter = recommended.replace(&format!("\"{THIRD}\""), "\"elsewhere.test\"");
    let stricter_file = cluster.dir.0.join("stricter.yaml");
    std::fs::write(&stricter_file, &stricter).unwrap();
    let mut table = String::new();
    let newly_denied = egress_tests::poll_until(Duration::from_secs(30), || {
        let out = diff(&stricter_file);
        table = text(&out);
        out.status.code() == Some(2)
    });
    assert!(newly_denied, "diff of a stricter proposal did not exit 2:\n{table}");
    let first = table.lines().skip_while(|l| !l.starts_with("WORKLOAD")).nth(1).unwrap_or_default();
    assert!(
        first.contains(&format!("{THIRD}:443")) && first.contains("allowed  denied *"),
        "{first}\n{table}"
    );

    // Enforce: the same traffic through the gateway works, by the applied rules; the direct
    // connection is refused by the kernel.
    ok(
        &cluster.kubectl(&["label", "namespace", "shop", "egressfw.io/mode=enforce", "--overwrite"]),
        "switching to enforce",
    );
    let refused = egress_tests::poll_until(Duration::from_secs(30), || {
        cluster.tcp_connect("client", "shop", 80) == "EPERM"
    });
    assert!(refused, "the direct connection is not refused under enforce: {}", cluster.agent_state());
    for host in HOSTS {
        assert_eq!(through_gateway(host), "200 200", "{host} through the gateway, enforced");
    }
    let logs =
        ok(&cluster.kubectl(&["logs", "-n", SYSTEM, "-l", GATEWAY_PODS, "--tail=-1"]), "the gateway's logs");
    let enforced = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["namespace"] == "shop" && v["reason"] == "allowed")
        .filter_map(|v| v["rule"].as_str().map(str::to_owned))
        .collect::<Vec<_>>();
    assert!(
        enforced.iter().filter(|r| r.starts_with("EgressPolicy/shop/recommended#")).count() >= 3,
        "the enforced connections were not allowed by the recommendation's rules: {enforced:?}"
    );

    // Scraped by now; what comes next changes the counters again within the rate windows: a
    // bypass attempt, and a request the gateway refuses (a bare address, which no rule names).
    std::thread::sleep(Duration::from_secs(3));
    let refused = through_gateway(&outside::host(5).to_string());
    assert_eq!(refused, "000 403", "a bare address through the gateway, enforced");
    // Each round: another bypass attempt, so the counter rises between two scrapes.
    let attempt = || assert_eq!(cluster.tcp_connect("client", "shop", 80), "EPERM");
    dashboard_queries_return_series(&prometheus, &monitoring, attempt);
}

/// Every query of the dashboard (for every namespace) returns series, and every alert rule
/// evaluates; the bypass attempt's alert fires for the pod.
fn dashboard_queries_return_series(
    prometheus: &Prometheus,
    monitoring: &std::path::Path,
    attempt: impl Fn(),
) {
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring.join("dashboard.json")).unwrap()).unwrap();
    let exprs: Vec<(String, String)> = board["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"].as_array().cloned().unwrap_or_default().into_iter().map(move |t| {
                (title.clone(), t["expr"].as_str().unwrap_or_default().replace("$namespace", ".*"))
            })
        })
        .collect();
    assert!(exprs.len() >= 9, "{exprs:?}");
    let mut empty = Vec::new();
    let all = egress_tests::poll_until(Duration::from_secs(60), || {
        attempt();
        empty = exprs
            .iter()
            .filter(|(_, expr)| prometheus.query(expr).unwrap_or_else(|e| panic!("{e:#}")).is_empty())
            .cloned()
            .collect();
        empty.is_empty()
    });
    assert!(
        all,
        "dashboard queries with no series: {empty:#?}\nthe kernel's denials: {:?}\ntargets: {}",
        prometheus.query("egressfw_denials_total").unwrap_or_default(),
        prometheus.targets().unwrap_or_default()
    );
    let top = prometheus.query("egressfw_gateway_observed_denied").unwrap();
    assert!(
        top.iter().any(
            |s| s["metric"]["namespace"] == "shop" && s["metric"]["host"] == outside::host(5).to_string()
        ),
        "the refused bare address is not in the top denied: {top:?}"
    );
    let mut rules = Vec::new();
    let fired = egress_tests::poll_until(Duration::from_secs(30), || {
        rules = prometheus.rules().unwrap_or_else(|e| panic!("{e:#}"));
        rules.iter().any(|r| r["name"] == "EgressfwBypassAttempt" && r["state"] == "firing")
    });
    assert!(fired, "EgressfwBypassAttempt did not fire: {rules:#?}");
    let unhealthy: Vec<&serde_json::Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
    assert!(unhealthy.is_empty(), "alert rules that do not evaluate: {unhealthy:#?}");
    assert_eq!(rules.len(), 8, "{rules:#?}");
}

/// `egress-agent <args>` as the operator runs it; with EGRESSFW_TRANSCRIPT set, the command and
/// its output are appended to that file (the README's walkthrough shows them).
fn operator(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    operator_in(cluster, args, &cluster.dir.0)
}

fn operator_in(cluster: &Cluster, args: &[&str], dir: &std::path::Path) -> std::process::Output {
    let out = cluster.egress_agent(args).current_dir(dir).output().expect("running egress-agent");
    if let Some(path) = std::env::var_os("EGRESSFW_TRANSCRIPT") {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        let _ = writeln!(
            file,
            "$ egress-agent {}\n{}{}(exit {})\n",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code().unwrap_or(-1)
        );
    }
    out
}

/// Admin: namespaces labelled `egress=self-service` may allow the three hosts on 443.
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
    - {{name: shop, action: Pass, to: [{{domainNames: ['{ALLOWED}', '{DENIED}', '{THIRD}']}}], ports: [{{port: 443}}]}}
"
    )
}

/// Kills the child (observe --follow) when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

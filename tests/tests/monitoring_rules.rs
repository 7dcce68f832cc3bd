//! deploy/monitoring/: the alerts are valid Prometheus rules and pass their unit tests with the
//! real promtool (Debian's `prometheus` package; `cargo xtask test` installs it), the
//! PrometheusRule ships the same groups as the plain rules file, and every gateway metric an
//! alert reads is one the gateway exports.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

fn monitoring() -> PathBuf {
    egress_tests::cluster::e2e::deploy_dir().join("monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).current_dir(monitoring()).output().unwrap_or_else(|e| {
        panic!("running promtool ({e}): install Debian's prometheus package (`cargo xtask setup` does)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
    text
}

fn yaml(name: &str) -> serde_yaml::Value {
    let path = monitoring().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_alerts_are_valid_rules_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts-test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_prometheus_rule_ships_the_same_groups_as_the_rules_file() {
    let rule = yaml("prometheusrule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"],
        yaml("alerts.yaml")["groups"],
        "prometheusrule.yaml and alerts.yaml differ"
    );
}

#[test]
fn every_gateway_metric_an_alert_reads_is_exported() {
    let mut metrics = egress_agent::gateway::metrics::GatewayMetrics::new();
    metrics.register_policy(&egress_agent::gateway::resources::PolicyGauges::default());
    // A family shows in the page once it has a series: one allowed and one denied connection.
    use egress_agent::gateway::access_log::Record;
    let mut allowed = Record::new("http_proxy", "127.0.0.1:1".parse().unwrap());
    allowed.allow("api.example.com".into());
    let mut denied = Record::new("http_proxy", "127.0.0.1:2".parse().unwrap());
    denied.deny("not_allowed");
    metrics.record(&allowed);
    metrics.record(&denied);
    let exported: BTreeSet<String> = metrics
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let groups = yaml("alerts.yaml");
    let exprs: Vec<&str> = groups["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["expr"].as_str())
        .collect();
    let mut read = BTreeSet::new();
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("egressfw_gateway_") {
                read.insert(name.to_owned());
            }
        }
    }
    assert!(read.len() >= 5, "{read:?}");
    for name in read {
        // Counters are exported as `<name>` in the TYPE line and read as `<name>_total`.
        let family = format!("egressfw_gateway_{}", name.trim_end_matches("_total"));
        assert!(
            exported.contains(&family),
            "alerts read egressfw_gateway_{name}, which the gateway does not export: {exported:?}"
        );
    }
}

#[test]
fn every_dashboard_panel_is_documented_with_its_queries() {
    let path = monitoring().join("dashboard.json");
    let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let readme = std::fs::read_to_string(monitoring().join("README.md")).unwrap();
    let panels = board["panels"].as_array().expect("panels");
    assert!(panels.len() >= 9, "{} panels", panels.len());
    for panel in panels {
        let title = panel["title"].as_str().expect("a title");
        assert!(readme.contains(&format!("### {title}\n")), "README.md does not document panel {title:?}");
        assert!(!panel["description"].as_str().unwrap_or_default().is_empty(), "{title}: no description");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expr");
            assert!(readme.contains(expr), "README.md does not show {title:?}'s query {expr}");
        }
    }
}

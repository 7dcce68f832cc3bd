//! Enforcement across the agent's life: SIGKILL, restart, reloads (good and bad), teardown.

use std::fs;

use egress_tests::{
    CGROUP_PROGRAMS,
    agent::{self, Agent},
    client::{refused, succeeded, tcp},
    lab::{EXTERNAL4, Lab, text},
    listen::Server,
    sock,
};

fn inspect(lab: &Lab) -> serde_json::Value {
    let out = agent::cli(lab, &["inspect", "--json"]);
    assert!(out.status.success(), "inspect failed:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

fn link_ids(report: &serde_json::Value) -> Vec<u64> {
    report["policies"][0]["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["link_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn sigkill_leaves_enforcement_in_place_and_a_new_agent_adopts_it() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let mut first = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let before = inspect(&lab);
    assert_eq!(link_ids(&before).len(), CGROUP_PROGRAMS, "{before:#}");

    first.kill9();
    let out = lab.in_pod(tcp(EXTERNAL4, 80));
    assert!(refused(&out), "with the agent dead:\n{}", text(&out));

    let second = Agent::start(&lab);
    let applied = second.wait_for("policy applied", 1);
    assert_eq!(applied[0]["links_adopted"], CGROUP_PROGRAMS, "{applied:#?}");
    assert_eq!(applied[0]["links_attached"], 0);
    assert_eq!(applied[0]["unchanged"], 1);
    assert_eq!(link_ids(&inspect(&lab)), link_ids(&before), "the very same links stay attached");
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))));
    assert_eq!(web.hits(), 0);
}

#[test]
fn teardown_removes_every_link_and_map() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let mut agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))));
    agent.kill9();

    let out = agent::cli(&lab, &["teardown"]);
    assert!(out.status.success(), "{}", text(&out));
    let removed = format!("removed {CGROUP_PROGRAMS} links");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&removed), "{}", text(&out));
    assert!(!lab.pin_dir.exists(), "the pin directory is gone");
    let out = lab.in_pod(tcp(EXTERNAL4, 80));
    assert!(succeeded(&out), "after teardown nothing is enforced:\n{}", text(&out));
    assert_eq!(web.hits(), 1);
    // Nothing of ours is attached to the cgroup any more.
    let attached = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&lab.pod_cgroup)
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(attached.status.success(), "{}", text(&attached));
    assert!(!String::from_utf8_lossy(&attached.stdout).contains("egress_"), "{}", text(&attached));
}

#[test]
fn a_bad_reload_keeps_the_enforced_policy_and_a_good_one_applies_as_a_diff() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let agent = Agent::start(&lab);
    let web = Server::tcp_http(&lab.external, sock(EXTERNAL4, 80));
    let links = link_ids(&inspect(&lab));

    // Broken YAML, then a cgroup that does not exist: both rejected, naming the problem.
    fs::write(lab.policy_path(), "policies: [{cgroup: x, mode: enforce, dns: [10.0.0.999]}]\n").unwrap();
    agent.hangup();
    agent.wait_until("reload rejected (SIGHUP)", |r| {
        r["error"].as_str().unwrap().contains("\"10.0.0.999\" is not an IP address")
    });
    fs::write(lab.policy_path(), lab.policy_text("enforce").replace("/pod\n", "/no-such-pod\n")).unwrap();
    agent.wait_until("reload rejected", |r| {
        r["error"].as_str().unwrap().contains("no-such-pod\" does not exist")
    });
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))), "the last good policy is still enforced");

    // A good change (to audit) is picked up from the file alone and keeps the same links.
    fs::write(lab.policy_path(), lab.policy_text("audit")).unwrap();
    let reloaded = agent.wait_until("policy reloaded", |r| r["updated"] == 1);
    assert_eq!(reloaded["links_adopted"], CGROUP_PROGRAMS, "{reloaded:#}");
    assert_eq!(link_ids(&inspect(&lab)), links);
    let out = lab.in_pod(tcp(EXTERNAL4, 80));
    assert!(succeeded(&out), "audit mode:\n{}", text(&out));
    assert_eq!(web.hits(), 1);

    // Dropping the policy from the file releases the cgroup and removes its links.
    fs::write(lab.policy_path(), "policies: []\n").unwrap();
    agent.wait_until("policy reloaded", |r| r["removed"] == 1);
    assert_eq!(inspect(&lab)["policies"].as_array().unwrap().len(), 0);
    assert!(succeeded(&lab.in_pod(tcp(EXTERNAL4, 80))));
}

#[test]
fn an_agent_started_with_a_bad_file_changes_nothing_and_says_why() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let mut agent = Agent::start(&lab);
    agent.kill9();
    fs::write(lab.policy_path(), "policies:\n  - cgroup: pod\n    mode: enforce\n    colour: blue\n")
        .unwrap();
    let log = Agent::try_start(&lab).err().expect("the agent must refuse a bad file");
    assert!(log.contains("unknown field `colour`"), "{log}");
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))), "the pinned policy stays in force");
}

#[test]
fn inspect_shows_links_policy_entries_and_counters() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let _agent = Agent::start(&lab);
    assert!(refused(&lab.in_pod(tcp(EXTERNAL4, 80))));
    let r = inspect(&lab);
    let p = &r["policies"][0];
    assert_eq!(p["cgroup_path"], lab.pod_cgroup.display().to_string());
    assert_eq!(p["mode"], "enforce");
    let programs: Vec<&str> =
        p["links"].as_array().unwrap().iter().map(|l| l["program"].as_str().unwrap()).collect();
    assert_eq!(
        programs,
        [
            "egress_connect4",
            "egress_connect6",
            "egress_getpeername4",
            "egress_getpeername6",
            "egress_sendmsg4",
            "egress_sendmsg6",
            "egress_skb",
            "egress_sockops"
        ]
    );
    let prefixes: Vec<&str> =
        p["allow"].as_array().unwrap().iter().map(|a| a["prefix"].as_str().unwrap()).collect();
    assert_eq!(prefixes, ["10.231.0.3/32", "10.231.0.4/32", "fd00:231::3/128", "fd00:231::4/128"]);
    let denied =
        r["counters"].as_array().unwrap().iter().find(|c| c["reason"] == "deny_destination").unwrap();
    assert!(denied["applied"].as_u64().unwrap() >= 1, "{r:#}");
    // And the human table.
    let out = agent::cli(&lab, &["inspect"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("egress_skb")
            && table.contains("tcp/3128 (gateway)")
            && table.contains("deny_destination"),
        "{table}"
    );
}

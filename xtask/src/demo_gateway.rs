//! Third part of `cargo xtask demo`: both halves together. The kernel lets the enforced pod
//! reach only the gateway and DNS; the real gateway (`egress-agent gateway`) then decides per
//! namespace which external hosts it may reach, and logs every decision. Clients are curl and
//! openssl; the "internet" is a namespace with python's http.server and openssl s_server.

use anyhow::{Result, anyhow};
use egress_tests::{
    agent::Agent,
    gateway::{GatewayLab, PROXY_PORT, TLS_PORT, UPSTREAM4, base_config, status_and_body},
    lab::{GATEWAY_PORT, GATEWAY4},
};

struct Row {
    what: &'static str,
    args: Vec<String>,
    /// The HTTP status curl should print (0: curl itself fails, e.g. the kernel said EPERM).
    expect: u16,
}

/// Runs part 3 and returns how many attempts did not behave as expected.
pub fn run() -> Result<usize> {
    println!("\n=== Part 3: the egress gateway decides where the only way out leads ===\n");
    let g = GatewayLab::new();
    // The kernel policy opens the gateway's proxy and SNI ports (the node agent's config does
    // the same with `gateways[].ports`).
    // TCP to port 443 that nothing else allows is steered to the SNI port: unmodified clients
    // (no proxy settings) reach allowed hosts through the gateway (README, transparent steering).
    let policy = format!(
        "{}    steer:\n      - ports: [443]\n        address: {GATEWAY4}\n        port: {TLS_PORT}\n",
        g.lab
            .policy_text("enforce")
            .replace(&format!("ports: [{GATEWAY_PORT}]"), &format!("ports: [{GATEWAY_PORT}, {TLS_PORT}]"))
    );
    std::fs::write(g.lab.policy_path(), policy)?;
    let agent = Agent::try_start(&g.lab).map_err(|log| anyhow!("the agent did not start:\n{log}"))?;
    let config = base_config(&g.ca, 1000).replace("upstreamPort: 443}", "upstreamPort: 443, steered: true}");
    let gw = g.try_start(&config).map_err(|log| anyhow!("the gateway did not start:\n{log}"))?;
    println!("Kernel: the pod may reach only {GATEWAY4}:{PROXY_PORT} and :{TLS_PORT} (the gateway) and DNS;");
    println!("        its TCP connects to port 443 anywhere else are steered to :{TLS_PORT}.");
    println!("Gateway rules (team-a is the pod's namespace, from its source address):");
    for line in
        config.lines().skip_while(|l| !l.starts_with("rules:")).take_while(|l| !l.starts_with("limits:"))
    {
        println!("  {line}");
    }
    let proxy = format!("http://{GATEWAY4}:{PROXY_PORT}");
    let ca = g.ca.display().to_string();
    let via = |url: &str| vec!["--proxy".to_string(), proxy.clone(), url.to_string()];
    let rows = [
        Row {
            what: "HTTP via the gateway to api.example.test",
            args: via("http://api.example.test/"),
            expect: 200,
        },
        Row {
            what: "HTTPS (CONNECT) to api.example.test",
            args: ["--cacert", &ca]
                .map(String::from)
                .into_iter()
                .chain(via("https://api.example.test/"))
                .collect(),
            expect: 200,
        },
        Row { what: "a host no rule allows", args: via("http://forbidden.example.test/"), expect: 403 },
        Row {
            what: "a name that resolves to the metadata IP",
            args: via("http://meta.example.test/"),
            expect: 403,
        },
        Row {
            what: "a name that resolves to a private IP",
            args: via("http://internal.example.test/"),
            expect: 403,
        },
        Row { what: "loopback spelled 2130706433", args: via("http://2130706433/"), expect: 403 },
        Row {
            what: "Host header fronting another name",
            args: ["-H", "Host: forbidden.example.test"]
                .map(String::from)
                .into_iter()
                .chain(via("http://api.example.test/"))
                .collect(),
            expect: 403,
        },
        Row {
            what: "unmodified https://api.example.test/ (steered)",
            args: vec![
                "--cacert".into(),
                ca.clone(),
                "--resolve".into(),
                format!("api.example.test:443:{UPSTREAM4}"),
                "https://api.example.test/".into(),
            ],
            expect: 200,
        },
        Row {
            what: "unmodified https://forbidden.example.test/",
            args: vec![
                "--cacert".into(),
                ca.clone(),
                "--resolve".into(),
                format!("forbidden.example.test:443:{UPSTREAM4}"),
                "https://forbidden.example.test/".into(),
            ],
            expect: 0,
        },
        Row {
            what: "straight to the upstream, port 80, no proxy",
            args: vec![format!("http://{UPSTREAM4}/")],
            expect: 0,
        },
    ];
    println!("\n{:<46} {:<8} {:<18} GATEWAY LOG", "ATTEMPT FROM THE ENFORCED POD", "STATUS", "EXPECTED");
    let mut surprises = 0;
    for row in &rows {
        let before = gw.access_lines().len();
        // -v: curl then prints the errno of a refused connect() (EPERM from the kernel).
        let mut args = vec!["-sSv", "--max-time", "5", "-o", "/dev/null", "-w", "\n%{http_code}"];
        args.extend(row.args.iter().map(String::as_str));
        let out = g.lab.pod.run(Some(&g.lab.pod_cgroup), "curl", &args);
        let (status, _) = status_and_body(&out);
        // A tunnel (CONNECT, SNI) is logged when it closes, which the gateway may see a moment
        // after curl has exited: an attempt that got an answer waits (briefly) for its line.
        // So does a steered connection the gateway refused (curl fails, the gateway logged it);
        // only an EPERM from the kernel certainly never reached it.
        let err = String::from_utf8_lossy(&out.stderr);
        let reached = status != 0 || !err.contains("not permitted");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while reached && gw.access_lines().len() <= before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let lines = gw.access_lines();
        let logged = lines.get(before..).and_then(|l| l.last()).map_or_else(
            || "(nothing: never reached the gateway)".to_string(),
            |v| {
                let steered = if v["steered"] == true { " (steered)" } else { "" };
                format!(
                    "{} {}{steered}",
                    v["decision"].as_str().unwrap_or("?"),
                    v["reason"].as_str().unwrap_or("?")
                )
            },
        );
        let shown = if status == 0 {
            if err.contains("not permitted") { "EPERM".to_string() } else { "failed".to_string() }
        } else {
            status.to_string()
        };
        let ok = status == row.expect;
        surprises += usize::from(!ok);
        let expected = if row.expect == 0 { "no connection".to_string() } else { row.expect.to_string() };
        println!(
            "{:<46} {:<8} {:<18} {logged}{}",
            row.what,
            shown,
            expected,
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }
    if let Some(line) = gw.access_lines().first() {
        println!("\nOne access-log line (JSON, stdout of the gateway):\n  {line}");
    }
    drop(gw);
    drop(agent);
    Ok(surprises)
}

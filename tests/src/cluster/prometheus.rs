//! A real Prometheus server (Debian's `prometheus` package) in the node's network namespace,
//! scraping the agent and the gateway pods every second with deploy/monitoring's alerts
//! loaded: what the dashboard and the alerts are checked against. Stopped with the value.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::supervisor::Supervisor;
use crate::netns::NetNs;

const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus<'a> {
    /// First, so the server stops before anything else goes.
    _procs: Supervisor,
    ns: &'a NetNs,
}

impl<'a> Prometheus<'a> {
    /// Scrapes `targets` (job name, `host:port` list) in `ns`, evaluating `rule_file`.
    pub fn start(
        ns: &'a NetNs,
        dir: &Path,
        targets: &[(&str, Vec<String>)],
        rule_file: &Path,
    ) -> Result<Self> {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let mut config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{:?}]\nscrape_configs:\n",
            rule_file.display().to_string()
        );
        for (job, addresses) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    honor_labels: true\n    static_configs: [{{targets: {addresses:?}}}]\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, &config)?;
        let mut procs = Supervisor::new(&dir);
        let mut cmd = ns.command("prometheus", None);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={LISTEN}"));
        procs
            .spawn("prometheus", cmd)
            .context("starting prometheus: install Debian's prometheus package (`cargo xtask setup` does)")?;
        let this = Self { _procs: procs, ns };
        this.wait_ready()?;
        Ok(this)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + crate::patience(Duration::from_secs(30));
        while std::time::Instant::now() < deadline {
            if self.get("/-/ready").is_ok_and(|t| t.contains("Ready")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("prometheus not ready within 30 s")
    }

    fn get(&self, path_and_query: &str) -> Result<String> {
        let out = self
            .ns
            .command("curl", None)
            .args(["-sS", "--max-time", "5", &format!("http://{LISTEN}{path_and_query}")])
            .output()?;
        if !out.status.success() {
            bail!("curl {path_and_query}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The result of an instant query (`data.result`); an error when Prometheus refuses it.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let out: std::process::Output = self
            .ns
            .command("curl", None)
            .args(["-sS", "--max-time", "5", "-G", "--data-urlencode"])
            .arg(format!("query={expr}"))
            .arg(format!("http://{LISTEN}/api/v1/query"))
            .output()?;
        let body: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{expr}: {}", String::from_utf8_lossy(&out.stdout)))?;
        if body["status"] != "success" {
            bail!("{expr}: {body}");
        }
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// `/api/v1/rules`: every rule with its health and state.
    pub fn rules(&self) -> Result<Vec<Value>> {
        let body: Value = serde_json::from_str(&self.get("/api/v1/rules")?)?;
        Ok(body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect())
    }

    /// `/api/v1/targets`: each target's job, health and last error.
    pub fn targets(&self) -> Result<String> {
        self.get("/api/v1/targets")
    }
}

//! A kubeconfig for the fake: one cluster, one context, no credentials.

use std::path::Path;

use anyhow::Context as _;
use serde_json::json;

pub(crate) fn write(server: &str, path: &Path) -> anyhow::Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server, "insecure-skip-tls-verify": true}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
        "current-context": "fake",
        "preferences": {},
    });
    let yaml = serde_yaml::to_string(&config).context("rendering the kubeconfig")?;
    std::fs::write(path, yaml).with_context(|| format!("writing the kubeconfig {}", path.display()))
}

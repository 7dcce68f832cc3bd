//! `cargo xtask e2e`: the suites that run on a real Kubernetes on this machine (tests/src/cluster):
//! the API-server suite (`k8s_real_api`) and the end-to-end suite on a node with real pods
//! (`k8s_e2e`). `cargo xtask test` runs both as part of the whole suite; this runs only them.

use anyhow::Result;

use crate::{
    kustomize,
    run::{build_agent, build_other_agent, cargo, require_root, status},
    toolchain,
};

/// The integration suites that need the real cluster.
pub const SUITES: [&str; 7] = [
    "k8s_real_api",
    "k8s_policy_crds",
    "k8s_policy_gateway",
    "k8s_e2e",
    "k8s_e2e_faults",
    "k8s_e2e_shapes",
    "k8s_adoption",
];

pub fn run() -> Result<()> {
    require_root("cargo xtask e2e")?;
    let tc = toolchain::setup_all()?;
    eprintln!("==> build the agent (the image the node runs is assembled from it)");
    let agent = build_agent(&tc, false)?;
    eprintln!("==> build the agent again with another build stamp (the image the DaemonSet is rolled to)");
    let other = build_other_agent(&tc)?;
    eprintln!(
        "==> Kubernetes {} and etcd {} (built once, cached), kustomize {}",
        egress_tests::cluster::KUBE_VERSION,
        egress_tests::cluster::ETCD_VERSION,
        kustomize::VERSION
    );
    crate::cluster::build()?;
    let kustomize = kustomize::ensure()?;
    let mut cmd = cargo(&tc)?;
    cmd.args(["test", "--package", "egress-tests"]);
    for suite in SUITES {
        cmd.args(["--test", suite]);
    }
    cmd.args(["--", "--test-threads=1"])
        .env("EGRESS_AGENT_BIN", &agent)
        .env("EGRESS_AGENT_OTHER_BIN", &other)
        .env(kustomize::ENV, &kustomize);
    status(&mut cmd)?;
    crate::test::check_no_leftovers()
}

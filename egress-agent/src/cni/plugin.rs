//! The CNI protocol side of the plugin (CNI spec 0.3.0 to 1.1.0): the container runtime runs the
//! binary with `CNI_COMMAND` and friends in the environment and the network configuration on
//! stdin. egressfw is a chained plugin: it runs after the network plugin that made the pod's
//! veth, passes that plugin's result on unchanged, and fails ADD (so the runtime starts none of
//! the pod's containers) when it cannot put the gate in place.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    gate::{self, GateRequest},
    state::StateDir,
};
use crate::kernel::bpffs::{DEFAULT_PIN_DIR, PinLayout};

/// The versions whose results this plugin passes through (it never builds one of its own).
const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];
/// CNI error code for errors of the plugin's own (100 and above are plugin-specific).
const ERROR_CODE: u32 = 100;

/// Our entry in the network configuration list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    /// The previous plugin's result (the chain's result so far).
    #[serde(default)]
    prev_result: Option<Value>,
    /// bpffs directory of the node agent's pins.
    #[serde(default)]
    pin_dir: Option<PathBuf>,
    /// The directory shared with the node agent (see `state`).
    #[serde(default)]
    state_dir: Option<PathBuf>,
}

/// True when the process was started as a CNI plugin (the runtime sets `CNI_COMMAND` and passes
/// no arguments).
pub fn invoked_as_plugin() -> bool {
    std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1
}

/// Runs one CNI command and returns the process exit code. Errors are printed on stdout in the
/// CNI error format (what the runtime shows in the pod's events) and on stderr.
pub fn main() -> i32 {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<NetConf>(&stdin).map(|c| c.cni_version).unwrap_or_default();
    match run(&command, &stdin) {
        Ok(output) => {
            if let Some(v) = output {
                print_json(&v);
            }
            0
        }
        Err(e) => {
            let msg = format!("egressfw: {e:#}");
            eprintln!("{msg}");
            print_json(&json!({
                "cniVersion": if version.is_empty() { "1.0.0".to_string() } else { version },
                "code": ERROR_CODE,
                "msg": msg,
            }));
            1
        }
    }
}

fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
}

fn run(command: &str, stdin: &[u8]) -> Result<Option<Value>> {
    match command {
        "VERSION" => Ok(Some(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS }))),
        "ADD" => add(&parse_conf(stdin)?).map(Some),
        // Nothing of ours outlives the pod's veth but its record; the agent also removes records
        // of interfaces that are gone. DEL must succeed when repeated or when nothing was added.
        "DEL" => {
            let conf = parse_conf(stdin)?;
            let container = env("CNI_CONTAINERID").unwrap_or_default();
            gate::forget(&state_dir(&conf), &container);
            Ok(None)
        }
        "CHECK" => check(&parse_conf(stdin)?).map(|()| None),
        // GC, STATUS: the agent collects records of interfaces that are gone, and the plugin is
        // ready whenever ADD would work (ADD itself refuses while nothing is pinned).
        "GC" | "STATUS" => Ok(None),
        other => bail!("unknown CNI_COMMAND {other:?}"),
    }
}

fn parse_conf(stdin: &[u8]) -> Result<NetConf> {
    serde_json::from_slice(stdin)
        .context("the network configuration on stdin is not valid JSON for this plugin")
}

fn add(conf: &NetConf) -> Result<Value> {
    let Some(prev) = conf.prev_result.clone() else {
        bail!(
            "no prevResult: egressfw is a chained plugin and must come after the network plugin in the conflist"
        );
    };
    gate::apply(&request(conf)?)?;
    Ok(prev)
}

/// CHECK exists from CNI 0.4.0 on, and the runtime passes the chain's result so far: as ADD, the
/// plugin refuses to run without it.
fn check(conf: &NetConf) -> Result<()> {
    if matches!(conf.cni_version.as_str(), "0.3.0" | "0.3.1") {
        bail!("CHECK is not defined for cniVersion {} (0.4.0 and later)", conf.cni_version);
    }
    if conf.prev_result.is_none() {
        bail!("no prevResult: CHECK needs the network plugin's result, as ADD does");
    }
    gate::verify(&request(conf)?)
}

/// The pod's interface as the runtime describes it (environment and prevResult).
fn request(conf: &NetConf) -> Result<GateRequest> {
    let args = cni_args();
    Ok(GateRequest {
        pins: PinLayout::new(conf.pin_dir.clone().unwrap_or_else(|| DEFAULT_PIN_DIR.into())),
        state: state_dir(conf),
        netns: env("CNI_NETNS").context("CNI_NETNS is not set")?.into(),
        ifname: env("CNI_IFNAME").context("CNI_IFNAME is not set")?,
        container_id: env("CNI_CONTAINERID").context("CNI_CONTAINERID is not set")?,
        namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
        pod: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        pod_uid: pod_uid(&args),
        addresses: conf.prev_result.as_ref().map(addresses).unwrap_or_default(),
    })
}

fn state_dir(conf: &NetConf) -> StateDir {
    StateDir::new(conf.state_dir.clone().unwrap_or_else(|| super::state::DEFAULT_STATE_DIR.into()))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `CNI_ARGS`: `K=V;K=V`, as kubelet's runtimes pass the pod's name, namespace and UID.
fn cni_args() -> BTreeMap<String, String> {
    parse_cni_args(&std::env::var("CNI_ARGS").unwrap_or_default())
}

fn parse_cni_args(text: &str) -> BTreeMap<String, String> {
    text.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Kubelet's UID of the pod, if the runtime passed one (an empty value is none).
fn pod_uid(args: &BTreeMap<String, String>) -> Option<String> {
    args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned()
}

/// The pod's addresses in a CNI result (`ips[].address`, CIDR notation, in every version).
fn addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_and_result_addresses_are_read_as_runtimes_write_them() {
        let args =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=abc");
        assert_eq!(args["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(args["K8S_POD_NAME"], "web-0");
        assert_eq!(args["K8S_POD_UID"], "abc");
        // Runtimes that have no UID to give pass the key with an empty value: no UID, not "".
        assert_eq!(pod_uid(&parse_cni_args("K8S_POD_NAME=web-0;K8S_POD_UID=")), None);
        assert_eq!(pod_uid(&args).as_deref(), Some("abc"));
        let result = json!({"cniVersion": "1.0.0", "ips": [
            {"address": "10.1.2.3/32", "interface": 0},
            {"address": "fd00::3/128"},
            {"address": "nonsense"}
        ]});
        assert_eq!(
            addresses(&result),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap(), "fd00::3".parse().unwrap()]
        );
    }
}

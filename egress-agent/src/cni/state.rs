//! The files the CNI plugin and the node agent share, in a host directory (default
//! `/run/egressfw/cni`, a tmpfs like bpffs, so both are empty again after a reboot):
//!
//! - `namespaces.json`, written by the agent: the mode of every namespace it knows. The plugin
//!   gates a new pod unless its namespace is known as `pass` or `audit`; a namespace the agent
//!   has not seen (created while it was down) is gated.
//! - `interfaces/<ifindex>.json`, written by the plugin for every pod's veth, gated or not: whose
//!   pod it is, so the agent binds it without waiting for the pod's addresses in the API (and on a
//!   bridged CNI, whose route names the bridge, at all), releases it when the pod turns out not to
//!   be enforced, and finds it again when the pod's namespace switches to `enforce` later.
//!
//! Every write is a rename of a complete file, so a reader never sees half of one.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::policy::Mode;

pub const DEFAULT_STATE_DIR: &str = "/run/egressfw/cni";

/// The namespaces file: name -> mode ("enforce", "audit", "pass").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceModes {
    pub namespaces: BTreeMap<String, String>,
}

impl NamespaceModes {
    /// Whether a new pod of `namespace` needs no gate: its namespace is known not to be enforced.
    pub fn needs_no_gate(&self, namespace: &str) -> bool {
        matches!(
            self.namespaces.get(namespace).and_then(|m| Mode::from_name(m)),
            Some(Mode::Pass | Mode::Audit)
        )
    }
}

/// One pod's veth, as the plugin found it on ADD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInterface {
    pub ifindex: u32,
    /// Host-side name when the plugin ran (checked against the index before use).
    pub interface: String,
    pub namespace: String,
    pub pod: String,
    /// The pod's API UID (K8S_POD_UID), when the runtime passed it.
    #[serde(default)]
    pub pod_uid: Option<String>,
    pub container_id: String,
    /// The addresses the network plugin gave the pod (its prevResult).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Whether the plugin gated the interface (the namespace was not known as `pass` or `audit`).
    /// The agent clears it once it has released the gate. Records of plugins that recorded only
    /// gated interfaces have no such field.
    #[serde(default = "gated_by_default")]
    pub gated: bool,
    /// For a gated interface, false while the plugin is still attaching: the record is written
    /// first, so the agent never finds a gate it has no record of (and takes it for a leftover
    /// to remove), and the agent leaves an interface alone until its record says the gate is
    /// complete.
    #[serde(default)]
    pub attached: bool,
}

fn gated_by_default() -> bool {
    true
}

#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn namespaces_file(&self) -> PathBuf {
        self.root.join("namespaces.json")
    }

    pub fn interfaces_dir(&self) -> PathBuf {
        self.root.join("interfaces")
    }

    fn interface_file(&self, ifindex: u32) -> PathBuf {
        self.interfaces_dir().join(format!("{ifindex}.json"))
    }

    /// The namespaces file; `None` when it does not exist or cannot be read (then every new pod
    /// is gated).
    pub fn read_namespaces(&self) -> Option<NamespaceModes> {
        let text = fs::read(self.namespaces_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn write_namespaces(&self, modes: &NamespaceModes) -> Result<()> {
        write_atomically(&self.namespaces_file(), &serde_json::to_vec_pretty(modes)?)
    }

    pub fn write_interface(&self, record: &PodInterface) -> Result<()> {
        write_atomically(&self.interface_file(record.ifindex), &serde_json::to_vec_pretty(record)?)
    }

    pub fn remove_interface(&self, ifindex: u32) -> Result<()> {
        let path = self.interface_file(ifindex);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Every interface on record, by ifindex. Files that cannot be read are skipped (and
    /// named in the returned problems): a damaged record must not stop the agent's pass.
    pub fn read_interfaces(&self) -> (BTreeMap<u32, PodInterface>, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        let Ok(entries) = fs::read_dir(self.interfaces_dir()) else {
            return (out, problems);
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let read = fs::read(&path).map_err(anyhow::Error::from);
            match read.and_then(|t| Ok(serde_json::from_slice::<PodInterface>(&t)?)) {
                Ok(g) => {
                    out.insert(g.ifindex, g);
                }
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        (out, problems)
    }
}

/// Writes `bytes` to a temporary file next to `path` and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a state file has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_a_plugin_that_recorded_only_gated_interfaces_reads_as_gated() {
        let old = r#"{"ifindex": 7, "interface": "veth7", "namespace": "shop", "pod": "web",
                      "podUid": "u", "containerId": "c", "addresses": [], "attached": true}"#;
        let record: PodInterface = serde_json::from_str(old).unwrap();
        assert!(record.gated && record.attached, "{record:?}");
        let open = PodInterface { gated: false, attached: false, ..record };
        let again: PodInterface = serde_json::from_slice(&serde_json::to_vec(&open).unwrap()).unwrap();
        assert_eq!(again, open, "a record of a pod left open round-trips");
    }
}

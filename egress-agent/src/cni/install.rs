//! Puts the plugin in place on a node: the binary in the CNI bin directory and an `egressfw`
//! entry at the end of the plugin chain of the network configuration the runtime uses (the
//! first `.conflist` in the configuration directory, as containerd and CRI-O pick it). Run by the
//! DaemonSet's init container, and again by the agent whenever the directory changes (and on
//! every tick), because network plugins rewrite their configuration when they restart. Edits
//! are compare-and-swap (`conflist`), so a rewrite that lands during ours is never lost.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    conflist::{self, Edited},
    state::write_atomically,
};

/// The plugin's name: the binary in the bin directory and the `type` in the conflist.
pub const PLUGIN_TYPE: &str = "egressfw";
/// Where container runtimes look for CNI plugins and their configuration by default.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

#[derive(Clone, Debug)]
pub struct Placement {
    pub conf_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

/// Copies this executable to `<bin_dir>/egressfw` (a complete file renamed into place, so the
/// runtime never runs half of one). Returns whether it changed.
pub fn install_binary(bin_dir: &Path) -> Result<bool> {
    let me = std::env::current_exe().context("finding this executable")?;
    let bytes = fs::read(&me).with_context(|| format!("reading {}", me.display()))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    write_atomically(&target, &bytes)?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", target.display()))?;
    Ok(true)
}

/// What `ensure_chained` found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chained {
    /// Our entry was already last in this file.
    Already(PathBuf),
    /// Our entry was added (or moved back to the end) in this file.
    Updated(PathBuf),
    /// No network configuration yet: the network plugin has not installed its own (a node
    /// being set up). Checked again later.
    NoConfiguration,
}

/// The configuration list the runtime uses: the first `*.conflist` by name, `None` when there is
/// no configuration at all. (`*.conf` files hold a single plugin and cannot chain one; they are
/// named in the error.)
pub fn active_conflist(conf_dir: &Path) -> Result<Option<PathBuf>> {
    let mut names: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("listing the CNI configuration directory {}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
        .collect();
    names.sort();
    match names.first() {
        Some(p) if p.extension().is_some_and(|x| x == "conflist") => Ok(Some(p.clone())),
        Some(p) => bail!(
            "the runtime's CNI configuration {} is a single-plugin file: it cannot chain egressfw (convert it to a .conflist)",
            p.display()
        ),
        None => Ok(None),
    }
}

/// Attempts at an edit before giving up until the next change (each lost only to a write by
/// someone else between our read and our swap).
const EDIT_ATTEMPTS: usize = 5;

/// Makes sure the active conflist ends its chain with our entry (with these directories).
pub fn ensure_chained(placement: &Placement) -> Result<Chained> {
    ensure_chained_with(placement, &mut |_| {})
}

/// [`ensure_chained`], with `before_swap` run between each read and swap (see
/// `conflist::edit_once`).
fn ensure_chained_with(placement: &Placement, before_swap: &mut dyn FnMut(&Path)) -> Result<Chained> {
    let ours = json!({
        "type": PLUGIN_TYPE,
        "pinDir": placement.pin_dir,
        "stateDir": placement.state_dir,
    });
    for _ in 0..EDIT_ATTEMPTS {
        // Again on every attempt: the active list may be another file by now.
        let Some(path) = active_conflist(&placement.conf_dir)? else {
            return Ok(Chained::NoConfiguration);
        };
        match conflist::edit_once(&path, |conf| chain_last(conf, &ours, &path), before_swap)? {
            Edited::Unchanged => return Ok(Chained::Already(path)),
            Edited::Swapped => return Ok(Chained::Updated(path)),
            Edited::Raced => {}
        }
    }
    bail!(
        "the CNI configuration in {} changed under every one of {EDIT_ATTEMPTS} attempts to chain egressfw; trying again at its next change",
        placement.conf_dir.display()
    )
}

/// Puts `ours` last in the list's chain; false when it already is.
fn chain_last(conf: &mut Value, ours: &Value, path: &Path) -> Result<bool> {
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        bail!("{} has no \"plugins\" list", path.display());
    };
    let position = plugins.iter().position(|p| p["type"] == PLUGIN_TYPE);
    // Last in the chain: it needs the veth the network plugin made, and nothing after it may
    // run before the gate is up.
    match position {
        Some(i) if i + 1 == plugins.len() && plugins[i] == *ours => return Ok(false),
        Some(i) => {
            plugins.remove(i);
            plugins.push(ours.clone());
        }
        None => plugins.push(ours.clone()),
    }
    Ok(true)
}

/// Takes our entry out of every conflist in `conf_dir` (teardown: a node whose conflist still
/// names the plugin refuses new pods while no programs are pinned). Returns the files changed;
/// a missing directory has nothing to change.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("listing the CNI configuration directory {}", conf_dir.display()));
        }
    };
    let mut changed = Vec::new();
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    paths.sort();
    for path in paths {
        let remove_ours = |conf: &mut Value| -> Result<bool> {
            let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
                return Ok(false);
            };
            let before = plugins.len();
            plugins.retain(|p| p["type"] != PLUGIN_TYPE);
            Ok(plugins.len() != before)
        };
        let mut attempts = 0;
        loop {
            match conflist::edit_once(&path, remove_ours, &mut |_| {})? {
                Edited::Unchanged => break,
                Edited::Swapped => {
                    changed.push(path);
                    break;
                }
                Edited::Raced if attempts + 1 < EDIT_ATTEMPTS => attempts += 1,
                Edited::Raced => bail!(
                    "{} changed under every one of {EDIT_ATTEMPTS} attempts to take egressfw out of it",
                    path.display()
                ),
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(dir: &Path) -> Placement {
        Placement {
            conf_dir: dir.into(),
            pin_dir: "/sys/fs/bpf/egressfw".into(),
            state_dir: "/run/egressfw/cni".into(),
        }
    }

    #[test]
    fn the_entry_is_added_last_once_and_moved_back_to_the_end() {
        let dir = std::env::temp_dir().join(format!("egressfw-cni-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = placement(&dir);
        assert_eq!(ensure_chained(&p).unwrap(), Chained::NoConfiguration);
        fs::write(dir.join("05-single.conf"), "{}").unwrap();
        assert!(format!("{:#}", ensure_chained(&p).unwrap_err()).contains("single-plugin"));
        fs::remove_file(dir.join("05-single.conf")).unwrap();

        let list = dir.join("10-net.conflist");
        fs::write(
            &list,
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        fs::write(dir.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        assert_eq!(ensure_chained(&p).unwrap(), Chained::Updated(list.clone()));
        assert_eq!(
            ensure_chained(&p).unwrap(),
            Chained::Already(list.clone()),
            "a second run changes nothing"
        );
        let types = |path: &Path| -> Vec<String> {
            let v: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
            v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(types(&list), ["ptp", "portmap", "egressfw"]);
        assert_eq!(types(&dir.join("99-other.conflist")), Vec::<String>::new(), "only the active list");

        // A network plugin that rewrites its list with ours in the middle: moved back last.
        fs::write(
            &list,
            r#"{"name":"k8s","plugins":[{"type":"ptp"},{"type":"egressfw","pinDir":"/sys/fs/bpf/egressfw","stateDir":"/run/egressfw/cni"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert_eq!(ensure_chained(&p).unwrap(), Chained::Updated(list.clone()));
        assert_eq!(types(&list), ["ptp", "portmap", "egressfw"]);

        // Teardown takes the entry out again, and only ours.
        assert_eq!(unchain(&dir).unwrap(), vec![list.clone()]);
        assert_eq!(types(&list), ["ptp", "portmap"]);
        assert_eq!(unchain(&dir).unwrap(), Vec::<PathBuf>::new(), "nothing left to take out");
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(unchain(&dir).unwrap(), Vec::<PathBuf>::new(), "no directory, nothing to change");
    }

    /// The network plugin restarts and rewrites its list while we chain ourselves into it: its
    /// change is kept and our entry ends up in its new list.
    #[test]
    fn a_concurrent_rewrite_by_the_network_plugin_is_not_lost() {
        let dir = std::env::temp_dir().join(format!("egressfw-cni-race-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let list = dir.join("10-calico.conflist");
        fs::write(&list, r#"{"name":"k8s","plugins":[{"type":"calico","mtu":1440}]}"#).unwrap();
        let mut rewrites = 0;
        let mut network_plugin = |path: &Path| {
            if rewrites < 2 {
                rewrites += 1;
                let text = format!(
                    r#"{{"name":"k8s","plugins":[{{"type":"calico","mtu":{}}},{{"type":"bandwidth"}}]}}"#,
                    1400 + rewrites
                );
                fs::write(path.with_extension("tmp"), text).unwrap();
                fs::rename(path.with_extension("tmp"), path).unwrap();
            }
        };
        let chained = ensure_chained_with(&placement(&dir), &mut network_plugin).unwrap();
        assert_eq!(chained, Chained::Updated(list.clone()));
        let v: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["mtu"], 1402, "the network plugin's last write is kept: {v}");
        assert_eq!(v["plugins"][1]["type"], "bandwidth", "{v}");
        assert_eq!(v["plugins"][2]["type"], "egressfw", "and ours is last: {v}");
        let _ = fs::remove_dir_all(&dir);
    }
}

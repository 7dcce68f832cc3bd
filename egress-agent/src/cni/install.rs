//! Puts the plugin in place on a node: the binary in the CNI bin directory and an `egressfw`
//! entry at the end of the plugin chain of the network configuration the runtime uses (the
//! first `.conflist` in the configuration directory, as containerd and CRI-O pick it). Run by the
//! DaemonSet's init container, and again by the agent on every tick, because network plugins
//! rewrite their configuration when they restart.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::state::write_atomically;

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

/// Makes sure the active conflist ends its chain with our entry (with these directories).
pub fn ensure_chained(placement: &Placement) -> Result<Chained> {
    let Some(path) = active_conflist(&placement.conf_dir)? else {
        return Ok(Chained::NoConfiguration);
    };
    let mut conf = read_conflist(&path)?;
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        bail!("{} has no \"plugins\" list", path.display());
    };
    let ours = json!({
        "type": PLUGIN_TYPE,
        "pinDir": placement.pin_dir,
        "stateDir": placement.state_dir,
    });
    let position = plugins.iter().position(|p| p["type"] == PLUGIN_TYPE);
    // Last in the chain: it needs the veth the network plugin made, and nothing after it may
    // run before the gate is up.
    match position {
        Some(i) if i + 1 == plugins.len() && plugins[i] == ours => return Ok(Chained::Already(path)),
        Some(i) => {
            plugins.remove(i);
            plugins.push(ours);
        }
        None => plugins.push(ours),
    }
    write_conflist(&path, &conf)?;
    Ok(Chained::Updated(path))
}

fn read_conflist(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Pretty, with a final newline, by rename: the runtime never reads half a file.
fn write_conflist(path: &Path, conf: &Value) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(conf)?;
    bytes.push(b'\n');
    write_atomically(path, &bytes)
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
        let mut conf = read_conflist(&path)?;
        let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p["type"] != PLUGIN_TYPE);
        if plugins.len() == before {
            continue;
        }
        write_conflist(&path, &conf)?;
        changed.push(path);
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
}

//! The few kernel modules the initramfs loads by itself (enough to mount the host's root over
//! 9p with an overlay); everything else is loaded later by the host's own `modprobe`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// virtio transport, 9p over virtio, and overlayfs. Any of them may be built in, depending on
/// the kernel's configuration; modules.builtin says which.
pub const FOR_ROOT: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// `kernel/fs/9p/9p.ko.xz` -> `9p`; module names treat `-` and `_` alike.
fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Module files (paths relative to the module tree) that load `wanted`, each after the modules
/// it depends on. `modules_dep` and `modules_builtin` are the contents of those index files.
pub fn load_order(modules_dep: &str, modules_builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let deps: HashMap<String, (String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(file, deps)| {
            (name_of(file), (file.to_owned(), deps.split_whitespace().map(str::to_owned).collect()))
        })
        .collect();
    let builtin: HashSet<String> = modules_builtin.lines().map(name_of).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if deps.contains_key(&name) {
            visit(&name, &deps, &mut seen, &mut order);
        } else if !builtin.contains(&name) {
            bail!("module {name} is neither in modules.dep nor built in");
        }
    }
    Ok(order)
}

/// Depth-first: dependencies before the module itself, each module once.
fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(name.to_owned()) {
        return;
    }
    let Some((file, needs)) = deps.get(name) else { return };
    for dep in needs {
        visit(&name_of(dep), deps, seen, order);
    }
    order.push(file.clone());
}

/// The modules for mounting the root, in load order, as (file name, uncompressed contents):
/// busybox's insmod only reads plain `.ko` files.
pub fn for_root(tree: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let read = |name: &str| {
        let path = tree.join(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let order = load_order(&read("modules.dep")?, &read("modules.builtin")?, FOR_ROOT)?;
    order
        .iter()
        .map(|rel| {
            let path = tree.join(rel);
            Ok((format!("{}.ko", name_of(rel)), uncompressed(&path)?))
        })
        .collect()
}

fn uncompressed(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("ko") => return fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("{}: not a kernel module this knows how to read", path.display()),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/net/veth.ko.xz:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko\n";

    #[test]
    fn dependencies_load_first_and_once_builtins_are_skipped() {
        let order = load_order(DEP, BUILTIN, FOR_ROOT).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
                "kernel/fs/overlayfs/overlay.ko.xz",
            ]
        );
    }

    #[test]
    fn a_module_that_is_nowhere_is_an_error() {
        let e = load_order(DEP, BUILTIN, &["virtiofs"]).unwrap_err();
        assert!(e.to_string().contains("virtiofs"), "{e}");
    }
}

//! cgroup v2 paths: where the hierarchy is mounted, and a cgroup's id and level.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// A cgroup directory as the kernel programs know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRef {
    pub path: PathBuf,
    /// The cgroup id: on cgroup v2 the directory's inode number, which is what
    /// `bpf_get_current_cgroup_id` and `bpf_skb_ancestor_cgroup_id` return.
    pub id: u64,
    /// Depth below the hierarchy root (root = 0): the `level` the ancestor helpers take.
    pub level: u32,
}

/// The cgroup2 mount point, read from /proc/mounts (it is /sys/fs/cgroup on most nodes and
/// /sys/fs/cgroup/unified on hybrid systems, so it is never assumed).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .context("no cgroup2 filesystem is mounted (see /proc/mounts); egressfw needs cgroup v2")
}

/// Resolves a cgroup as written in a policy: relative to the cgroup2 mount, or absolute under it.
pub fn resolve(root: &Path, written: &str) -> Result<CgroupRef> {
    let given = Path::new(written);
    let path = if given.is_absolute() { given.to_path_buf() } else { root.join(given) };
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("cgroup {written:?}: `..` is not allowed in cgroup paths");
    }
    let rel = path
        .strip_prefix(root)
        .with_context(|| format!("cgroup {written:?} is not under the cgroup2 mount {}", root.display()))?;
    let meta = fs::metadata(&path)
        .with_context(|| format!("cgroup {written:?} does not exist ({})", path.display()))?;
    if !meta.is_dir() || !path.join("cgroup.procs").exists() {
        bail!("cgroup {written:?} ({}) is not a cgroup directory", path.display());
    }
    let level = rel.components().count() as u32;
    Ok(CgroupRef { path, id: meta.ino(), level })
}

/// The cgroup id of a path, if it still exists.
pub fn id_of(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Finds the paths of the given cgroup ids by walking the hierarchy (for display only).
pub fn paths_of(root: &Path, ids: &[u64]) -> std::collections::HashMap<u64, PathBuf> {
    let mut found = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        if let Some(id) = id_of(&dir).filter(|id| ids.contains(id)) {
            found.insert(id, dir.clone());
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(
                entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
            );
        }
    }
    found
}

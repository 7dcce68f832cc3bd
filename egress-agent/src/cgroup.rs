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

/// `statfs(2)`'s f_type of a cgroup2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup2 hierarchy at or in `given` (a `--cgroup-root`, or the host's `/sys/fs/cgroup`
/// mounted into the agent's container). On a hybrid node `/sys/fs/cgroup` is a tmpfs of cgroup
/// v1 hierarchies with cgroup2 at `unified/` (where runc puts every container as well), so that
/// is taken instead; anything else is refused, since programs attach only to cgroup2 directories.
pub fn cgroup2_at(given: &Path) -> Result<PathBuf> {
    let kind = fs_type(given)?;
    if kind == CGROUP2_SUPER_MAGIC {
        return Ok(given.to_path_buf());
    }
    let unified = given.join("unified");
    if fs_type(&unified).is_ok_and(|t| t == CGROUP2_SUPER_MAGIC) {
        tracing::info!(
            given = %given.display(),
            cgroup2 = %unified.display(),
            "cgroup root is a hybrid layout (cgroup v1 hierarchies); using its cgroup2 hierarchy"
        );
        return Ok(unified);
    }
    bail!(
        "cgroup root {} is not a cgroup2 filesystem (filesystem type {kind:#x}) and holds none at unified/; egressfw needs the host's cgroup v2 hierarchy: give its mount point with --cgroup-root (EGRESSFW_CGROUP_ROOT)",
        given.display()
    )
}

fn fs_type(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("cgroup root {} holds a NUL byte", path.display()))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        let err = std::io::Error::last_os_error();
        bail!("cgroup root {}: {err}", path.display());
    }
    Ok(stat.f_type as i64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_its_own_hierarchy_and_a_hybrid_parent_leads_to_it() {
        let mount = cgroup2_mount().expect("this machine has cgroup2");
        assert_eq!(cgroup2_at(&mount).unwrap(), mount);
        // On a hybrid layout (this project's test machines) the tmpfs above it leads to it.
        if mount.ends_with("unified") {
            assert_eq!(cgroup2_at(mount.parent().unwrap()).unwrap(), mount);
        }
    }

    #[test]
    fn a_directory_that_is_no_cgroup2_is_refused_by_name() {
        let dir = std::env::temp_dir();
        let err = format!("{:#}", cgroup2_at(&dir).unwrap_err());
        assert!(err.contains(&dir.display().to_string()) && err.contains("not a cgroup2"), "{err}");
    }
}

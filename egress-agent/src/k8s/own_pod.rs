//! The agent's own pod must never be held back by the pod-start gate: a gate left up by a
//! previous agent (say, one replaced while a pod was starting) would otherwise cut the new agent
//! off from the API server it needs to lower the gate. So before it talks to the API, the agent
//! finds its own pod cgroup and registers it as not enforced.

use std::{fs, path::PathBuf};

use super::pod_cgroup::{PodsRoot, pod_uid_of};

/// The pod cgroup holding this process, if the process runs in a pod on this node.
///
/// Found by reading `cgroup.procs` under each pod cgroup: the kernel lists pids as seen from
/// the reader's pid namespace, so our own pid shows up in our own cgroup even in a container
/// (with a private cgroup namespace, /proc/self/cgroup would only say "/").
pub fn find(root: &PodsRoot) -> Option<PathBuf> {
    find_pid(root, std::process::id())
}

/// The pod cgroup whose subtree holds process `pid` (as numbered in our pid namespace).
pub fn find_pid(root: &PodsRoot, pid: u32) -> Option<PathBuf> {
    let me = pid.to_string();
    for parent in root.pod_parents() {
        let Ok(entries) = fs::read_dir(&parent) else { continue };
        for pod in entries.flatten().map(|e| e.path()) {
            let is_pod = pod.file_name().and_then(|n| n.to_str()).and_then(pod_uid_of).is_some();
            if is_pod && subtree_holds(&pod, &me) {
                return Some(pod);
            }
        }
    }
    None
}

fn subtree_holds(dir: &std::path::Path, pid: &str) -> bool {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if procs.lines().any(|l| l == pid) {
        return true;
    }
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()) && subtree_holds(&e.path(), pid))
}

//! Where the kubelet puts a pod's cgroup, for both cgroup drivers and every QoS class.
//!
//! ```text
//! cgroupfs: <root>/kubepods/pod<uid>                      Guaranteed
//!           <root>/kubepods/burstable/pod<uid>            Burstable
//!           <root>/kubepods/besteffort/pod<uid>           BestEffort
//! systemd:  <root>/kubepods.slice/kubepods-pod<u_i_d>.slice
//!           <root>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice
//!           <root>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<u_i_d>.slice
//! ```
//!
//! (systemd unit names cannot hold '-' inside a component, so the UID's dashes become '_'.) The
//! pods root may sit deeper (kind nests it as `kubelet.slice/kubelet-kubepods.slice`), so it is
//! found by name, or given explicitly. Containers live in child cgroups of the pod cgroup; the
//! policy sits on the pod cgroup and covers them all, including hostNetwork pods.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

/// The cgroup above every pod on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodsRoot {
    pub path: PathBuf,
    pub driver: Driver,
    /// systemd unit-name prefix of the pod slices: `kubepods`, or `kubelet-kubepods` for kind.
    prefix: String,
}

pub const QOS_CLASSES: [&str; 3] = ["Guaranteed", "Burstable", "BestEffort"];

impl PodsRoot {
    /// The pods root at `path`; the driver follows from its name (`*.slice`: systemd).
    pub fn at(path: PathBuf) -> Result<Self> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("pods cgroup {} has no usable name", path.display()))?;
        let (driver, prefix) = match name.strip_suffix(".slice") {
            Some(p) => (Driver::Systemd, p.to_owned()),
            None => (Driver::Cgroupfs, String::new()),
        };
        Ok(Self { path, driver, prefix })
    }

    /// Looks for the kubelet's pods cgroup in the first levels of the hierarchy.
    pub fn discover(cgroup_root: &Path) -> Result<Self> {
        let mut level = vec![cgroup_root.to_path_buf()];
        for _depth in 0..3 {
            let mut next = Vec::new();
            for dir in &level {
                let Ok(entries) = fs::read_dir(dir) else { continue };
                for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice") {
                        return Self::at(e.path());
                    }
                    next.push(e.path());
                }
            }
            level = next;
        }
        bail!(
            "no kubelet pods cgroup (kubepods or kubepods.slice) within 3 levels of {}; is this a Kubernetes node, and is the host cgroup2 mount given with --cgroup-root? Otherwise name it with --pods-cgroup",
            cgroup_root.display()
        )
    }

    /// The QoS-class directory pods of `qos` live in (`None`: the pods root itself).
    fn qos_dir(&self, qos: &str) -> Option<PathBuf> {
        let class = match qos {
            "Burstable" => "burstable",
            "BestEffort" => "besteffort",
            _ => return None,
        };
        Some(match self.driver {
            Driver::Cgroupfs => self.path.join(class),
            Driver::Systemd => self.path.join(format!("{}-{class}.slice", self.prefix)),
        })
    }

    /// The directories that hold pod cgroups (the root and the two QoS directories).
    pub fn pod_parents(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.path.clone()];
        dirs.extend(["Burstable", "BestEffort"].iter().filter_map(|q| self.qos_dir(q)));
        dirs
    }

    /// Where the kubelet creates the cgroup of pod `uid` with QoS class `qos`.
    pub fn pod_dir(&self, uid: &str, qos: &str) -> PathBuf {
        let parent = self.qos_dir(qos).unwrap_or_else(|| self.path.clone());
        match self.driver {
            Driver::Cgroupfs => parent.join(format!("pod{uid}")),
            Driver::Systemd => {
                let unit_uid = uid.replace('-', "_");
                let class = match qos {
                    "Burstable" => "-burstable",
                    "BestEffort" => "-besteffort",
                    _ => "",
                };
                parent.join(format!("{}{class}-pod{unit_uid}.slice", self.prefix))
            }
        }
    }

    /// Finds the existing cgroup of a pod. The QoS class from the pod's status is tried first;
    /// the others cover a status the watch has not delivered yet.
    pub fn find_pod(&self, uid: &str, qos: Option<&str>) -> Option<PathBuf> {
        let first = qos.into_iter();
        first
            .chain(QOS_CLASSES.iter().copied().filter(|q| Some(*q) != qos))
            .map(|q| self.pod_dir(uid, q))
            .find(|p| p.is_dir())
    }

    /// Every pod cgroup present, by pod UID.
    pub fn scan(&self) -> HashMap<String, PathBuf> {
        let mut found = HashMap::new();
        for parent in self.pod_parents() {
            let Ok(entries) = fs::read_dir(&parent) else { continue };
            for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                if let Some(uid) = pod_uid_of(&e.file_name().to_string_lossy()) {
                    found.insert(uid, e.path());
                }
            }
        }
        found
    }
}

/// The pod UID a pod cgroup's directory name carries, in the API's form (with dashes).
pub fn pod_uid_of(name: &str) -> Option<String> {
    if let Some(uid) = name.strip_prefix("pod") {
        return (!uid.is_empty() && !uid.contains('.')).then(|| uid.to_owned());
    }
    let unit = name.strip_suffix(".slice")?;
    let (_, uid) = unit.rsplit_once("-pod")?;
    (!uid.is_empty()).then(|| uid.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f1b7c2e-9a3d-4e8f-b1c2-0d9e8f7a6b5c";

    /// Builds a directory tree from relative paths, as recorded from real nodes.
    fn layout(paths: &[&str]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for p in paths {
            fs::create_dir_all(d.0.join(p)).unwrap();
        }
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("egressfw-podcg-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn cgroupfs_layout() {
        // Recorded from a kubeadm node with containerd and cgroupDriver: cgroupfs.
        let d = layout(&[
            "kubepods/burstable/pod5f1b7c2e-9a3d-4e8f-b1c2-0d9e8f7a6b5c/3f2a9c",
            "kubepods/besteffort/pod0a0a0a0a-0000-4000-8000-000000000001/aa11",
            "kubepods/pod0b0b0b0b-0000-4000-8000-000000000002/bb22",
            "system.slice/containerd.service",
        ]);
        let root = PodsRoot::discover(&d.0).unwrap();
        assert_eq!(root.driver, Driver::Cgroupfs);
        assert_eq!(root.path, d.0.join("kubepods"));
        assert_eq!(root.pod_dir(UID, "Burstable"), d.0.join(format!("kubepods/burstable/pod{UID}")));
        assert_eq!(root.pod_dir(UID, "Guaranteed"), d.0.join(format!("kubepods/pod{UID}")));
        assert_eq!(root.find_pod(UID, Some("Burstable")), Some(root.pod_dir(UID, "Burstable")));
        // A stale or missing QoS class still finds the pod.
        assert_eq!(root.find_pod(UID, Some("BestEffort")), Some(root.pod_dir(UID, "Burstable")));
        assert_eq!(root.find_pod(UID, None), Some(root.pod_dir(UID, "Burstable")));
        assert_eq!(root.find_pod("0c0c0c0c-0000-4000-8000-000000000003", None), None);
        let scan = root.scan();
        assert_eq!(scan.len(), 3);
        assert_eq!(scan[UID], root.pod_dir(UID, "Burstable"));
        assert_eq!(
            scan["0b0b0b0b-0000-4000-8000-000000000002"],
            d.0.join("kubepods/pod0b0b0b0b-0000-4000-8000-000000000002")
        );
    }

    #[test]
    fn systemd_layout() {
        // Recorded from a node with cgroupDriver: systemd (the kubeadm default since 1.22).
        let d = layout(&[
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f1b7c2e_9a3d_4e8f_b1c2_0d9e8f7a6b5c.slice/cri-containerd-3f2a.scope",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a0a0a0a_0000_4000_8000_000000000001.slice",
            "kubepods.slice/kubepods-pod0b0b0b0b_0000_4000_8000_000000000002.slice/cri-containerd-bb.scope",
            "system.slice/kubelet.service",
        ]);
        let root = PodsRoot::discover(&d.0).unwrap();
        assert_eq!(root.driver, Driver::Systemd);
        assert_eq!(
            root.pod_dir(UID, "Burstable"),
            d.0.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f1b7c2e_9a3d_4e8f_b1c2_0d9e8f7a6b5c.slice")
        );
        assert_eq!(
            root.pod_dir("0b0b0b0b-0000-4000-8000-000000000002", "Guaranteed"),
            d.0.join("kubepods.slice/kubepods-pod0b0b0b0b_0000_4000_8000_000000000002.slice")
        );
        assert!(root.find_pod(UID, Some("Burstable")).is_some());
        let scan = root.scan();
        assert_eq!(scan.len(), 3, "{scan:?}");
        assert!(scan.contains_key("0a0a0a0a-0000-4000-8000-000000000001"));
    }

    #[test]
    fn kind_nested_systemd_layout() {
        // kind runs the kubelet inside a container with its pods under kubelet.slice.
        let d = layout(&[
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod5f1b7c2e_9a3d_4e8f_b1c2_0d9e8f7a6b5c.slice",
        ]);
        let root = PodsRoot::discover(&d.0).unwrap();
        assert_eq!(root.path, d.0.join("kubelet.slice/kubelet-kubepods.slice"));
        assert_eq!(root.find_pod(UID, Some("BestEffort")), Some(root.pod_dir(UID, "BestEffort")));
        assert_eq!(root.scan().len(), 1);
    }

    #[test]
    fn hybrid_layout_is_found_under_the_unified_mount() {
        // Hybrid hosts (like the test machines) mount cgroup2 at /sys/fs/cgroup/unified; the
        // agent is given that mount as its root and finds the pods below it the same way.
        let d = layout(&["unified/kubepods/besteffort/pod5f1b7c2e-9a3d-4e8f-b1c2-0d9e8f7a6b5c"]);
        let root = PodsRoot::discover(&d.0.join("unified")).unwrap();
        assert_eq!(root.find_pod(UID, None), Some(d.0.join(format!("unified/kubepods/besteffort/pod{UID}"))));
    }

    #[test]
    fn static_pod_uids_are_config_hashes() {
        // Static pods are named by the kubelet's hash of their manifest, not an API UID.
        assert_eq!(
            pod_uid_of("pod6d8e1e2c7a3f4b5c9d0e1f2a3b4c5d6e").as_deref(),
            Some("6d8e1e2c7a3f4b5c9d0e1f2a3b4c5d6e")
        );
        assert_eq!(pod_uid_of("kubepods-pod6d8e1e2c.slice").as_deref(), Some("6d8e1e2c"));
        assert_eq!(pod_uid_of("kubepods-burstable.slice"), None);
        assert_eq!(pod_uid_of("burstable"), None);
        assert_eq!(pod_uid_of("cri-containerd-abc.scope"), None);
    }

    #[test]
    fn missing_pods_root_is_explained() {
        let d = layout(&["system.slice/sshd.service"]);
        let e = PodsRoot::discover(&d.0).unwrap_err().to_string();
        assert!(e.contains("--pods-cgroup"), "{e}");
    }
}

//! The bpffs directory that holds everything egressfw leaves in the kernel. Pins are what make
//! enforcement outlive the agent: links and maps stay until `teardown` removes them.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egressfw";

/// Layout under the pin directory:
/// `maps/<MAP_NAME>`, `links/<cgroup id>/<program name>`, `links/gate/<program name>` and
/// `tc/<ifindex>/<program name>` (tcx links on pod veths; clsact filters need no pin) and
/// `programs/<program name>` (the tc programs, for the CNI plugin's gate to attach).
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn cgroup_links(&self, cgroup_id: u64) -> PathBuf {
        self.links().join(cgroup_id.to_string())
    }

    /// Links of the pod-start gate (not a cgroup id, so never taken for a policy's links).
    pub fn gate_links(&self) -> PathBuf {
        self.links().join("gate")
    }

    pub fn tc(&self) -> PathBuf {
        self.root.join("tc")
    }

    pub fn tc_links(&self, ifindex: u32) -> PathBuf {
        self.tc().join(ifindex.to_string())
    }

    /// The node agent pins the tc programs here, so the CNI plugin (another process, run by the
    /// container runtime) can attach them to a new pod's veth with no agent running.
    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    /// Interfaces (ifindex) that have a tc links directory.
    pub fn pinned_interfaces(&self) -> Result<Vec<u32>> {
        numbered_entries(&self.tc())
    }

    pub fn exists(&self) -> bool {
        self.maps().is_dir()
    }

    /// Makes sure the parent is on a bpffs (mounting one at it if nothing is mounted there yet)
    /// and creates the directories.
    pub fn prepare(&self) -> Result<()> {
        let mount_point = self.root.parent().context("pin directory has no parent")?;
        ensure_bpffs(mount_point)?;
        self.create_dirs()
    }

    /// Like `prepare`, but refuses to mount: inside a container a bpffs mounted by the agent
    /// would vanish with the pod, and every pin with it, which would end enforcement.
    pub fn prepare_host_mounted(&self) -> Result<()> {
        let mount_point = self.root.parent().context("pin directory has no parent")?;
        if !is_bpffs(mount_point)? {
            bail!(
                "{} is not a bpffs: mount the host's bpffs there (hostPath /sys/fs/bpf; `mount -t bpf bpf /sys/fs/bpf` on the node if it has none), so pins outlive the agent's pod",
                mount_point.display()
            );
        }
        self.create_dirs()
    }

    fn create_dirs(&self) -> Result<()> {
        for dir in [self.maps(), self.links()] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// Cgroup ids that have a links directory.
    pub fn pinned_cgroups(&self) -> Result<Vec<u64>> {
        numbered_entries(&self.links())
    }
}

/// Entries of `dir` named by a number, sorted; nothing when `dir` does not exist.
fn numbered_entries<T: std::str::FromStr + Ord>(dir: &Path) -> Result<Vec<T>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut ids = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(id) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(false);
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn ensure_bpffs(dir: &Path) -> Result<()> {
    if is_bpffs(dir)? {
        return Ok(());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let fstype = c"bpf";
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "{} is not a bpffs and mounting one there failed: {} (the agent needs CAP_SYS_ADMIN, or mount bpffs on the host)",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    tracing::info!(path = %dir.display(), "mounted bpffs");
    Ok(())
}

//! Asks the kernel which programs are attached to a cgroup (BPF_PROG_QUERY), independently of
//! the pins: readiness is judged by what the kernel runs, not by what the agent believes.

use std::{fs::File, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, Result, bail};

const BPF_PROG_QUERY: libc::c_long = 16;
const MAX_PROGS: usize = 64;

/// Kernel attach types (enum bpf_attach_type) of the programs egressfw attaches.
pub const ATTACH_INET_EGRESS: u32 = 1;
pub const ATTACH_SOCK_OPS: u32 = 3;
pub const ATTACH_INET4_CONNECT: u32 = 10;
pub const ATTACH_INET6_CONNECT: u32 = 11;
pub const ATTACH_UDP4_SENDMSG: u32 = 14;
pub const ATTACH_UDP6_SENDMSG: u32 = 15;
pub const ATTACH_INET4_GETPEERNAME: u32 = 29;
pub const ATTACH_INET6_GETPEERNAME: u32 = 30;

/// The `query` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `prog_cnt`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached directly to `cgroup` for `attach_type` (not inherited ones).
pub fn attached_programs(cgroup: &Path, attach_type: u32) -> Result<Vec<u32>> {
    let dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut ids = [0u32; MAX_PROGS];
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGS as u32,
        ..QueryAttr::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix and prog_ids points at MAX_PROGS writable u32s; the
    // kernel copies at most prog_cnt ids and zero-fills the attr tail it does not know.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            size_of::<QueryAttr>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "BPF_PROG_QUERY on cgroup {} (attach type {attach_type}): {}",
            cgroup.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(ids[..(attr.prog_cnt as usize).min(MAX_PROGS)].to_vec())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the link pinned at `pin` from its hook now (BPF_LINK_DETACH, Linux 5.9). Removing
/// the pin would too, but the reference a bpffs pin holds is put from a workqueue after the pin
/// is gone, so the program may stay attached for a moment: too late for a caller that attaches
/// the same program again at once (the kernel refuses it twice on one hook).
pub fn detach_pinned_link(pin: &Path) -> Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", pin.display()))?;
    // `obj_get` member of `union bpf_attr`: pathname, bpf_fd, file_flags.
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: attr is a valid bpf_attr prefix of the stated size; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), size_of_val(&get) as u32) };
    if fd < 0 {
        bail!("opening pinned link {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned; owned (and closed) here.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // `link_detach` member: the link's fd.
    let mut detach = [0u32; 2];
    detach[0] = link.as_raw_fd() as u32;
    // SAFETY: attr is a valid bpf_attr prefix of the stated size.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), size_of_val(&detach) as u32)
    };
    if rc != 0 {
        bail!("detaching link {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

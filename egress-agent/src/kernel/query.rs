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

//! Programs an attacker (or a careless tool) could load, made with raw bpf(2) calls: a program
//! that returns a constant, attached where it could compete with ours. Two instructions need no
//! compiler, and the tests stay independent of the agent's own loader.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const PROG_TYPE_SCHED_CLS: u32 = 3;
pub const PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const ATTACH_CGROUP_INET_EGRESS: u32 = 1;
pub const F_ALLOW_OVERRIDE: u32 = 1;
pub const F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: the attribute buffer is valid for its size, which is passed along.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: a new descriptor the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// A program of `prog_type` that returns `value`: `r0 = value; exit`.
pub fn load(prog_type: u32, value: i32) -> io::Result<OwnedFd> {
    let mut insns = [0u8; 16];
    insns[0] = 0xb7; // mov64 r0, imm
    insns[4..8].copy_from_slice(&value.to_ne_bytes());
    insns[8] = 0x95; // exit
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr).map(fd)
}

/// BPF_LINK_CREATE: `prog` on `target` (an ifindex or a cgroup fd) for `attach_type`.
pub fn link_create(prog: &OwnedFd, target: u32, attach_type: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&target.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr[12..16].copy_from_slice(&flags.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr).map(fd)
}

/// BPF_PROG_ATTACH (the older, fd-less attachment): `prog` on cgroup `cgroup` with `flags`.
pub fn prog_attach(prog: &OwnedFd, cgroup: &std::fs::File, attach_type: u32, flags: u32) -> io::Result<()> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr[12..16].copy_from_slice(&flags.to_ne_bytes());
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

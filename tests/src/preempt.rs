//! Another program put ahead of ours on the pod's veth, the way a CNI attaching later could: a
//! pass-all program that ends classification before ours sees the frame. On tcx kernels (6.6+)
//! a tcx link at the head of the chain, made with raw bpf(2) calls (two instructions: return
//! TCX_PASS); on older kernels a cls_bpf filter at our priority (1), which cls_bpf runs before
//! older filters of the same priority, with classic BPF that matches everything and the `ok`
//! action. Removed on drop.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::netns::NetNs;

pub enum Preemptor {
    /// The tcx link; closing it detaches the program.
    Tcx(OwnedFd),
    /// A clsact filter, deleted on drop: its namespace and the `tc` arguments that name it.
    Clsact { ns: Option<String>, name: Vec<String> },
}

impl Preemptor {
    /// Attaches a pass-all program ahead of everything on the ingress of `dev`, in `ns` (the
    /// test's own namespace when None). `handle` tells several clsact filters apart.
    pub fn attach(ns: Option<&NetNs>, dev: &str, handle: u32) -> Self {
        if tcx_kernel() {
            let attach = || {
                let index = crate::frames::ifindex(dev);
                let prog = load_pass_all().unwrap_or_else(|e| panic!("loading the pass-all program: {e}"));
                link_at_head(&prog, index).unwrap_or_else(|e| panic!("tcx link at the head of {dev}: {e}"))
            };
            return Self::Tcx(ns.map_or_else(attach, |n| n.within(attach)));
        }
        let handle = format!("{handle:#x}");
        let name: Vec<String> =
            ["dev", dev, "ingress", "prio", "1", "protocol", "all", "handle", &handle, "bpf"]
                .map(String::from)
                .to_vec();
        let mut args = vec!["filter".to_string(), "add".into()];
        args.extend(name.iter().cloned());
        args.extend(["bytecode", "1,6 0 0 4294967295,", "action", "ok"].map(String::from));
        let out = tc(ns.map(|n| n.name.as_str()), &args);
        assert!(out.status.success(), "tc {}:\n{}", args.join(" "), crate::lab::text(&out));
        Self::Clsact { ns: ns.map(|n| n.name.clone()), name }
    }
}

/// Runs `tc` in network namespace `ns` (or the test's own).
fn tc(ns: Option<&str>, args: &[String]) -> std::process::Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => std::process::Command::new("tc"),
    };
    cmd.args(args).output().expect("running tc (iproute2)")
}

impl Drop for Preemptor {
    fn drop(&mut self) {
        if let Self::Clsact { ns, name } = self {
            let mut args = vec!["filter".to_string(), "del".into()];
            args.extend(name.iter().cloned());
            let _ = tc(ns.as_deref(), &args);
        }
    }
}

/// Linux 6.6+, where the agent uses tcx (as `tc_attach::mechanism` decides).
fn tcx_kernel() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
/// With no relative program: the head of the chain.
const BPF_F_BEFORE: u32 = 1 << 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: the attribute buffer is valid for its size, which is passed along.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `r0 = 0 (TCX_PASS); exit`.
fn load_pass_all() -> io::Result<OwnedFd> {
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

fn link_at_head(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
    attr[12..16].copy_from_slice(&BPF_F_BEFORE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

//! Another program put ahead of ours on the pod's veth, the way a CNI attaching later could: a
//! pass-all program that ends classification before ours sees the frame. On tcx kernels (6.6+)
//! a tcx link at the head of the chain, made with raw bpf(2) calls (two instructions: return
//! TCX_PASS); on older kernels a cls_bpf filter at our priority (1), which cls_bpf runs before
//! older filters of the same priority, with classic BPF that matches everything (a match with
//! no action passes the frame). Removed on drop.

use std::{io, os::fd::OwnedFd};

use crate::{netns::NetNs, raw_bpf};

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
        // A classic BPF filter that matches everything and has no action: cls_bpf then ends
        // classification with TC_ACT_OK (pass), and ours never runs.
        args.extend(["bytecode", "1,6 0 0 4294967295,"].map(String::from));
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

/// Linux 6.6+, where the agent uses tcx (as `tc_attach::mechanism` decides, unless
/// `EGRESSFW_TC_MECHANISM=clsact` tells it, and the tests, to use clsact filters).
fn tcx_kernel() -> bool {
    if std::env::var("EGRESSFW_TC_MECHANISM").as_deref() == Ok("clsact") {
        return false;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

const BPF_TCX_INGRESS: u32 = 46;
/// With no relative program: the head of the chain.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `r0 = 0 (TCX_PASS); exit`.
fn load_pass_all() -> io::Result<OwnedFd> {
    raw_bpf::load(raw_bpf::PROG_TYPE_SCHED_CLS, 0)
}

fn link_at_head(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    raw_bpf::link_create(prog, ifindex, BPF_TCX_INGRESS, BPF_F_BEFORE)
}

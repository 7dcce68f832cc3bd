//! What the host needs to boot test VMs: the Debian packages, and whether KVM is usable.

use std::{
    fs::{self, OpenOptions},
    path::Path,
    process::Command,
};

use anyhow::Result;

use crate::toolchain;

/// qemu itself; a static busybox for the initramfs; kmod for depmod on the host and for
/// modprobe inside the VM (which runs the host's root); xz to unpack the modules the initramfs
/// loads (Debian compresses them).
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

/// Installs the missing packages. Checked by package status rather than by command name: the
/// dynamically linked `busybox` package provides the same command but would not run in an
/// initramfs.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    toolchain::apt_install(&missing)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

/// What `--accel` asks for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if it can run a stock kernel here, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// How qemu runs the guest.
#[derive(Clone, Copy)]
pub enum Accel {
    Kvm,
    /// Pure emulation: the same results, many times slower.
    Tcg,
}

impl Accel {
    /// KVM when /dev/kvm opens read-write and the CPU has hardware virtualization. A /dev/kvm
    /// without vmx/svm behind it (kvm_pvm, a shadow-paging KVM for nested sandboxes) opens fine
    /// but cannot run a stock kernel: Debian's bzImage hangs in its decompressor and an
    /// uncompressed one dies on "KVM internal error: emulation failure" at the first
    /// cmpxchg16b or xsaves.
    pub fn pick(choice: AccelChoice) -> Self {
        let accel = match choice {
            AccelChoice::Kvm => Self::Kvm,
            AccelChoice::Tcg => Self::Tcg,
            AccelChoice::Auto => match kvm_unusable() {
                None => Self::Kvm,
                Some(why) => {
                    eprintln!("vm: {why}: using TCG emulation (slower; pass --accel kvm to try KVM anyway)");
                    Self::Tcg
                }
            },
        };
        if let Self::Kvm = accel {
            eprintln!("vm: using KVM (/dev/kvm)");
        }
        accel
    }

    /// qemu's `-accel` and `-cpu`: the host CPU under KVM so the guest kernel sees the same
    /// features (the BPF JIT uses them); the most capable emulated CPU otherwise.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // One host thread runs every vCPU in turn. With a thread per vCPU (MTTCG) a guest
            // CPU can run a stale copy of kernel text another one just patched (static keys
            // flipped by attaching cgroup programs, text_poke): the guest dies with an int3 Oops
            // in the middle of tcp_connect, as 6.12 did here. The guest still has several CPUs.
            Self::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }

    /// How much longer everything takes: deadlines are stretched by this.
    pub fn slowdown(self) -> u64 {
        match self {
            Self::Kvm => 1,
            Self::Tcg => 10,
        }
    }
}

/// Why KVM cannot boot the test kernels here, if it cannot.
fn kvm_unusable() -> Option<String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("/dev/kvm is not usable ({e})"));
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if hardware_virtualization(&cpuinfo) {
        return None;
    }
    let provider = if Path::new("/sys/module/kvm_pvm").exists() { " (it is kvm_pvm)" } else { "" };
    Some(format!("/dev/kvm{provider} has no vmx/svm CPU support behind it and cannot run stock kernels"))
}

/// Whether the first CPU's flags include Intel VT-x or AMD-V.
fn hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.trim_start().strip_prefix(':')))
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_or_svm_in_the_flags_means_hardware_virtualization() {
        assert!(hardware_virtualization("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(hardware_virtualization("flags\t\t: fpu svm\n"));
        // A PVM sandbox: a hypervisor flag, no vmx.
        assert!(!hardware_virtualization("flags\t\t: fpu cx16 hypervisor avx2\nvmx flags\t: ept\n"));
        assert!(!hardware_virtualization(""));
    }
}

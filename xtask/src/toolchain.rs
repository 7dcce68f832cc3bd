//! Makes sure the build chain exists on a fresh machine: the nightly toolchain's rust-src, a
//! bpf-linker built against that nightly's own LLVM, and the Debian packages the tests use.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run::{output, status};

/// Debian packages the integration tests, demo and benchmarks call. Each one is a real tool the
/// tests drive (curl for TCP, socat for UDP, ping for ICMP, hping3 for raw IP, bpftool for
/// bpf_stats, iperf3 for throughput, squid and tinyproxy as the gateway benchmark's
/// references; containerd, runc, the CNI plugins, iptables/nft and dnsmasq for the real cluster's node, umoci and a
/// static libc for the images it runs; promtool for the alerts' unit tests). An absolute path
/// stands for a package with no command.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("socat", "socat"),
    ("ping", "iputils-ping"),
    ("hping3", "hping3"),
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("python3", "python3"),
    ("squid", "squid"),
    ("tinyproxy", "tinyproxy"),
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/ptp", "containernetworking-plugins"),
    ("umoci", "umoci"),
    ("gcc", "gcc"),
    ("strip", "binutils"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("/usr/sbin/dnsmasq", "dnsmasq-base"),
    ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
    ("promtool", "prometheus"),
];

/// The toolchain that builds the eBPF crate (aya-build runs `rustup run <toolchain> cargo`).
pub struct EbpfToolchain {
    pub name: &'static str,
    /// Stable carries the same LLVM; RUSTC_BOOTSTRAP lets it use `-Z build-std=core`.
    pub needs_bootstrap: bool,
}

impl EbpfToolchain {
    /// Environment for any cargo invocation that builds egress-agent (its build.rs builds eBPF).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("EGRESS_EBPF_TOOLCHAIN", self.name);
        if self.needs_bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
    }
}

pub fn setup_all() -> Result<EbpfToolchain> {
    let toolchain = setup_build()?;
    ensure_debian_packages()?;
    ensure_cargo_fuzz()?;
    Ok(toolchain)
}

/// Everything needed to build egress-agent (and so the embedded eBPF object).
pub fn setup_build() -> Result<EbpfToolchain> {
    let toolchain = pick_ebpf_toolchain()?;
    ensure_rust_src(&toolchain)?;
    ensure_bpf_linker(&toolchain)?;
    Ok(toolchain)
}

/// The nightly toolchain if there is one; otherwise stable with RUSTC_BOOTSTRAP. The eBPF build
/// (`-Z build-std`) and cargo-fuzz (`-Z sanitizer`) both need nightly features.
pub fn pick_ebpf_toolchain() -> Result<EbpfToolchain> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the eBPF toolchain")?;
    if installed.lines().any(|l| l.starts_with("nightly")) {
        return Ok(EbpfToolchain { name: "nightly", needs_bootstrap: false });
    }
    eprintln!("xtask: no nightly toolchain; building eBPF with stable and RUSTC_BOOTSTRAP=1");
    Ok(EbpfToolchain { name: "stable", needs_bootstrap: true })
}

fn ensure_rust_src(toolchain: &EbpfToolchain) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain.name,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the {} toolchain", toolchain.name);
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain.name]))
        .with_context(|| format!("the eBPF build needs rust-src for `{}` (build-std=core)", toolchain.name))
}

/// LLVM facts of the toolchain that compiles the eBPF crate: bpf-linker must link against the
/// very same LLVM, or the bitcode rustc emits may not load.
struct LlvmInfo {
    major: String,
    /// The real shared object in the toolchain sysroot, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    shared_object: PathBuf,
}

fn llvm_info(toolchain: &EbpfToolchain) -> Result<LlvmInfo> {
    let plus = format!("+{}", toolchain.name);
    let version = output(Command::new("rustc").args([plus.as_str(), "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .with_context(|| format!("`rustc {plus} -vV` did not report an LLVM version:\n{version}"))?;
    let major = llvm.split('.').next().unwrap_or(llvm).to_string();
    let sysroot = output(Command::new("rustc").args([plus.as_str(), "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // The sysroot also holds `libLLVM-<major>-rust-...so`, which is a linker script on some
    // toolchains; the versioned `libLLVM.so.<ver>` name is always the real ELF object.
    let shared_object = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    Ok(LlvmInfo { major, shared_object })
}

/// Where the LLVM prefix and the bpf-linker binary live: outside `target/` so `cargo clean`
/// does not force a rebuild, keyed by the LLVM object so a nightly update rebuilds it.
fn tools_dir(llvm: &LlvmInfo) -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    let so_name = llvm.shared_object.file_name().unwrap_or_default().to_string_lossy();
    Ok(Path::new(&home).join(".cache/egressfw").join(so_name.as_ref()))
}

/// Path of the bpf-linker this project builds; put first on PATH for eBPF builds.
pub fn bpf_linker_bin_dir(toolchain: &EbpfToolchain) -> Result<PathBuf> {
    Ok(tools_dir(&llvm_info(toolchain)?)?.join("bin"))
}

fn ensure_bpf_linker(toolchain: &EbpfToolchain) -> Result<()> {
    let llvm = llvm_info(toolchain)?;
    let dir = tools_dir(&llvm)?;
    let linker = dir.join("bin/bpf-linker");
    if linker.exists() && Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    // The recipe: a prefix whose lib/ holds libLLVM.so (for the link step) and the versioned
    // soname (for the loader), both symlinks to the toolchain's own LLVM object.
    let prefix = dir.join("llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let so_name = llvm.shared_object.file_name().expect("found by file name");
    for name in [Path::new("libLLVM.so"), Path::new(so_name)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm.shared_object, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), llvm.shared_object.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker against LLVM {} from {} (about a minute)",
        llvm.major,
        llvm.shared_object.display()
    );
    let feature = format!("llvm-{}", llvm.major);
    let mut cmd = Command::new("cargo");
    cmd.args(["+".to_owned() + toolchain.name])
        .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features", &feature])
        .arg("--root")
        .arg(&dir)
        .env("LLVM_PREFIX", &prefix)
        // The installed binary must find the LLVM object at run time, wherever rustup keeps it.
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib.display()));
    if toolchain.needs_bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    status(&mut cmd).with_context(|| {
        format!("building bpf-linker with LLVM_PREFIX={} (feature {feature})", prefix.display())
    })?;
    let check = Command::new(&linker).arg("--version").output();
    match check {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "{} was built but does not run: {}",
            linker.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!("{} was built but does not run: {e}", linker.display()),
    }
}

/// cargo-fuzz, for `cargo xtask fuzz` and the fuzz step of `cargo xtask test`; installed into
/// `~/.cargo/bin` like any cargo subcommand.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (a few minutes)");
    status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz from crates.io (the fuzz targets need it)")
}

pub(crate) fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(tool, _)| !command_exists(tool))
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

/// Installs Debian packages with apt-get; nothing to do for an empty list.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
    status(Command::new("apt-get").arg("update").arg("-qq"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", packages.join(" ")))
}

pub fn command_exists(tool: &str) -> bool {
    if Path::new(tool).is_absolute() {
        return Path::new(tool).is_file();
    }
    env::var_os("PATH").is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

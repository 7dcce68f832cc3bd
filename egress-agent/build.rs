//! Builds the eBPF crate (egress-ebpf) for bpfel-unknown-none and leaves the object in OUT_DIR,
//! where `src/ebpf/object.rs` embeds it. `cargo xtask` installs the nightly rust-src and the
//! bpf-linker this needs; it also chooses the toolchain through EGRESS_EBPF_TOOLCHAIN.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EGRESS_EBPF_TOOLCHAIN");
    // The programs' build stamp (egress-ebpf/src/stamp.rs): another stamp, another build.
    println!("cargo:rerun-if-env-changed=EGRESSFW_BUILD_STAMP");
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("running `cargo metadata` to find egress-ebpf")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name == "egress-ebpf")
        .ok_or_else(|| anyhow!("package egress-ebpf not found in the workspace"))?;
    let root_dir =
        ebpf.manifest_path.parent().context("egress-ebpf manifest has no parent directory")?.to_string();
    let toolchain_name = std::env::var("EGRESS_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain_name.as_deref() {
        Some(name) => Toolchain::Custom(name),
        None => Toolchain::Nightly,
    };
    // aya-build passes every line the inner cargo prints on stderr on as a `cargo:warning`, so
    // its progress ("Compiling ...", "Finished ...") reads as dozens of warnings. Quiet, it
    // prints only errors and real warnings. (Single-threaded here: nothing else reads the
    // environment while it is set.)
    // SAFETY: the build script has no other threads yet.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package { name: "egress-ebpf", root_dir: &root_dir, ..Default::default() }],
        toolchain,
    )
    .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)")
}

//! `cargo xtask`: everything a newcomer or CI runs, with nothing installed by hand first.

mod bench;
mod cluster;
mod demo;
mod demo_gateway;
mod demo_k8s;
mod e2e;
mod fuzz;
mod kustomize;
mod run;
mod test;
mod toolchain;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "egressfw developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and tests need: nightly rust-src, bpf-linker, Debian packages,
    /// cargo-fuzz.
    Setup,
    /// Build the agent (with its embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Simulated node in network namespaces: what an enforced pod can and cannot reach.
    Demo,
    /// Benchmarks that report ratios measured side by side in one run.
    Bench {
        #[command(subcommand)]
        which: bench::Bench,
    },
    /// Run the fuzz targets (the gateway's readers of client input) for a while each.
    Fuzz(fuzz::FuzzArgs),
    /// Lint, unit tests, fuzzing, BPF_PROG_TEST_RUN tests and network-namespace integration tests.
    Test(test::TestArgs),
    /// The suites on a real single-node Kubernetes (control plane, kubelet, containerd, pods).
    E2e,
    /// A real Kubernetes control plane on this machine (built from the Go modules, cached).
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// The kernel integration suite on Debian's 6.1 and 6.12 kernels (or others), each booted
    /// in qemu.
    Vm(vm::VmArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => toolchain::setup_all().map(|_| ()),
        Command::Build { release } => {
            let tc = toolchain::setup_build()?;
            let path = run::build_agent(&tc, release)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Vm(args) => vm::run(&args),
        Command::E2e => e2e::run(),
        Command::Cluster { command } => cluster::run(&command),
        Command::Demo => demo::run(),
        Command::Bench { which } => bench::run(&which),
    }
}

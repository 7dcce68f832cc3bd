//! `cargo xtask`: everything a newcomer or CI runs, with nothing installed by hand first.

mod run;
mod toolchain;

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
    /// Install what the build and tests need: nightly rust-src, bpf-linker, Debian packages.
    Setup,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => toolchain::setup_all(),
    }
}

use std::{io::IsTerminal as _, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use egress_agent::{
    cgroup, inspect,
    kernel::bpffs::{DEFAULT_PIN_DIR, PinLayout},
    standalone, teardown,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "egressfw: kernel-enforced egress for workloads (eBPF, cgroup v2)")]
struct Cli {
    /// bpffs directory holding the pinned maps and links (mounted if bpffs is absent).
    #[arg(long, global = true, env = "EGRESSFW_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup2 mount point; found in /proc/mounts when not given.
    #[arg(long, global = true, env = "EGRESSFW_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Log format: json (default when stderr is not a terminal) or text.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce the policies of a YAML file on this machine (no Kubernetes).
    Standalone {
        /// Policy file; reloaded on SIGHUP and when it changes.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what is attached and enforced, read from the kernel.
    Inspect {
        #[arg(long)]
        json: bool,
    },
    /// Remove every link and map egressfw pinned: enforcement stops.
    Teardown,
}

fn init_tracing(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let pins = PinLayout::new(cli.pin_dir);
    let cgroup_root = || cli.cgroup_root.clone().map_or_else(cgroup::cgroup2_mount, Ok);
    match cli.command {
        Command::Standalone { config } => {
            let opts = standalone::Options { config, pins, cgroup_root: cgroup_root()? };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(standalone::run(opts))
        }
        Command::Inspect { json } => {
            let report = inspect::collect(&pins, &cgroup_root()?)?;
            if json {
                inspect::print_json(&report)
            } else {
                inspect::print_table(&report);
                Ok(())
            }
        }
        Command::Teardown => teardown::run(&pins),
    }
}

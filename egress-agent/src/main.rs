use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use egress_agent::cni::install::Chained;
use egress_agent::{
    cgroup, cni, gateway, http, inspect, k8s,
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
    /// Kubernetes node agent: enforce the pods of labelled namespaces on this node.
    Run {
        /// Agent configuration (gateways, DNS, extra CIDRs); reloaded when it changes.
        #[arg(long, short, env = "EGRESSFW_CONFIG", default_value = k8s::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// This node's name (from the downward API: spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Address for /healthz, /readyz and /metrics.
        #[arg(long, env = "EGRESSFW_HTTP_ADDR", default_value = http::DEFAULT_HTTP_ADDR)]
        http_addr: SocketAddr,
        /// The kubelet's pods cgroup (relative to the cgroup root); found by name when not given.
        #[arg(long, env = "EGRESSFW_PODS_CGROUP")]
        pods_cgroup: Option<PathBuf>,
        /// Directory shared with the CNI plugin (namespace modes, records of pods' veths).
        #[arg(long, env = "EGRESSFW_CNI_STATE_DIR", default_value = cni::state::DEFAULT_STATE_DIR)]
        cni_state_dir: PathBuf,
        /// The node's CNI configuration directory: when given, the agent keeps the plugin's entry
        /// at the end of the active conflist (network plugins rewrite theirs when they restart).
        #[arg(long, env = "EGRESSFW_CNI_CONF_DIR")]
        cni_conf_dir: Option<PathBuf>,
        /// Address ranges besides the node's own addresses that may read the kernel's
        /// observations and verdicts (`/observations`, `/events`): the control-plane nodes,
        /// whose API server proxies `recommend` and `observe` to the agents.
        #[arg(long, env = "EGRESSFW_OBSERVATION_READERS", value_delimiter = ',')]
        observation_readers: Vec<ipnet::IpNet>,
    },
    /// Enforce the policies of a YAML file on this machine (no Kubernetes).
    Standalone {
        /// Policy file; reloaded on SIGHUP and when it changes.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Egress gateway proxy: CONNECT/HTTP proxy, SNI passthrough, TCP forwards and TLS
    /// origination, allowlisted per source namespace; one JSON access-log line per connection
    /// or request on stdout.
    Gateway {
        /// Gateway configuration (listeners, rules, sources); reloaded when it changes or on SIGHUP.
        #[arg(long, short, env = "EGRESSFW_GATEWAY_CONFIG", default_value = gateway::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Worker threads, each serving its own copy of every listener (default: one per CPU
        /// this process may use).
        #[arg(long, env = "EGRESSFW_GATEWAY_THREADS")]
        threads: Option<usize>,
        /// Access-log lines that may wait for stdout; when it does not keep up, further lines
        /// are dropped and counted rather than holding up connections.
        #[arg(long, env = "EGRESSFW_GATEWAY_ACCESS_LOG_QUEUE", default_value_t = gateway::access_log::DEFAULT_QUEUE_LINES)]
        access_log_queue: usize,
    },
    /// Install the CNI plugin that gates new pods' veths: the binary as `egressfw` in the CNI
    /// bin directory, and its entry at the end of the active conflist (DaemonSet init container).
    CniInstall {
        #[arg(long, default_value = cni::install::DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        #[arg(long, default_value = cni::install::DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// The state directory as the plugin sees it on the node.
        #[arg(long, env = "EGRESSFW_CNI_STATE_DIR", default_value = cni::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The pin directory as the plugin sees it on the node (default: --pin-dir).
        #[arg(long)]
        node_pin_dir: Option<PathBuf>,
    },
    /// Show what is attached and enforced, read from the kernel.
    Inspect {
        #[arg(long)]
        json: bool,
    },
    /// Print the CustomResourceDefinitions of egressfw's policy resources (the YAML shipped in
    /// deploy/base/crds/).
    Crds,
    /// How the gateway would decide a connection from a namespace, step by step, by the policy
    /// resources (ClusterEgressPolicy, EgressPolicy) and optionally its configuration file.
    /// Exit status 0: allowed; 2: denied; 1: the question could not be answered.
    Explain {
        /// The client's namespace.
        #[arg(long)]
        namespace: String,
        /// The name or address the client asks for (CONNECT, SNI, Host).
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// The client pod: its labels count (read from the API, or from the files).
        #[arg(long)]
        pod: Option<String>,
        /// A pod label, `key=value`, added to the pod's (or alone); repeat for more.
        #[arg(long = "pod-label")]
        pod_labels: Vec<String>,
        /// How the connection reaches the gateway: Connect, TlsPassthrough, TlsOrigination or
        /// TcpForward.
        #[arg(long, default_value = "Connect")]
        via: String,
        /// The gateway's configuration file: its rules decide first, as in the gateway.
        #[arg(long)]
        gateway_config: Option<PathBuf>,
        /// YAML files with the objects (ClusterEgressPolicy, EgressPolicy, Namespace, Pod;
        /// `kubectl get -o yaml` lists too); default: the cluster of the kubeconfig.
        #[arg(long = "file", short = 'f')]
        files: Vec<PathBuf>,
    },
    /// An EgressPolicy for a namespace from what its workloads were seen reaching through the
    /// gateway (every replica's /observations), with the evidence for each rule as comments;
    /// destinations seen by address only, and those the Admin tier decides anyway, are listed
    /// after it.
    Recommend(gateway::recommend_cli::Options),
    /// What a proposed policy change would do to the traffic a namespace was seen sending:
    /// every observed flow decided with the objects as they are and with the proposal, the
    /// changes first, and proposed rules nothing uses. Exit status 0: nothing seen would be
    /// newly denied; 2: something would; 1: the question could not be answered.
    Diff(gateway::diff_cli::Options),
    /// Per pod, the kernel's verdicts and the gateway's decisions in one stream ordered by time
    /// (every node agent's and gateway replica's /events); --follow keeps reading.
    Observe(egress_agent::observe::Options),
    /// Remove every link and map egressfw pinned, and the CNI plugin's conflist entry:
    /// enforcement stops.
    Teardown {
        /// The node's CNI configuration directory, as this process sees it: the plugin's entry
        /// is taken out of its conflists first.
        #[arg(long, default_value = cni::install::DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
    },
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
    // Run by the container runtime as the `egressfw` CNI plugin: its own protocol, no CLI.
    if cni::plugin::invoked_as_plugin() {
        std::process::exit(cni::plugin::main());
    }
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let pins = PinLayout::new(cli.pin_dir);
    let cgroup_root = || cli.cgroup_root.as_deref().map_or_else(cgroup::cgroup2_mount, cgroup::cgroup2_at);
    match cli.command {
        Command::Run {
            config,
            node_name,
            http_addr,
            pods_cgroup,
            cni_state_dir,
            cni_conf_dir,
            observation_readers,
        } => {
            let opts = k8s::run::Options {
                config,
                node_name,
                http_addr,
                pins,
                cgroup_root: cgroup_root()?,
                pods_cgroup,
                cni_state: cni::state::StateDir::new(cni_state_dir),
                cni_conf_dir,
                observation_readers,
            };
            // Multi-threaded: the watches, the event reader and the HTTP server must keep going
            // while a reconcile pass makes its (blocking) map and link syscalls.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(k8s::run::run(opts))
        }
        Command::Standalone { config } => {
            let opts = standalone::Options { config, pins, cgroup_root: cgroup_root()? };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(standalone::run(opts))
        }
        Command::Gateway { config, threads, access_log_queue } => {
            // Control only (signals, reloads, admin): connections are served on worker threads.
            let threads = threads.unwrap_or_else(gateway::workers::default_count).max(1);
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(
                gateway::server::run(gateway::server::Options { config, threads, access_log_queue }),
            )
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
        Command::CniInstall { bin_dir, conf_dir, state_dir, node_pin_dir } => {
            if cni::install::install_binary(&bin_dir)? {
                println!("installed the plugin as {}", bin_dir.join(cni::install::PLUGIN_TYPE).display());
            }
            let placement =
                cni::install::Placement { conf_dir, pin_dir: node_pin_dir.unwrap_or(pins.root), state_dir };
            match cni::install::ensure_chained(&placement)? {
                Chained::Updated(path) => println!("chained egressfw at the end of {}", path.display()),
                Chained::Already(path) => println!("egressfw is already chained in {}", path.display()),
                Chained::NoConfiguration => println!(
                    "no CNI network configuration in {} yet: the node agent chains egressfw when the network plugin installs one",
                    placement.conf_dir.display()
                ),
            }
            Ok(())
        }
        Command::Teardown { cni_conf_dir } => teardown::run(&pins, &cni_conf_dir),
        Command::Explain { namespace, host, port, pod, pod_labels, via, gateway_config, files } => {
            let question =
                gateway::explain::Question { namespace, host, port, pod, pod_labels, via, gateway_config };
            if !gateway::explain::run(&question, &files)? {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Recommend(options) => gateway::recommend_cli::run(&options),
        Command::Observe(options) => egress_agent::observe::run(&options),
        Command::Diff(options) => {
            if gateway::diff_cli::run(&options)? {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Crds => {
            print!("{}", egress_agent::crd::manifest()?);
            Ok(())
        }
    }
}

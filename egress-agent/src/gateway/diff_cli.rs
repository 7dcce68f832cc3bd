//! `egress-agent diff`: what it reads (`observed`, and the proposed objects) and what it
//! prints (see `diff`). Exit status 0: nothing seen would be newly denied; 2: something would
//! (for CI gates); 1: the question could not be answered.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{
    diff::{Objects, applied, diff, table},
    explain,
    observed::{Observed, SourceArgs},
    policy::Policy,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct Options {
    /// The namespace whose traffic is replayed.
    #[arg(long)]
    pub namespace: String,
    /// The proposed objects (EgressPolicy, ClusterEgressPolicy), applied over the current ones
    /// (same kind, namespace and name replaced); repeat for more files.
    #[arg(long = "file", short = 'f', required = true)]
    pub proposed: Vec<PathBuf>,
    /// The gateway's configuration file: its rules decide first, as in the gateway.
    #[arg(long)]
    pub gateway_config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub sources: SourceArgs,
}

/// Whether anything seen would be newly denied.
pub fn run(options: &Options) -> Result<bool> {
    let observed = Observed::load(&options.sources, &options.namespace)?;
    let mut proposed = explain::Objects::from_files(&options.proposed)?;
    if proposed.cluster.is_empty() && proposed.namespaced.is_empty() {
        bail!("no EgressPolicy or ClusterEgressPolicy in the proposed files");
    }
    // An EgressPolicy without a namespace is the one `kubectl apply -n <namespace>` would make.
    for p in &mut proposed.namespaced {
        p.metadata.namespace.get_or_insert_with(|| options.namespace.clone());
    }
    let file =
        options.gateway_config.as_deref().map(Policy::from_config_file).transpose()?.unwrap_or_default();
    let current = &observed.objects;
    let cluster = applied(&current.cluster, &proposed.cluster);
    let namespaced = applied(&current.namespaced, &proposed.namespaced);
    let d = diff(
        &observed.observations(),
        &options.namespace,
        &file,
        &Objects { cluster: &current.cluster, namespaced: &current.namespaced },
        &Objects { cluster: &cluster, namespaced: &namespaced },
        &observed.namespace_labels(&options.namespace),
        &observed.workload_labels(&options.namespace),
    );
    if !d.refused.is_empty() {
        bail!(
            "the gateway would refuse objects of the proposal (it keeps their last good generation, or leaves them out):\n  {}",
            d.refused.join("\n  ")
        );
    }
    let labels = observed.namespace_labels(&options.namespace);
    let audit = labels.get(crate::k8s::desired::LABEL_MODE).is_some_and(|m| m == "audit");
    let mode = if audit {
        format!(
            "# Namespace {} is in audit mode: what CURRENT denies goes through today, reported; it is refused once it enforces.\n",
            options.namespace
        )
    } else {
        String::new()
    };
    match options.output {
        Output::Table => print!("{}{mode}{}", observed.header(), table(&d)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
    }
    Ok(d.newly_denied > 0)
}

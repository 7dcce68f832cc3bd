//! `egress-agent recommend`: what it reads (`observed`) and what it prints (see `recommend` for
//! the recommendation itself).

use std::time::SystemTime;

use anyhow::Result;

use super::{
    observed::{Observed, SourceArgs},
    recommend::{Ask, flows, left_out, recommend},
    recommend_direct::{direct_flows, section},
};

#[derive(clap::Args)]
pub struct Options {
    /// The namespace to write the policy for.
    #[arg(long)]
    pub namespace: String,
    /// Only what was seen within this long (`7d`, `12h`); default: all the gateways kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// The recommended object's name.
    #[arg(long, default_value = "recommended")]
    pub name: String,
    /// Distinct names seen under one registrable domain that make a `*.domain` wildcard.
    #[arg(long, default_value_t = super::recommend::DEFAULT_WILDCARD_AT)]
    pub wildcard_at: usize,
    #[command(flatten)]
    pub sources: SourceArgs,
}

pub fn run(options: &Options) -> Result<()> {
    let observed = Observed::load(&options.sources, &options.namespace)?;
    let ask = Ask {
        namespace: &options.namespace,
        since: options.since.and_then(|d| SystemTime::now().checked_sub(d)),
        wildcard_at: options.wildcard_at,
        name: &options.name,
    };
    let flows = flows(&observed.observations(), &ask);
    let direct = direct_flows(&observed.kernel(), &options.namespace, ask.since);
    let seen = flows.len();
    let labels = observed.namespace_labels(&options.namespace);
    let mut r = recommend(flows, &ask, &observed.objects.cluster, &observed.objects.namespaced, &labels);
    if !observed.objects_known {
        // Without the Admin tier every rule would look undelegated: say nothing rather than that.
        r.outside_bounds.clear();
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    print!(
        "# egress-agent recommend --namespace {}: {seen} destination{} seen, {} rule{}; review before applying.\n{}{}{}{}",
        options.namespace,
        plural(seen),
        r.rules,
        plural(r.rules),
        observed.header(),
        r.yaml,
        left_out(&r),
        section(&direct)
    );
    if r.rules == 0 {
        println!("# Nothing to recommend: no destination by name was seen for this namespace.");
    }
    Ok(())
}

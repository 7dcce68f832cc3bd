//! `egress-agent recommend`: where the observations and the policy objects come from, and what
//! is printed (see `recommend` for the recommendation itself).
//!
//! Observations: by default from every gateway replica through the API server (the pods'
//! admin port, by the API server's pod proxy: `get` on `pods/proxy` in the gateway's
//! namespace); or from admin endpoints named with `--from`; or from files saved from
//! `/observations` (`-f`). The policy objects (for what the Admin tier decides and delegates)
//! come from the cluster by default, from `--policy-file` otherwise; without either they are
//! left out, and the output says so.

use std::{path::PathBuf, time::SystemTime};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt as _, api::ListParams};

use super::{
    explain::Objects,
    observations::Snapshot,
    recommend::{Ask, flows, left_out, recommend},
    tiers,
};

#[derive(clap::Args)]
pub struct Options {
    /// The namespace to write the policy for.
    #[arg(long)]
    pub namespace: String,
    /// Only what was seen within this long (`7d`, `12h`); default: all the gateways kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// A gateway's admin endpoint (`http://host:9809`) to read instead of the cluster's gateway
    /// pods; repeat for more.
    #[arg(long)]
    pub from: Vec<String>,
    /// A saved /observations answer to read instead; repeat for more.
    #[arg(long = "file", short = 'f')]
    pub files: Vec<PathBuf>,
    /// YAML files with the policy objects and the namespace (as explain -f takes them);
    /// default: the cluster, when the observations come from it.
    #[arg(long = "policy-file")]
    pub policy_files: Vec<PathBuf>,
    /// The recommended object's name.
    #[arg(long, default_value = "recommended")]
    pub name: String,
    /// Distinct names seen under one registrable domain that make a `*.domain` wildcard.
    #[arg(long, default_value_t = super::recommend::DEFAULT_WILDCARD_AT)]
    pub wildcard_at: usize,
    #[arg(long, default_value = "egressfw-system")]
    pub gateway_namespace: String,
    #[arg(long, default_value = "app.kubernetes.io/name=egress-gateway")]
    pub gateway_selector: String,
    #[arg(long, default_value_t = 9809)]
    pub admin_port: u16,
}

/// Where the observations came from, for the output's header.
struct Source {
    name: String,
    snapshot: Snapshot,
}

pub fn run(options: &Options) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let from_cluster = options.from.is_empty() && options.files.is_empty();
    let client = if from_cluster || options.policy_files.is_empty() {
        runtime.block_on(kube::Client::try_default()).ok()
    } else {
        None
    };
    let sources = if from_cluster {
        let client = client.clone().context(
            "no Kubernetes API to read the gateways from (kubeconfig or in-cluster); name admin endpoints with --from or files with -f",
        )?;
        runtime.block_on(from_gateways(&client, options))?
    } else {
        let mut sources = Vec::new();
        for url in &options.from {
            let snapshot = runtime.block_on(fetch(url, &options.namespace))?;
            sources.push(Source { name: url.clone(), snapshot });
        }
        for path in &options.files {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let snapshot = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an /observations answer", path.display()))?;
            sources.push(Source { name: path.display().to_string(), snapshot });
        }
        sources
    };
    let (objects, policies_from) = if !options.policy_files.is_empty() {
        (Objects::from_files(&options.policy_files)?, "the files given with --policy-file".to_owned())
    } else if let (true, Some(client)) = (from_cluster, &client) {
        (
            runtime.block_on(Objects::from_client(client.clone(), None, &options.namespace))?,
            "the cluster".to_owned(),
        )
    } else {
        (Objects::default(), "nowhere: the Admin tier is not taken into account (--policy-file)".to_owned())
    };
    print!("{}", render(options, &sources, &objects, &policies_from));
    Ok(())
}

fn render(options: &Options, sources: &[Source], objects: &Objects, policies_from: &str) -> String {
    let ask = Ask {
        namespace: &options.namespace,
        since: options.since.and_then(|d| SystemTime::now().checked_sub(d)),
        wildcard_at: options.wildcard_at,
        name: &options.name,
    };
    let observations: Vec<_> = sources.iter().flat_map(|s| s.snapshot.observations.iter().cloned()).collect();
    let labels = objects
        .namespaces
        .iter()
        .find(|n| n.name_any() == options.namespace)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let labels = tiers::namespace_labels(labels, &options.namespace);
    let flows = flows(&observations, &ask);
    let seen = flows.len();
    let r = recommend(flows, &ask, &objects.cluster, &objects.namespaced, &labels);
    let mut out = format!(
        "# egress-agent recommend --namespace {}: {seen} destination{} seen, {} rule{}; review before applying.\n",
        options.namespace,
        if seen == 1 { "" } else { "s" },
        r.rules,
        if r.rules == 1 { "" } else { "s" },
    );
    for s in sources {
        let evicted = match s.snapshot.evicted {
            0 => String::new(),
            n => format!("; {n} older entries were forgotten (limits.maxObservations)"),
        };
        out.push_str(&format!(
            "# Observed by {} since {} (kept in memory only){evicted}.\n",
            s.name, s.snapshot.since
        ));
    }
    out.push_str(&format!("# Policy objects from {policies_from}.\n"));
    out.push_str(&r.yaml);
    out.push_str(&left_out(&r));
    if r.rules == 0 {
        out.push_str("# Nothing to recommend: no destination by name was seen for this namespace.\n");
    }
    out
}

/// Every Running gateway pod's observations, through the API server's pod proxy.
async fn from_gateways(client: &kube::Client, options: &Options) -> Result<Vec<Source>> {
    let pods = Api::<Pod>::namespaced(client.clone(), &options.gateway_namespace)
        .list(&ListParams::default().labels(&options.gateway_selector))
        .await
        .with_context(|| format!("listing the gateway's pods in {}", options.gateway_namespace))?;
    let running: Vec<Pod> = pods
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    if running.is_empty() {
        bail!(
            "no running gateway pod in namespace {} with labels {}",
            options.gateway_namespace,
            options.gateway_selector
        );
    }
    let mut sources = Vec::new();
    for pod in running {
        let name = pod.name_any();
        let path = format!(
            "/api/v1/namespaces/{}/pods/{name}:{}/proxy/observations?namespace={}",
            options.gateway_namespace, options.admin_port, options.namespace
        );
        let request = http::Request::get(&path).body(Vec::new())?;
        let text = client.request_text(request).await.with_context(|| {
            format!("reading {name}'s observations (get on pods/proxy in {})", options.gateway_namespace)
        })?;
        let snapshot =
            serde_json::from_str(&text).with_context(|| format!("{name}: not an /observations answer"))?;
        sources.push(Source { name: format!("gateway pod {name}"), snapshot });
    }
    Ok(sources)
}

/// `GET <url>/observations?namespace=N` on an admin endpoint (plain HTTP).
async fn fetch(url: &str, namespace: &str) -> Result<Snapshot> {
    let base = url.strip_prefix("http://").with_context(|| format!("--from {url}: want http://host:port"))?;
    let authority = base.trim_end_matches('/');
    let stream =
        tokio::net::TcpStream::connect(authority).await.with_context(|| format!("connecting to {url}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(format!("/observations?namespace={namespace}"))
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{url}/observations answered {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("{url}/observations: not an /observations answer"))
}

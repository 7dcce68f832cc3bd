//! What `recommend` and `diff` read: the gateway replicas' observations, the node agents' (what
//! the kernel refused or audited: traffic that went elsewhere than the gateway) and the policy
//! objects.
//!
//! Observations: by default from every running gateway and agent pod through the API server
//! (the pod's admin port, by the API server's pod proxy: `get` on `pods/proxy` in their
//! namespace); or from endpoints named with `--from` (a gateway's or an agent's); or from saved
//! `/observations` answers (`--observations`). The policy objects, the namespace and its pods (for the
//! workloads' labels) come from the cluster when the observations do, from `--policy-file`
//! otherwise; without either they are left out, and the output says so.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt as _, api::ListParams};

use serde::Deserialize;

use super::{
    explain::Objects,
    observations::Observation,
    pod_index::workload_of,
    tiers::{self, Labels},
};
use crate::kernel_observations::KernelObservation;

#[derive(clap::Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    /// A saved /observations answer to read instead; repeat for more.
    #[arg(long = "observations")]
    pub observation_files: Vec<PathBuf>,
    /// YAML files with the policy objects, the namespace and its pods (as explain -f takes
    /// them); default: the cluster, when the observations come from it.
    #[arg(long = "policy-file")]
    pub policy_files: Vec<PathBuf>,
}

/// The gateways and agents to read: the cluster's pods, or endpoints named with `--from`.
#[derive(clap::Args)]
pub struct Endpoints {
    /// A gateway's admin endpoint (`http://host:9809`) or an agent's (`http://node:9808`) to
    /// read instead of the cluster's pods; repeat for more.
    #[arg(long)]
    pub from: Vec<String>,
    #[arg(long, default_value = "egressfw-system")]
    pub gateway_namespace: String,
    #[arg(long, default_value = "app.kubernetes.io/name=egress-gateway")]
    pub gateway_selector: String,
    #[arg(long, default_value_t = 9809)]
    pub admin_port: u16,
    #[arg(long, default_value = "egressfw-system")]
    pub agent_namespace: String,
    #[arg(long, default_value = "app.kubernetes.io/name=egress-agent")]
    pub agent_selector: String,
    #[arg(long, default_value_t = 9808)]
    pub agent_port: u16,
}

/// An `/observations` answer: a gateway's (`observations`) or a node agent's (`kernel`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub since: String,
    #[serde(default)]
    pub evicted: u64,
    #[serde(default)]
    pub observations: Vec<Observation>,
    #[serde(default)]
    pub kernel: Vec<KernelObservation>,
}

/// One replica's, agent's (or file's) observations, and where they came from.
pub struct Source {
    pub name: String,
    pub snapshot: Answer,
}

pub struct Observed {
    pub sources: Vec<Source>,
    pub objects: Objects,
    /// Where `objects` came from, in words.
    pub policies_from: String,
    /// Whether there were objects to read at all (not: none were given).
    pub objects_known: bool,
    /// Agents that could not be read, and why.
    pub unread: Vec<String>,
}

impl Observed {
    /// Reads everything about `namespace` that `args` point at.
    pub fn load(args: &SourceArgs, namespace: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(Self::load_async(args, namespace))
    }

    async fn load_async(args: &SourceArgs, namespace: &str) -> Result<Self> {
        let from_cluster = args.endpoints.from.is_empty() && args.observation_files.is_empty();
        let mut sources = Vec::new();
        let mut unread = Vec::new();
        let client = if from_cluster {
            let client = kube::Client::try_default().await.context(
                "no Kubernetes API to read the gateways from (kubeconfig or in-cluster); name admin endpoints with --from or saved answers with --observations",
            )?;
            let path = format!("observations?namespace={namespace}");
            for pod in args.endpoints.pods(&client, true).await? {
                let read = async {
                    let text = pod.get(&client, &path).await?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not an /observations answer", pod.describe()))
                };
                match read.await {
                    Ok(snapshot) => sources.push(Source { name: pod.describe(), snapshot }),
                    // Every gateway replica, or the recommendation would miss what one saw.
                    Err(e) if pod.node.is_none() => return Err(e),
                    // An agent out of reach (its node's readers, see kernel_observations) leaves
                    // that node's direct traffic unknown: said, not fatal.
                    Err(e) => {
                        eprintln!("warning: {e:#}");
                        unread.push(format!("{}: {e:#}", pod.describe()));
                    }
                }
            }
            Some(client)
        } else {
            for url in &args.endpoints.from {
                sources.push(Source { name: url.clone(), snapshot: fetch(url, namespace).await? });
            }
            for path in &args.observation_files {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let snapshot = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an /observations answer", path.display()))?;
                sources.push(Source { name: path.display().to_string(), snapshot });
            }
            None
        };
        let (objects, policies_from) = match (&client, args.policy_files.is_empty()) {
            (_, false) => (Objects::from_files(&args.policy_files)?, "the files given with --policy-file".into()),
            (Some(client), true) => {
                let mut objects = Objects::from_client(client.clone(), None, namespace).await?;
                let pods = Api::<Pod>::namespaced(client.clone(), namespace)
                    .list(&ListParams::default())
                    .await
                    .with_context(|| format!("listing the pods of {namespace} (for their labels)"))?;
                objects.pods = pods.items;
                (objects, "the cluster".into())
            }
            (None, true) => (
                Objects::default(),
                "nowhere: the Admin tier and the namespace's policies are not taken into account (--policy-file)"
                    .into(),
            ),
        };
        let objects_known = client.is_some() || !args.policy_files.is_empty();
        Ok(Self { sources, objects, policies_from, objects_known, unread })
    }

    /// Every replica's observations, one after the other.
    pub fn observations(&self) -> Vec<Observation> {
        self.sources.iter().flat_map(|s| s.snapshot.observations.iter().cloned()).collect()
    }

    /// Every agent's observations of the kernel, one after the other.
    pub fn kernel(&self) -> Vec<KernelObservation> {
        self.sources.iter().flat_map(|s| s.snapshot.kernel.iter().cloned()).collect()
    }

    /// The namespace's labels as selectors see them.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let labels = self
            .objects
            .namespaces
            .iter()
            .find(|n| n.name_any() == namespace)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        tiers::namespace_labels(labels, namespace)
    }

    /// The pod labels of each workload of `namespace` (one pod's; a workload's pods share its
    /// template's labels), as observations name workloads.
    pub fn workload_labels(&self, namespace: &str) -> BTreeMap<String, Labels> {
        let mut labels = BTreeMap::new();
        for pod in self.objects.pods.iter().filter(|p| p.namespace().as_deref() == Some(namespace)) {
            labels.entry(workload_of(pod)).or_insert_with(|| pod.labels().clone());
        }
        labels
    }

    /// Comment lines saying where everything came from.
    pub fn header(&self) -> String {
        let mut out = String::new();
        for s in &self.sources {
            let evicted = match s.snapshot.evicted {
                0 => String::new(),
                1 => "; 1 older entry was forgotten (the table is bounded)".to_owned(),
                n => format!("; {n} older entries were forgotten (the table is bounded)"),
            };
            out.push_str(&format!(
                "# Observed by {} since {} (kept in memory only){evicted}.\n",
                s.name, s.snapshot.since
            ));
        }
        for why in &self.unread {
            let why = crate::printable::printable(why);
            out.push_str(&format!("# NOT READ (what the kernel saw on its node is missing): {why}\n"));
        }
        out.push_str(&format!("# Policy objects from {}.\n", self.policies_from));
        out
    }
}

impl Endpoints {
    /// Every running gateway pod (at least one when `need_gateway`, or an error), then every
    /// running agent pod (none when no agent runs: a gateway without the node enforcement).
    pub async fn pods(&self, client: &kube::Client, need_gateway: bool) -> Result<Vec<PodEndpoint>> {
        let gateways = running_pods(client, &self.gateway_namespace, &self.gateway_selector).await?;
        if gateways.is_empty() && need_gateway {
            bail!(
                "no running gateway pod in namespace {} with labels {}",
                self.gateway_namespace,
                self.gateway_selector
            );
        }
        let agents = running_pods(client, &self.agent_namespace, &self.agent_selector).await?;
        let gateways = gateways.into_iter().map(|pod| PodEndpoint {
            namespace: self.gateway_namespace.clone(),
            name: pod.name_any(),
            port: self.admin_port,
            node: None,
        });
        let agents = agents.into_iter().map(|pod| PodEndpoint {
            namespace: self.agent_namespace.clone(),
            name: pod.name_any(),
            port: self.agent_port,
            node: Some(pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()),
        });
        Ok(gateways.chain(agents).collect())
    }
}

/// A gateway or agent pod, read through the API server's pod proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// The node, for an agent.
    pub node: Option<String>,
}

impl PodEndpoint {
    pub fn describe(&self) -> String {
        match &self.node {
            Some(node) => format!("agent pod {} (node {node})", self.name),
            None => format!("gateway pod {}", self.name),
        }
    }

    /// `GET path` on the pod's port, through the API server's pod proxy.
    pub async fn get(&self, client: &kube::Client, path: &str) -> Result<String> {
        let uri =
            format!("/api/v1/namespaces/{}/pods/{}:{}/proxy/{path}", self.namespace, self.name, self.port);
        let request = http::Request::get(&uri).body(Vec::new())?;
        client.request_text(request).await.with_context(|| {
            format!("reading {}:{}/{path} (get on pods/proxy in {})", self.name, self.port, self.namespace)
        })
    }
}

/// The running pods of `namespace` that `selector` selects.
async fn running_pods(client: &kube::Client, namespace: &str, selector: &str) -> Result<Vec<Pod>> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .with_context(|| format!("listing the pods in {namespace} with labels {selector}"))?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect())
}

/// `GET <url>/observations?namespace=N` on an admin endpoint (plain HTTP).
async fn fetch(url: &str, namespace: &str) -> Result<Answer> {
    let body = get(url, &format!("/observations?namespace={namespace}")).await?;
    serde_json::from_str(&body).with_context(|| format!("{url}/observations: not an /observations answer"))
}

/// `GET <url><path>` (plain HTTP), the body when the answer is a success.
pub(crate) async fn get(url: &str, path: &str) -> Result<String> {
    let base = url.strip_prefix("http://").with_context(|| format!("--from {url}: want http://host:port"))?;
    let authority = base.trim_end_matches('/');
    let stream =
        tokio::net::TcpStream::connect(authority).await.with_context(|| format!("connecting to {url}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request =
        http::Request::get(path).header(http::header::HOST, authority).body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{url}{path} answered {status}: {}", String::from_utf8_lossy(&body).trim_end());
    }
    String::from_utf8(body.to_vec()).with_context(|| format!("{url}{path}: not UTF-8"))
}

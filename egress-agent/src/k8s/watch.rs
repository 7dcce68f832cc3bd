//! Reflectors over what the policy depends on: namespaces, the pods on this node, and the
//! gateway and DNS Services with their EndpointSlices. Every change (and every relist after a
//! watch restart or a 410 Gone) is signalled on one channel with the instant it arrived, so the
//! agent can measure the time from a watch event to the kernel map write.
//!
//! The stores keep their last state through API outages: the watchers retry with backoff and the
//! agent keeps enforcing what it knows.

use std::{pin::pin, time::Instant};

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinSet};

use super::{config::AgentConfig, watch_health::WatchHealth};

/// Why the agent should reconcile, and since when.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    /// A watched object changed (or a relist completed).
    Watch(Instant),
    /// A pod cgroup appeared or went away.
    Cgroup(Instant),
}

/// Read handles on every reflector store.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
    pub services: Vec<Store<Service>>,
    pub slices: Vec<Store<EndpointSlice>>,
    /// Which watches are failing (see `watch_health`).
    pub health: WatchHealth,
}

impl Stores {
    /// Resolves once every store has completed its first list.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.namespaces.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        for s in &self.services {
            s.wait_until_ready().await?;
        }
        for s in &self.slices {
            s.wait_until_ready().await?;
        }
        Ok(())
    }
}

/// Starts the reflectors on `tasks`. Dropping (or aborting) the tasks stops them.
pub fn start(
    client: &Client,
    node_name: &str,
    config: &AgentConfig,
    tx: &mpsc::UnboundedSender<Trigger>,
    tasks: &mut JoinSet<()>,
) -> Stores {
    let health = WatchHealth::default();
    let namespaces =
        reflect(&health, Api::<Namespace>::all(client.clone()), watcher::Config::default(), tx, tasks);
    let pods = reflect(
        &health,
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        tx,
        tasks,
    );
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for svc in config.services().filter(|s| seen.insert((*s).clone())) {
        services.push(reflect(
            &health,
            Api::<Service>::namespaced(client.clone(), &svc.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", svc.name)),
            tx,
            tasks,
        ));
        slices.push(reflect(
            &health,
            Api::<EndpointSlice>::namespaced(client.clone(), &svc.namespace),
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", svc.name)),
            tx,
            tasks,
        ));
    }
    Stores { namespaces, pods, services, slices, health }
}

fn reflect<K>(
    health: &WatchHealth,
    api: Api<K>,
    config: watcher::Config,
    tx: &mpsc::UnboundedSender<Trigger>,
    tasks: &mut JoinSet<()>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    // What this watch covers, for readiness: the kind, and where (all namespaces or one).
    let watch = format!("{kind} watch in {}", api.namespace().unwrap_or("all namespaces"));
    let (tx, health) = (tx.clone(), health.clone());
    tasks.spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        let mut stream = pin!(stream.map_err(|e| e.to_string()));
        while let Some(item) = stream.next().await {
            match item {
                // Objects of an initial list are held back by the store until the list is done.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    if tx.send(Trigger::Watch(Instant::now())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        kind,
                        error = e,
                        "watch failed; retrying with backoff, enforcement unchanged"
                    );
                    health.failed(&watch, &e);
                    // A pass re-evaluates readiness with the failure.
                    if tx.send(Trigger::Watch(Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    reader
}

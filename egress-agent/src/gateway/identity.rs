//! Who a client is: its source address mapped to a namespace. Pod IPs come from a cluster-wide
//! pod watch (exact match, the newest running pod owning a reused address: see `pod_index`); a
//! static CIDR table covers standalone use and fixed ranges. Pod IPs win over the table, and the
//! table's most specific CIDR wins within it.

use std::{
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::{
    ip_literal,
    pod_index::{Owner, PodIndex},
};

#[derive(Default)]
pub struct Identities {
    /// Sorted by prefix length, longest first.
    table: RwLock<Vec<(IpNet, Arc<str>)>>,
    pods: RwLock<PodIndex>,
    /// False until the pod watch (if any) has listed everything once.
    synced: AtomicBool,
}

impl Identities {
    pub fn new(table: Vec<(IpNet, String)>, watches_pods: bool) -> Self {
        let ids = Self { synced: AtomicBool::new(!watches_pods), ..Self::default() };
        ids.set_table(table);
        ids
    }

    /// Replaces the static table (configuration reload).
    pub fn set_table(&self, mut table: Vec<(IpNet, String)>) {
        table.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        if let Ok(mut t) = self.table.write() {
            *t = table.into_iter().map(|(net, ns)| (net, Arc::from(ns))).collect();
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Whether `client` may read what every namespace reaches (the admin endpoint's
    /// `/observations` and `/events`): not a workload (a pod's address, whatever its state:
    /// a terminating pod still runs; a static source's range), and not before the pods are
    /// known. Why not, otherwise.
    pub fn may_read_observations(&self, client: IpAddr) -> Result<(), String> {
        if !self.synced() {
            return Err(
                "the gateway has not listed the pods yet: it cannot tell a workload from a reader".into()
            );
        }
        if let Some(owner) = self.identify(client) {
            return Err(format!(
                "{client} is a workload of namespace {}: workloads may not read the gateway's observations",
                owner.namespace
            ));
        }
        let ip = ip_literal::normalize(client);
        // A poisoned lock still holds the pods (a writer panicked): read them, never wave through.
        if self.pods.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_pod_address(ip) {
            return Err(format!(
                "{client} is a pod's address: workloads may not read the gateway's observations"
            ));
        }
        Ok(())
    }

    /// Who a client address is: its pod's namespace and labels, or a table entry's namespace
    /// (no labels). IPv4-mapped sources (dual-stack listeners) are looked up as the IPv4 they
    /// carry.
    pub fn identify(&self, source: IpAddr) -> Option<Owner> {
        let ip = ip_literal::normalize(source);
        if let Some(owner) = self.pods.read().ok().and_then(|m| m.owner_of(ip).cloned()) {
            return Some(owner);
        }
        let table = self.table.read().ok()?;
        let namespace = table.iter().find(|(net, _)| net.contains(&ip)).map(|(_, ns)| ns.clone())?;
        Some(Owner::namespace_only(namespace))
    }

    /// The namespace of a client address (see [`Self::identify`]).
    pub fn namespace_of(&self, source: IpAddr) -> Option<Arc<str>> {
        self.identify(source).map(|o| o.namespace)
    }

    fn replace_pods(&self, pods: PodIndex) {
        if let Ok(mut m) = self.pods.write() {
            *m = pods;
        }
    }

    /// Keeps the pod table current until the stream ends (it does not: the watcher retries with
    /// backoff). A relist builds a fresh table and swaps it in whole.
    pub async fn watch_pods(self: Arc<Self>, client: Client) {
        let api: Api<Pod> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut relist: Option<PodIndex> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relist = Some(PodIndex::default()),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(m) = relist.as_mut() {
                        m.apply(&pod);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(m) = relist.take() {
                        tracing::info!(pod_ips = m.addresses(), "pod identities listed");
                        self.replace_pods(m);
                    }
                    self.synced.store(true, Ordering::Release);
                }
                Ok(watcher::Event::Apply(pod)) => {
                    if let Ok(mut m) = self.pods.write() {
                        m.apply(&pod);
                    }
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Ok(mut m) = self.pods.write() {
                        m.delete(&pod);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pod watch (client identities) failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn most_specific_cidr_and_mapped_sources() {
        let ids = Identities::new(
            vec![
                ("10.0.0.0/8".parse().unwrap(), "wide".into()),
                ("10.1.0.0/16".parse().unwrap(), "narrow".into()),
            ],
            false,
        );
        assert!(ids.synced());
        assert_eq!(ids.namespace_of(ip("10.1.2.3")).as_deref(), Some("narrow"));
        assert_eq!(ids.namespace_of(ip("::ffff:10.1.2.3")).as_deref(), Some("narrow"));
        assert_eq!(ids.namespace_of(ip("10.2.0.1")).as_deref(), Some("wide"));
        assert_eq!(ids.namespace_of(ip("192.168.0.1")), None);
    }

    #[test]
    fn pods_win_over_the_table_and_leave() {
        let ids = Identities::new(vec![("10.0.0.0/8".parse().unwrap(), "wide".into())], true);
        assert!(!ids.synced());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "team-a", "name": "p"},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.9.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let mut m = PodIndex::default();
        m.apply(&pod);
        ids.replace_pods(m);
        assert_eq!(ids.namespace_of(ip("10.9.0.1")).as_deref(), Some("team-a"));
        assert_eq!(ids.namespace_of(ip("::ffff:10.9.0.1")).as_deref(), Some("team-a"));
        assert_eq!(ids.namespace_of(ip("fd00::1")).as_deref(), Some("team-a"));
        ids.replace_pods(PodIndex::default());
        assert_eq!(ids.namespace_of(ip("10.9.0.1")).as_deref(), Some("wide"));
    }
}

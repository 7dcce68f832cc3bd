//! Who a client is: its source address mapped to a namespace. Pod IPs come from a cluster-wide
//! pod watch (exact match); a static CIDR table covers standalone use and fixed ranges. Pod IPs
//! win over the table, and the table's most specific CIDR wins within it.

use std::{
    collections::HashMap,
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

use super::ip_literal;

#[derive(Default)]
pub struct Identities {
    /// Sorted by prefix length, longest first.
    table: RwLock<Vec<(IpNet, String)>>,
    pods: RwLock<HashMap<IpAddr, PodIdentity>>,
    /// False until the pod watch (if any) has listed everything once.
    synced: AtomicBool,
}

#[derive(Clone, Debug)]
struct PodIdentity {
    namespace: String,
    /// `namespace/name`, to drop the right entry when a pod goes and its IP is reused.
    key: String,
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
            *t = table;
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The namespace of a client address; IPv4-mapped sources (dual-stack listeners) are
    /// looked up as the IPv4 they carry.
    pub fn namespace_of(&self, source: IpAddr) -> Option<String> {
        let ip = ip_literal::normalize(source);
        if let Some(p) = self.pods.read().ok().and_then(|m| m.get(&ip).cloned()) {
            return Some(p.namespace);
        }
        let table = self.table.read().ok()?;
        table.iter().find(|(net, _)| net.contains(&ip)).map(|(_, ns)| ns.clone())
    }

    fn replace_pods(&self, pods: HashMap<IpAddr, PodIdentity>) {
        if let Ok(mut m) = self.pods.write() {
            *m = pods;
        }
    }

    fn apply_pod(&self, pod: &Pod, into: &mut HashMap<IpAddr, PodIdentity>) {
        let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
            return;
        };
        let key = format!("{ns}/{name}");
        into.retain(|_, p| p.key != key);
        // hostNetwork pods carry the node's address, shared with everything on the node: it
        // identifies no namespace. Finished pods no longer own their IP.
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if host_network || matches!(phase, Some("Succeeded" | "Failed")) {
            return;
        }
        let ips = pod.status.as_ref().and_then(|s| s.pod_ips.as_ref()).into_iter().flatten();
        for ip in ips.filter_map(|p| p.ip.parse::<IpAddr>().ok()) {
            into.insert(ip, PodIdentity { namespace: ns.to_owned(), key: key.clone() });
        }
    }

    fn delete_pod(&self, pod: &Pod) {
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        if let Ok(mut m) = self.pods.write() {
            m.retain(|_, p| p.key != key);
        }
    }

    /// Keeps the pod table current until the stream ends (it does not: the watcher retries with
    /// backoff). A relist builds a fresh table and swaps it in whole.
    pub async fn watch_pods(self: Arc<Self>, client: Client) {
        let api: Api<Pod> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut relist: Option<HashMap<IpAddr, PodIdentity>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let Some(m) = relist.as_mut() {
                        self.apply_pod(&pod, m);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(m) = relist.take() {
                        tracing::info!(pod_ips = m.len(), "pod identities listed");
                        self.replace_pods(m);
                    }
                    self.synced.store(true, Ordering::Release);
                }
                Ok(watcher::Event::Apply(pod)) => {
                    if let Ok(mut m) = self.pods.write() {
                        self.apply_pod(&pod, &mut m);
                    }
                }
                Ok(watcher::Event::Delete(pod)) => self.delete_pod(&pod),
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
    fn pods_win_and_leave() {
        let ids = Identities::new(vec![("10.0.0.0/8".parse().unwrap(), "wide".into())], true);
        assert!(!ids.synced());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "team-a", "name": "p"},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.9.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let mut m = HashMap::new();
        ids.apply_pod(&pod, &mut m);
        ids.replace_pods(m);
        assert_eq!(ids.namespace_of(ip("10.9.0.1")).as_deref(), Some("team-a"));
        assert_eq!(ids.namespace_of(ip("fd00::1")).as_deref(), Some("team-a"));
        ids.delete_pod(&pod);
        assert_eq!(ids.namespace_of(ip("10.9.0.1")).as_deref(), Some("wide"));
        let host: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "kube-system", "name": "h"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.9.0.2"}]}
        }))
        .unwrap();
        let mut m = HashMap::new();
        ids.apply_pod(&host, &mut m);
        assert!(m.is_empty(), "hostNetwork pods identify no namespace");
    }
}

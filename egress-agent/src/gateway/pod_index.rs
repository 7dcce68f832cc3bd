//! Which pod owns a client address, from the pod watch's events. Pod IPs are reused: a new pod
//! can get an address while the old one is still terminating, and watch events about the two
//! can arrive in any order. So identities are keyed by pod, each address keeps the set of pods
//! that claim it, and the newest running claimant owns it. A pod that stops running
//! (Succeeded, Failed) or is terminating (deletionTimestamp) claims nothing; when the owner
//! goes, an older pod that still runs there owns the address again.
//!
//! Each event touches only that pod's entry and its own addresses (no scan of every pod).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};

use super::ip_literal;

#[derive(Default)]
pub struct PodIndex {
    /// `namespace/name` -> what the pod claims.
    pods: HashMap<String, Claim>,
    /// Address -> the pods that claim it (one, except while an address is being reused).
    owners: HashMap<IpAddr, Vec<Claimant>>,
    /// Every pod's addresses, terminating and finished pods' too (not hostNetwork pods': the
    /// node's), and how many pods have each: who may not read the observations, which is more
    /// than who a policy applies to.
    present: HashMap<String, Vec<IpAddr>>,
    present_ips: HashMap<IpAddr, u32>,
}

struct Claim {
    /// Shared with every connection from the pod (no copy per connection).
    owner: Owner,
    ips: Vec<IpAddr>,
}

/// Who a pod is, as the policies see it.
#[derive(Clone, Debug)]
pub struct Owner {
    pub namespace: Arc<str>,
    /// The pod's labels (`EgressPolicy.podSelector`, a `ClusterEgressPolicy`'s `subject.pods`).
    pub labels: Arc<BTreeMap<String, String>>,
    /// What runs the pod, as `Kind/name` (`Deployment/web`, `StatefulSet/db`, `Pod/debug` for a
    /// bare pod): what `observations` counts by, so a recommendation names workloads, not pods
    /// that come and go.
    pub workload: Arc<str>,
    pub service_account: Arc<str>,
    /// The pod's name (`-` for a static source): what `observe` shows.
    pub pod: Arc<str>,
}

impl Owner {
    /// A client known by its address only (a static source): its namespace and nothing else.
    pub fn namespace_only(namespace: Arc<str>) -> Self {
        let unknown: Arc<str> = Arc::from("-");
        Self {
            namespace,
            labels: Arc::default(),
            workload: unknown.clone(),
            service_account: unknown.clone(),
            pod: unknown,
        }
    }
}

/// The newest claimant wins: by creation time, then by key so the choice is stable.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    created: Option<Time>,
    key: String,
}

impl PodIndex {
    /// An ADDED or MODIFIED pod: replaces whatever the pod claimed before.
    pub fn apply(&mut self, pod: &Pod) {
        let Some(key) = key_of(pod) else { return };
        self.remove(&key);
        self.forget_present(&key);
        if !pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
            let ips = pod_ips(pod);
            for ip in &ips {
                *self.present_ips.entry(*ip).or_default() += 1;
            }
            self.present.insert(key.clone(), ips);
        }
        let Some((namespace, ips)) = claim_of(pod) else { return };
        let claimant = Claimant { created: created_at(pod), key: key.clone() };
        for ip in &ips {
            self.owners.entry(*ip).or_default().push(claimant.clone());
        }
        let labels = Arc::new(pod.metadata.labels.clone().unwrap_or_default());
        let service_account =
            pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default").into();
        let name = pod.metadata.name.as_deref().unwrap_or_default().into();
        let owner = Owner {
            namespace: namespace.into(),
            labels,
            workload: workload_of(pod).into(),
            service_account,
            pod: name,
        };
        self.pods.insert(key, Claim { owner, ips });
    }

    /// A DELETED pod.
    pub fn delete(&mut self, pod: &Pod) {
        if let Some(key) = key_of(pod) {
            self.remove(&key);
            self.forget_present(&key);
        }
    }

    /// Whether `ip` is any pod's address, whatever the pod's state.
    pub fn is_pod_address(&self, ip: IpAddr) -> bool {
        self.present_ips.contains_key(&ip)
    }

    fn forget_present(&mut self, key: &str) {
        for ip in self.present.remove(key).unwrap_or_default() {
            if let Some(n) = self.present_ips.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.present_ips.remove(&ip);
                }
            }
        }
    }

    /// The pod that owns `ip` (already normalised), if any.
    pub fn owner_of(&self, ip: IpAddr) -> Option<&Owner> {
        let owner = self.owners.get(&ip)?.iter().max()?;
        self.pods.get(&owner.key).map(|c| &c.owner)
    }

    #[cfg(test)]
    fn namespace_of(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.owner_of(ip).map(|o| &o.namespace)
    }

    /// Addresses with an owner.
    pub fn addresses(&self) -> usize {
        self.owners.len()
    }

    fn remove(&mut self, key: &str) {
        let Some(old) = self.pods.remove(key) else { return };
        for ip in old.ips {
            if let Some(claimants) = self.owners.get_mut(&ip) {
                claimants.retain(|c| c.key != key);
                if claimants.is_empty() {
                    self.owners.remove(&ip);
                }
            }
        }
    }
}

fn key_of(pod: &Pod) -> Option<String> {
    let m = &pod.metadata;
    Some(format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?))
}

/// The namespace and addresses a pod claims, or `None` when it claims none.
fn claim_of(pod: &Pod) -> Option<(String, Vec<IpAddr>)> {
    // hostNetwork pods carry the node's address, shared with everything on the node: it
    // identifies no namespace. Finished and terminating pods no longer own their IP: the
    // address may already belong to a new pod.
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let status = pod.status.as_ref()?;
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if host_network || finished || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some((pod.metadata.namespace.clone()?, pod_ips(pod)))
}

/// The pod's addresses (status.podIPs), normalised, each once.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .iter()
        .flat_map(|s| s.pod_ips.iter().flatten())
        .filter_map(|p| p.ip.parse::<IpAddr>().ok())
        .map(ip_literal::normalize)
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// The workload that runs `pod`: its controller, and for a ReplicaSet that a Deployment made
/// (its name is the Deployment's, `-`, the pod-template hash), the Deployment.
///
/// The API server checks an owner reference's kind and name only for being there: a pod's
/// author can write any text into them, and this text is printed into `recommend`'s YAML and
/// kept per destination. Only a kind that is a word and a name that is a DNS subdomain (what
/// every real controller's is) are taken; otherwise the pod is named by itself.
pub(crate) fn workload_of(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let plausible = |o: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
        o.controller == Some(true) && is_kind(&o.kind) && is_subdomain(&o.name)
    };
    let Some(controller) = pod.metadata.owner_references.iter().flatten().find(plausible) else {
        return format!("Pod/{name}");
    };
    let hash = pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
    match (controller.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => match controller.name.strip_suffix(&format!("-{hash}")) {
            Some(deployment) => format!("Deployment/{deployment}"),
            None => format!("ReplicaSet/{}", controller.name),
        },
        (kind, _) => format!("{kind}/{}", controller.name),
    }
}

/// A Kubernetes kind: a letter, then letters and digits, at most 63.
fn is_kind(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A DNS subdomain (RFC 1123), as object names are: at most 253 of `a-z0-9.-`, starting and
/// ending with a letter or digit.
fn is_subdomain(s: &str) -> bool {
    let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.starts_with(edge)
        && s.ends_with(edge)
        && s.chars().all(|c| edge(c) || c == '-' || c == '.')
}

/// When the pod was created (its start time if the API left that out).
fn created_at(pod: &Pod) -> Option<Time> {
    pod.metadata.creation_timestamp.clone().or_else(|| pod.status.as_ref()?.start_time.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_counted_under_the_workload_that_runs_it() {
        let pod = |owner: serde_json::Value, hash: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "a", "name": "web-7d9f8-x2x", "ownerReferences": owner,
                             "labels": hash.map(|h| serde_json::json!({"pod-template-hash": h}))},
            }))
            .unwrap()
        };
        let controller = |kind: &str, name: &str| serde_json::json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}]);
        assert_eq!(workload_of(&pod(controller("ReplicaSet", "web-7d9f8"), Some("7d9f8"))), "Deployment/web");
        // What no controller's reference looks like: the pod is named by itself.
        for (kind, name) in [
            ("ReplicaSet", "web\n---\nkind: ClusterRoleBinding"),
            ("Job\u{1b}[2J", "x"),
            ("Job", &"a".repeat(254)),
            ("Job", "Upper"),
            ("", "x"),
        ] {
            assert_eq!(
                workload_of(&pod(controller(kind, name), None)),
                "Pod/web-7d9f8-x2x",
                "{kind:?} {name:?}"
            );
        }
        assert_eq!(
            workload_of(&pod(controller("ReplicaSet", "web-other"), Some("7d9f8"))),
            "ReplicaSet/web-other"
        );
        assert_eq!(workload_of(&pod(controller("StatefulSet", "db"), None)), "StatefulSet/db");
        assert_eq!(workload_of(&pod(serde_json::json!([]), None)), "Pod/web-7d9f8-x2x");
    }

    fn pod(ns: &str, name: &str, ip: &str, created: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn with(mut p: Pod, edit: impl FnOnce(&mut serde_json::Value)) -> Pod {
        let mut v = serde_json::to_value(&p).unwrap();
        edit(&mut v);
        p = serde_json::from_value(v).unwrap();
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_newest_running_pod_owns_a_reused_address() {
        let mut idx = PodIndex::default();
        let old = pod("a", "old", "10.0.0.1", "2024-01-01T00:00:00Z");
        let new = pod("b", "new", "10.0.0.1", "2024-02-01T00:00:00Z");
        // Newer first, then a late update of the older pod: the newer one still owns it.
        idx.apply(&new);
        idx.apply(&old);
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), Some("b"));
        // The newer one goes: the older one, still running, owns the address again.
        idx.delete(&new);
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), Some("a"));
        idx.apply(&new);
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), Some("b"));
        // A newer pod that finishes gives the address back too.
        idx.apply(&with(new.clone(), |v| v["status"]["phase"] = "Succeeded".into()));
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), Some("a"));
        // A terminating pod owns nothing.
        idx.apply(&with(old, |v| v["metadata"]["deletionTimestamp"] = "2024-03-01T00:00:00Z".into()));
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), None);
        assert_eq!(idx.addresses(), 0);
    }

    #[test]
    fn a_terminating_pod_is_no_client_but_still_a_pod() {
        let mut idx = PodIndex::default();
        let p = pod("a", "p", "10.0.0.1", "2024-01-01T00:00:00Z");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        idx.apply(&with(p.clone(), |v| v["metadata"]["deletionTimestamp"] = "2024-03-01T00:00:00Z".into()));
        assert!(idx.owner_of(ip).is_none(), "policies no longer apply to it");
        assert!(idx.is_pod_address(ip), "it still runs: it may not read the observations");
        idx.delete(&p);
        assert!(!idx.is_pod_address(ip));
        let host = with(pod("kube-system", "h", "10.9.0.2", "2024-01-01T00:00:00Z"), |v| {
            v["spec"] = serde_json::json!({"hostNetwork": true, "containers": []});
        });
        idx.apply(&host);
        assert!(!idx.is_pod_address("10.9.0.2".parse().unwrap()), "the node's address is no pod's");
    }

    #[test]
    fn a_pod_that_changes_address_leaves_the_old_one() {
        let mut idx = PodIndex::default();
        let p = pod("a", "p", "10.0.0.1", "2024-01-01T00:00:00Z");
        idx.apply(&p);
        idx.apply(&with(p, |v| {
            v["status"]["podIPs"] = serde_json::json!([{"ip": "10.0.0.2"}, {"ip": "fd00::2"}])
        }));
        assert_eq!(idx.namespace_of(ip("10.0.0.1")).map(|n| &**n), None);
        assert_eq!(idx.namespace_of(ip("10.0.0.2")).map(|n| &**n), Some("a"));
        assert_eq!(idx.namespace_of(ip("fd00::2")).map(|n| &**n), Some("a"));
    }

    #[test]
    fn host_network_pods_identify_no_namespace() {
        let mut idx = PodIndex::default();
        let host = with(pod("kube-system", "h", "10.9.0.2", "2024-01-01T00:00:00Z"), |v| {
            v["spec"] = serde_json::json!({"hostNetwork": true, "containers": []});
        });
        idx.apply(&host);
        assert_eq!(idx.namespace_of(ip("10.9.0.2")).map(|n| &**n), None);
    }
}

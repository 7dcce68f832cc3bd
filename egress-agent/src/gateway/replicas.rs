//! Who the gateway's replicas are, so the policies' `Programmed` condition can say how many of
//! them apply a generation.
//!
//! A replica knows itself from the downward API (`POD_NAME`, `POD_NAMESPACE` in
//! deploy/base/gateway/deployment.yaml) and its peers from a watch on the pods of its own
//! namespace: the pods that carry all of its own labels (the pod-template hash aside, so the
//! old and new pods of a rollout are peers). No selector is configured, so relabelling the
//! Deployment (kustomize `labels:`) cannot make the count wrong.
//!
//! - Serving: the peers that are Ready and not terminating, this replica among them by the
//!   same rule (so all replicas count the same set).
//! - The first serving replica by name writes the shared conditions; every replica writes its
//!   own entry.
//! - Existing: every pod the namespace still has; a replica's entry in a policy's status whose
//!   pod is gone is removed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::reflector::{ObjectRef, Store},
};

use super::resources::{Events, reflect};

/// The label the Deployment's controller adds per revision: old and new pods differ in it.
const REVISION_LABEL: &str = "pod-template-hash";

/// This replica's pod, from the downward API: `None` outside a pod (standalone, tests, the
/// benchmarks), where the gateway reports no `Programmed`.
pub fn own_pod() -> Option<(String, String)> {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    Some((var("POD_NAMESPACE")?, var("POD_NAME")?))
}

pub struct Replicas {
    /// This replica's pod name.
    pub me: String,
    namespace: String,
    pods: Store<Pod>,
}

impl Replicas {
    /// Watches the pods of `namespace`; the events say when the peers change.
    pub(super) fn watch(client: Client, namespace: &str, me: String) -> (Self, Events) {
        let (pods, events) = reflect(Api::<Pod>::namespaced(client, namespace));
        (Self { me, namespace: namespace.to_owned(), pods }, events)
    }

    /// Waits until the pods have been listed once (before that, every peer looks gone).
    pub async fn listed(&self) {
        // The writer lives as long as the watch, which never ends.
        let _ = self.pods.wait_until_ready().await;
    }

    /// The serving replicas' names, sorted: this one too only once its own pod is Ready, by the
    /// same rule as the others, so every replica counts the same set.
    pub fn serving(&self) -> Vec<String> {
        let names: BTreeSet<String> =
            self.peers().into_iter().filter(|p| serving(p)).map(|p| p.name_any()).collect();
        names.into_iter().collect()
    }

    /// Whether this replica writes the conditions everyone shares: the first serving replica
    /// by name. One writer, so replicas whose views differ for a moment (a rollout, a lagging
    /// watch) cannot write against each other; the others write only their own entry.
    pub fn writes_conditions(&self, serving: &[String]) -> bool {
        serving.first() == Some(&self.me)
    }

    /// Whether the API still has a pod of this name in the namespace (whatever its labels: an
    /// entry is removed only once its pod is gone, never because the peers' labels differ).
    pub fn exists(&self, name: &str) -> bool {
        name == self.me || self.pods.get(&ObjectRef::new(name).within(&self.namespace)).is_some()
    }

    fn peers(&self) -> Vec<std::sync::Arc<Pod>> {
        let Some(own) = self.pods.get(&ObjectRef::new(&self.me).within(&self.namespace)) else {
            return Vec::new();
        };
        let wanted = identity_labels(&own);
        self.pods.state_filter(|p| {
            let labels = p.labels();
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
    }
}

/// A pod's labels that every replica of the gateway shares.
fn identity_labels(pod: &Pod) -> BTreeMap<String, String> {
    let mut labels = pod.labels().clone();
    labels.remove(REVISION_LABEL);
    labels
}

/// Ready and not on its way out.
fn serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, hash: &str, ready: bool, terminating: bool) -> Pod {
        let mut pod: Pod = serde_yaml::from_str(&format!(
            r"
metadata:
  name: {name}
  namespace: egressfw-system
  labels: {{app.kubernetes.io/name: egress-gateway, pod-template-hash: '{hash}'}}
status:
  conditions: [{{type: Ready, status: '{}'}}]
",
            if ready { "True" } else { "False" }
        ))
        .unwrap();
        if terminating {
            pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        }
        pod
    }

    fn replicas(me: &str, pods: Vec<Pod>) -> Replicas {
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        for p in pods {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(p));
        }
        Replicas { me: me.into(), namespace: "egressfw-system".into(), pods: store }
    }

    #[test]
    fn peers_share_the_replicas_labels_across_revisions_and_count_only_when_serving() {
        let mut agent = pod("egress-agent-x", "1", true, false);
        agent.metadata.labels =
            Some([("app.kubernetes.io/name".to_owned(), "egress-agent".to_owned())].into());
        let r = replicas(
            "gw-a",
            vec![
                pod("gw-a", "1", false, false),
                pod("gw-b", "1", true, false),
                pod("gw-new", "2", true, false),
                pod("gw-starting", "2", false, false),
                pod("gw-old", "1", true, true),
                agent,
            ],
        );
        // A peer of another revision; not itself before its own Ready, not the one starting,
        // the one terminating, nor another workload of the namespace.
        assert_eq!(r.serving(), ["gw-b", "gw-new"]);
        assert!(r.writes_conditions(&["gw-a".into(), "gw-b".into()]));
        assert!(!r.writes_conditions(&r.serving()), "gw-b writes while gw-a is not serving");
        // Entries go only with their pods.
        assert!(r.exists("gw-old") && r.exists("gw-starting") && r.exists("egress-agent-x"));
        assert!(!r.exists("gw-gone"));
    }

    #[test]
    fn before_its_own_pod_is_seen_a_replica_counts_no_one_and_writes_nothing_shared() {
        let r = replicas("gw-a", vec![pod("gw-b", "1", true, false)]);
        assert!(r.serving().is_empty());
        assert!(!r.writes_conditions(&r.serving()));
        assert!(r.exists("gw-a") && r.exists("gw-b"));
    }
}

//! The policy resources as the gateway keeps them: `ClusterEgressPolicy` and `EgressPolicy`
//! objects and the namespaces' labels, each watched through a kube-rs reflector, compiled into
//! [`Tiers`] and swapped in whole, so a connection decides by one consistent set.
//!
//! - Nothing applies until both kinds of policy have been listed once: a half-listed set could
//!   miss the Admin Deny that outranks an Accept already seen. Until then the gateway file's
//!   rules decide alone (never more than they allow), and readiness waits.
//! - An object that cannot be compiled keeps its last good generation in force (a Deny must
//!   not vanish because someone broke its YAML); one never good takes no part. Either way it is
//!   logged, with the reason.
//! - A change applies to new decisions as soon as its watch event arrives; open tunnels keep
//!   the decision they were made with.
//! - Each object's status says whether its generation is applied, by how many replicas, and,
//!   for a namespace's policy, which rules the Admin tier keeps from taking effect
//!   (`policy_status`, written by `status_writer` after every change, namespace labels and
//!   replicas included).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::{FutureExt as _, Stream, StreamExt as _, stream};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use prometheus_client::metrics::gauge::Gauge;

use super::{
    replicas::{self, Replicas},
    status_writer::StatusWriter,
    tiers::{self, Labels, Rejection, Tiers},
};
use crate::crd::{ClusterEgressPolicy, EgressPolicy};

const NAMESPACE: &str = "Namespace";
const CLUSTER: &str = "ClusterEgressPolicy";
const NAMESPACED: &str = "EgressPolicy";
/// The pods of the gateway's own namespace, where its replicas are (`replicas`).
const POD: &str = "Pod";

/// The kind's name, as log fields and refusals say it.
pub(super) fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Namespace" => NAMESPACE,
        "ClusterEgressPolicy" => CLUSTER,
        "Pod" => POD,
        _ => NAMESPACED,
    }
}

#[derive(Default)]
pub struct Resources {
    tiers: RwLock<Arc<Tiers>>,
    rejected: RwLock<Vec<Rejection>>,
    namespaces: RwLock<Option<Store<Namespace>>>,
    synced: AtomicBool,
    /// The generation of each object (by uid) that this replica applies.
    applied: RwLock<HashMap<String, i64>>,
    /// Something changed that the objects' status may have to say (see `status_writer`).
    pub(super) status_due: tokio::sync::Notify,
    pub gauges: PolicyGauges,
}

/// The resources' state as metrics (registered with the gateway's others): what alerts watch.
#[derive(Clone, Debug, Default)]
pub struct PolicyGauges {
    /// Objects this replica refuses (their last good generation, if any, stays in force).
    pub refused: Gauge,
    /// 1 once the resources are listed and applied (0: decisions do not take them into account).
    pub synced: Gauge,
}

impl Resources {
    /// `watched`: false when the gateway does not watch the resources (standalone, or
    /// `policyResources: false`): it is synced from the start, with no policies.
    pub fn new(watched: bool) -> Self {
        let resources = Self { synced: AtomicBool::new(!watched), ..Self::default() };
        resources.gauges.synced.set(i64::from(!watched));
        resources
    }

    pub fn tiers(&self) -> Arc<Tiers> {
        self.tiers.read().map(|t| t.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The objects that take no part (or only with their last good generation), and why.
    pub fn rejected(&self) -> Vec<Rejection> {
        self.rejected.read().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The generation of the object with this uid that this replica applies, if any.
    pub fn applied(&self, uid: &str) -> Option<i64> {
        self.applied.read().ok()?.get(uid).copied()
    }

    /// A namespace's labels; the name label alone for a namespace the API does not have.
    pub fn namespace_labels(&self, namespace: &str) -> Arc<Labels> {
        let found = self.namespaces.read().ok().and_then(|s| {
            let ns = s.as_ref()?.get(&ObjectRef::new(namespace))?;
            Some(ns.metadata.labels.clone().unwrap_or_default())
        });
        Arc::new(tiers::namespace_labels(found.unwrap_or_default(), namespace))
    }

    /// Keeps the policies and namespace labels current until the streams end (they do not: the
    /// watchers retry with backoff, logging why).
    pub async fn watch(self: Arc<Self>, client: Client) {
        let (namespaces, namespace_events) = reflect(Api::<Namespace>::all(client.clone()));
        let (cluster, cluster_events) = reflect(Api::<ClusterEgressPolicy>::all(client.clone()));
        let (namespaced, namespaced_events) = reflect(Api::<EgressPolicy>::all(client.clone()));
        if let Ok(mut n) = self.namespaces.write() {
            *n = Some(namespaces);
        }
        let mut streams = vec![namespace_events, cluster_events, namespaced_events];
        let replicas = match replicas::own_pod() {
            Some((namespace, me)) => {
                let (replicas, pod_events) = Replicas::watch(client.clone(), &namespace, me);
                streams.push(pod_events);
                Some(Arc::new(replicas))
            }
            None => {
                tracing::info!(
                    "not running in a pod (POD_NAME, POD_NAMESPACE unset): no Programmed condition"
                );
                None
            }
        };
        let writer = StatusWriter { resources: self.clone(), client, replicas };
        tokio::spawn(writer.run(cluster.clone(), namespaced.clone()));
        let mut events = stream::select_all(streams);
        let mut listed = BTreeSet::new();
        let mut last_good = LastGood::default();
        while let Some(first) = events.next().await {
            // Take whatever else has already arrived, then rebuild once.
            let mut batch = vec![first];
            while let Some(Some(more)) = events.next().now_or_never() {
                batch.push(more);
            }
            let (mut changed, mut labels_changed) = (false, false);
            for event in batch {
                match event {
                    // A relist after a lost watch may have changed anything.
                    Seen::Listed(POD) => labels_changed = true,
                    Seen::Listed(kind) => {
                        listed.insert(kind);
                        changed = true;
                    }
                    // Labels are read per decision: a namespace change needs no rebuild, only
                    // another look at the bounds the status reports; a replica coming or going
                    // changes only what Programmed counts.
                    Seen::Changed(NAMESPACE | POD) => labels_changed = true,
                    Seen::Changed(_) => changed = true,
                    Seen::Failed(kind, error) => tracing::warn!(
                        kind,
                        %error,
                        "watching policy resources failed; retrying (are the CRDs in deploy/base/crds installed? \
                         policyResources: false runs without them)"
                    ),
                }
            }
            let all_listed = [NAMESPACE, CLUSTER, NAMESPACED].iter().all(|k| listed.contains(k));
            if !all_listed {
                continue;
            }
            if changed {
                self.rebuild(&cluster, &namespaced, &mut last_good);
                self.gauges.synced.set(1);
                if !self.synced.swap(true, Ordering::AcqRel) {
                    tracing::info!("policy resources listed; applying them");
                }
            }
            if changed || labels_changed {
                self.status_due.notify_one();
            }
        }
    }

    fn rebuild(
        &self,
        cluster: &Store<ClusterEgressPolicy>,
        namespaced: &Store<EgressPolicy>,
        last: &mut LastGood,
    ) {
        // A status write changes no generation: nothing to rebuild for it.
        let generations = generations(&cluster.state(), &namespaced.state());
        if last.generations.as_ref() == Some(&generations) {
            return;
        }
        last.generations = Some(generations);
        let mut rejected = Vec::new();
        let cluster = usable(cluster.state(), &mut last.cluster, Tiers::check_cluster, &mut rejected);
        let namespaced =
            usable(namespaced.state(), &mut last.namespaced, Tiers::check_namespaced, &mut rejected);
        let (tiers, never_good) = Tiers::build(&cluster, &namespaced);
        debug_assert!(never_good.is_empty(), "only checked objects are built: {never_good:?}");
        let previous = self.rejected();
        for r in rejected.iter().filter(|r| !previous.contains(r)) {
            tracing::warn!(object = %r.object, reason = %r.reason, "policy refused");
        }
        tracing::info!(
            cluster_policies = cluster.len(),
            namespace_policies = namespaced.len(),
            refused = rejected.len(),
            "policy resources applied"
        );
        let applied = cluster
            .iter()
            .map(|o| o.meta())
            .chain(namespaced.iter().map(|o| o.meta()))
            .map(|m| (m.uid.clone().unwrap_or_default(), m.generation.unwrap_or_default()))
            .collect();
        if let Ok(mut t) = self.tiers.write() {
            *t = Arc::new(tiers);
        }
        if let Ok(mut a) = self.applied.write() {
            *a = applied;
        }
        self.gauges.refused.set(i64::try_from(rejected.len()).unwrap_or(i64::MAX));
        if let Ok(mut r) = self.rejected.write() {
            *r = rejected;
        }
    }
}

/// What a watch stream said, by the kind it watches.
pub(super) enum Seen {
    Listed(&'static str),
    Changed(&'static str),
    Failed(&'static str, String),
}

pub(super) type Events = std::pin::Pin<Box<dyn Stream<Item = Seen> + Send>>;

/// A reflector over every object of a kind: its store, and what happened to it.
pub(super) fn reflect<K>(api: Api<K>) -> (Store<K>, Events)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = kind_of::<K>();
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |e| {
            std::future::ready(match e {
                Ok(watcher::Event::InitDone) => Some(Seen::Listed(kind)),
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some(Seen::Changed(kind)),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => Some(Seen::Failed(kind, e.to_string())),
            })
        })
        .boxed();
    (store, events)
}

/// The last generation of each object that compiled, by uid, and the generations the tiers in
/// force were built from.
#[derive(Default)]
struct LastGood {
    cluster: HashMap<String, ClusterEgressPolicy>,
    namespaced: HashMap<String, EgressPolicy>,
    generations: Option<BTreeSet<(String, i64)>>,
}

/// Every object's uid and generation.
fn generations(
    cluster: &[Arc<ClusterEgressPolicy>],
    namespaced: &[Arc<EgressPolicy>],
) -> BTreeSet<(String, i64)> {
    let of =
        |m: &kube::core::ObjectMeta| (m.uid.clone().unwrap_or_default(), m.generation.unwrap_or_default());
    cluster.iter().map(|o| of(o.meta())).chain(namespaced.iter().map(|o| of(o.meta()))).collect()
}

/// The objects to build from: each as it is now if it compiles, else its last good generation
/// (if it had one); refusals are noted either way. Objects gone from the API are forgotten.
fn usable<K: Resource<DynamicType = ()> + Clone>(
    current: Vec<Arc<K>>,
    last: &mut HashMap<String, K>,
    check: fn(&K) -> Result<(), String>,
    rejected: &mut Vec<Rejection>,
) -> Vec<K> {
    let mut kept = HashMap::with_capacity(current.len());
    for object in current {
        let uid = object.uid().unwrap_or_else(|| format!("{:?}/{}", object.namespace(), object.name_any()));
        let name = match object.namespace() {
            Some(ns) => format!("{}/{ns}/{}", kind_of::<K>(), object.name_any()),
            None => format!("{}/{}", kind_of::<K>(), object.name_any()),
        };
        match check(&object) {
            Ok(()) => {
                kept.insert(uid, (*object).clone());
            }
            Err(reason) => {
                let generation = object.meta().generation.unwrap_or_default();
                let reason = match last.remove(&uid) {
                    Some(good) => {
                        let kept_generation = good.meta().generation.unwrap_or_default();
                        kept.insert(uid, good);
                        format!(
                            "{reason} (generation {generation}; generation {kept_generation} stays in force)"
                        )
                    }
                    None => format!("{reason} (generation {generation}; not applied)"),
                };
                rejected.push(Rejection { object: name, reason });
            }
        }
    }
    *last = kept;
    let mut objects: Vec<K> = last.values().cloned().collect();
    // A stable order, so the log and the build do not depend on the map's.
    objects.sort_by_key(|o| (o.namespace(), o.name_any()));
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ClusterEgressPolicy` with this uid and generation; `operator` in its subject
    /// (`Near` cannot be evaluated, so the object cannot be used).
    fn object(uid: &str, generation: i64, operator: &str) -> Arc<ClusterEgressPolicy> {
        let mut o: ClusterEgressPolicy = serde_yaml::from_str(&format!(
            r"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {{name: {uid}}}
spec:
  tier: Admin
  priority: 10
  subject: {{namespaces: {{matchExpressions: [{{key: team, operator: {operator}, values: [a]}}]}}}}
  egress:
    - {{name: paste, action: Deny, to: [{{domainNames: [pastebin.com]}}]}}
"
        ))
        .unwrap();
        o.metadata.uid = Some(uid.into());
        o.metadata.generation = Some(generation);
        Arc::new(o)
    }

    fn step(
        current: Vec<Arc<ClusterEgressPolicy>>,
        last: &mut HashMap<String, ClusterEgressPolicy>,
    ) -> (Vec<(String, i64)>, Vec<String>) {
        let mut rejected = Vec::new();
        let used = usable(current, last, Tiers::check_cluster, &mut rejected);
        let used = used.iter().map(|o| (o.name_any(), o.metadata.generation.unwrap())).collect();
        (used, rejected.into_iter().map(|r| format!("{}: {}", r.object, r.reason)).collect())
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_generation_and_a_never_good_object_takes_no_part() {
        let mut last = HashMap::new();
        let (used, rejected) = step(vec![object("deny", 1, "In")], &mut last);
        assert_eq!((used, rejected.len()), (vec![("deny".into(), 1)], 0));

        let (used, rejected) = step(vec![object("deny", 2, "Near"), object("new", 1, "Near")], &mut last);
        assert_eq!(used, vec![("deny".into(), 1)], "generation 1 stays, the never-good one is out");
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[0].starts_with("ClusterEgressPolicy/deny: subject.namespaces: "), "{}", rejected[0]);
        assert!(rejected[0].ends_with("(generation 2; generation 1 stays in force)"), "{}", rejected[0]);
        assert!(rejected[1].ends_with("(generation 1; not applied)"), "{}", rejected[1]);

        // Still broken: still the first generation.
        let (used, _) = step(vec![object("deny", 3, "Near")], &mut last);
        assert_eq!(used, vec![("deny".into(), 1)]);
        // Fixed: the new generation.
        let (used, rejected) = step(vec![object("deny", 4, "In")], &mut last);
        assert_eq!((used, rejected.len()), (vec![("deny".into(), 4)], 0));
        // Deleted: forgotten, and a broken object of the same name later has nothing to fall back on.
        assert_eq!(step(vec![], &mut last).0, vec![]);
        let (used, rejected) = step(vec![object("deny", 1, "Near")], &mut last);
        assert!(used.is_empty());
        assert!(rejected[0].ends_with("not applied)"), "{}", rejected[0]);
    }
}

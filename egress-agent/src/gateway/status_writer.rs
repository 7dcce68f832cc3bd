//! Writes the policies' status (see `policy_status`) after each change, apart from the loop
//! that applies the changes: a thousand status writes must not hold up the next policy (the
//! `policy-apply` benchmark found they did). A change during a pass makes another pass.
//!
//! Per object, in one pass:
//! 1. entries of replicas whose pod is gone are removed (a merge patch that carries the
//!    object's resourceVersion, so it cannot remove an entry written meanwhile);
//! 2. this replica's own entry (`status.replicas`) is applied under its own field manager when
//!    the generation it applies differs from what the entry says;
//! 3. the conditions are applied under the shared field manager when they differ, by one
//!    replica only: the first serving one by name (`Replicas::writes_conditions`), so replicas
//!    whose views differ for a moment never write against each other. Entries of gone pods
//!    are removed by that replica too.
//!
//! A failed write is logged and ends the pass; the next change tries again.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};

use super::{
    policy_status::{FIELD_MANAGER, Finding, replica_field_manager, same_conditions, wanted},
    replicas::Replicas,
    resources::{Resources, kind_of},
};
use crate::crd::{
    ClusterEgressPolicy, EgressPolicy,
    status::{PolicyStatus, ReplicaStatus},
};

/// The two kinds of policy, as the writer reads them.
pub trait WithPolicyStatus:
    Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned
{
    fn policy_status(&self) -> Option<&PolicyStatus>;
}

impl WithPolicyStatus for ClusterEgressPolicy {
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl WithPolicyStatus for EgressPolicy {
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

pub struct StatusWriter {
    pub resources: Arc<Resources>,
    pub client: Client,
    /// `None` outside a pod: no replica entries and no `Programmed`.
    pub replicas: Option<Arc<Replicas>>,
}

/// What one pass knows about every object alike.
struct Pass<'a> {
    refused: HashMap<String, String>,
    /// The serving replicas, when the gateway knows them.
    serving: Option<&'a [String]>,
    /// This replica writes the shared conditions (and removes gone replicas' entries).
    writer: bool,
    now: Timestamp,
}

impl StatusWriter {
    pub async fn run(self, cluster: Store<ClusterEgressPolicy>, namespaced: Store<EgressPolicy>) {
        // Until the replicas' pods are listed every peer looks gone, and its entries would go.
        if let Some(replicas) = &self.replicas {
            replicas.listed().await;
        }
        loop {
            self.resources.status_due.notified().await;
            self.pass(&cluster, &namespaced).await;
        }
    }

    async fn pass(&self, cluster: &Store<ClusterEgressPolicy>, namespaced: &Store<EgressPolicy>) {
        let tiers = self.resources.tiers();
        let serving = self.replicas.as_ref().map(|r| r.serving());
        let writer = match (&self.replicas, &serving) {
            (Some(replicas), Some(serving)) => replicas.writes_conditions(serving),
            _ => true,
        };
        let pass = Pass {
            refused: self.resources.rejected().into_iter().map(|r| (r.object, r.reason)).collect(),
            serving: serving.as_deref(),
            writer,
            // Whole seconds, as the API server keeps them: a status read back then equals the
            // one written, and the next pass leaves it alone.
            now: Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()),
        };
        for object in cluster.state() {
            let api = Api::<ClusterEgressPolicy>::all(self.client.clone());
            let key = format!("{}/{}", kind_of::<ClusterEgressPolicy>(), object.name_any());
            if !self.settle(&pass, api, &object, &key, None).await {
                return;
            }
        }
        for object in namespaced.state() {
            let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
            let outside =
                tiers.outside_bounds(&namespace, &self.resources.namespace_labels(&namespace), &name);
            let api = Api::<EgressPolicy>::namespaced(self.client.clone(), &namespace);
            let key = format!("{}/{namespace}/{name}", kind_of::<EgressPolicy>());
            if !self.settle(&pass, api, &object, &key, Some(&outside)).await {
                return;
            }
        }
    }

    /// Brings one object's status up to date; false when a write failed.
    async fn settle<K: WithPolicyStatus>(
        &self,
        pass: &Pass<'_>,
        api: Api<K>,
        object: &K,
        key: &str,
        outside_bounds: Option<&[String]>,
    ) -> bool {
        let name = object.name_any();
        let current = object.policy_status();
        let entries = current.map(|s| s.replicas.as_slice()).unwrap_or_default();
        let applied = self.resources.applied(&object.uid().unwrap_or_default());
        let mut counted = None;
        if let (Some(replicas), Some(serving)) = (&self.replicas, pass.serving) {
            let kept: Vec<&ReplicaStatus> = entries.iter().filter(|e| replicas.exists(&e.name)).collect();
            if pass.writer && kept.len() < entries.len() {
                remove_gone(&api, &name, object.resource_version(), &kept).await;
            }
            let own = entries.iter().find(|e| e.name == replicas.me).map(|e| e.applied_generation);
            if own != applied && !apply_own_entry(&api, &name, &replicas.me, applied).await {
                return false;
            }
            counted = Some(
                serving
                    .iter()
                    .map(|replica| {
                        let generation = if *replica == replicas.me {
                            applied
                        } else {
                            entries.iter().find(|e| e.name == *replica).map(|e| e.applied_generation)
                        };
                        (replica.clone(), generation)
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let finding = Finding {
            generation: object.meta().generation.unwrap_or_default(),
            refused: pass.refused.get(key).map(String::as_str),
            outside_bounds,
            replicas: counted.as_deref(),
        };
        let status = wanted(&finding, current, &pass.now);
        if !pass.writer || same_conditions(current, &status) {
            return true;
        }
        let body = serde_json::to_value(&status).unwrap_or_default();
        apply_status(&api, &name, FIELD_MANAGER, body).await
    }
}

/// Applies `status` to the object's status subresource under `manager`; false (logged) when
/// that fails.
async fn apply_status<K: WithPolicyStatus>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: serde_json::Value,
) -> bool {
    let kind = kind_of::<K>();
    let body = serde_json::json!({ "apiVersion": K::api_version(&()), "kind": kind, "status": status });
    let params = PatchParams::apply(manager).force();
    match api.patch_status(name, &params, &Patch::Apply(&body)).await {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(kind, name, %error, "writing a policy's status failed (does the gateway's ClusterRole allow patch on its status?)");
            false
        }
    }
}

/// This replica's entry: the generation it applies, or no entry when it applies none (what the
/// replica's field manager no longer applies, the API server removes).
async fn apply_own_entry<K: WithPolicyStatus>(
    api: &Api<K>,
    name: &str,
    me: &str,
    applied: Option<i64>,
) -> bool {
    let status = match applied {
        Some(generation) => serde_json::json!({
            "replicas": [ReplicaStatus { name: me.to_owned(), applied_generation: generation }]
        }),
        None => serde_json::json!({}),
    };
    apply_status(api, name, &replica_field_manager(me), status).await
}

/// Removes the entries of replicas whose pod is gone, keeping `kept`. The resourceVersion makes
/// it fail rather than drop an entry written since the object was read; it is tried again on
/// the next pass.
async fn remove_gone<K: WithPolicyStatus>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<String>,
    kept: &[&ReplicaStatus],
) {
    let body = serde_json::json!({
        "metadata": { "resourceVersion": resource_version },
        "status": { "replicas": kept },
    });
    if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)).await {
        tracing::debug!(kind = kind_of::<K>(), name, %error, "removing gone replicas from a policy's status failed; next pass");
    }
}

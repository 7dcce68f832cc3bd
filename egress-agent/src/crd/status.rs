//! The status both kinds of policy report: standard conditions with the generation they are
//! about (`Accepted`, `Programmed`, `PartiallyEffective`), and the generation each gateway
//! replica applies, from which `Programmed` is counted.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation each gateway replica applies. Each replica writes its own entry (a list
    /// keyed by name, so server-side apply merges the replicas' entries); an entry whose pod is
    /// gone is removed by the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(max = 256))]
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The gateway replica's pod.
    pub name: String,
    /// The generation of this object that replica applies (its last good one, while a later
    /// generation is refused).
    pub applied_generation: i64,
}

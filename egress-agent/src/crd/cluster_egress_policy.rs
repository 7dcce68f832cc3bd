//! `ClusterEgressPolicy`: the platform team's policy, cluster-scoped. Admin-tier rules are
//! evaluated first, by priority: Accept and Deny are final, Pass hands the decision to the
//! namespace's own `EgressPolicy` objects (the delegation: what namespace owners may allow).
//! Baseline-tier rules apply where nothing above decided.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    destination::{Destination, PortSpec},
    status::PolicyStatus,
};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "egressfw.io",
    version = "v1alpha1",
    kind = "ClusterEgressPolicy",
    plural = "clusteregresspolicies",
    shortname = "cegp",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.tier == 'Admin' || self.egress.all(r, r.action != 'Pass')").message("Pass delegates to namespace policies, which come after the Admin tier: it exists only in the Admin tier"))]
pub struct ClusterEgressPolicySpec {
    pub tier: Tier,
    /// Order within the tier: lower first (0 to 1000).
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u16,
    /// Whose egress this is about.
    pub subject: Subject,
    /// The rules, in order; each has a name unique in this policy.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("every rule needs a name of its own in this policy"))]
    pub egress: Vec<ClusterRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Tier {
    /// Before namespace policies: Accept and Deny are final, Pass delegates.
    Admin,
    /// After namespace policies: applies where nothing else decided.
    Baseline,
}

/// The namespaces (and optionally pods in them) a policy is about.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// The namespaces; `{}` selects all.
    pub namespaces: LabelSelector,
    /// Pods within those namespaces; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<LabelSelector>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRule {
    /// Named in status, logs and `egress-agent explain`.
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    pub action: ClusterAction,
    #[schemars(length(min = 1, max = 8))]
    pub to: Vec<Destination>,
    /// Every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ClusterAction {
    Accept,
    Deny,
    Pass,
}

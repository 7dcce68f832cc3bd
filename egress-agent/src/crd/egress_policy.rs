//! `EgressPolicy`: an application team's policy, in its own namespace. Accept only: it can allow
//! what the Admin tier passes to it, never more (rules outside those bounds are reported in
//! status as `PartiallyEffective`, reason `OutsideAdminBounds`).

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
    kind = "EgressPolicy",
    plural = "egresspolicies",
    shortname = "egp",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicySpec {
    /// The pods of this namespace the policy is for; `{}` selects all.
    pub pod_selector: LabelSelector,
    /// The rules; each has a name unique in this policy.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("every rule needs a name of its own in this policy"))]
    pub egress: Vec<NamespaceRule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceRule {
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    pub action: NamespaceAction,
    #[schemars(length(min = 1, max = 8))]
    pub to: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub ports: Option<Vec<PortSpec>>,
    /// How the gateway carries the connection; any way the gateway offers when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
}

/// A namespace policy only accepts: denying is the platform's (Admin tier) and the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NamespaceAction {
    Accept,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Via {
    /// HTTP CONNECT (or plain HTTP) through the proxy port.
    Connect,
    /// TLS passed through by its SNI (also steered connections).
    TlsPassthrough,
    /// The gateway opens TLS to the destination.
    TlsOrigination,
    /// A static TCP forward.
    TcpForward,
}

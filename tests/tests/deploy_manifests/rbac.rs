//! API access: the ClusterRole a workload's ServiceAccount is bound to, and what it grants.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One permission: (apiGroup, resource, verb).
pub(crate) type Grant = (String, String, String);

/// The ClusterRole bound to the ServiceAccount of a workload's pods (`who` names the workload in
/// messages). The account must be in deploy/, named by exactly one ClusterRoleBinding and by no
/// RoleBinding (which would grant more than the role under review).
pub(crate) fn bound_cluster_role<'a>(
    m: &'a Manifests,
    file: &str,
    who: &str,
    namespace: &str,
    pod: &PodSpec,
) -> (&'a str, ClusterRole) {
    let sa_name =
        pod.service_account_name.clone().unwrap_or_else(|| panic!("{file}: set serviceAccountName"));
    let (sa_file, _) = m
        .all::<ServiceAccount>()
        .into_iter()
        .find(|(_, sa)| {
            sa.metadata.name.as_ref() == Some(&sa_name) && sa.metadata.namespace.as_deref() == Some(namespace)
        })
        .unwrap_or_else(|| panic!("{file}: ServiceAccount {namespace}/{sa_name} is not in deploy/"));
    let names_account = |subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.into_iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == sa_name && s.namespace.as_deref() == Some(namespace)
        })
    };
    let all_bindings = m.all::<ClusterRoleBinding>();
    let mut bindings: Vec<_> =
        all_bindings.iter().filter(|(_, b)| names_account(b.subjects.as_ref())).collect();
    assert_eq!(
        bindings.len(),
        1,
        "expected one ClusterRoleBinding for {who}'s ServiceAccount {namespace}/{sa_name} ({sa_file}, used by \
         {file}); subjects of the bindings in deploy/: {:?}",
        all_bindings.iter().map(|(f, b)| (f, &b.subjects)).collect::<Vec<_>>()
    );
    if let Some((f, _)) = m.all::<RoleBinding>().iter().find(|(_, b)| names_account(b.subjects.as_ref())) {
        panic!("{f}: a RoleBinding grants {who} ({sa_file}) more than its ClusterRole");
    }
    let (binding_file, binding) = bindings.remove(0);
    let role_ref = &binding.role_ref;
    assert_eq!(
        (role_ref.api_group.as_str(), role_ref.kind.as_str()),
        ("rbac.authorization.k8s.io", "ClusterRole"),
        "{binding_file}: roleRef"
    );
    m.all::<ClusterRole>()
        .into_iter()
        .find(|(_, r)| r.metadata.name.as_ref() == Some(&role_ref.name))
        .unwrap_or_else(|| panic!("{binding_file}: ClusterRole {:?} is not in deploy/", role_ref.name))
}

/// Every (apiGroup, resource, verb) a role grants. Rules this cannot review fail: aggregation,
/// non-resource URLs, resourceNames and wildcards.
pub(crate) fn grants(file: &str, role: &ClusterRole) -> BTreeSet<Grant> {
    assert!(role.aggregation_rule.is_none(), "{file}: an aggregated role's rules are not reviewable here");
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        assert!(rule.non_resource_urls.is_none(), "{file}: rule {i} grants non-resource URLs");
        assert!(
            rule.resource_names.is_none(),
            "{file}: rule {i}: resourceNames is not something egressfw uses"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for word in groups.iter().chain(resources).chain(&rule.verbs) {
            assert!(!word.contains('*'), "{file}: rule {i} has a wildcard ({word:?})");
        }
        for g in groups {
            for r in resources {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    granted
}

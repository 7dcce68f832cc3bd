//! The tc layer's view of the node's pods: for each enforced or audited pod, the host-side veth
//! its frames cross. Found from the CNI plugin's record when the plugin gated the veth (no need
//! to wait for the pod's addresses in the API), else from the node's route to the pod's address.
//! Interfaces the plugin gated for pods that turn out not to be enforced are released; those of
//! pods the agent cannot place yet stay gated.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::desired::PodPolicy;
use crate::{
    cgroup::CgroupRef, cni::state::GatedInterface, interfaces::DesiredInterface, policy::Mode, routes,
};

/// What the tc layer should do in this pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TcPlan {
    pub wanted: Vec<DesiredInterface>,
    /// Gated interfaces whose pod is not known or not started yet: left as the plugin made them.
    pub keep: BTreeSet<u32>,
    /// Gated interfaces of pods that are not enforced: the gate comes off.
    pub release: BTreeSet<u32>,
    /// Records that no longer describe anything (released, or the interface is gone).
    pub forget: Vec<u32>,
    /// One line per pod whose interface was not found.
    pub problems: Vec<String>,
}

/// `policies`: every pod's policy; `cgroups`: the cgroups present, by the pod's cgroup UID;
/// `records`: the plugin's gated interfaces, each with whether it still exists as recorded.
pub fn plan(
    policies: &BTreeMap<String, PodPolicy>,
    cgroups: &HashMap<&str, &CgroupRef>,
    records: &BTreeMap<u32, (GatedInterface, bool)>,
) -> TcPlan {
    let mut out = TcPlan::default();
    let by_name: HashMap<(&str, &str), &PodPolicy> =
        policies.values().map(|p| ((p.namespace.as_str(), p.name.as_str()), p)).collect();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    for (&index, (record, live)) in records {
        if !live {
            out.forget.push(index);
            continue;
        }
        if !record.attached {
            // The plugin is still at work on it.
            out.keep.insert(index);
            continue;
        }
        let pod = by_name
            .get(&(record.namespace.as_str(), record.pod.as_str()))
            // A pod of the same name but another UID: the record is an older pod's, whose
            // sandbox is still being taken down. It stays gated until its veth goes.
            .filter(|p| same_pod(record, p));
        let Some(pod) = pod else {
            out.keep.insert(index);
            continue;
        };
        if pod.mode == Mode::Pass {
            out.release.insert(index);
            out.forget.push(index);
            continue;
        }
        let Some(cgroup) = cgroups.get(pod.cgroup_uid.as_str()) else {
            out.keep.insert(index);
            continue;
        };
        placed.insert(pod.cgroup_uid.as_str());
        let addresses =
            if pod.addresses.is_empty() { record.addresses.clone() } else { pod.addresses.clone() };
        out.wanted.push(DesiredInterface {
            name: record.interface.clone(),
            policy_cgroup_id: cgroup.id,
            addresses,
        });
    }
    for pod in policies.values() {
        if pod.mode == Mode::Pass || pod.addresses.is_empty() || placed.contains(pod.cgroup_uid.as_str()) {
            continue;
        }
        let Some(cgroup) = cgroups.get(pod.cgroup_uid.as_str()) else { continue };
        if let Some(found) = by_route(pod, cgroup, &mut out.problems) {
            out.wanted.push(found);
        }
    }
    out
}

/// Whether the record's UID (what the runtime passed: kubelet's UID) names this pod. Kubelet's
/// UID is the API's `metadata.uid` for ordinary pods and the config hash for static pods (the
/// mirror pod's `metadata.uid` is another value), which is also what the pod's cgroup is named
/// by. A record without a UID (or with an empty one) matches by name alone.
fn same_pod(record: &GatedInterface, pod: &PodPolicy) -> bool {
    match record.pod_uid.as_deref() {
        None | Some("") => true,
        Some(uid) => uid == pod.cgroup_uid || pod.api_uid.as_deref().is_none_or(|api| api == uid),
    }
}

/// The pod's interface from the node's routes to its addresses. Dual-stack pods have one veth:
/// the first address that routes decides, and the other must route the same way.
fn by_route(pod: &PodPolicy, cgroup: &CgroupRef, problems: &mut Vec<String>) -> Option<DesiredInterface> {
    let mut found: Option<String> = None;
    for addr in &pod.addresses {
        match (routes::pod_interface(*addr), &found) {
            (Ok(name), None) => found = Some(name),
            (Ok(name), Some(first)) if &name == first => {}
            (Ok(name), Some(first)) => problems.push(format!(
                "pod {}/{}: its addresses route through different interfaces ({first}, {name}); the tc layer uses {first}",
                pod.namespace, pod.name
            )),
            (Err(e), _) => problems.push(format!("pod {}/{}: {e}", pod.namespace, pod.name)),
        }
    }
    Some(DesiredInterface { name: found?, policy_cgroup_id: cgroup.id, addresses: pod.addresses.clone() })
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc};

    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, mode: Mode, addresses: &[&str]) -> PodPolicy {
        PodPolicy {
            cgroup_uid: uid.into(),
            api_uid: Some(uid.into()),
            namespace: ns.into(),
            name: name.into(),
            terminating: false,
            mode,
            gateway: "main".into(),
            steering: true,
            allowed: Arc::default(),
            problems: Vec::new(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn record(index: u32, ns: &str, name: &str, uid: &str, addresses: &[&str]) -> GatedInterface {
        GatedInterface {
            ifindex: index,
            interface: format!("veth{index}"),
            namespace: ns.into(),
            pod: name.into(),
            pod_uid: Some(uid.into()),
            container_id: format!("c{index}"),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            attached: true,
        }
    }

    #[test]
    fn gated_interfaces_are_bound_kept_released_or_forgotten_by_their_pod() {
        let policies: BTreeMap<String, PodPolicy> = [
            pod("shop", "web", "u-web", Mode::Enforce, &[]),
            pod("shop", "late", "u-late", Mode::Enforce, &["10.0.0.9"]),
            pod("free", "app", "u-app", Mode::Pass, &[]),
            pod("shop", "again", "u-new", Mode::Enforce, &[]),
        ]
        .into_iter()
        .map(|p| (p.cgroup_uid.clone(), p))
        .collect();
        let web = CgroupRef { id: 41, level: 3, path: "/pods/web".into() };
        let again = CgroupRef { id: 43, level: 3, path: "/pods/again".into() };
        let cgroups: HashMap<&str, &CgroupRef> = [("u-web", &web), ("u-new", &again)].into();
        let records: BTreeMap<u32, (GatedInterface, bool)> = [
            (record(7, "shop", "web", "u-web", &["10.0.0.7"]), true),
            (record(8, "shop", "late", "u-late", &[]), true),
            (record(9, "free", "app", "u-app", &[]), true),
            (record(10, "shop", "gone", "u-gone", &[]), false),
            (record(11, "shop", "unknown", "u-unknown", &[]), true),
            (record(12, "shop", "again", "u-old", &[]), true),
            (GatedInterface { attached: false, ..record(13, "free", "app", "u-app", &[]) }, true),
        ]
        .into_iter()
        .map(|(r, live)| (r.ifindex, (r, live)))
        .collect();
        let plan = plan(&policies, &cgroups, &records);
        assert_eq!(
            plan.wanted,
            vec![DesiredInterface {
                name: "veth7".into(),
                policy_cgroup_id: 41,
                addresses: vec!["10.0.0.7".parse::<IpAddr>().unwrap()],
            }],
            "bound from the record, with the plugin's addresses while the API has none"
        );
        assert_eq!(
            plan.keep,
            BTreeSet::from([8, 11, 12, 13]),
            "no cgroup yet; unknown pod; an older pod's veth; the plugin still attaching"
        );
        assert_eq!(plan.release, BTreeSet::from([9]), "a pod of a namespace that did not opt in");
        assert_eq!(plan.forget, vec![9, 10]);
    }

    #[test]
    fn a_static_pods_record_carries_kubelets_uid_and_is_bound() {
        // The runtime passes kubelet's UID, which for a static pod is its config hash (what its
        // cgroup is named by), not the mirror pod's metadata.uid.
        let mut mirror = pod("kube-system", "etcd-node-1", "6d8e1e2c", Mode::Enforce, &[]);
        mirror.api_uid = Some("mirror-uid".into());
        let policies = BTreeMap::from([(mirror.cgroup_uid.clone(), mirror)]);
        let cgroup = CgroupRef { id: 51, level: 3, path: "/pods/etcd".into() };
        let cgroups: HashMap<&str, &CgroupRef> = [("6d8e1e2c", &cgroup)].into();
        let records: BTreeMap<u32, (GatedInterface, bool)> =
            [(5, (record(5, "kube-system", "etcd-node-1", "6d8e1e2c", &["10.0.0.5"]), true))].into();
        let plan = plan(&policies, &cgroups, &records);
        assert_eq!(plan.wanted.len(), 1, "bound, not left gated: {plan:?}");
        assert_eq!(plan.wanted[0].policy_cgroup_id, 51);
        assert!(plan.keep.is_empty(), "{plan:?}");
    }

    #[test]
    fn an_empty_uid_on_record_is_no_uid() {
        // Records of plugins that stored an empty K8S_POD_UID as a UID.
        let policies =
            BTreeMap::from([("u-web".to_string(), pod("shop", "web", "u-web", Mode::Enforce, &[]))]);
        let cgroup = CgroupRef { id: 41, level: 3, path: "/pods/web".into() };
        let cgroups: HashMap<&str, &CgroupRef> = [("u-web", &cgroup)].into();
        let records: BTreeMap<u32, (GatedInterface, bool)> = [(
            7,
            (GatedInterface { pod_uid: Some(String::new()), ..record(7, "shop", "web", "", &[]) }, true),
        )]
        .into();
        let plan = plan(&policies, &cgroups, &records);
        assert_eq!(plan.wanted.len(), 1, "matched by name: {plan:?}");
    }
}

//! The tc layer's view of the node's pods: for each enforced or audited pod, the host-side veth
//! its frames cross. Found from the CNI plugin's record of the veth, gated or not (no need to
//! wait for the pod's addresses in the API, and on a bridged CNI the only way), else from the
//! node's route to the pod's address. Interfaces the plugin gated for pods that turn out not to
//! be enforced are released; those of pods the agent cannot place yet stay gated, and so does
//! the veth of an enforced pod whose cgroup the agent has not found yet, gated or not at ADD.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::desired::PodPolicy;
use crate::{
    cgroup::CgroupRef, cni::state::PodInterface, interfaces::DesiredInterface, policy::Mode, routes,
};

/// What the tc layer should do in this pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TcPlan {
    pub wanted: Vec<DesiredInterface>,
    /// Gated interfaces whose pod is not known or not started yet: left as the plugin made them.
    pub keep: BTreeSet<u32>,
    /// Kept interfaces that must carry the gate, by name: the plugin's complete gates, and the
    /// veths of enforced pods not placed yet. Attached (unbound) again if anything took it off.
    pub reattach: BTreeMap<u32, String>,
    /// Gated interfaces of pods that are not enforced: the gate comes off.
    pub release: BTreeSet<u32>,
    /// Released interfaces whose record now says so (kept: the namespace may opt in later).
    pub ungate: Vec<u32>,
    /// Records of interfaces that are gone.
    pub forget: Vec<u32>,
    /// One line per pod whose interface was not found.
    pub problems: Vec<String>,
}

impl TcPlan {
    fn keep_gated(&mut self, record: &PodInterface) {
        self.keep.insert(record.ifindex);
        self.reattach.insert(record.ifindex, record.interface.clone());
    }
}

/// `policies`: every pod's policy; `cgroups`: the cgroups present, by the pod's cgroup UID;
/// `records`: the plugin's records of pods' veths, each with whether it still exists as recorded.
pub fn plan(
    policies: &BTreeMap<String, PodPolicy>,
    cgroups: &HashMap<&str, &CgroupRef>,
    records: &BTreeMap<u32, (PodInterface, bool)>,
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
        if record.gated && !record.attached {
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
            if record.gated {
                out.keep_gated(record);
            }
            continue;
        };
        if pod.mode == Mode::Pass {
            // The plugin's gate comes off; the record stays, saying so (the namespace may opt
            // in later).
            if record.gated {
                out.release.insert(index);
                out.ungate.push(index);
            }
            continue;
        }
        let Some(cgroup) = cgroups.get(pod.cgroup_uid.as_str()) else {
            // Not started yet: a gate stays, and an enforced pod's veth gets one.
            if record.gated || pod.mode == Mode::Enforce {
                out.keep_gated(record);
            }
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
fn same_pod(record: &PodInterface, pod: &PodPolicy) -> bool {
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
            workload: format!("Pod/{name}"),
            terminating: false,
            mode,
            gateway: "main".into(),
            steering: true,
            allowed: Arc::default(),
            problems: Vec::new(),
            refused_gateway: None,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn record(index: u32, ns: &str, name: &str, uid: &str, addresses: &[&str]) -> PodInterface {
        PodInterface {
            ifindex: index,
            interface: format!("veth{index}"),
            namespace: ns.into(),
            pod: name.into(),
            pod_uid: Some(uid.into()),
            container_id: format!("c{index}"),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            gated: true,
            attached: true,
        }
    }

    /// The record of a veth the plugin left open (its namespace was `pass` or `audit` at ADD).
    fn open(index: u32, ns: &str, name: &str, uid: &str) -> PodInterface {
        PodInterface { gated: false, attached: false, ..record(index, ns, name, uid, &[]) }
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
        let records: BTreeMap<u32, (PodInterface, bool)> = [
            (record(7, "shop", "web", "u-web", &["10.0.0.7"]), true),
            (record(8, "shop", "late", "u-late", &[]), true),
            (record(9, "free", "app", "u-app", &[]), true),
            (record(10, "shop", "gone", "u-gone", &[]), false),
            (record(11, "shop", "unknown", "u-unknown", &[]), true),
            (record(12, "shop", "again", "u-old", &[]), true),
            (PodInterface { attached: false, ..record(13, "free", "app", "u-app", &[]) }, true),
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
        assert_eq!(
            plan.reattach.keys().copied().collect::<Vec<_>>(),
            vec![8, 11, 12],
            "complete gates are attached again if taken off; the plugin's own work in progress is not"
        );
        assert_eq!(plan.release, BTreeSet::from([9]), "a pod of a namespace that did not opt in");
        assert_eq!(plan.ungate, vec![9], "its record stays, saying the veth is open");
        assert_eq!(plan.forget, vec![10]);
    }

    /// A pod started while its namespace was `audit` or `off` has a record of an open veth. When
    /// the namespace switches to `enforce`, the record finds the veth: on a bridged CNI the route
    /// to the pod names the bridge, and the pod would keep its socket hooks only.
    #[test]
    fn open_veths_are_bound_when_their_namespace_opts_in_and_gated_until_the_cgroup_is_found() {
        let policies: BTreeMap<String, PodPolicy> = [
            pod("shop", "web", "u-web", Mode::Enforce, &["10.0.0.7"]),
            pod("shop", "new", "u-new", Mode::Enforce, &[]),
            pod("trial", "app", "u-app", Mode::Audit, &[]),
            pod("trial", "early", "u-early", Mode::Audit, &[]),
            pod("free", "app", "u-free", Mode::Pass, &[]),
        ]
        .into_iter()
        .map(|p| (p.cgroup_uid.clone(), p))
        .collect();
        let web = CgroupRef { id: 41, level: 3, path: "/pods/web".into() };
        let app = CgroupRef { id: 42, level: 3, path: "/pods/app".into() };
        let cgroups: HashMap<&str, &CgroupRef> = [("u-web", &web), ("u-app", &app)].into();
        let records: BTreeMap<u32, (PodInterface, bool)> = [
            open(7, "shop", "web", "u-web"),
            open(8, "shop", "new", "u-new"),
            open(9, "trial", "app", "u-app"),
            open(10, "trial", "early", "u-early"),
            open(11, "free", "app", "u-free"),
            open(12, "shop", "unknown", "u-unknown"),
        ]
        .into_iter()
        .map(|r| (r.ifindex, (r, true)))
        .collect();
        let plan = plan(&policies, &cgroups, &records);
        let wanted: Vec<(&str, u64)> =
            plan.wanted.iter().map(|d| (d.name.as_str(), d.policy_cgroup_id)).collect();
        assert_eq!(
            wanted,
            vec![("veth7", 41), ("veth9", 42)],
            "enforced and audited pods are bound from the record"
        );
        assert_eq!(plan.keep, BTreeSet::from([8]), "an enforced pod not placed yet is gated: {plan:?}");
        assert_eq!(plan.reattach.get(&8).map(String::as_str), Some("veth8"));
        assert!(
            plan.release.is_empty()
                && plan.ungate.is_empty()
                && plan.forget.is_empty()
                && plan.problems.is_empty(),
            "nothing to release: the plugin left them open: {plan:?}"
        );
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
        let records: BTreeMap<u32, (PodInterface, bool)> =
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
        let records: BTreeMap<u32, (PodInterface, bool)> =
            [(7, (PodInterface { pod_uid: Some(String::new()), ..record(7, "shop", "web", "", &[]) }, true))]
                .into();
        let plan = plan(&policies, &cgroups, &records);
        assert_eq!(plan.wanted.len(), 1, "matched by name: {plan:?}");
    }
}

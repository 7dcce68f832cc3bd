//! The tc layer's view of the node's pods: for each enforced or audited pod with addresses, the
//! host-side veth the node routes its addresses through.

use super::desired::PodPolicy;
use crate::{cgroup::CgroupRef, interfaces::DesiredInterface, policy::Mode, routes};

/// Interfaces to enforce, and one problem line per pod whose interface was not found.
pub fn desired_interfaces<'a>(
    pods: impl Iterator<Item = (&'a PodPolicy, &'a CgroupRef)>,
) -> (Vec<DesiredInterface>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (pod, cgroup) in pods {
        if pod.mode == Mode::Pass || pod.addresses.is_empty() {
            continue;
        }
        // Dual-stack pods have one veth: the first address that routes decides, and the other
        // must route the same way.
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
        if let Some(name) = found {
            out.push(DesiredInterface {
                name,
                policy_cgroup_id: cgroup.id,
                addresses: pod.addresses.clone(),
            });
        }
    }
    (out, problems)
}

//! What the plugin does on ADD: find the host side of the new pod's veth, decide whether the pod
//! needs the gate, attach the pinned tc programs there if it does (unbound, so they drop
//! everything the pod sends) and leave a record saying whose interface it is, gated or not. The
//! node agent takes over from the record: on a bridged CNI, whose route to the pod names the
//! bridge, the record is the only way it finds the veth of a pod whose namespace opts in later.

use std::path::PathBuf;

use anyhow::{Result, bail};
use egress_common::maps::PROG_TC_FROM_POD;

use super::state::{PodInterface, StateDir};
use crate::kernel::{
    bpffs::PinLayout,
    tc_attach,
    veth_peer::{self, PeerError},
};

/// One pod's ADD, as the runtime described it.
#[derive(Clone, Debug)]
pub struct GateRequest {
    pub pins: PinLayout,
    pub state: StateDir,
    pub netns: PathBuf,
    pub ifname: String,
    pub container_id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: Option<String>,
    pub addresses: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The agent knows the namespace as not enforced (pass or audit).
    NotEnforced,
    /// The pod's interface is not a veth: the tc layer has no host side to sit on.
    NotVeth(String),
    Gated {
        ifindex: u32,
        interface: String,
    },
}

pub fn apply(req: &GateRequest) -> Result<Outcome> {
    let outcome = decide_and_gate(req)?;
    let pod = format!("{}/{}", req.namespace, req.pod);
    match &outcome {
        Outcome::NotVeth(why) => eprintln!("egressfw: pod {pod}: not gated: {why}"),
        Outcome::NotEnforced | Outcome::Gated { .. } => {}
    }
    Ok(outcome)
}

fn decide_and_gate(req: &GateRequest) -> Result<Outcome> {
    // The runtime runs this plugin because the node's conflist names it: the node is enrolled.
    // Missing pins then mean the agent has not finished its first pass since the node started
    // (bpffs and /run are empty after a reboot, and on a node the autoscaler just added), not
    // that egressfw is absent: refuse, and the runtime starts none of the pod's containers and
    // retries. The agent runs in the host's network namespace, so it never waits for this.
    // `teardown` takes the entry out of the conflist before it removes the pins.
    let program = req.pins.program(PROG_TC_FROM_POD);
    if !program.exists() {
        bail!(
            "pod {}/{}: the egressfw agent has not pinned its programs on this node yet ({} does not exist): \
             the pod waits until it has (the runtime retries); to take egressfw off this node, run \
             `egress-agent teardown --cni-conf-dir <the CNI configuration directory>`",
            req.namespace,
            req.pod,
            program.display()
        );
    }
    // A namespace the agent never described (the file missing, the namespace created while the
    // agent was down) is gated: fail closed.
    let gate = !req.state.read_namespaces().is_some_and(|m| m.needs_no_gate(&req.namespace));
    let pair = match veth_peer::host_peer(&req.netns, &req.ifname) {
        Ok(pair) => pair,
        Err(e @ PeerError::NotVeth { .. }) => return Ok(Outcome::NotVeth(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let host = pair.host_side;
    let mut record = PodInterface {
        ifindex: host.index,
        interface: host.name.clone(),
        namespace: req.namespace.clone(),
        pod: req.pod.clone(),
        pod_uid: req.pod_uid.clone(),
        container_id: req.container_id.clone(),
        addresses: req.addresses.clone(),
        gated: gate,
        attached: false,
    };
    if !gate {
        // Recorded all the same: a failed write fails the ADD (the runtime retries), since a
        // pod without a record on a bridged CNI would keep its socket hooks only once its
        // namespace is enforced.
        req.state.write_interface(&record)?;
        return Ok(Outcome::NotEnforced);
    }
    // Record, attach, then mark the record complete (see `PodInterface::attached`).
    req.state.write_interface(&record)?;
    if let Err(e) = tc_attach::attach_gate(&req.pins, host.index, &host.name) {
        let _ = req.state.remove_interface(host.index);
        return Err(e.context(format!("gating interface {} ({})", host.name, host.index)));
    }
    record.attached = true;
    req.state.write_interface(&record)?;
    Ok(Outcome::Gated { ifindex: host.index, interface: host.name })
}

/// CHECK: what ADD put in place is still there. The pod's veth has its record (without it the
/// agent cannot find the veth on a bridged CNI once the namespace is enforced), and where the
/// pod must be enforced (its namespace not known as `pass` or `audit`) our tc programs run
/// first on both hooks of the host side: the plugin's gate or the agent's binding, which use the
/// same attachment. An error names what is missing; the runtime reports it on the pod.
pub fn verify(req: &GateRequest) -> Result<()> {
    let pod = format!("{}/{}", req.namespace, req.pod);
    let host = match veth_peer::host_peer(&req.netns, &req.ifname) {
        Ok(pair) => pair.host_side,
        // Not gated on ADD either (logged there): nothing of ours to check.
        Err(PeerError::NotVeth { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let (records, _) = req.state.read_interfaces();
    match records.get(&host.index) {
        Some(r) if r.container_id == req.container_id => {}
        Some(r) => bail!(
            "pod {pod}: the record of interface {} ({}) belongs to container {}, not {}: the agent would bind this veth for another pod",
            host.name,
            host.index,
            r.container_id,
            req.container_id
        ),
        None => bail!(
            "pod {pod}: interface {} ({}) has no egressfw record in {}: the agent cannot find this veth on a bridged network; recreate the pod",
            host.name,
            host.index,
            req.state.interfaces_dir().display()
        ),
    }
    if req.state.read_namespaces().is_some_and(|m| m.needs_no_gate(&req.namespace)) {
        return Ok(());
    }
    let missing = tc_attach::hooks_without_us_first(&req.pins, host.index, &host.name)?;
    if !missing.is_empty() {
        bail!(
            "pod {pod}: the egressfw tc programs do not run first on interface {} ({}) ({}): what the pod sends there is not judged",
            host.name,
            host.index,
            missing.join(", ")
        );
    }
    Ok(())
}

/// DEL: drops the records of `container_id`'s interfaces. Best effort: the agent also drops
/// records of interfaces that no longer exist.
pub fn forget(state: &StateDir, container_id: &str) {
    if container_id.is_empty() {
        return;
    }
    let (records, _) = state.read_interfaces();
    for (ifindex, record) in records {
        if record.container_id == container_id {
            let _ = state.remove_interface(ifindex);
        }
    }
}

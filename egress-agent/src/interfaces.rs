//! Keeps the tc layer in line with the enforced workloads: each workload's host-side interface
//! is bound to its policy, its addresses are bound to that interface, and both tc programs are
//! attached. Ordered like the cgroup reconcile, so an enforced interface is never unprotected:
//!
//! 1. bindings are written before the programs are attached (and an attached program that finds
//!    no binding denies anyway);
//! 2. a removed interface loses its programs first, then its bindings;
//! 3. every pass checks that ours still run first on each interface, and moves them back to
//!    the head when another program was put ahead of them (`tc_attach::ensure_first`).
//!
//! A workload's interface may not exist yet, or may be recreated with a new ifindex (a pod's
//! sandbox restarting): each pass resolves names again, and the caller runs a pass whenever a
//! link appears or goes (`link_events`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::IpAddr,
};

use anyhow::Result;
use aya::Ebpf;

use crate::kernel::{
    attach::{AttachOutcome, ProgramTags},
    bpffs::PinLayout,
    tc_attach,
    tc_maps::{BoundSource, TcMaps},
};

/// One workload interface to enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredInterface {
    /// Host-side interface name.
    pub name: String,
    /// Cgroup id of the workload's policy.
    pub policy_cgroup_id: u64,
    /// The workload's addresses: the only sources accepted from the interface.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TcSummary {
    /// Interfaces bound and attached after this pass.
    pub enforced: usize,
    /// Interfaces bound to a policy (or to another one) in this pass: among them every gate the
    /// CNI plugin attached that now judges by its pod's policy.
    pub bound: usize,
    /// Interfaces whose binding was removed in this pass.
    pub released: usize,
    /// Named interfaces that do not exist (yet).
    pub missing: Vec<String>,
    /// Interfaces that could not be attached, with the error (retried on the next pass).
    pub failed: Vec<(String, String)>,
    pub links: AttachOutcome,
    /// (interface, direction) where another program ran before ours: ours was moved back to
    /// the head in this pass.
    pub moved_to_head: Vec<(String, &'static str)>,
    /// Interfaces the CNI plugin gated whose pod is not placed yet (they drop everything).
    pub gated: usize,
}

/// What the tc maps hold and which interfaces this process attached, as last written; a full
/// pass (the first, or after an error) re-reads the maps and re-checks every attachment.
#[derive(Debug)]
pub struct TcState {
    interfaces: BTreeMap<u32, u64>,
    /// Source map entries: (interface, address) -> policy cgroup id.
    sources: BTreeMap<BoundSource, u64>,
    attached: BTreeSet<u32>,
    stale: bool,
}

impl Default for TcState {
    fn default() -> Self {
        Self { interfaces: BTreeMap::new(), sources: BTreeMap::new(), attached: BTreeSet::new(), stale: true }
    }
}

impl TcState {
    /// Whether the next pass is a full one (and so needs the pinned interfaces listed).
    pub fn is_stale(&self) -> bool {
        self.stale
    }
}

impl TcSummary {
    /// One warning per hook where ours had to be moved back to the head.
    pub fn warn_moved_to_head(&self) {
        for (interface, direction) in &self.moved_to_head {
            tracing::warn!(
                interface,
                direction,
                why = "another tc program was attached ahead of ours: it could pass or redirect frames before they are judged (check which CNI or tool attaches programs at the head)",
                "tc program moved back to the head"
            );
        }
    }
}

/// The kernel's index of an interface in this network namespace, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: plain libc call on a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `index`, if it exists.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Interfaces attached by someone else than this agent's passes: the CNI plugin's gates.
#[derive(Debug, Default)]
pub struct Gated {
    /// Left attached and unbound although not desired (a pod not placed yet).
    pub keep: BTreeSet<u32>,
    /// Kept gates whose record says they are complete, by interface name: attached again
    /// (unbound, so they drop everything) if anything took them off.
    pub reattach: BTreeMap<u32, String>,
    /// Detached although never bound here (a pod that is not enforced).
    pub release: BTreeSet<u32>,
    /// The interfaces with tc pins, listed before the plugin's records were read (see
    /// `observe`; only full passes list them). `None`: no records to order against, the pass
    /// lists them itself when it is full (standalone).
    pub pinned: Option<Vec<u32>>,
}

/// Reads the tc pins and the plugin's records in the one order that cannot lose a gate. The
/// plugin writes its record before it attaches (and pins), so every pin listed first has its
/// record in what is read next. The other way round, an ADD landing between the two reads
/// leaves a pin whose record was not read, and the pass takes that gate for a leftover and
/// detaches it while the pod starts.
pub fn observe<R>(
    full: bool,
    list_pins: impl FnOnce() -> Result<Vec<u32>>,
    read_records: impl FnOnce() -> R,
) -> Result<(Vec<u32>, R)> {
    let pinned = if full { list_pins()? } else { Vec::new() };
    Ok((pinned, read_records()))
}

/// The interfaces a pass takes its programs off: whatever it bound or attached before, found
/// pinned, or was told to release, unless it is wanted or a gate to keep.
fn to_detach(
    bound: impl Iterator<Item = u32>,
    pinned: &[u32],
    attached: &BTreeSet<u32>,
    gated: &Gated,
    wanted: &BTreeMap<u32, (u64, &str)>,
) -> BTreeSet<u32> {
    bound
        .chain(pinned.iter().copied())
        .chain(attached.iter().copied())
        .chain(gated.release.iter().copied())
        .filter(|i| !wanted.contains_key(i) && !gated.keep.contains(i))
        .collect()
}

/// Applies `desired`. Errors on individual interfaces are reported in the summary and retried
/// on the next pass; map errors abort the pass (and make the next one full).
pub fn apply(
    ebpf: &mut Ebpf,
    maps: &mut TcMaps,
    pins: &PinLayout,
    desired: &[DesiredInterface],
    gated: &Gated,
    state: &mut TcState,
) -> Result<TcSummary> {
    if state.stale {
        state.interfaces = maps.interfaces()?;
        state.sources = maps.sources()?;
        state.attached.clear();
    }
    let full = state.stale;
    state.stale = true;
    let summary = apply_diff(ebpf, maps, pins, desired, gated, state, full)?;
    // Failed attachments are retried from scratch.
    state.stale = !summary.failed.is_empty();
    Ok(summary)
}

fn apply_diff(
    ebpf: &mut Ebpf,
    maps: &mut TcMaps,
    pins: &PinLayout,
    desired: &[DesiredInterface],
    gated: &Gated,
    state: &mut TcState,
    full: bool,
) -> Result<TcSummary> {
    let mut summary = TcSummary::default();
    let mut wanted_if: BTreeMap<u32, (u64, &str)> = BTreeMap::new();
    // An address is bound to one interface at most: the last workload that claims it.
    let mut wanted_addr: BTreeMap<IpAddr, (u32, u64)> = BTreeMap::new();
    for d in desired {
        let Some(index) = ifindex(&d.name) else {
            summary.missing.push(d.name.clone());
            continue;
        };
        wanted_if.insert(index, (d.policy_cgroup_id, d.name.as_str()));
        for a in &d.addresses {
            wanted_addr.insert(*a, (index, d.policy_cgroup_id));
        }
    }
    let wanted_src: BTreeMap<BoundSource, u64> = wanted_addr
        .into_iter()
        .map(|(addr, (ifindex, cgroup_id))| (BoundSource { ifindex, addr }, cgroup_id))
        .collect();

    // Removals first, programs before bindings. An address that moves to a new interface loses
    // its old binding before it gets the new one: meanwhile the new interface drops its frames
    // as spoofed.
    let pinned = match &gated.pinned {
        Some(listed) => listed.clone(),
        None if full => pins.pinned_interfaces()?,
        None => Vec::new(),
    };
    let gone = to_detach(state.interfaces.keys().copied(), &pinned, &state.attached, gated, &wanted_if);
    for index in gone {
        tc_attach::detach(pins, index, ifname(index).as_deref())?;
        state.attached.remove(&index);
        if state.interfaces.remove(&index).is_some() {
            maps.unbind_interface(index)?;
            summary.released += 1;
        }
    }
    let stale_sources: Vec<BoundSource> =
        state.sources.keys().copied().filter(|s| !wanted_src.contains_key(s)).collect();
    for s in stale_sources {
        maps.unbind_source(s)?;
        state.sources.remove(&s);
    }

    for (&index, &(cgroup_id, _)) in &wanted_if {
        if state.interfaces.get(&index) != Some(&cgroup_id) {
            maps.bind_interface(index, cgroup_id)?;
            state.interfaces.insert(index, cgroup_id);
            summary.bound += 1;
        }
    }
    for (&source, &cgroup_id) in &wanted_src {
        if state.sources.get(&source) != Some(&cgroup_id) {
            maps.bind_source(source, cgroup_id)?;
            state.sources.insert(source, cgroup_id);
        }
    }

    let mut tags: Option<ProgramTags> = None;
    // A gate kept for a pod not placed yet must be there: something may have taken it off (a
    // pass that raced the plugin's ADD, a tool). Attached again unbound, it drops everything.
    for (&index, name) in &gated.reattach {
        if wanted_if.contains_key(&index) || ifindex(name) != Some(index) {
            continue;
        }
        let tags = match &mut tags {
            Some(t) => t,
            None => tags.insert(ProgramTags::read(ebpf)?),
        };
        match tc_attach::ensure_attached(ebpf, pins, tags, index, name) {
            Ok(o) => {
                if o.attached > 0 {
                    tracing::warn!(interface = name.as_str(), "a kept gate was missing: attached again");
                }
                summary.links.attached += o.attached;
            }
            Err(e) => summary.failed.push((name.clone(), format!("{e:#}"))),
        }
    }
    for (&index, &(_, name)) in &wanted_if {
        if state.attached.contains(&index) {
            // Attached before: still first? (Anything attached later may have gone ahead.)
            match tc_attach::ensure_first(ebpf, pins, index, name) {
                Ok(moved) => summary.moved_to_head.extend(moved.into_iter().map(|d| (name.to_string(), d))),
                Err(e) => {
                    state.attached.remove(&index);
                    summary.failed.push((name.to_string(), format!("{e:#}")));
                    continue;
                }
            }
            summary.enforced += 1;
            continue;
        }
        let tags = match &mut tags {
            Some(t) => t,
            None => tags.insert(ProgramTags::read(ebpf)?),
        };
        // Adopted attachments may have had something put ahead of them while no agent ran.
        let attached = tc_attach::ensure_attached(ebpf, pins, tags, index, name)
            .and_then(|o| Ok((o, tc_attach::ensure_first(ebpf, pins, index, name)?)));
        match attached {
            Ok((o, moved)) => {
                summary.moved_to_head.extend(moved.into_iter().map(|d| (name.to_string(), d)));
                state.attached.insert(index);
                summary.enforced += 1;
                summary.links.attached += o.attached;
                summary.links.adopted += o.adopted;
                summary.links.replaced += o.replaced;
            }
            Err(e) => summary.failed.push((name.to_string(), format!("{e:#}"))),
        }
    }
    Ok(summary)
}

/// Removes every tc attachment and binding (teardown). Returns the number of interfaces. `maps`
/// is None when the pin directory has no tc maps of this version (older agents): their
/// attachments are still found through the pins.
pub fn remove_all(mut maps: Option<&mut TcMaps>, pins: &PinLayout) -> Result<usize> {
    let bound = match &maps {
        Some(m) => m.interfaces()?,
        None => BTreeMap::new(),
    };
    let all: BTreeSet<u32> = bound.keys().copied().chain(pins.pinned_interfaces()?).collect();
    for &index in &all {
        let name = ifname(index);
        if name.is_none() && tc_attach::mechanism() == tc_attach::TcMechanism::Clsact {
            // clsact filters are found by interface name, in this network namespace only. A
            // deleted interface took its filters with it; one in another namespace keeps them.
            tracing::warn!(
                ifindex = index,
                "no interface with this index in teardown's network namespace: if it still exists in another one (run teardown where the agent runs, in the node's), its clsact filters stay attached"
            );
        }
        tc_attach::detach(pins, index, name.as_deref())?;
        if let Some(m) = maps.as_deref_mut() {
            m.unbind_interface(index)?;
        }
    }
    if let Some(m) = maps {
        for s in m.sources()?.into_keys() {
            m.unbind_source(s)?;
        }
    }
    Ok(all.len())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// The node as the two reads see it: the plugin's ADD for interface 9 lands after the
    /// first read and before the second, writing its record, then attaching (and pinning).
    struct Node {
        reads: usize,
    }

    impl Node {
        fn read(&mut self) -> bool {
            self.reads += 1;
            // The second read sees the ADD done.
            self.reads > 1
        }
    }

    #[test]
    fn a_gate_attached_between_the_reads_is_never_detached() {
        let node = RefCell::new(Node { reads: 0 });
        let (pinned, records) = observe(
            true,
            || Ok(if node.borrow_mut().read() { vec![3, 9] } else { vec![3] }),
            || if node.borrow_mut().read() { vec![9] } else { Vec::new() },
        )
        .unwrap();
        // The plan keeps every interface it has a record of (its pod not placed yet); 3 is a
        // leftover with neither record nor pod.
        let gated = Gated { keep: records.into_iter().collect(), pinned: Some(pinned), ..Gated::default() };
        let gone = to_detach(
            std::iter::empty(),
            gated.pinned.as_deref().unwrap(),
            &BTreeSet::new(),
            &gated,
            &BTreeMap::new(),
        );
        assert!(!gone.contains(&9), "the new pod's gate is neither kept nor detached: {gone:?}");
        assert_eq!(gone, BTreeSet::from([3]), "the leftover still goes");
    }

    #[test]
    fn wanted_and_kept_interfaces_stay_everything_else_goes() {
        let gated = Gated { keep: BTreeSet::from([4]), release: BTreeSet::from([5]), ..Gated::default() };
        let wanted = BTreeMap::from([(1, (7, "veth1"))]);
        let gone = to_detach([1, 2].into_iter(), &[3, 4], &BTreeSet::from([6]), &gated, &wanted);
        assert_eq!(gone, BTreeSet::from([2, 3, 5, 6]));
    }
}

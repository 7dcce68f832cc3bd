//! One reconcile pass of the node agent: from the watched objects and the pod cgroups present to
//! the kernel maps and links, then the pod-start gate, then the owner index for logs and metrics.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use anyhow::Result;
use aya::Ebpf;
use egress_common::{
    maps::{
        PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SENDMSG4, PROG_SENDMSG6,
        PROG_SKB_EGRESS, PROG_SOCKOPS,
    },
    policy::CgroupPolicy,
};

use super::{
    config::AgentConfig,
    desired::{self, PodPolicy, World},
    pod_cgroup::PodsRoot,
    pod_interfaces,
    watch::Stores,
};
use crate::{
    cgroup::{self, CgroupRef},
    cni::state::{NamespaceModes, PodInterface, StateDir},
    interfaces::{self, TcState, TcSummary},
    kernel::{
        attach::{self, ProgramTags},
        bpffs::PinLayout,
        maps::KernelMaps,
        query,
        tc_maps::TcMaps,
    },
    metrics::{Owner, OwnerIndex},
    policy::{
        Mode,
        compile::{CompiledRules, compile},
    },
    reconcile::{self, Desired, KernelState, Summary},
};

pub struct Node {
    pub ebpf: Ebpf,
    pub maps: KernelMaps,
    pub tc_maps: TcMaps,
    pub pins: PinLayout,
    pub cgroup_root: PathBuf,
    pub pods_root: PodsRoot,
    pub owners: OwnerIndex,
    /// Problems already logged, so each is logged once while it lasts.
    logged: BTreeSet<String>,
    /// The kernel state as this agent last wrote it (see `KernelState`).
    state: KernelState,
    /// The tc layer as this agent last wrote it.
    tc_state: TcState,
    /// Pod cgroup path -> id and level, so an incremental pass does not stat every pod.
    cgroups: HashMap<PathBuf, CgroupRef>,
    /// Pod UID -> pod cgroup, as last scanned; `None` after a pod cgroup appeared or went away.
    present: Option<HashMap<String, PathBuf>>,
    /// Cgroup ids in the shared owner index, to update it by difference.
    owned: HashSet<u64>,
    /// The directory shared with the CNI plugin.
    cni_state: StateDir,
    /// The namespace modes last written there.
    published_modes: Option<NamespaceModes>,
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub summary: Summary,
    /// Pods of enforced or audited namespaces whose cgroup does not exist yet.
    pub pending: Vec<String>,
    pub gate_attached: bool,
    /// Pods by (mode, state) for the pods gauge.
    pub pods: HashMap<(&'static str, &'static str), i64>,
    /// Pods by (namespace, the gateway its label names but may not use).
    pub refused_gateways: BTreeMap<(String, String), i64>,
    /// Enforced/audited cgroups written in this pass, for the link check.
    pub enforced: Vec<CgroupRef>,
    /// The tc layer on the pods' veths.
    pub tc: TcSummary,
}

/// Where a node's agent finds its cgroups and the files it shares.
pub struct Places {
    pub pins: PinLayout,
    pub cgroup_root: PathBuf,
    pub pods_root: PodsRoot,
    pub cni_state: StateDir,
}

impl Node {
    pub fn new(ebpf: Ebpf, maps: KernelMaps, tc_maps: TcMaps, places: Places, owners: OwnerIndex) -> Self {
        let Places { pins, cgroup_root, pods_root, cni_state } = places;
        Self {
            ebpf,
            maps,
            tc_maps,
            pins,
            cgroup_root,
            pods_root,
            owners,
            logged: BTreeSet::new(),
            state: KernelState::unknown(),
            tc_state: TcState::default(),
            cgroups: HashMap::new(),
            present: None,
            owned: HashSet::new(),
            cni_state,
            published_modes: None,
        }
    }

    /// A pod cgroup appeared or went away: the next pass rescans the pods cgroups.
    pub fn cgroups_changed(&mut self) {
        self.present = None;
    }

    /// Makes the next pass a full one: re-read the maps, check every link, re-stat every cgroup.
    pub fn invalidate(&mut self) {
        self.state.invalidate();
        self.tc_state = TcState::default();
        self.cgroups.clear();
        self.present = None;
    }

    /// Brings the kernel in line with the stores. Safe to call at any time after the stores
    /// have synced: it is a diff, and an error leaves every enforced pod enforced.
    pub fn reconcile(&mut self, stores: &Stores, config: &AgentConfig) -> Result<Pass> {
        let namespaces = stores.namespaces.state();
        let pods = stores.pods.state();
        let services: Vec<_> = stores.services.iter().flat_map(|s| s.state()).collect();
        let slices: Vec<_> = stores.slices.iter().flat_map(|s| s.state()).collect();
        let world = World {
            namespaces: namespaces.iter().map(AsRef::as_ref).collect(),
            pods: pods.iter().map(AsRef::as_ref).collect(),
            services: services.iter().map(AsRef::as_ref).collect(),
            slices: slices.iter().map(AsRef::as_ref).collect(),
        };
        let policies = desired::pod_policies(&world, config);
        self.log_problems(policies.values());

        let present = match self.present.take() {
            Some(p) => p,
            None => {
                let p = self.pods_root.scan();
                let paths: HashSet<&PathBuf> = p.values().collect();
                self.cgroups.retain(|path, _| paths.contains(path));
                p
            }
        };
        // The link check only runs after full passes; skip collecting for it otherwise.
        let full = self.state.is_stale();
        let mut pass = Pass::default();
        let mut desired = Vec::with_capacity(policies.len());
        let mut new_owners = Vec::new();
        let mut seen = HashSet::with_capacity(policies.len());
        // Keyed by the shared `Allowed` itself, not by the gateway's name: a pod held for an
        // unknown namespace names the default gateway but must not get its rules.
        let mut compiled: HashMap<*const desired::Allowed, Arc<CompiledRules>> = HashMap::new();
        // Enforced and audited pods' cgroups, by cgroup UID, for the tc layer.
        let mut with_cgroup: HashMap<&str, CgroupRef> = HashMap::new();
        let nothing = Arc::new(CompiledRules::default());
        for p in policies.values() {
            let cgroup = present.get(&p.cgroup_uid).and_then(|path| self.cached_cgroup(path));
            let state = if cgroup.is_some() { "running" } else { "pending" };
            *pass.pods.entry((p.mode.name(), state)).or_default() += 1;
            if let Some(asked) = &p.refused_gateway {
                *pass.refused_gateways.entry((p.namespace.clone(), asked.clone())).or_default() += 1;
            }
            let Some(cgroup) = cgroup else {
                if p.mode != Mode::Pass && !p.terminating {
                    pass.pending.push(format!("{}/{}", p.namespace, p.name));
                }
                continue;
            };
            // Pods of one gateway share their rules: compile them once per pass.
            let rules = if p.mode == Mode::Pass {
                nothing.clone()
            } else if let Some(r) = compiled.get(&Arc::as_ptr(&p.allowed)) {
                r.clone()
            } else {
                let r = Arc::new(self.rules_of(p, &cgroup));
                compiled.insert(Arc::as_ptr(&p.allowed), r.clone());
                r
            };
            // A cgroup id belongs to one pod for good: only new ones need an owner entry.
            seen.insert(cgroup.id);
            if !self.owned.contains(&cgroup.id) {
                let owner = Owner {
                    namespace: p.namespace.clone(),
                    pod: p.name.clone(),
                    workload: p.workload.clone(),
                    cgroup: cgroup.path.display().to_string(),
                };
                new_owners.push((cgroup.id, owner));
            }
            if full && p.mode != Mode::Pass {
                pass.enforced.push(cgroup.clone());
            }
            if p.mode != Mode::Pass {
                with_cgroup.insert(p.cgroup_uid.as_str(), cgroup.clone());
            }
            desired.push(Desired { cgroup, mode: p.mode, rules });
        }
        self.present = Some(present);

        // Owners first, so events from a pod enforced in this pass are named.
        let gone: Vec<u64> = self.owned.difference(&seen).copied().collect();
        if (!new_owners.is_empty() || !gone.is_empty())
            && let Ok(mut index) = self.owners.write()
        {
            for id in &gone {
                index.remove(id);
                self.owned.remove(id);
            }
            for (id, owner) in new_owners {
                index.insert(id, owner);
                self.owned.insert(id);
            }
        }
        pass.summary =
            reconcile::apply_with(&mut self.ebpf, &mut self.maps, &self.pins, &desired, &mut self.state)?;
        self.publish_namespace_modes(&world);
        // After the policies exist: a bound interface finds its pod's policy at once.
        let (pinned, (records, record_problems)) = interfaces::observe(
            self.tc_state.is_stale(),
            || self.pins.pinned_interfaces(),
            || self.cni_state.read_interfaces(),
        )?;
        let records: BTreeMap<u32, _> = records
            .into_iter()
            .map(|(index, r)| {
                let live = interfaces::ifname(index).as_deref() == Some(r.interface.as_str());
                (index, (r, live))
            })
            .collect();
        let cgroups = with_cgroup.iter().map(|(uid, c)| (*uid, c)).collect();
        let plan = pod_interfaces::plan(&policies, &cgroups, &records);
        self.log_tc_problems(plan.problems.iter().cloned().chain(record_problems).collect());
        let gated = interfaces::Gated {
            keep: plan.keep,
            reattach: plan.reattach,
            release: plan.release,
            pinned: Some(pinned),
        };
        pass.tc = interfaces::apply(
            &mut self.ebpf,
            &mut self.tc_maps,
            &self.pins,
            &plan.wanted,
            &gated,
            &mut self.tc_state,
        )?;
        pass.tc.gated = gated.keep.len();
        // Only once the gate is off: a record changed first would leave a gate nobody releases.
        for (record, _) in plan.ungate.iter().filter_map(|i| records.get(i)) {
            self.cni_state.write_interface(&PodInterface { gated: false, ..record.clone() })?;
        }
        for index in plan.forget {
            self.cni_state.remove_interface(index)?;
        }
        // The gate goes up after the pass has registered every known pod (so known pods keep
        // flowing) and comes down only once no enforced pod is waiting for its cgroup.
        pass.gate_attached = if pass.pending.is_empty() {
            attach::remove_gate(&self.pins)?;
            false
        } else {
            let above = self.cgroup_of(&self.pods_root.path)?;
            let tags = ProgramTags::read(&self.ebpf)?;
            attach::ensure_gate(&mut self.ebpf, &self.pins, &tags, &above)?;
            true
        };
        Ok(pass)
    }

    /// Tells the CNI plugin which namespaces need no gate for their new pods (written when it
    /// changes). A failed write is logged and retried on the next pass; meanwhile the plugin
    /// gates by the older file, or every pod without one (fail closed).
    fn publish_namespace_modes(&mut self, world: &World<'_>) {
        let modes = NamespaceModes {
            namespaces: world
                .namespaces
                .iter()
                .filter_map(|n| {
                    let name = n.metadata.name.clone()?;
                    Some((name, desired::namespace_mode(Some(n)).0.name().to_string()))
                })
                .collect(),
        };
        if self.published_modes.as_ref() == Some(&modes) {
            return;
        }
        match self.cni_state.write_namespaces(&modes) {
            Ok(()) => self.published_modes = Some(modes),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not tell the CNI plugin the namespaces' modes; it gates every new pod until this works"
            ),
        }
    }

    /// Registers the agent's own pod as not enforced, straight away (see `own_pod`).
    pub fn exempt_own_pod(&mut self) -> Result<()> {
        let Some(path) = super::own_pod::find(&self.pods_root) else {
            return Ok(());
        };
        let cgroup = self.cgroup_of(&path)?;
        if self.maps.policies()?.contains_key(&cgroup.id) {
            return Ok(());
        }
        self.maps.set_level_mask(self.maps.level_mask()? | (1 << cgroup.level))?;
        let pass = CgroupPolicy { policy_id: 0, mode: Mode::Pass.kernel_value() };
        self.maps
            .policies
            .insert(cgroup.id, pass, 0)
            .map_err(|e| anyhow::anyhow!("registering the agent's own pod {}: {e}", path.display()))?;
        tracing::info!(cgroup = %path.display(), "registered the agent's own pod as not enforced");
        Ok(())
    }

    fn cached_cgroup(&mut self, path: &std::path::Path) -> Option<CgroupRef> {
        if let Some(c) = self.cgroups.get(path) {
            return Some(c.clone());
        }
        let c = self.cgroup_of(path).ok()?;
        self.cgroups.insert(path.to_path_buf(), c.clone());
        Some(c)
    }

    fn cgroup_of(&self, path: &std::path::Path) -> Result<CgroupRef> {
        cgroup::resolve(&self.cgroup_root, &path.to_string_lossy())
    }

    fn rules_of(&mut self, p: &PodPolicy, cgroup: &CgroupRef) -> CompiledRules {
        let spec = (*p.allowed).clone().into_spec(cgroup.path.display().to_string(), p.mode);
        compile(&spec).unwrap_or_else(|e| {
            // Fail closed: the pod keeps loopback only, and the reason is in the log.
            let problem = format!("pod {}/{}: {e}; nothing but loopback is allowed", p.namespace, p.name);
            if self.logged.insert(problem.clone()) {
                tracing::error!(problem, "policy does not fit the kernel tables");
            }
            CompiledRules::default()
        })
    }

    /// Logs each tc-layer problem once while it lasts (they are re-found on every pass).
    fn log_tc_problems(&mut self, problems: Vec<String>) {
        let now: BTreeSet<String> = problems.into_iter().map(|p| format!("tc: {p}")).collect();
        for problem in now.difference(&self.logged) {
            tracing::warn!(problem, "tc layer not applied to a pod; its socket hooks still enforce");
        }
        self.logged.retain(|p| !p.starts_with("tc: ") || now.contains(p));
        self.logged.extend(now);
    }

    fn log_problems<'a>(&mut self, policies: impl Iterator<Item = &'a PodPolicy>) {
        let now: BTreeSet<String> = policies.flat_map(|p| p.problems.iter().cloned()).collect();
        for problem in now.difference(&self.logged) {
            tracing::warn!(problem, "policy narrowed");
        }
        self.logged.retain(|p| now.contains(p) || p.starts_with("pod ") || p.starts_with("tc: "));
        self.logged.extend(now);
    }

    /// Asks the kernel whether every enforced cgroup runs our cgroup programs. `None` when all do.
    pub fn verify_links(&self, enforced: &[CgroupRef]) -> Result<Option<String>> {
        let tags = ProgramTags::read(&self.ebpf)?;
        let hooks = [
            (query::ATTACH_SOCK_OPS, PROG_SOCKOPS),
            (query::ATTACH_INET_EGRESS, PROG_SKB_EGRESS),
            (query::ATTACH_INET4_GETPEERNAME, PROG_GETPEERNAME4),
            (query::ATTACH_INET6_GETPEERNAME, PROG_GETPEERNAME6),
            (query::ATTACH_INET4_CONNECT, PROG_CONNECT4),
            (query::ATTACH_INET6_CONNECT, PROG_CONNECT6),
            (query::ATTACH_UDP4_SENDMSG, PROG_SENDMSG4),
            (query::ATTACH_UDP6_SENDMSG, PROG_SENDMSG6),
        ];
        for cgroup in enforced {
            for (attach_type, name) in hooks {
                let ids = match query::attached_programs(&cgroup.path, attach_type) {
                    Ok(ids) => ids,
                    // Gone since the pass (pod deleted): nothing to enforce there any more.
                    Err(_) if !cgroup.path.exists() => break,
                    Err(e) => return Err(e),
                };
                if !ids.iter().any(|id| tags.is_ours(name, *id)) {
                    return Ok(Some(format!("{name} is not attached to {}", cgroup.path.display())));
                }
            }
        }
        Ok(None)
    }
}

/// Pass result for logs.
pub fn log_pass(why: &str, pass: &Pass, gate_was: bool) {
    let s = &pass.summary;
    let tc = &pass.tc;
    let changed = s.added
        + s.updated
        + s.removed
        + s.links.attached
        + s.links.replaced
        + tc.released
        + tc.bound
        + tc.links.attached
        + tc.links.replaced
        + tc.failed.len()
        + tc.moved_to_head.len();
    for (interface, error) in &tc.failed {
        tracing::error!(interface, error, "tc layer not attached; retrying on the next pass");
    }
    tc.warn_moved_to_head();
    if changed == 0 && gate_was == pass.gate_attached {
        tracing::debug!(why, unchanged = s.unchanged, "reconciled, no change");
        return;
    }
    tracing::info!(
        why,
        added = s.added,
        updated = s.updated,
        unchanged = s.unchanged,
        removed = s.removed,
        links_attached = s.links.attached,
        links_adopted = s.links.adopted,
        pending = pass.pending.len(),
        gate = pass.gate_attached,
        tc_interfaces = tc.enforced,
        tc_bound = tc.bound,
        tc_links_attached = tc.links.attached,
        tc_links_adopted = tc.links.adopted,
        tc_gated = tc.gated,
        "policy applied"
    );
}

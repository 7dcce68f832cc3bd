//! Brings the kernel to a desired set of policies, as a diff, in an order that never leaves an
//! enforced cgroup unprotected:
//!
//! 1. everything is validated first (cgroups exist, rules compile); any error changes nothing;
//! 2. a changed policy's rules are written under a fresh policy id, then the cgroup's entry is
//!    switched to it in one map update, then the old id's rules are deleted;
//! 3. links are attached after the policy exists (and before that, a lookup miss denies anyway);
//! 4. a removed cgroup loses its links first, then its map entries.
//!
//! The kernel maps are the source of truth: nothing is remembered between runs, so a new agent
//! adopts whatever an old one left, and leftovers of an interrupted run are cleaned up.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use anyhow::{Result, bail};
use aya::Ebpf;
use egress_common::policy::{CgroupPolicy, MAX_POLICY_LEVEL};

use crate::{
    cgroup::{self, CgroupRef},
    kernel::{
        attach::{self, AttachOutcome, ProgramTags},
        bpffs::PinLayout,
        maps::KernelMaps,
    },
    policy::{
        Mode,
        compile::{CompiledRules, compile},
        config::PolicySpec,
    },
};

/// One cgroup's policy, validated and compiled, ready to write.
#[derive(Debug)]
pub struct Desired {
    pub cgroup: CgroupRef,
    pub mode: Mode,
    /// Shared: every pod of one gateway carries the same rules.
    pub rules: Arc<CompiledRules>,
}

/// Resolves and compiles every policy; fails on the first problem, naming it.
pub fn plan(specs: &[PolicySpec], cgroup_root: &Path) -> Result<Vec<Desired>> {
    let mut out: Vec<Desired> = Vec::with_capacity(specs.len());
    for spec in specs {
        let cgroup = cgroup::resolve(cgroup_root, &spec.cgroup)?;
        if cgroup.level > MAX_POLICY_LEVEL {
            bail!(
                "cgroup {:?} is {} levels deep; policies can sit at most {MAX_POLICY_LEVEL} deep",
                spec.cgroup,
                cgroup.level
            );
        }
        if let Some(other) = out.iter().find(|d| d.cgroup.id == cgroup.id) {
            bail!("cgroups {:?} and {} are the same cgroup", spec.cgroup, other.cgroup.path.display());
        }
        // Policies never nest: the programs stop at the first policy found among the ancestors,
        // and attaching both would run each program twice for the inner cgroup.
        if let Some(other) = out
            .iter()
            .find(|d| d.cgroup.path.starts_with(&cgroup.path) || cgroup.path.starts_with(&d.cgroup.path))
        {
            bail!(
                "cgroups {} and {} are nested; a policy covers its whole subtree, so give only one of them a policy",
                cgroup.path.display(),
                other.cgroup.path.display()
            );
        }
        let rules = compile(spec)?;
        out.push(Desired { cgroup, mode: spec.mode, rules: Arc::new(rules) });
    }
    Ok(out)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub links: AttachOutcome,
}

/// What the kernel holds, as last read or written by this process. A full pass reads it from
/// the maps and checks every link; an incremental pass trusts it, so its cost follows the
/// number of changes rather than the number of pods. Only this process writes the maps, so the
/// shadow stays exact between full passes.
#[derive(Debug, Default)]
pub struct KernelState {
    policies: BTreeMap<u64, CgroupPolicy>,
    entries: BTreeMap<u32, CompiledRules>,
    level_mask: u32,
    /// Cgroups whose links were checked or attached since the last full pass.
    linked: BTreeSet<u64>,
    /// Whether the next pass must re-read the kernel and check every link.
    stale: bool,
}

impl KernelState {
    /// A state that makes the next `apply` a full pass.
    pub fn unknown() -> Self {
        Self { stale: true, ..Self::default() }
    }

    /// Whether the next `apply` is a full pass.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Makes the next `apply` a full pass (after an error, or periodically to catch outside
    /// interference such as a removed pin).
    pub fn invalidate(&mut self) {
        self.stale = true;
    }

    fn refresh(&mut self, maps: &KernelMaps) -> Result<()> {
        self.policies = maps.policies()?;
        self.entries = maps.allow_entries()?;
        self.level_mask = maps.level_mask()?;
        self.linked.clear();
        Ok(())
    }
}

/// Applies `desired` with a fresh read of the kernel (standalone mode, one-shot callers).
pub fn apply(
    ebpf: &mut Ebpf,
    maps: &mut KernelMaps,
    pins: &PinLayout,
    desired: &[Desired],
) -> Result<Summary> {
    apply_with(ebpf, maps, pins, desired, &mut KernelState::unknown())
}

/// Applies `desired` against `state`. On error the state is marked for a full pass.
pub fn apply_with(
    ebpf: &mut Ebpf,
    maps: &mut KernelMaps,
    pins: &PinLayout,
    desired: &[Desired],
    state: &mut KernelState,
) -> Result<Summary> {
    let full = state.stale;
    if full {
        state.refresh(maps)?;
    }
    // Until this pass completes, a failure anywhere means the shadow may be off.
    state.stale = true;
    let summary = apply_diff(ebpf, maps, pins, desired, state, full)?;
    state.stale = false;
    Ok(summary)
}

fn apply_diff(
    ebpf: &mut Ebpf,
    maps: &mut KernelMaps,
    pins: &PinLayout,
    desired: &[Desired],
    state: &mut KernelState,
    full: bool,
) -> Result<Summary> {
    let mut summary = Summary::default();
    let mut used_ids: BTreeSet<u32> =
        state.policies.values().map(|p| p.policy_id).chain(state.entries.keys().copied()).collect();

    let wanted_mask = desired.iter().fold(0u32, |m, d| m | (1 << d.cgroup.level));
    // Widen the level mask before any new policy depends on it.
    if state.level_mask | wanted_mask != state.level_mask {
        state.level_mask |= wanted_mask;
        maps.set_level_mask(state.level_mask)?;
    }

    // Rules no policy points to (an interrupted earlier run) go first: they take room the
    // writes below may need.
    remove_orphan_rules(maps, state)?;

    let mut tags: Option<ProgramTags> = None;
    for d in desired {
        let want = CgroupPolicy { policy_id: 0, mode: d.mode.kernel_value() };
        let existing = state.policies.get(&d.cgroup.id).copied();
        let same = existing.is_some_and(|p| {
            p.mode == want.mode
                && state.entries.get(&p.policy_id).unwrap_or(&CompiledRules::default()) == &*d.rules
        });
        if same {
            summary.unchanged += 1;
        } else {
            let id = fresh_id(&used_ids);
            used_ids.insert(id);
            if let Err(e) = maps.write_rules(id, &d.rules) {
                // A full table (or any other failure) midway: take back what was written, so
                // the refused change leaves no rules behind to crowd out the next one. The
                // cgroup still points at its old rules, which stay enforced.
                maps.remove_rules_present(id, &d.rules);
                return Err(e.context(format!(
                    "the rules of cgroup {} do not fit (a change needs room for the old and the new rules side by side); nothing was changed",
                    d.cgroup.path.display()
                )));
            }
            state.entries.insert(id, (*d.rules).clone());
            let policy = CgroupPolicy { policy_id: id, ..want };
            maps.policies.insert(d.cgroup.id, policy, 0).map_err(|e| {
                anyhow::anyhow!("writing the policy of cgroup {}: {e}", d.cgroup.path.display())
            })?;
            state.policies.insert(d.cgroup.id, policy);
            match existing {
                Some(old) => {
                    if let Some(old_rules) = state.entries.remove(&old.policy_id) {
                        maps.remove_rules(old.policy_id, &old_rules)?;
                    }
                    summary.updated += 1;
                }
                None => summary.added += 1,
            }
        }
        if d.mode == Mode::Pass {
            // Released (or never enforced): registered for the gate only, no links of its own.
            if full || state.linked.remove(&d.cgroup.id) {
                attach::detach(pins, d.cgroup.id)?;
            }
            continue;
        }
        if !full && state.linked.contains(&d.cgroup.id) {
            continue;
        }
        let tags = match &mut tags {
            Some(t) => t,
            None => tags.insert(ProgramTags::read(ebpf)?),
        };
        let o = attach::ensure_attached(ebpf, pins, tags, &d.cgroup)?;
        state.linked.insert(d.cgroup.id);
        summary.links.attached += o.attached;
        summary.links.adopted += o.adopted;
        summary.links.replaced += o.replaced;
    }

    let keep: BTreeSet<u64> = desired.iter().map(|d| d.cgroup.id).collect();
    let pinned = if full { pins.pinned_cgroups()? } else { state.linked.iter().copied().collect() };
    let stale: BTreeSet<u64> =
        state.policies.keys().copied().chain(pinned).filter(|id| !keep.contains(id)).collect();
    for id in stale {
        attach::detach(pins, id)?;
        state.linked.remove(&id);
        if state.policies.remove(&id).is_some() {
            maps.policies
                .remove(&id)
                .map_err(|e| anyhow::anyhow!("removing the policy of cgroup id {id}: {e}"))?;
        }
        summary.removed += 1;
    }
    // Rules no policy points to any more: left by removed policies.
    remove_orphan_rules(maps, state)?;
    if state.level_mask != wanted_mask {
        state.level_mask = wanted_mask;
        maps.set_level_mask(wanted_mask)?;
    }
    if full || summary.removed > 0 {
        maps.forget_counters_except(&keep)?;
    }
    Ok(summary)
}

/// Removes the rules of policy ids no cgroup's policy points to.
fn remove_orphan_rules(maps: &mut KernelMaps, state: &mut KernelState) -> Result<()> {
    let live: BTreeSet<u32> = state.policies.values().map(|p| p.policy_id).collect();
    let orphans: Vec<u32> = state.entries.keys().copied().filter(|id| !live.contains(id)).collect();
    for id in orphans {
        if let Some(rules) = state.entries.remove(&id) {
            maps.remove_rules(id, &rules)?;
        }
    }
    Ok(())
}

fn fresh_id(used: &BTreeSet<u32>) -> u32 {
    let next = used.last().map_or(1, |m| m.wrapping_add(1));
    if next != 0 && !used.contains(&next) {
        return next;
    }
    (1..=u32::MAX).find(|id| !used.contains(id)).expect("fewer than 2^32 policies")
}

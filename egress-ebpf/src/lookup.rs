//! Policy lookups shared by every program.

use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    decide::AllowLookup,
    policy::{AllowRules, CgroupPolicy, Ipv4AllowKey, Ipv6AllowKey, MAX_POLICY_LEVEL, POLICY_ID_BITS},
};

use crate::maps::{EGRESS_ALLOW4_V1, EGRESS_ALLOW6_V1, EGRESS_CONFIG_V1, EGRESS_POLICY_V1};

/// The policy that governs a socket, found through its ancestors.
pub struct FoundPolicy {
    pub cgroup_id: u64,
    pub policy: CgroupPolicy,
}

/// Looks up the ancestors (`ancestor(level)` returns the cgroup id at that level, 0 when the
/// cgroup is shallower) at every level that holds a policy. Policies are never nested (userspace
/// rejects that), so the first hit is the only one.
#[inline(always)]
pub fn find_policy(ancestor: impl Fn(i32) -> u64) -> Option<FoundPolicy> {
    let mask = EGRESS_CONFIG_V1.get(0).map_or(0, |c| c.level_mask);
    let mut level = 0;
    while level <= MAX_POLICY_LEVEL {
        if mask >> level == 0 {
            break;
        }
        if mask & (1 << level) != 0 {
            let cgroup_id = ancestor(level as i32);
            if cgroup_id == 0 {
                break;
            }
            // SAFETY: the value is plain data and only read here.
            if let Some(policy) = unsafe { EGRESS_POLICY_V1.get(&cgroup_id) } {
                return Some(FoundPolicy { cgroup_id, policy: *policy });
            }
        }
        level += 1;
    }
    None
}

/// The allow tries, as the pure decision logic sees them.
pub struct KernelAllowTables;

impl AllowLookup for KernelAllowTables {
    #[inline(always)]
    fn rules_v4(&self, policy_id: u32, addr: [u8; 4]) -> Option<&AllowRules> {
        let key = Key::new(POLICY_ID_BITS + 32, Ipv4AllowKey { policy_id_be: policy_id.to_be_bytes(), addr });
        EGRESS_ALLOW4_V1.get(&key)
    }

    #[inline(always)]
    fn rules_v6(&self, policy_id: u32, addr: [u8; 16]) -> Option<&AllowRules> {
        let key =
            Key::new(POLICY_ID_BITS + 128, Ipv6AllowKey { policy_id_be: policy_id.to_be_bytes(), addr });
        EGRESS_ALLOW6_V1.get(&key)
    }
}

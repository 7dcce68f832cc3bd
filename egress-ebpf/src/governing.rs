//! The decision every program makes before it looks at the traffic, written once: which policy
//! governs, and whether there is anything to judge.
//!
//! - **No policy** (an interface or cgroup attached but the policy gone: an interrupted change,
//!   since the agent detaches before it removes a policy; or a socket used by a task outside
//!   every policy): `DenyNoPolicy`, enforced. Fail closed.
//! - **Pass mode** (a registered pod of a namespace that is not enforced, under the pod-start
//!   gate): `AllowUnenforced`, the traffic is not looked at.
//! - **Enforce or audit**: the program's own judgement, under that mode (`report::settle`
//!   applies it).

use egress_common::{
    policy::{CgroupPolicy, MODE_ENFORCE, MODE_PASS},
    verdict::Reason,
};

/// The policy a verdict was reached under, for its counters and its event. Small on purpose:
/// the tc program initialises it for every frame, and zeroing a larger struct costs a
/// byte-by-byte memset call in BPF.
pub struct Governing {
    /// The policy's cgroup; 0 when no policy was found.
    pub policy_cgroup_id: u64,
    pub mode: u32,
}

impl Governing {
    /// Before any policy is found: none, enforced.
    pub const NONE: Self = Self { policy_cgroup_id: 0, mode: MODE_ENFORCE };
}

/// `judge(policy id)` under `policy`, the policy found for `policy_cgroup_id` (if any), which is
/// recorded in `governing` with its mode.
#[inline(always)]
pub fn under_policy(
    policy_cgroup_id: u64,
    policy: Option<&CgroupPolicy>,
    governing: &mut Governing,
    judge: impl FnOnce(u32) -> Reason,
) -> Reason {
    governing.policy_cgroup_id = policy_cgroup_id;
    match policy {
        None => Reason::DenyNoPolicy,
        Some(p) if p.mode == MODE_PASS => Reason::AllowUnenforced,
        Some(p) => {
            governing.mode = p.mode;
            judge(p.policy_id)
        }
    }
}

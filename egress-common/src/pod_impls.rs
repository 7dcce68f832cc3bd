//! Lets userspace put the shared types into aya maps. Sound because every type is `repr(C)`,
//! `Copy`, has no padding and accepts any bit pattern.

use crate::{
    event::{EventBudget, VerdictEvent},
    policy::{AllowRules, CgroupPolicy, GlobalConfig, Ipv4AllowKey, Ipv6AllowKey},
    steer::{SteerKey, SteerTarget, SteeredPeer},
    tc::{InboundKey, PolicyBinding, SourceKey4, SourceKey6},
    verdict::{CgroupReasonKey, ReasonCounters},
};

// SAFETY: see the module comment.
unsafe impl aya::Pod for CgroupPolicy {}
unsafe impl aya::Pod for AllowRules {}
unsafe impl aya::Pod for Ipv4AllowKey {}
unsafe impl aya::Pod for Ipv6AllowKey {}
unsafe impl aya::Pod for GlobalConfig {}
unsafe impl aya::Pod for ReasonCounters {}
unsafe impl aya::Pod for CgroupReasonKey {}
unsafe impl aya::Pod for VerdictEvent {}
unsafe impl aya::Pod for EventBudget {}
unsafe impl aya::Pod for PolicyBinding {}
unsafe impl aya::Pod for SourceKey4 {}
unsafe impl aya::Pod for SourceKey6 {}
unsafe impl aya::Pod for InboundKey {}
unsafe impl aya::Pod for SteerKey {}
unsafe impl aya::Pod for SteerTarget {}
unsafe impl aya::Pod for SteeredPeer {}

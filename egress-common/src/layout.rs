//! The size of every type the kernel programs and userspace exchange through maps and the ring
//! buffer, checked when either side compiles. Both build this crate, so the check cannot prove
//! the two agree (they use the same definitions); what it catches is a layout that changes by
//! accident: implicit padding (which the kernel may leave uninitialised and a hash key would then
//! hash), or a field added without thinking of the maps already pinned on running nodes, whose
//! name must then change (the `_V<n>` suffixes in [`crate::maps`]).

use core::mem::size_of;

use crate::{
    event::{EventBudget, VerdictEvent},
    policy::{AllowRules, CgroupPolicy, GlobalConfig, Ipv4AllowKey, Ipv6AllowKey, PortRule},
    steer::{SteerKey, SteerTarget, SteeredPeer},
    tc::{InboundKey, PolicyBinding, SourceKey4, SourceKey6},
    verdict::{CgroupReasonKey, ReasonCounters},
};

const _: () = assert!(size_of::<CgroupPolicy>() == 8);
const _: () = assert!(size_of::<PortRule>() == 8);
const _: () = assert!(size_of::<AllowRules>() == 136);
const _: () = assert!(size_of::<Ipv4AllowKey>() == 8);
const _: () = assert!(size_of::<Ipv6AllowKey>() == 20);
const _: () = assert!(size_of::<GlobalConfig>() == 8);
const _: () = assert!(size_of::<ReasonCounters>() == 16);
const _: () = assert!(size_of::<CgroupReasonKey>() == 16);
const _: () = assert!(size_of::<VerdictEvent>() == 72);
const _: () = assert!(size_of::<EventBudget>() == 32);
const _: () = assert!(size_of::<PolicyBinding>() == 8);
const _: () = assert!(size_of::<SourceKey4>() == 8);
const _: () = assert!(size_of::<SourceKey6>() == 20);
const _: () = assert!(size_of::<InboundKey>() == 40);
const _: () = assert!(size_of::<SteerKey>() == 8);
const _: () = assert!(size_of::<SteerTarget>() == 24);
const _: () = assert!(size_of::<SteeredPeer>() == 40);

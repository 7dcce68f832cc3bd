//! Every map, pinned by name under the agent's bpffs directory so that the policy outlives the
//! agent process. Names must equal the constants in `egress_common::maps`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use egress_common::{
    event::EventBudget,
    maps::{
        EVENTS_RING_BYTES, MAX_ALLOW_ENTRIES, MAX_CGROUP_COUNTERS, MAX_INBOUND, MAX_PASSIVE_SOCKETS,
        MAX_POLICIES, MAX_STEER_ENTRIES, MAX_TC_SOURCES, PASSIVE_STAT_SLOTS,
    },
    policy::{AllowRules, CgroupPolicy, GlobalConfig, Ipv4AllowKey, Ipv6AllowKey},
    steer::{SteerKey, SteerTarget},
    tc::{InboundKey, PolicyBinding, SourceKey4, SourceKey6},
    verdict::{CgroupReasonKey, REASON_SLOTS, ReasonCounters},
};

use crate::steered_storage::SteeredStorage;

/// Enforced cgroup id -> its policy.
#[map]
pub static EGRESS_POLICY_V1: HashMap<u64, CgroupPolicy> = HashMap::pinned(MAX_POLICIES, 0);

/// (policy id, IPv4 prefix) -> rules for destinations under that prefix.
#[map]
pub static EGRESS_ALLOW4_V1: LpmTrie<Ipv4AllowKey, AllowRules> = LpmTrie::pinned(MAX_ALLOW_ENTRIES, 0);

/// (policy id, IPv6 prefix) -> rules for destinations under that prefix.
#[map]
pub static EGRESS_ALLOW6_V1: LpmTrie<Ipv6AllowKey, AllowRules> = LpmTrie::pinned(MAX_ALLOW_ENTRIES, 0);

/// Index 0: global configuration (which cgroup levels hold policies).
#[map]
pub static EGRESS_CONFIG_V1: Array<GlobalConfig> = Array::pinned(1, 0);

/// Reason number -> verdict counts, per CPU so the hot path never contends.
#[map]
pub static EGRESS_COUNTERS_V1: PerCpuArray<ReasonCounters> = PerCpuArray::pinned(REASON_SLOTS, 0);

/// (policy cgroup, deny reason) -> denials and audits, per CPU: the per-pod metrics. Not preallocated:
/// per-CPU values of every possible entry would cost MAX_CGROUP_COUNTERS x CPUs x 16 bytes.
#[map]
pub static EGRESS_CGCOUNT_V1: PerCpuHashMap<CgroupReasonKey, ReasonCounters> =
    PerCpuHashMap::pinned(MAX_CGROUP_COUNTERS, BPF_F_NO_PREALLOC);

/// Socket cookie -> 1 for TCP connections an enforced workload accepted (see `sock_ops`).
#[map]
pub static EGRESS_PASSIVE_V1: LruHashMap<u64, u8> = LruHashMap::pinned(MAX_PASSIVE_SOCKETS, 0);

/// Passive marks made, released at close and found evicted at close (`PASSIVE_STAT_*`), per CPU.
#[map]
pub static EGRESS_PASSIVE_STATS_V1: PerCpuArray<u64> = PerCpuArray::pinned(PASSIVE_STAT_SLOTS, 0);

/// Index 0: per-CPU event rate limit state.
#[map]
pub static EGRESS_EVBUDGET_V1: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// Deny and audit events for the agent.
#[map]
pub static EGRESS_EVENTS_V1: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// Host-side ifindex of an enforced pod's veth -> the pod's policy (see `tc_from_pod`).
#[map]
pub static EGRESS_TCIF_V1: HashMap<u32, PolicyBinding> = HashMap::pinned(MAX_POLICIES, 0);

/// (ifindex, pod IPv4 address) -> the pod's policy: the address may be sent from that interface.
#[map]
pub static EGRESS_TCSRC4_V2: HashMap<SourceKey4, PolicyBinding> = HashMap::pinned(MAX_TC_SOURCES, 0);

/// (ifindex, pod IPv6 address) -> the pod's policy.
#[map]
pub static EGRESS_TCSRC6_V2: HashMap<SourceKey6, PolicyBinding> = HashMap::pinned(MAX_TC_SOURCES, 0);

/// TCP connections opened towards pods (recorded by `tc_to_pod`); value unused.
#[map]
pub static EGRESS_INBOUND_V1: LruHashMap<InboundKey, u8> = LruHashMap::pinned(MAX_INBOUND, 0);

/// (policy id, original port) -> the gateway listener TCP connections to that port are carried
/// to when the policy does not allow their destination (see `steer`).
#[map]
pub static EGRESS_STEER_V1: HashMap<SteerKey, SteerTarget> = HashMap::pinned(MAX_STEER_ENTRIES, 0);

/// The destination a steered socket asked for, for getpeername: socket-local storage, which the
/// kernel frees with the socket (see `steered_storage`).
#[btf_map]
pub static EGRESS_STEERED_V2: SteeredStorage = SteeredStorage::new();

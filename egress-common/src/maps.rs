//! Map names (as pinned under the bpffs directory) and sizes. A name carries a version suffix
//! that is bumped whenever its key or value layout changes, so a new agent never reinterprets an
//! old pinned map.

pub const MAP_POLICIES: &str = "EGRESS_POLICY_V1";
pub const MAP_ALLOW_V4: &str = "EGRESS_ALLOW4_V1";
pub const MAP_ALLOW_V6: &str = "EGRESS_ALLOW6_V1";
pub const MAP_CONFIG: &str = "EGRESS_CONFIG_V1";
pub const MAP_COUNTERS: &str = "EGRESS_COUNTERS_V1";
pub const MAP_CGROUP_COUNTERS: &str = "EGRESS_CGCOUNT_V1";
pub const MAP_PASSIVE: &str = "EGRESS_PASSIVE_V1";
pub const MAP_PASSIVE_STATS: &str = "EGRESS_PASSIVE_STATS_V1";
pub const MAP_EVENT_BUDGET: &str = "EGRESS_EVBUDGET_V1";
pub const MAP_EVENTS: &str = "EGRESS_EVENTS_V1";
pub const MAP_TC_INTERFACES: &str = "EGRESS_TCIF_V1";
pub const MAP_TC_SOURCES_V4: &str = "EGRESS_TCSRC4_V2";
pub const MAP_TC_SOURCES_V6: &str = "EGRESS_TCSRC6_V2";
pub const MAP_INBOUND: &str = "EGRESS_INBOUND_V1";
pub const MAP_STEER: &str = "EGRESS_STEER_V1";
pub const MAP_STEERED: &str = "EGRESS_STEERED_V2";

/// Enforced cgroups (pods) per node.
pub const MAX_POLICIES: u32 = 16_384;
/// (cgroup, reason) counter entries: every policy cgroup times the reasons it actually saw.
pub const MAX_CGROUP_COUNTERS: u32 = 65_536;
/// Accepted TCP connections remembered at once, over all pods (LRU beyond that): the size of a
/// node's default conntrack table (nf_conntrack_max on a 16 GiB node), about 20 MiB of kernel
/// memory. Loopback connections are not marked, so only connections that really cross the
/// pods' links take room. (The size of a map pinned by an older agent stays until teardown.)
pub const MAX_PASSIVE_SOCKETS: u32 = 262_144;

/// Slots of the passive-mark statistics (per-CPU u64 counters).
pub const PASSIVE_STAT_MARKED: u32 = 0;
pub const PASSIVE_STAT_RELEASED: u32 = 1;
/// A marked socket closed and its mark was gone: the LRU evicted it while it was in use.
pub const PASSIVE_STAT_LOST: u32 = 2;
pub const PASSIVE_STAT_SLOTS: u32 = 3;
/// Allow prefixes per address family, over all policies.
pub const MAX_ALLOW_ENTRIES: u32 = 262_144;
/// Pod addresses bound to interfaces, per address family (pods have one or two each).
pub const MAX_TC_SOURCES: u32 = 4 * MAX_POLICIES;
/// Inbound TCP connections to pods remembered at once, over all pods (LRU beyond that).
pub const MAX_INBOUND: u32 = 65_536;
/// Steered ports over all policies: a few per pod.
pub const MAX_STEER_ENTRIES: u32 = 4 * MAX_POLICIES;
/// Ring buffer size for events (bytes, power of two).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Program names as they appear in the object file.
pub const PROG_SKB_EGRESS: &str = "egress_skb";
pub const PROG_CONNECT4: &str = "egress_connect4";
pub const PROG_CONNECT6: &str = "egress_connect6";
pub const PROG_SENDMSG4: &str = "egress_sendmsg4";
pub const PROG_SENDMSG6: &str = "egress_sendmsg6";
pub const PROG_SOCKOPS: &str = "egress_sockops";
/// getpeername() of a steered socket: the address the application connected to.
pub const PROG_GETPEERNAME4: &str = "egress_getpeername4";
pub const PROG_GETPEERNAME6: &str = "egress_getpeername6";
/// tc ingress on a pod's host-side veth: judges what the pod sends.
pub const PROG_TC_FROM_POD: &str = "egress_tc_from_pod";
/// tc egress on the same veth: records TCP connections opened towards the pod.
pub const PROG_TC_TO_POD: &str = "egress_tc_to_pod";

//! Deny and audit events sent from the kernel to userspace through the ring buffer.

/// `VerdictEvent::action`: the packet was dropped or the syscall refused with EPERM.
pub const ACTION_DENIED: u8 = 1;
/// `VerdictEvent::action`: audit mode let a would-be denial through.
pub const ACTION_AUDITED: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns()`: monotonic nanoseconds since boot.
    pub timestamp_ns: u64,
    /// The socket's own cgroup (for the socket hooks: the calling task's cgroup).
    pub cgroup_id: u64,
    /// The enforced cgroup whose policy applied; 0 when none was found.
    pub policy_cgroup_id: u64,
    /// Destination address as judged, network byte order; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
    /// Source address for packets (zero for socket hooks), same layout as `daddr`.
    pub saddr: [u8; 16],
    /// Destination port, host byte order; 0 when the protocol has none or it is unknown.
    pub dport: u16,
    /// Source port, host byte order (packets only).
    pub sport: u16,
    /// [`crate::verdict::Reason`] number.
    pub reason: u8,
    /// 4 or 6: the family the destination was judged as (IPv4-mapped IPv6 is 4).
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// [`crate::verdict::Hook`] number.
    pub hook: u8,
    /// `ACTION_DENIED` or `ACTION_AUDITED`.
    pub action: u8,
    pub reserved: [u8; 7],
}

/// Kernel-side cap on events per CPU per second; beyond it events are counted, not sent, so a
/// flood of denied packets cannot flood the ring buffer or the agent's log.
pub const EVENTS_PER_CPU_PER_SEC: u64 = 2000;

/// Per-CPU event budget state (index 0 of the budget array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub sent_in_window: u64,
    /// Events not sent because the per-second budget was spent.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub ringbuf_full: u64,
}

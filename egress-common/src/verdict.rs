//! Stable, numbered verdict reasons. The numbers are part of the interface (metrics labels,
//! events, counters map index): never renumber, only append.

/// Why a packet or syscall was allowed or denied.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Destination is loopback (127.0.0.0/8, ::1; and for syscalls the unspecified address, which
    /// the kernel turns into a local one).
    AllowLoopback = 1,
    /// Destination is one of the workload's gateway address:port pairs.
    AllowGateway = 2,
    /// Destination is a DNS server on UDP or TCP port 53.
    AllowDns = 3,
    /// Destination is inside a configured extra CIDR (with its protocol/port restriction).
    AllowExtraCidr = 4,
    /// The cgroup is registered as not enforced (a pod of a namespace that did not opt in). Seen
    /// only while the pod-start gate is attached above the pods (see the agent's `k8s::gate`).
    AllowUnenforced = 5,
    /// A packet of a TCP connection the workload accepted (a reply to whoever connected in,
    /// such as a kubelet probe), or the SYN-ACK of a listening socket.
    AllowReply = 6,
    /// Link-layer housekeeping at the tc layer: ARP, and IPv6 neighbour discovery and multicast
    /// listener messages from a link-local or unspecified source (scoped to the link: a router
    /// never forwards a packet with a link-local source).
    AllowLinkControl = 7,
    /// A TCP connect() the policy does not allow, to a port the policy steers: carried to the
    /// gateway's steering listener instead of refused (connect hooks only; see `steer`). In
    /// audit mode the connection is not rewritten and this is reported as "would steer".
    AllowSteered = 8,
    /// No allow entry covers the destination address.
    DenyDestination = 16,
    /// The destination address is allowed, but not for this protocol or port.
    DenyPort = 17,
    /// The cgroup is inside an enforced subtree but no policy was found for it: fail closed.
    DenyNoPolicy = 18,
    /// The packet could not be parsed (truncated header, unknown IP version).
    DenyMalformed = 19,
    /// A non-first fragment towards a port-restricted destination: its port cannot be checked.
    DenyFragment = 20,
    /// IPv4 options or an IPv6 routing header: a router could forward the packet past the
    /// destination that was checked (source routing, segment routing).
    DenySourceRoute = 21,
    /// A loopback destination on a packet leaving through a non-loopback device.
    DenyLoopbackSpoof = 22,
    /// At the tc layer: the source address is not one the agent bound to the interface the
    /// frame came from (a spoofed source, or another pod's address).
    DenySpoofedSource = 23,
    /// At the tc layer: a frame that is neither IPv4, IPv6 nor ARP (raw Ethernet types, VLAN
    /// tags), which a packet socket can send and the policy cannot judge.
    DenyNotIp = 24,
    /// An encapsulating protocol (IP-in-IP, GRE, ...) or UDP to a well-known tunnel port, to an
    /// address whose rules do not name it: a rule for any protocol or any UDP port does not
    /// cover a tunnel, whose inner packet the destination would forward past both layers.
    DenyEncapsulation = 25,
}

/// Size of the counters array: every reason number is an index below this.
pub const REASON_SLOTS: u32 = 32;

/// All reasons, for userspace listings (metrics, inspect).
pub const ALL_REASONS: [Reason; 18] = [
    Reason::AllowLoopback,
    Reason::AllowGateway,
    Reason::AllowDns,
    Reason::AllowExtraCidr,
    Reason::AllowUnenforced,
    Reason::AllowReply,
    Reason::AllowLinkControl,
    Reason::AllowSteered,
    Reason::DenyDestination,
    Reason::DenyPort,
    Reason::DenyNoPolicy,
    Reason::DenyMalformed,
    Reason::DenyFragment,
    Reason::DenySourceRoute,
    Reason::DenyLoopbackSpoof,
    Reason::DenySpoofedSource,
    Reason::DenyNotIp,
    Reason::DenyEncapsulation,
];

impl Reason {
    pub const fn is_allow(self) -> bool {
        (self as u8) < 16
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::AllowLoopback,
            2 => Self::AllowGateway,
            3 => Self::AllowDns,
            4 => Self::AllowExtraCidr,
            5 => Self::AllowUnenforced,
            6 => Self::AllowReply,
            7 => Self::AllowLinkControl,
            8 => Self::AllowSteered,
            16 => Self::DenyDestination,
            17 => Self::DenyPort,
            18 => Self::DenyNoPolicy,
            19 => Self::DenyMalformed,
            20 => Self::DenyFragment,
            21 => Self::DenySourceRoute,
            22 => Self::DenyLoopbackSpoof,
            23 => Self::DenySpoofedSource,
            24 => Self::DenyNotIp,
            25 => Self::DenyEncapsulation,
            _ => return None,
        })
    }

    /// Stable snake_case name, used as the metrics label and in logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AllowLoopback => "allow_loopback",
            Self::AllowGateway => "allow_gateway",
            Self::AllowDns => "allow_dns",
            Self::AllowExtraCidr => "allow_extra_cidr",
            Self::AllowUnenforced => "allow_unenforced",
            Self::AllowReply => "allow_reply",
            Self::AllowLinkControl => "allow_link_control",
            Self::AllowSteered => "allow_steered",
            Self::DenyDestination => "deny_destination",
            Self::DenyPort => "deny_port",
            Self::DenyNoPolicy => "deny_no_policy",
            Self::DenyMalformed => "deny_malformed",
            Self::DenyFragment => "deny_fragment",
            Self::DenySourceRoute => "deny_source_route",
            Self::DenyLoopbackSpoof => "deny_loopback_spoof",
            Self::DenySpoofedSource => "deny_spoofed_source",
            Self::DenyNotIp => "deny_not_ip",
            Self::DenyEncapsulation => "deny_encapsulation",
        }
    }
}

/// Per-CPU counter value, indexed by reason number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonCounters {
    /// Verdicts applied as stated: allowed and passed, or denied and dropped/refused.
    pub applied: u64,
    /// Denials that audit mode let through.
    pub audited: u64,
}

/// Key of the per-cgroup counters of denials and audits: the cgroup that holds the policy (a
/// pod) and the reason. (Allowed traffic is counted per reason for the whole node only.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupReasonKey {
    /// Cgroup id (host order) of the cgroup whose policy judged the traffic.
    pub cgroup_id: u64,
    pub reason: u8,
    pub reserved: [u8; 7],
}

/// Which hook reached a verdict.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    SkbEgress = 1,
    Connect4 = 2,
    Connect6 = 3,
    Sendmsg4 = 4,
    Sendmsg6 = 5,
    /// tc ingress on the host side of a pod's veth: frames from the pod.
    TcFromPod = 6,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::SkbEgress,
            2 => Self::Connect4,
            3 => Self::Connect6,
            4 => Self::Sendmsg4,
            5 => Self::Sendmsg6,
            6 => Self::TcFromPod,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::SkbEgress => "cgroup_skb/egress",
            Self::Connect4 => "cgroup/connect4",
            Self::Connect6 => "cgroup/connect6",
            Self::Sendmsg4 => "cgroup/sendmsg4",
            Self::Sendmsg6 => "cgroup/sendmsg6",
            Self::TcFromPod => "tc/from_pod",
        }
    }
}

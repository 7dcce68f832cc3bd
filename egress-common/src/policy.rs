//! Policy values stored in the kernel maps.

/// `CgroupPolicy::mode`: deny what the policy does not allow.
pub const MODE_ENFORCE: u32 = 1;
/// `CgroupPolicy::mode`: let everything through, but count and report what would be denied.
pub const MODE_AUDIT: u32 = 2;
/// `CgroupPolicy::mode`: the cgroup is known and not enforced; everything passes. Used for pods
/// of namespaces that did not opt in, so the pod-start gate can tell them from unknown cgroups.
pub const MODE_PASS: u32 = 3;

/// Value of the per-cgroup policy map, keyed by cgroup id (u64, host order; the cgroup
/// directory's inode number on cgroup v2).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupPolicy {
    /// Selects this policy's entries in the allow tries. Userspace writes a policy's entries under
    /// a fresh id and then switches this field, so a change is one atomic map update.
    pub policy_id: u32,
    /// `MODE_ENFORCE`, `MODE_AUDIT` or `MODE_PASS`.
    pub mode: u32,
}

/// `PortRule::protocol` value that matches every IP protocol.
pub const PROTO_ANY: u8 = 255;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// One permission for an address prefix: a protocol and a destination port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRule {
    /// IP protocol number, or `PROTO_ANY`.
    pub protocol: u8,
    /// The allow [`crate::verdict::Reason`] reported when this rule matches.
    pub reason: u8,
    pub reserved: [u8; 2],
    /// First allowed destination port, host byte order. `0..=65535` means "any port".
    pub port_first: u16,
    /// Last allowed destination port (inclusive), host byte order.
    pub port_last: u16,
}

impl PortRule {
    pub const fn any_port(&self) -> bool {
        self.port_first == 0 && self.port_last == u16::MAX
    }
}

/// Most rules one prefix can carry (after userspace merges in the rules of every covering,
/// shorter prefix). Bounded so the kernel loop is bounded; the config is rejected beyond it.
pub const MAX_RULES_PER_PREFIX: usize = 16;

/// Value of the allow tries: every rule that applies to destinations under the matched prefix.
///
/// Userspace stores, for each prefix, the union of its own rules and those of all shorter
/// prefixes that contain it. A longest-prefix lookup therefore returns every rule whose CIDR
/// contains the destination, in one lookup, however many entries the trie holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowRules {
    pub count: u32,
    pub reserved: u32,
    pub rules: [PortRule; MAX_RULES_PER_PREFIX],
}

impl AllowRules {
    pub const EMPTY: Self = Self {
        count: 0,
        reserved: 0,
        rules: [PortRule { protocol: 0, reason: 0, reserved: [0; 2], port_first: 0, port_last: 0 };
            MAX_RULES_PER_PREFIX],
    };

    /// The rules in use.
    pub fn as_slice(&self) -> &[PortRule] {
        let n = (self.count as usize).min(MAX_RULES_PER_PREFIX);
        &self.rules[..n]
    }
}

/// LPM trie key data for IPv4 allow entries. Matched bit by bit from the first byte, so both
/// fields are big-endian and the prefix length always covers all 32 bits of `policy_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4AllowKey {
    /// Policy id, big-endian.
    pub policy_id_be: [u8; 4],
    /// Destination address, network byte order.
    pub addr: [u8; 4],
}

/// LPM trie key data for IPv6 allow entries (see [`Ipv4AllowKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6AllowKey {
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Bits of the LPM prefix taken by the policy id in front of the address.
pub const POLICY_ID_BITS: u32 = 32;

/// Value of the single-entry global configuration array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Bit n set: some policy is keyed by a cgroup at level n of the hierarchy (root = 0). The
    /// programs only look up the ancestors at these levels, usually one lookup per packet.
    pub level_mask: u32,
    pub reserved: u32,
}

/// Deepest cgroup level a policy may be attached at (bits of `level_mask`).
pub const MAX_POLICY_LEVEL: u32 = 31;

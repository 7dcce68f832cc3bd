//! Policy as the user writes it (config), and as the kernel stores it (compile).

pub mod compile;
pub mod config;

use egress_common::policy::{MODE_AUDIT, MODE_ENFORCE, MODE_PASS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
    /// Known and not enforced: registered only so the pod-start gate lets it through; never
    /// given links of its own.
    Pass,
}

impl Mode {
    pub const fn kernel_value(self) -> u32 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
            Self::Pass => MODE_PASS,
        }
    }

    pub const fn from_kernel(v: u32) -> Option<Self> {
        match v {
            MODE_ENFORCE => Some(Self::Enforce),
            MODE_AUDIT => Some(Self::Audit),
            MODE_PASS => Some(Self::Pass),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Pass => "pass",
        }
    }

    /// The mode `name` names (the inverse of [`Mode::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Enforce, Self::Audit, Self::Pass].into_iter().find(|m| m.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
    /// One IP protocol by number (0-254). Tunnels (GRE 47, IP-in-IP 4, IPv6-in-IP 41, ...)
    /// are allowed only by a rule that names them this way; `Any` does not cover them.
    Number(u8),
}

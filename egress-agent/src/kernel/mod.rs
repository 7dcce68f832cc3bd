//! Everything that touches the kernel: bpffs pins, the embedded object, maps and links.

pub mod agent_lock;
pub mod attach;
pub mod bpffs;
pub mod maps;
pub mod object;
pub mod query;
pub mod rtnetlink;
pub mod tc_attach;
pub mod tc_filters;
pub mod tc_maps;
pub mod veth_peer;

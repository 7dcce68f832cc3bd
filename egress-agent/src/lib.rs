//! egressfw node agent: loads and pins the kernel programs, keeps the kernel policy in line with
//! the configuration, reports verdicts, and shows what is enforced.

pub mod cgroup;
pub mod cni;
pub mod crd;
pub mod events;
pub mod feed;
pub mod gateway;
pub mod http;
pub mod inspect;
pub mod interfaces;
pub mod k8s;
pub mod kernel;
pub mod kernel_observations;
pub mod link_events;
pub mod metrics;
pub mod netlink_wait;
pub mod observation_table;
pub mod observe;
pub mod policy;
pub mod printable;
pub mod reconcile;
pub mod routes;
pub mod standalone;
pub mod teardown;

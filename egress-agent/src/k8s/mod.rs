//! `egress-agent run`: the Kubernetes node agent. Namespace labels and the node's pods become
//! kernel policies on the pods' cgroups.

pub mod cgroup_watch;
pub mod config;
pub mod desired;
pub mod gateway_access;
pub mod node;
pub mod own_pod;
pub mod pod_cgroup;
pub mod pod_events;
pub mod pod_interfaces;
pub mod record_watch;
pub mod run;
pub mod watch;
pub mod watch_health;

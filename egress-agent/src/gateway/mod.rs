//! The egress gateway proxy (`egress-agent gateway --config gw.yaml`): the userspace half of
//! the product. The kernel makes the gateway the only way out; the gateway decides, per source
//! namespace, which external hosts are reachable, and logs and counts every decision.
//!
//! - `config`, `limits`, `policy`, `identity`, `pod_index`: what is allowed, and who is asking;
//! - `target`, `host`, `ip_literal`, `ranges`, `client_hello`, `first_flight`: reading and
//!   normalising what the client asked for (pure functions, fuzzed);
//! - `connection`: the pipeline every connection walks (admit, identify, authorise, resolve,
//!   check, dial the checked address, relay, finish), with `slots` and `refusal`;
//! - `http_proxy`, `tls_passthrough`, `tcp_forward`: the listeners' fronts, each supplying its
//!   target step; `connect_tunnel`, `tls_hello`, `originate`: what they share;
//! - `relay`, `forward_body`, `access_log`, `metrics`: moving bytes, and accounting;
//! - `state`, `server`, `workers`: the running gateway and its process.

pub mod access_log;
pub mod client_hello;
pub mod config;
pub mod config_watch;
pub mod connect_tunnel;
pub mod connection;
pub mod decision;
pub mod diff;
pub mod diff_cli;
pub mod explain;
pub mod first_flight;
pub mod forward_body;
pub mod framing;
pub mod host;
pub mod http_proxy;
pub mod identity;
pub mod ip_literal;
pub mod limits;
pub mod metrics;
pub mod observation_series;
pub mod observations;
pub mod observed;
pub mod originate;
pub mod parent;
pub mod pod_index;
pub mod policy;
pub mod policy_status;
pub mod ranges;
pub mod recommend;
pub mod recommend_cli;
pub mod recommend_direct;
pub mod refusal;
pub mod relay;
pub mod replicas;
pub mod resources;
pub mod server;
pub mod slots;
pub mod sniffed_io;
pub mod state;
pub mod status_writer;
pub mod target;
pub mod tcp_forward;
pub mod tiers;
pub mod tls_hello;
pub mod tls_passthrough;
pub mod upstream_checks;
pub mod workers;

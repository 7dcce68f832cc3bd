//! The egress gateway proxy (`egress-agent gateway`, issue 4). So far: the destination checks
//! every listener will share, as pure functions with unit tests. The listeners, configuration,
//! logs and metrics come next.

pub mod host;
pub mod ip_literal;
pub mod ranges;

//! Why no upstream connection was made (or a request could not complete), and how that is
//! written down: a denial is the client's doing, a failure the upstream's.

use super::{access_log::Record, policy::Deny};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Deny(Deny),
    /// Allowed, but connecting failed.
    ConnectFailed,
    ConnectTimeout,
    /// Originating TLS to the upstream failed (certificate not valid for the name, or no TLS).
    TlsFailed,
    /// The client stopped sending its request body (`requestBodyTimeout`).
    RequestBodyTimeout,
    /// The upstream did not answer (`responseTimeout`).
    ResponseTimeout,
    /// The parent proxy (`upstreamProxy`) could not be reached or broke off.
    ParentUnreachable,
    /// The parent proxy answered CONNECT with this status (0: not an HTTP answer).
    ParentRefused(u16),
}

impl From<Deny> for Refusal {
    fn from(d: Deny) -> Self {
        Self::Deny(d)
    }
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Deny(d) => d.name(),
            Self::ConnectFailed => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::TlsFailed => "upstream_tls_failed",
            Self::RequestBodyTimeout => "request_body_timeout",
            Self::ResponseTimeout => "response_timeout",
            Self::ParentUnreachable => "parent_unreachable",
            Self::ParentRefused(_) => "parent_refused",
        }
    }

    /// Puts the refusal into the access-log record.
    pub fn note(self, record: &mut Record) {
        match self {
            // The client's fault, like a slow request head: a denial.
            Self::Deny(_) | Self::RequestBodyTimeout => record.deny(self.reason()),
            Self::ConnectFailed
            | Self::ConnectTimeout
            | Self::TlsFailed
            | Self::ResponseTimeout
            | Self::ParentUnreachable => {
                record.fail(self.reason());
            }
            Self::ParentRefused(status) => {
                record.fail(self.reason());
                record.parent_status = Some(status);
            }
        }
    }
}

//! The `limits:` part of the gateway configuration: how much, and for how long, one client or
//! upstream may hold the gateway's resources. Defaults are in [`Limits::default`]; every value
//! is checked and an error names it.

use std::time::Duration;

use serde::Deserialize;

use crate::policy::config::{ParseError, invalid};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Per client address: one pod cannot take every slot.
    pub max_connections_per_source: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest pause inside a forwarded request body (a client dripping its body).
    pub request_body_timeout: Duration,
    /// Longest an upstream may stay silent: before the response head (counted from the last
    /// request bytes sent) and between response body chunks.
    pub response_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub client_hello_max_bytes: usize,
    /// Entries of the observations table (`observations`): what each workload reached.
    pub max_observations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_source: 1_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            // nginx's client_body_timeout and proxy_read_timeout: long enough for slow mobile
            // clients and slow APIs, short enough that a stalled peer frees its slot.
            request_body_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_observations: super::observations::DEFAULT_CAPACITY,
            client_hello_max_bytes: 16 * 1024,
        }
    }
}

/// No timeout is longer than this (timer arithmetic stays far from overflow).
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    connect_timeout: Option<String>,
    request_body_timeout: Option<String>,
    response_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    client_hello_max_bytes: Option<usize>,
    max_observations: Option<usize>,
}

pub(super) fn parse_limits(raw: &RawLimits) -> Result<Limits, ParseError> {
    let d = Limits::default();
    let duration = |v: &Option<String>, at: &str, default: Duration| {
        v.as_deref()
            .map(|s| parse_duration(s, &format!("limits.{at}")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let positive = |v: Option<usize>, at: &str, default: usize, min: usize| match v {
        None => Ok(default),
        Some(n) if n >= min => Ok(n),
        Some(n) => Err(invalid(format!("limits.{at}"), format!("{n} is below the minimum of {min}"))),
    };
    Ok(Limits {
        max_observations: positive(raw.max_observations, "maxObservations", d.max_observations, 1)?,
        max_connections: positive(raw.max_connections, "maxConnections", d.max_connections, 1)?,
        max_connections_per_source: positive(
            raw.max_connections_per_source,
            "maxConnectionsPerSource",
            d.max_connections_per_source,
            1,
        )?,
        header_timeout: duration(&raw.header_timeout, "headerTimeout", d.header_timeout)?,
        idle_timeout: duration(&raw.idle_timeout, "idleTimeout", d.idle_timeout)?,
        connect_timeout: duration(&raw.connect_timeout, "connectTimeout", d.connect_timeout)?,
        request_body_timeout: duration(
            &raw.request_body_timeout,
            "requestBodyTimeout",
            d.request_body_timeout,
        )?,
        response_timeout: duration(&raw.response_timeout, "responseTimeout", d.response_timeout)?,
        // hyper's read buffer cannot be smaller than 8 KiB.
        max_header_bytes: positive(raw.max_header_bytes, "maxHeaderBytes", d.max_header_bytes, 8192)?,
        max_headers: match positive(raw.max_headers, "maxHeaders", d.max_headers, 8)? {
            n if n <= super::framing::MAX_HEADERS => n,
            n => {
                return Err(invalid(
                    "limits.maxHeaders",
                    format!("{n} is above the maximum of {}", super::framing::MAX_HEADERS),
                ));
            }
        },
        client_hello_max_bytes: positive(
            raw.client_hello_max_bytes,
            "clientHelloMaxBytes",
            d.client_hello_max_bytes,
            512,
        )?,
    })
}

pub(super) fn parse_duration(s: &str, at: &str) -> Result<Duration, ParseError> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d > MAX_DURATION => Err(invalid(at, format!("{s:?} is longer than a week"))),
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(invalid(at, format!("{s:?} is zero; give a positive duration"))),
        Err(e) => Err(invalid(at, format!("{s:?} is not a duration like \"10s\" or \"5m\" ({e})"))),
    }
}

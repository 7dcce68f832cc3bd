//! What the gateway changes in a forwarded request and response: the origin-form target, the
//! checked Host, and the headers that belong to one hop only.

use http::{HeaderMap, HeaderValue, Request, Uri, header};
use hyper::body::Incoming;

use super::Mode;
use crate::gateway::{parent::Parent, policy::Target};

/// Origin-form target, Host set to the checked destination, hop-by-hop headers (and the
/// client's proxy credentials) removed. Through a parent proxy the target is in absolute form
/// instead, with the parent's own credentials.
pub(super) fn rewrite_request(
    req: &mut Request<Incoming>,
    target: &Target,
    port: u16,
    mode: Mode,
    parent: Option<&Parent>,
) {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    strip_hop_by_hop(req.headers_mut());
    let default = if matches!(mode, Mode::Originate) { 443 } else { 80 };
    let host = if port == default { target.to_string() } else { format!("{target}:{port}") };
    let uri = match parent {
        Some(_) => format!("http://{host}{path}"),
        None => path,
    };
    if let Ok(uri) = uri.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(header::HOST, v);
    }
    if let Some(auth) = parent.and_then(Parent::authorization) {
        req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth.clone());
    }
}

/// RFC 9110 7.6.1: headers for this hop only, plus the ones `Connection` names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for h in named {
        headers.remove(h.as_str());
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(h);
    }
}

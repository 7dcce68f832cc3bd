//! Where a request on an HTTP listener goes, by that listener's rules, with every consistency
//! check between the request target, Host and (inside a CONNECT tunnel) the tunnel's target.

use http::{HeaderValue, Method, Request, header};
use hyper::body::Incoming;

use super::{Conn, Mode};
use crate::gateway::{
    policy::{Deny, Target},
    state::Live,
    target,
};

impl Conn {
    /// Where the request goes, by this listener's rules, with every consistency check.
    pub(super) fn destination(&self, req: &Request<Incoming>, live: &Live) -> Result<(Target, u16), Deny> {
        let headers = req.headers();
        // As sent (hyper has already resolved some ambiguities away), then as parsed. No
        // verdict means the framer lost track of the stream: refuse rather than guess.
        let sent = self.framer.lock().ok().and_then(|mut f| f.next_verdict());
        sent.unwrap_or(Err(target::TargetError::BadRequest))?;
        target::check_framing(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))?;
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = hosts.next().map(HeaderValue::as_bytes);
        if hosts.next().is_some() {
            return Err(Deny::BadRequest);
        }
        if let Some((want, want_port)) = &self.tunnel {
            // A name in the absolute form wins over Host at most servers (RFC 9112 3.2.2):
            // both must name the tunnel's target. No port: the tunnel's.
            let host = host.ok_or(Deny::BadRequest)?;
            target::check_host_agrees(Some(host), want, *want_port, *want_port)?;
            if let Some(a) = req.uri().authority() {
                target::check_host_agrees(Some(a.as_str().as_bytes()), want, *want_port, *want_port)?;
            }
            if req.method() == Method::CONNECT {
                return Err(Deny::BadRequest);
            }
            return Ok((want.clone(), *want_port));
        }
        let uri = req.uri().to_string();
        let method = req.method().as_str();
        if let Mode::Proxy = self.mode {
            let t = target::proxy_target(method, &uri)?;
            if !t.connect {
                target::check_host_agrees(host, &t.target, t.port, 80)?;
            }
            return Ok((t.target, t.port));
        }
        if req.method() == Method::CONNECT {
            return Err(Deny::BadRequest);
        }
        // Origin-form: the Host header names the destination. An absolute URI must agree.
        let host = std::str::from_utf8(host.ok_or(Deny::BadRequest)?).map_err(|_| Deny::BadRequest)?;
        let (t, host_port) = target::parse_authority(host.trim())?;
        if req.uri().authority().is_some() {
            let abs = target::proxy_target(method, &uri)?;
            if abs.target != t || host_port.is_some_and(|p| p != abs.port) {
                return Err(Deny::TargetMismatch);
            }
        }
        match self.mode {
            Mode::Transparent { default_port } => Ok((t, host_port.unwrap_or(default_port))),
            Mode::Originate => {
                let originator = live.originator.as_ref().ok_or(Deny::NotOriginated)?;
                match &t {
                    Target::Name(name) if originator.originates(name) => Ok((t, originator.upstream_port)),
                    _ => Err(Deny::NotOriginated),
                }
            }
            Mode::Proxy | Mode::Tunneled => unreachable!("handled above"),
        }
    }
}

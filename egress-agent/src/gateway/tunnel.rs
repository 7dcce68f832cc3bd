//! Allowed tunnels: CONNECT after the 200, SNI passthrough and TCP forwards all end here. Also
//! the ClientHello reader the TLS listener and CONNECT's fronting check share.

use std::{sync::Arc, time::Duration};

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncReadExt as _, net::TcpStream};

use super::{
    access_log::Record,
    client_hello::{self, AlertDescription, ClientHello, HelloError, Progress},
    config::Limits,
    policy::{Deny, Target},
    relay::{self, Ended},
    shared::Shared,
    sniffed_io::Sniffed,
};

/// Relays an allowed connection to the end and writes its access-log line.
pub async fn run(
    shared: Arc<Shared>,
    client: TcpStream,
    upstream: TcpStream,
    first_up: Vec<u8>,
    limits: Limits,
    mut record: Record,
) {
    let gauge = shared.metrics.tunnel_gauge(record.listener);
    gauge.inc();
    let (moved, ended) =
        relay::relay(&client, &upstream, first_up, limits.idle_timeout, &shared.cancel).await;
    gauge.dec();
    record.bytes_up = moved.up;
    record.bytes_down = moved.down;
    record.end = Some(match ended {
        Ended::Closed => "closed",
        Ended::Idle => "idle_timeout",
        Ended::Cancelled => "drain_deadline",
    });
    shared.finish(&mut record);
}

/// After `200` to a CONNECT: takes the raw client socket back from hyper, checks that a TLS
/// ClientHello inside the tunnel names the host the tunnel was opened for, then relays.
pub async fn after_connect(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    upstream: TcpStream,
    target: Target,
    limits: Limits,
    mut record: Record,
) {
    let parts = match hyper::upgrade::on(req).await.map(|u| u.downcast::<TokioIo<Sniffed<TcpStream>>>()) {
        Ok(Ok(parts)) => parts,
        Ok(Err(_)) | Err(_) => {
            record.fail("upgrade_failed");
            shared.finish(&mut record);
            return;
        }
    };
    let mut client = parts.io.into_inner().inner;
    let mut first = parts.read_buf.to_vec();
    // The drain deadline also ends a tunnel still waiting for its first bytes.
    let checked = tokio::select! {
        r = check_first_flight(&mut client, &upstream, &mut first, &target, &limits, &mut record) => r,
        () = shared.cancel.cancelled() => Err("drain_deadline"),
    };
    if let Err("drain_deadline") = checked {
        record.end = Some("drain_deadline");
        shared.finish(&mut record);
        return;
    }
    if let Err(reason) = checked {
        record.deny(reason);
        shared.finish(&mut record);
        return;
    }
    run(shared, client, upstream, first, limits, record).await;
}

/// Domain fronting through CONNECT: a tunnel opened for `allowed.example` whose ClientHello asks
/// a CDN for `forbidden.example`. When the client speaks first and speaks TLS, its SNI must name
/// the CONNECT host. Protocols where the server speaks first (SSH, SMTP) are left alone.
async fn check_first_flight(
    client: &mut TcpStream,
    upstream: &TcpStream,
    first: &mut Vec<u8>,
    target: &Target,
    limits: &Limits,
    record: &mut Record,
) -> Result<(), &'static str> {
    // Wait for the first bytes from either side; read the client's (they are relayed first).
    while first.is_empty() {
        tokio::select! {
            r = client.readable() => if r.is_err() { return Ok(()) },
            _ = upstream.readable() => return Ok(()),
            () = tokio::time::sleep(limits.idle_timeout) => return Err("idle_before_first_byte"),
        }
        let mut buf = vec![0u8; 4096];
        match client.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.truncate(n);
                *first = buf;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(()),
        }
    }
    if first[0] != 22 {
        return Ok(());
    }
    let hello =
        match read_client_hello(client, first, limits.client_hello_max_bytes, limits.header_timeout).await {
            Ok(h) => h,
            Err(failure) => {
                failure.alert(client).await;
                return Err(failure.reason());
            }
        };
    record.sni.clone_from(&hello.server_name);
    let verdict = sni_verdict(&hello, Some(target));
    if let Err(deny) = verdict {
        send_alert(client, AlertDescription::AccessDenied).await;
        return Err(deny.name());
    }
    Ok(())
}

/// Checks a ClientHello's server name: present unless `connect_target` is an IP tunnel, and
/// (for a tunnel to a name) the same name.
pub fn sni_verdict(hello: &ClientHello, connect_target: Option<&Target>) -> Result<Option<Target>, Deny> {
    // Encrypted Client Hello is judged by its outer (public) name, which a rule must allow
    // like any other: real ECH then reaches only providers whose public name is allowed, and
    // browsers that send GREASE ECH (no real inner hello) keep working.
    // Through the same IP-literal reading as every other target: an SNI of `10.0.0.1` is an
    // address and needs a CIDR rule, never a host pattern.
    let sni = hello.server_name.as_deref().map(Target::parse).transpose()?;
    match (connect_target, &sni) {
        // A CONNECT to a name: the SNI, when sent, must be that name.
        (Some(t @ Target::Name(_)), Some(s)) if s != t => Err(Deny::TargetMismatch),
        (Some(_), _) => Ok(sni),
        (None, None) => Err(Deny::NoServerName),
        (None, Some(_)) => Ok(sni),
    }
}

/// Why no ClientHello could be read.
pub enum HelloFailure {
    Bad(HelloError),
    Timeout,
    Closed,
}

impl HelloFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bad(e) => e.reason(),
            Self::Timeout => Deny::HeaderTimeout.name(),
            Self::Closed => "closed_before_client_hello",
        }
    }

    /// Tells a TLS client why, when it can understand the answer.
    pub async fn alert(&self, client: &mut TcpStream) {
        if let Self::Bad(e) = self
            && let Some(desc) = e.alert()
        {
            send_alert(client, desc).await;
        }
    }
}

/// Reads until `buf` holds a whole ClientHello, within `max` bytes and `timeout` overall.
pub async fn read_client_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<ClientHello, HelloFailure> {
    let read = async {
        loop {
            match client_hello::parse(buf, max) {
                Ok(Progress::Done(hello)) => return Ok(hello),
                Err(e) => return Err(HelloFailure::Bad(e)),
                Ok(Progress::NeedMore) => {}
            }
            let room = max.saturating_sub(buf.len()).max(1);
            let start = buf.len();
            buf.resize(start + room.min(4096), 0);
            let n = client.read(&mut buf[start..]).await.map_err(|_| HelloFailure::Closed)?;
            buf.truncate(start + n);
            if n == 0 {
                return Err(HelloFailure::Closed);
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(HelloFailure::Timeout))
}

pub async fn send_alert(client: &mut TcpStream, desc: AlertDescription) {
    relay::reply_and_close(client, &client_hello::alert(desc)).await;
}

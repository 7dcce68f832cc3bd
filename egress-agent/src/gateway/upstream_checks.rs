//! Readiness that follows the upstreams (`readiness.upstreams`): a gateway that fronts one
//! upstream (a partner API, a database) is of no use while that upstream is down, and clients
//! are better off failing fast on another route than waiting on it. Every `interval` each
//! upstream gets a TCP connect (and, with `tls`, a verified TLS handshake) within `timeout`;
//! while any fails, /readyz says which and why, so Kubernetes takes the pod out of its Service's
//! endpoints until the upstream answers again. An upstream the parent proxy (`upstreamProxy`)
//! covers is checked the way traffic reaches it: a CONNECT through the parent (which must
//! answer 2xx), then the TLS handshake through that tunnel. Where the parent is the only way
//! out, a direct connect would never succeed and the gateway would never be ready.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;

use super::{
    config::{Readiness, UpstreamCheck},
    originate::tls_client,
    parent::Parent,
    target::Target,
};

/// What the checks found last: `None` while every upstream answers.
#[derive(Default)]
pub struct UpstreamHealth {
    down: Mutex<Option<String>>,
}

impl UpstreamHealth {
    /// Before the first round: not ready when there are checks to run.
    pub fn starting(checks: bool) -> Self {
        Self { down: Mutex::new(checks.then(|| "upstream checks have not run yet".to_owned())) }
    }

    /// Why the gateway is not ready on account of its upstreams, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        self.down.lock().ok().and_then(|d| d.clone())
    }

    fn set(&self, down: Option<String>) {
        if let Ok(mut d) = self.down.lock() {
            *d = down;
        }
    }
}

/// The checks a configuration asks for, built (the TLS client's CA bundle read) up front so a
/// reload with a bad bundle is rejected.
#[derive(Clone)]
pub struct Checks {
    readiness: Readiness,
    tls: Option<TlsConnector>,
    /// The live configuration's parent proxy, with the credentials traffic uses.
    parent: Option<Arc<Parent>>,
}

impl Checks {
    pub fn new(readiness: Option<&Readiness>, parent: Option<Arc<Parent>>) -> Result<Option<Self>> {
        let Some(r) = readiness else { return Ok(None) };
        let tls = if r.upstreams.iter().any(|u| u.tls) {
            Some(tls_client(r.ca_file.as_deref(), &[])?)
        } else {
            None
        };
        Ok(Some(Self { readiness: r.clone(), tls, parent }))
    }
}

/// Runs the checks of the current configuration (`config` changes on reload) and keeps
/// `health` up to date. A first round runs at once, before the gateway is first reported ready.
pub async fn run(health: Arc<UpstreamHealth>, mut config: watch::Receiver<Option<Checks>>) {
    loop {
        let current = config.borrow_and_update().clone();
        let Some(checks) = current else {
            health.set(None);
            if config.changed().await.is_err() {
                return;
            }
            continue;
        };
        let failures =
            futures_util::future::join_all(
                checks.readiness.upstreams.iter().map(|u| {
                    check(u, checks.tls.as_ref(), checks.parent.as_deref(), checks.readiness.timeout)
                }),
            )
            .await;
        let down: Vec<String> = failures.into_iter().flatten().collect();
        let was_down = health.not_ready().is_some();
        if down.is_empty() {
            if was_down {
                tracing::info!("every upstream answers again; ready");
            }
            health.set(None);
        } else {
            let why = format!("upstream not answering: {}", down.join("; "));
            if !was_down {
                tracing::warn!(reason = %why, "not ready until the upstreams answer");
            }
            health.set(Some(why));
        }
        tokio::select! {
            () = tokio::time::sleep(checks.readiness.interval) => {}
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

/// One upstream: `None` when it answered, otherwise what went wrong.
async fn check(
    u: &UpstreamCheck,
    tls: Option<&TlsConnector>,
    parent: Option<&Parent>,
    timeout: Duration,
) -> Option<String> {
    let shown = format!("{}:{}", u.address.host, u.address.port);
    let attempt = async {
        let through = Target::parse(&u.address.host).ok().filter(|t| parent.is_some_and(|p| p.covers(t)));
        let tcp = match (through, parent) {
            (Some(target), Some(parent)) => {
                parent.tunnel(&target, u.address.port).await.map(|(stream, _)| stream).map_err(|refusal| {
                    format!("through the parent proxy {}: {}", parent.shown, refusal.reason())
                })?
            }
            _ => TcpStream::connect((u.address.host.as_str(), u.address.port))
                .await
                .map_err(|e| e.to_string())?,
        };
        if let (true, Some(tls)) = (u.tls, tls) {
            let name = ServerName::try_from(u.address.host.clone()).map_err(|e| e.to_string())?;
            tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{shown} ({e})")),
        Err(_) => Some(format!("{shown} (no answer within {timeout:?})")),
    }
}

//! The gateway process: binds the listeners (a copy for each worker thread, see `workers`),
//! serves /healthz, /readyz and /metrics, reloads the configuration when the file or a file it
//! points at (credentials, CA bundles) changes, or on SIGHUP, without touching open connections, and drains on SIGTERM: stop accepting, let
//! connections finish until the deadline, then close.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    access_log,
    config::{self, GatewayConfig},
    config_watch::{self, ConfigWatch, Fingerprint},
    connection::Connection,
    http_proxy::{self, Mode},
    identity::Identities,
    metrics::ByResult,
    observations,
    originate::Originator,
    parent::Parent,
    policy::Policy,
    resources::Resources,
    state::{Gateway, Live},
    tcp_forward, tls_passthrough,
    upstream_checks::{self, Checks, UpstreamHealth},
    workers::{Workers, bind_copies},
};
use tracing::Instrument as _;

use crate::http::Health;

pub struct Options {
    pub config: PathBuf,
    /// Worker threads, each serving its own copy of every listener.
    pub threads: usize,
    /// Access-log lines that may wait for stdout before further ones are dropped.
    pub access_log_queue: usize,
}

/// What a listener does with an accepted connection.
#[derive(Clone)]
enum Kind {
    Http(Mode),
    Tls {
        upstream_port: u16,
    },
    /// Shared by the connections of the listener (no copy per connection).
    Forward(Arc<config::Upstream>),
}

/// A listener's front: what it does with a connection, and whether the node agent steers
/// workloads' connections to it (they are logged as steered).
#[derive(Clone)]
struct Front {
    kind: Kind,
    steered: bool,
}

pub async fn run(opts: Options) -> Result<()> {
    // Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let config = config::load(&opts.config)?;
    access_log::start(opts.access_log_queue);
    raise_open_files_limit();
    let mut changes = ConfigWatch::new(&opts.config, &config_watch::referenced_files(&config))?;
    // Read before the live configuration is built from them (see `reload`).
    let files = Fingerprint::of(&config_watch::referenced_files(&config));
    let live = build_live(&config)?;
    let (checks, checks_rx) =
        tokio::sync::watch::channel(Checks::new(config.readiness.as_ref(), live.parent.clone())?);
    let upstreams = Arc::new(UpstreamHealth::starting(config.readiness.is_some()));
    tokio::spawn(upstream_checks::run(upstreams.clone(), checks_rx));
    let identities = Arc::new(Identities::new(config.sources.table.clone(), config.sources.kubernetes));
    let resources = Arc::new(Resources::new(config.policy_resources));
    let gateway = Arc::new(Gateway::new(live, identities.clone(), resources.clone()));
    if config.sources.kubernetes || config.policy_resources {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (sources.kubernetes, policyResources)")?;
        if config.sources.kubernetes {
            tokio::spawn(identities.clone().watch_pods(client.clone()));
        }
        if config.policy_resources {
            tokio::spawn(resources.watch(client));
        }
    }

    // Bind everything before serving anything: a taken port fails the start, naming the listener.
    let workers = Workers::start(opts.threads)?;
    let copies = workers.handles().len();
    let bound = listeners(&config)
        .into_iter()
        .map(|(addr, name, front)| {
            bind_copies(addr, copies)
                .with_context(|| format!("binding the {name} listener on {addr}"))
                .map(|l| (l, name, front))
        })
        .collect::<Result<Vec<_>>>()?;
    let admin = match config.admin {
        Some(addr) => Some(bind(addr).with_context(|| format!("binding the admin endpoint on {addr}"))?),
        None => None,
    };
    let stop_accepting = CancellationToken::new();
    let mut accepting = JoinSet::new();
    for (listeners, name, front) in bound {
        for (listener, worker) in listeners.into_iter().zip(workers.handles()) {
            let accept = accept_loop(gateway.clone(), listener, name, front.clone(), stop_accepting.clone());
            accepting.spawn_on(accept, worker);
        }
    }
    let health = Arc::new(Health::new());
    if let Some(admin) = admin {
        let render = {
            let gateway = gateway.clone();
            Arc::new(move || gateway.metrics.render())
        };
        let health = health.clone();
        let more = observations::routes(gateway.observations.clone(), gateway.identities.clone())
            .merge(observations::feed_routes(gateway.feed.clone(), gateway.identities.clone()));
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve_on(admin, health, render, more).await {
                tracing::error!(error = format!("{e:#}"), "admin endpoint stopped");
            }
        });
    }
    tokio::spawn(readiness(gateway.clone(), health.clone(), upstreams));
    tracing::info!(
        config = %opts.config.display(),
        listeners = ?config.listeners.addresses().iter().map(|(a, n)| format!("{n}={a}")).collect::<Vec<_>>(),
        rules = config.rules.len(),
        kubernetes_sources = config.sources.kubernetes,
        policy_resources = config.policy_resources,
        worker_threads = copies,
        "gateway ready"
    );

    let mut current = Current { config, files };
    loop {
        tokio::select! {
            Some(()) = changes.next() => reload(&gateway, &opts, &mut current, &checks, &mut changes),
            _ = hup.recv() => reload(&gateway, &opts, &mut current, &checks, &mut changes),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    health.set_ready(Some("draining".to_owned()));
    drain(&gateway, stop_accepting, accepting, current.config.drain_timeout).await;
    workers.stop();
    Ok(())
}

/// Each tunnel holds six descriptors (two sockets, two pipes of two ends); container runtimes
/// often start processes with a soft limit of 1024, which would cap a replica near 170 tunnels.
/// The soft limit is raised to the hard one the runtime allows.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let from = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::info!(from, to = lim.rlim_max, "raised the open-files limit");
            }
        }
    }
}

fn build_live(config: &GatewayConfig) -> Result<Live> {
    let originator = config
        .listeners
        .tls_origination
        .as_ref()
        .map(Originator::new)
        .transpose()
        .context("listeners.tlsOrigination")?;
    Ok(Live {
        policy: Policy::new(config.rules.clone(), config.blocked_cidrs.clone()),
        limits: config.limits,
        originator,
        parent: config.upstream_proxy.as_ref().map(Parent::new).transpose()?.map(Arc::new),
    })
}

fn listeners(config: &GatewayConfig) -> Vec<(SocketAddr, &'static str, Front)> {
    let l = &config.listeners;
    let mut all = Vec::new();
    let front = |kind, steered| Front { kind, steered };
    let http = |addr, mode: Mode, steered| (addr, mode.listener(), front(Kind::Http(mode), steered));
    all.extend(l.http_proxy.map(|a| http(a, Mode::Proxy, false)));
    all.extend(
        l.http_transparent
            .as_ref()
            .map(|r| http(r.listen, Mode::Transparent { default_port: r.upstream_port }, r.steered)),
    );
    all.extend(l.tls_origination.as_ref().map(|o| http(o.listen, Mode::Originate, false)));
    all.extend(l.tls_passthrough.as_ref().map(|r| {
        (r.listen, tls_passthrough::LISTENER, front(Kind::Tls { upstream_port: r.upstream_port }, r.steered))
    }));
    all.extend(l.tcp_forwards.iter().map(|f| {
        (f.listen, tcp_forward::LISTENER, front(Kind::Forward(Arc::new(f.upstream.clone())), false))
    }));
    all
}

/// Accepts on one worker's copy of a listener; every connection is served on that worker.
async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: std::net::TcpListener,
    name: &'static str,
    front: Front,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    // Registered here, with this worker's reactor.
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(?addr, error = %e, "cannot serve a listener");
            return;
        }
    };
    loop {
        let (stream, source) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(?addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // Every log line of the connection says which one it is about; the namespace and the
        // target are filled in as they become known (`Connection::accept`, `Connection::dial`).
        let span = tracing::info_span!(
            "connection",
            listener = name,
            source = %source,
            namespace = tracing::field::Empty,
            target = tracing::field::Empty,
        );
        let gateway = gateway.clone();
        let front = front.clone();
        let served = async move {
            let mut conn = Connection::accept(gateway, source, name);
            if front.steered {
                conn.steered();
            }
            match front.kind {
                Kind::Http(mode) => http_proxy::serve(conn, stream, mode).await,
                Kind::Tls { upstream_port } => tls_passthrough::serve(conn, stream, upstream_port).await,
                Kind::Forward(upstream) => tcp_forward::serve(conn, stream, &upstream).await,
            }
        };
        tokio::spawn(served.instrument(span));
    }
}

/// One listening socket, served on the control runtime (the admin endpoint).
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = bind_copies(addr, 1)?.pop().context("no socket bound")?;
    Ok(TcpListener::from_std(socket)?)
}

/// Ready when client identities are known (the pod list synced), the policy resources are
/// listed, and not draining.
async fn readiness(gateway: Arc<Gateway>, health: Arc<Health>, upstreams: Arc<UpstreamHealth>) {
    loop {
        health.beat();
        let not_ready = if gateway.draining() {
            Some("draining".to_owned())
        } else if !gateway.identities.synced() {
            Some("client identities (pod list) not synced yet".to_owned())
        } else if !gateway.resources.synced() {
            Some("policy resources not listed yet (are the CRDs installed?)".to_owned())
        } else {
            upstreams.not_ready()
        };
        health.set_ready(not_ready);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The configuration in force and the contents of the files it points at when it was applied.
struct Current {
    config: GatewayConfig,
    files: Fingerprint,
}

/// Applies a changed configuration file, or changed files it points at (a rotated Secret). A bad
/// one is rejected with the error, and the previous configuration keeps serving. Listener
/// changes need a restart (open connections must not be cut by a ConfigMap edit); they are
/// reported, the rest applies at once.
fn reload(
    gateway: &Gateway,
    opts: &Options,
    current: &mut Current,
    checks: &tokio::sync::watch::Sender<Option<Checks>>,
    watch: &mut ConfigWatch,
) {
    // The files' contents are taken before the live configuration reads them: a change in
    // between makes the next event reload again, never one that is missed.
    let loaded = config::load(&opts.config).map_err(anyhow::Error::from).and_then(|c| {
        let files = Fingerprint::of(&config_watch::referenced_files(&c));
        let live = build_live(&c)?;
        let checks = Checks::new(c.readiness.as_ref(), live.parent.clone()).context("readiness")?;
        Ok((live, checks, c, files))
    });
    let label = |result| ByResult { result };
    match loaded {
        Err(e) => {
            gateway.metrics.reloads.get_or_create(&label("rejected")).inc();
            tracing::error!(
                error = format!("{e:#}"),
                "rejected the new gateway configuration; the previous one stays in force"
            );
        }
        Ok((_, _, new, files)) if new == current.config && files == current.files => {}
        Ok((live, new_checks, new, files)) => {
            gateway.set_live(live);
            let files_changed = files != current.files;
            if new.readiness != current.config.readiness
                || new.upstream_proxy != current.config.upstream_proxy
                || files_changed
            {
                checks.send_replace(new_checks);
            }
            gateway.identities.set_table(new.sources.table.clone());
            let old = &current.config;
            if new.listeners != old.listeners
                || new.admin != old.admin
                || new.sources.kubernetes != old.sources.kubernetes
                || new.policy_resources != old.policy_resources
            {
                tracing::warn!(
                    "listener, admin, sources.kubernetes or policyResources changes take effect after a restart"
                );
            }
            gateway.metrics.reloads.get_or_create(&label("applied")).inc();
            tracing::info!(rules = new.rules.len(), files_changed, "gateway configuration reloaded");
            watch.follow(&config_watch::referenced_files(&new));
            *current = Current { config: new, files };
        }
    }
}

/// Stops accepting, asks keep-alive connections to close after their current request, waits
/// for open connections up to the deadline, then cuts the rest.
async fn drain(
    gateway: &Gateway,
    stop_accepting: CancellationToken,
    mut accepting: JoinSet<()>,
    deadline: Duration,
) {
    gateway.start_draining();
    stop_accepting.cancel();
    while accepting.join_next().await.is_some() {}
    let open = gateway.slots.active();
    tracing::info!(open_connections = open, deadline_s = deadline.as_secs_f64(), "draining");
    let waited = tokio::time::timeout(deadline, gateway.slots.idle()).await;
    let cut = gateway.slots.active();
    gateway.cancel.cancel();
    // Let the cut connections write their access-log lines, and the writer put them out.
    let _ = tokio::time::timeout(Duration::from_secs(1), gateway.slots.idle()).await;
    // The control runtime has nothing else to do by now: waiting here is fine.
    access_log::flush(Duration::from_secs(2));
    tracing::info!(
        open_at_start = open,
        cut_at_deadline = if waited.is_ok() { 0 } else { cut },
        "gateway stopped"
    );
}

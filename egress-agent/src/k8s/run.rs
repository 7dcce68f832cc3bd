//! The node agent's main loop: load and pin the programs, sync the caches, then reconcile on
//! every watch event, pod cgroup change, config change and periodic tick.
//!
//! Nothing is reconciled before every cache has synced: an empty namespace cache would read as
//! "no namespace is enforced" and release every pod. Until then the pinned state stays as the
//! previous agent left it.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use egress_common::{
    event::{ACTION_DENIED, VerdictEvent},
    verdict::Reason,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinSet,
    time::Instant,
};

use super::{
    cgroup_watch,
    config::{self, AgentConfig},
    node::{Node, Places, log_pass},
    pod_cgroup::PodsRoot,
    pod_events::{self, Denial},
    record_watch,
    watch::{self, Stores, Trigger},
};
use crate::{
    cni::{
        install::{Chained, Placement, ensure_chained},
        state::StateDir,
    },
    events,
    http::{self, Health},
    kernel::{agent_lock::AgentLock, bpffs::PinLayout, maps::KernelMaps, object, tc_maps::TcMaps},
    kernel_observations::{self, KernelObservations, Readers},
    link_events::LinkEvents,
    metrics::{Metrics, Owner, OwnerIndex},
    standalone::{watch_dir, watch_file},
};

/// A pass even without events (covers anything a watch or inotify missed) and a liveness beat.
const TICK_EVERY: Duration = Duration::from_secs(10);
/// Every this many ticks the pass is a full one: maps re-read, every link checked in the kernel
/// (catches outside interference such as a removed pin), readiness re-evaluated. Its cost grows
/// with the number of pods, so it is not run for every change.
const FULL_EVERY_TICKS: u32 = 6;
/// After a failed pass.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The least time between two conflist repairs the directory watch triggers.
const CHAIN_CHECK_SPACING: Duration = Duration::from_secs(1);
/// How long a configuration change may wait for its new Service caches.
const CONFIG_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Options {
    pub config: PathBuf,
    pub node_name: String,
    pub http_addr: SocketAddr,
    pub pins: PinLayout,
    pub cgroup_root: PathBuf,
    /// The kubelet's pods cgroup, relative to the cgroup root or absolute; found when `None`.
    pub pods_cgroup: Option<PathBuf>,
    /// Shared with the CNI plugin.
    pub cni_state: StateDir,
    /// When given, the plugin's conflist entry is kept in place: on every change in the
    /// directory (inotify) and on every tick.
    pub cni_conf_dir: Option<PathBuf>,
    /// Besides the node itself, who may read `/observations` and `/events`.
    pub observation_readers: Vec<ipnet::IpNet>,
}

pub async fn run(opts: Options) -> Result<()> {
    // Validate everything before touching the kernel: a bad start leaves the pinned state alone.
    let mut config = config::load(&opts.config)?;
    let mut config_text = std::fs::read_to_string(&opts.config).unwrap_or_default();
    let pods_root = match &opts.pods_cgroup {
        Some(p) => PodsRoot::at(opts.cgroup_root.join(p))?,
        None => PodsRoot::discover(&opts.cgroup_root)?,
    };
    tracing::info!(
        node = opts.node_name,
        config = %opts.config.display(),
        pin_dir = %opts.pins.root.display(),
        cgroup_root = %opts.cgroup_root.display(),
        pods_cgroup = %pods_root.path.display(),
        cgroup_driver = ?pods_root.driver,
        gateways = ?config.gateways.keys().collect::<Vec<_>>(),
        default_gateway = config.default_gateway,
        dns = %config.dns.service,
        "starting node agent"
    );
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;

    opts.pins.prepare_host_mounted()?;
    // Held until the process ends: teardown refuses while it is.
    let _running = AgentLock::running(&opts.pins.root)?;
    let mut ebpf = object::load(&opts.pins)?;
    let maps = KernelMaps::from_ebpf(&mut ebpf)?;
    let tc_maps = TcMaps::from_ebpf(&mut ebpf)?;
    let ring = object::events_ring(&mut ebpf)?;
    let owners = OwnerIndex::default();
    // Before the first pass, so a pod veth created meanwhile triggers another.
    let mut links = LinkEvents::subscribe()?;
    let places = Places {
        pins: opts.pins.clone(),
        cgroup_root: opts.cgroup_root.clone(),
        pods_root: pods_root.clone(),
        cni_state: opts.cni_state.clone(),
    };
    let mut node = Node::new(ebpf, maps, tc_maps, places, owners.clone());
    node.exempt_own_pod()?;
    keep_cni_chained(&opts);

    let health = Arc::new(Health::new());
    let metrics = Arc::new(Metrics::new(opts.pins.clone(), owners.clone()));
    let mut background = JoinSet::new();
    let observed = Arc::new(KernelObservations::default());
    let readers = Readers { ranges: opts.observation_readers.clone() };
    let more = kernel_observations::routes(observed.clone(), readers);
    background.spawn(http_task(opts.http_addr, health.clone(), metrics.clone(), more));
    let denials = spawn_pod_events(&client, &opts.node_name, &config, &mut background);
    background.spawn(events_task(ring, owners, denials, observed));

    let (tx, mut rx) = mpsc::unbounded_channel();
    let _cgroups = cgroup_watch::start(&pods_root, tx.clone())?;
    let _records = record_watch::start(&opts.cni_state.interfaces_dir(), tx.clone())?;
    let mut config_changes = watch_file(&opts.config)?;
    // The network plugin may rewrite its conflist at any moment (when it restarts): put our entry
    // back at once, not at the next tick, since pods started meanwhile are not gated.
    let mut cni_conf_changes = match &opts.cni_conf_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Some(watch_dir(dir)?)
        }
        None => None,
    };
    let mut watches = JoinSet::new();
    let mut stores = watch::start(&client, &opts.node_name, &config, &tx, &mut watches);
    tracing::info!("waiting for the API caches to sync; pinned enforcement stays as it is meanwhile");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // SIGHUP: a full pass now (maps re-read, the plugin's records and pins read again, every
    // link checked in the kernel), instead of at the next sixth tick.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::select! {
        r = stores.wait_until_ready() => r.context("API caches")?,
        _ = term.recv() => {
            stopped();
            return Ok(());
        },
        _ = int.recv() => {
            stopped();
            return Ok(());
        },
    }
    tracing::info!("caches synced");

    // The first pass is full anyway (nothing is known yet): start ticking one period later, so
    // a second full pass does not follow it at once.
    let mut tick = tokio::time::interval_at(Instant::now() + TICK_EVERY, TICK_EVERY);
    let mut ticks: u32 = 0;
    let mut retry_at: Option<Instant> = Some(Instant::now());
    let mut oldest: Option<std::time::Instant> = None;
    // Readiness needs one link check after the first pass; later ones run on the resync tick.
    let mut links_checked = false;
    // What the last link check found (None: everything in place).
    let mut links_verdict: Option<String> = Some("the pod interfaces are not checked yet".into());
    let mut tc_failed_before = false;
    let mut gate_was = false;
    // The tc programs are pinned for the CNI plugin after the first pass, which has told it the
    // namespaces' modes: on a node where egressfw starts for the first time, the plugin does not
    // gate anything before the agent can release what needs no gate.
    let mut programs_pinned = false;
    // The conflist watch's repairs: when the next is due, and when the last ran.
    let mut chain_check_at: Option<Instant> = None;
    let mut last_chain_check = Instant::now() - CHAIN_CHECK_SPACING;
    loop {
        let mut full_check = false;
        tokio::select! {
            Some(t) = rx.recv() => note_trigger(t, &mut oldest, &mut node),
            // A veth appeared, changed or went: the tc layer resolves pod interfaces again.
            r = links.next() => r?,
            Some(_) = futures_util::StreamExt::next(&mut config_changes) => {
                match reload_config(&opts, &config_text, &config, &client, &tx).await {
                    Ok(Some((text, new_config, new_stores, new_watches))) => {
                        config_text = text;
                        config = new_config;
                        if let Some(s) = new_stores {
                            stores = s;
                            watches = new_watches;
                        }
                        tracing::info!("agent configuration reloaded");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "new agent configuration rejected; the previous one stays in force"
                    ),
                }
            }
            Some(()) = next_change(&mut cni_conf_changes) => {
                // One edit is several events (ours included): at most one repair a second, so a
                // network plugin that rewrites its file on every change cannot spin us with it.
                let due = last_chain_check + CHAIN_CHECK_SPACING;
                chain_check_at = Some(chain_check_at.map_or(due, |at| at.min(due)));
                continue;
            }
            () = sleep_until_some(chain_check_at) => {
                chain_check_at = None;
                last_chain_check = Instant::now();
                blocking(|| keep_cni_chained(&opts));
                continue;
            }
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                full_check = ticks.is_multiple_of(FULL_EVERY_TICKS);
                blocking(|| keep_cni_chained(&opts));
            }
            () = sleep_until_some(retry_at) => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: full pass");
                full_check = true;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        // Coalesce whatever else arrived meanwhile into this pass.
        while let Ok(t) = rx.try_recv() {
            note_trigger(t, &mut oldest, &mut node);
        }
        health.beat();
        if full_check {
            node.invalidate();
        }
        // Map and link syscalls, BPF_PROG_QUERY, rtnetlink: blocking work, done where it does not
        // hold up the watches, the event reader and the HTTP server.
        match blocking(|| node.reconcile(&stores, &config)) {
            Ok(pass) => {
                retry_at = None;
                if let Some(since) = oldest.take() {
                    metrics.apply_latency.observe(since.elapsed().as_secs_f64());
                }
                metrics.reconciles.get_or_create(&vec![("result", "ok")]).inc();
                metrics.pending_pods.set(pass.pending.len() as i64);
                metrics.gate_attached.set(i64::from(pass.gate_attached));
                metrics.tc_moved_to_head.inc_by(pass.tc.moved_to_head.len() as u64);
                metrics.pods.clear();
                for ((mode, state), n) in &pass.pods {
                    metrics.pods.get_or_create(&vec![("mode", *mode), ("state", *state)]).set(*n);
                }
                metrics.gateway_refused_pods.clear();
                for ((namespace, gateway), n) in &pass.refused_gateways {
                    let labels = vec![("namespace", namespace.clone()), ("gateway", gateway.clone())];
                    metrics.gateway_refused_pods.get_or_create(&labels).set(*n);
                }
                log_pass("reconcile", &pass, gate_was);
                if !programs_pinned {
                    match blocking(|| object::pin_tc_programs(&mut node.ebpf, &opts.pins)) {
                        Ok(()) => programs_pinned = true,
                        Err(e) => tracing::error!(
                            error = format!("{e:#}"),
                            "pinning the tc programs for the CNI plugin failed; new pods are gated with the programs pinned before, if any; retrying"
                        ),
                    }
                }
                gate_was = pass.gate_attached;
                if full_check || !links_checked || !pass.tc.failed.is_empty() || tc_failed_before {
                    links_checked = true;
                    let verdict = blocking(|| node.verify_links(&pass.enforced));
                    links_verdict = match verdict {
                        // A pod interface whose tc layer is not attached (or could not be put
                        // back first) is unprotected at that layer: not ready until it is.
                        Ok(None) => pass.tc.failed.first().map(|(interface, error)| {
                            format!("tc layer not in place on interface {interface}: {error}")
                        }),
                        Ok(v) => v,
                        Err(e) => Some(format!("{e:#}")),
                    };
                }
                tc_failed_before = !pass.tc.failed.is_empty();
                // A failing watch leaves its store stale however complete it looks.
                let watches_failing = stores.health.problem(std::time::Instant::now());
                health.set_ready(watches_failing.or_else(|| links_verdict.clone()));
            }
            Err(e) => {
                metrics.reconciles.get_or_create(&vec![("result", "error")]).inc();
                tracing::error!(
                    error = format!("{e:#}"),
                    "reconcile failed; what was enforced before stays enforced; retrying"
                );
                health.set_ready(Some(format!("last reconcile failed: {e:#}")));
                retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }
    watches.abort_all();
    background.abort_all();
    stopped();
    Ok(())
}

/// Runs blocking work (syscalls) on this worker thread after handing the worker's other tasks to
/// the runtime's other worker, so they keep running meanwhile (the runtime is multi-threaded).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Puts the plugin's entry back at the end of the active conflist if a network plugin rewrote it
/// (as Calico and others do when they restart): without it new pods' veths are not gated.
fn keep_cni_chained(opts: &Options) {
    let Some(conf_dir) = &opts.cni_conf_dir else { return };
    let placement = Placement {
        conf_dir: conf_dir.clone(),
        pin_dir: opts.pins.root.clone(),
        state_dir: opts.cni_state.root.clone(),
    };
    match ensure_chained(&placement) {
        Ok(Chained::Already(_)) => {}
        Ok(Chained::NoConfiguration) => tracing::debug!(
            conf_dir = %conf_dir.display(),
            "no CNI network configuration yet: the plugin is chained when the network plugin installs one"
        ),
        Ok(Chained::Updated(path)) => tracing::warn!(
            file = %path.display(),
            "the CNI plugin's entry was missing from the active network configuration (rewritten by the network plugin?): put back; pods started meanwhile were not gated at their veth"
        ),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "the CNI plugin is not chained: new pods' veths are not gated until it is"
        ),
    }
}

/// Sleeps until `at`; pending for ever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next change from an optional watch; pending for ever without one.
async fn next_change(watch: &mut Option<impl futures_util::Stream<Item = ()> + Unpin>) -> Option<()> {
    match watch {
        Some(w) => futures_util::StreamExt::next(w).await,
        None => std::future::pending().await,
    }
}

fn stopped() {
    tracing::info!("stopping; enforcement stays pinned (use `egress-agent teardown` to remove it)");
}

/// Keeps the earliest unapplied trigger (the latency metric measures from there), and tells the
/// node when pod cgroups changed.
fn note_trigger(t: Trigger, oldest: &mut Option<std::time::Instant>, node: &mut Node) {
    let at = match t {
        Trigger::Watch(at) => at,
        Trigger::Cgroup(at) => {
            node.cgroups_changed();
            at
        }
    };
    if oldest.is_none_or(|o| at < o) {
        *oldest = Some(at);
    }
}

type Reloaded = (String, AgentConfig, Option<Stores>, JoinSet<()>);

/// Re-reads the configuration. `Ok(None)`: unchanged. New Service caches are synced before the
/// new configuration takes over, so a change never passes through "gateway not found".
async fn reload_config(
    opts: &Options,
    current_text: &str,
    current: &AgentConfig,
    client: &kube::Client,
    tx: &mpsc::UnboundedSender<Trigger>,
) -> Result<Option<Reloaded>> {
    let text = std::fs::read_to_string(&opts.config)
        .with_context(|| format!("reading agent config {}", opts.config.display()))?;
    if text == current_text {
        return Ok(None);
    }
    let new = config::parse_file(&opts.config, &text)?;
    let mut watches = JoinSet::new();
    let services_changed = current.services().collect::<Vec<_>>() != new.services().collect::<Vec<_>>();
    let stores = if services_changed {
        let stores = watch::start(client, &opts.node_name, &new, tx, &mut watches);
        tokio::time::timeout(CONFIG_SYNC_TIMEOUT, stores.wait_until_ready())
            .await
            .context("the new configuration's Services did not sync within 60 s")??;
        Some(stores)
    } else {
        None
    };
    Ok(Some((text, new, stores, watches)))
}

async fn http_task(addr: SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>, more: axum::Router) {
    if let Err(e) = http::serve(addr, health, Arc::new(move || metrics.render()), more).await {
        tracing::error!(error = format!("{e:#}"), "health/metrics endpoint stopped");
    }
}

async fn events_task(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    owners: OwnerIndex,
    denials: Option<mpsc::Sender<Denial>>,
    observed: Arc<KernelObservations>,
) {
    let owner_of = move |id: u64| owners.read().ok()?.get(&id).cloned();
    let also = move |ev: &VerdictEvent, owner: Option<&Owner>| {
        observed.record(ev, owner);
        let (Some(tx), Some(owner)) = (&denials, owner) else { return };
        if ev.action != ACTION_DENIED || owner.pod.is_empty() {
            return;
        }
        let reason = Reason::from_u8(ev.reason).map_or("unknown", Reason::name);
        let dst = events::address(ev.daddr, ev.family);
        let note = format!(
            "egress to {dst} port {} ({}) denied: {reason}",
            ev.dport,
            events::protocol_name(ev.protocol)
        );
        // Full queue: dropped here, still in the log.
        let _ = tx.try_send(Denial { namespace: owner.namespace.clone(), pod: owner.pod.clone(), note });
    };
    if let Err(e) = events::run(ring, owner_of, also).await {
        tracing::error!(error = format!("{e:#}"), "verdict event reader stopped");
    }
}

fn spawn_pod_events(
    client: &kube::Client,
    node_name: &str,
    config: &AgentConfig,
    tasks: &mut JoinSet<()>,
) -> Option<mpsc::Sender<Denial>> {
    if !config.pod_events {
        return None;
    }
    let (tx, rx) = mpsc::channel(pod_events::QUEUE);
    tasks.spawn(pod_events::run(client.clone(), node_name.to_owned(), rx));
    Some(tx)
}

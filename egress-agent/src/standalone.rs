//! `egress-agent standalone`: enforce a policy file on one machine, no Kubernetes.
//!
//! Reloads on SIGHUP and whenever the file changes (editors and ConfigMap updates replace the
//! file, so the directory is watched). A bad file is logged and ignored: what is enforced stays.
//! SIGTERM/SIGINT stop the agent and leave enforcement exactly as it is. Workload interfaces the
//! file names get the tc layer; they are looked up again whenever a link appears or goes.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    events,
    interfaces::{self, DesiredInterface, TcState, TcSummary},
    kernel::{agent_lock::AgentLock, bpffs::PinLayout, maps::KernelMaps, object, tc_maps::TcMaps},
    link_events::LinkEvents,
    metrics::{Owner, OwnerIndex},
    policy::config,
    reconcile::{self, Summary},
};

pub struct Options {
    pub config: PathBuf,
    pub pins: PinLayout,
    pub cgroup_root: PathBuf,
}

struct Agent {
    ebpf: Ebpf,
    maps: KernelMaps,
    tc_maps: TcMaps,
    tc_state: TcState,
    /// Interfaces of the applied policy, re-resolved on every link event.
    interfaces: Vec<DesiredInterface>,
    opts: Options,
    /// Enforced cgroup id -> path, for naming cgroups in event logs.
    owners: OwnerIndex,
    /// Text of the file as last applied: directory events that leave it unchanged (other files,
    /// a ConfigMap's `..data` swap that changed nothing here) do not reapply it.
    applied_text: Option<String>,
}

impl Agent {
    /// Validates the file and applies it; on any error nothing in the kernel changes.
    /// `None` when `only_if_changed` and the file is as last applied.
    fn reload(&mut self, only_if_changed: bool) -> Result<Option<Summary>> {
        let text = config::read(&self.opts.config)?;
        if only_if_changed && self.applied_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        let specs = config::parse_file(&self.opts.config, &text)?;
        let desired = reconcile::plan(&specs, &self.opts.cgroup_root)
            .with_context(|| format!("policy file {}", self.opts.config.display()))?;
        let summary = reconcile::apply(&mut self.ebpf, &mut self.maps, &self.opts.pins, &desired)?;
        self.applied_text = Some(text);
        // `plan` keeps the order of the specs, one entry each.
        self.interfaces = specs
            .iter()
            .zip(&desired)
            .flat_map(|(spec, d)| {
                spec.interfaces.iter().map(|i| DesiredInterface {
                    name: i.name.clone(),
                    policy_cgroup_id: d.cgroup.id,
                    addresses: i.addresses.clone(),
                })
            })
            .collect();
        self.apply_interfaces(true)?;
        let mut owners = self.owners.write().expect("owner index lock");
        owners.clear();
        owners.extend(desired.iter().map(|d| {
            (d.cgroup.id, Owner { cgroup: d.cgroup.path.display().to_string(), ..Owner::default() })
        }));
        Ok(Some(summary))
    }

    /// Brings the tc layer in line with the applied policy's interfaces; logs what changed
    /// (`always`: even if nothing did).
    fn apply_interfaces(&mut self, always: bool) -> Result<()> {
        let s = interfaces::apply(
            &mut self.ebpf,
            &mut self.tc_maps,
            &self.opts.pins,
            &self.interfaces,
            // No CNI plugin here: every interface is named in the policy file.
            &interfaces::Gated::default(),
            &mut self.tc_state,
        )?;
        log_tc_summary(&s, always);
        Ok(())
    }
}

fn log_tc_summary(s: &TcSummary, always: bool) {
    s.warn_moved_to_head();
    let changed = s.released > 0
        || s.links != Default::default()
        || !s.failed.is_empty()
        || !s.moved_to_head.is_empty();
    if !(changed || always) || (s.enforced == 0 && s.missing.is_empty() && !changed) {
        return;
    }
    for (name, error) in &s.failed {
        tracing::error!(interface = name, error, "tc layer not attached; retrying on the next link event");
    }
    tracing::info!(
        enforced = s.enforced,
        released = s.released,
        missing = ?s.missing,
        links_attached = s.links.attached,
        links_adopted = s.links.adopted,
        links_replaced = s.links.replaced,
        moved_to_head = s.moved_to_head.len(),
        mechanism = interfaces_mechanism(s),
        "tc layer applied"
    );
}

fn interfaces_mechanism(s: &TcSummary) -> &'static str {
    if s.enforced == 0 { "none" } else { crate::kernel::tc_attach::mechanism().name() }
}

fn log_summary(what: &str, s: &Summary) {
    tracing::info!(
        added = s.added,
        updated = s.updated,
        unchanged = s.unchanged,
        removed = s.removed,
        links_attached = s.links.attached,
        links_adopted = s.links.adopted,
        links_replaced = s.links.replaced,
        "{what}"
    );
}

/// How often the tc layer's attachments are checked (ours first on every interface) between
/// link events: a few syscalls per interface.
const TC_ORDER_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn run(opts: Options) -> Result<()> {
    tracing::info!(
        config = %opts.config.display(),
        pin_dir = %opts.pins.root.display(),
        cgroup_root = %opts.cgroup_root.display(),
        "starting standalone agent"
    );
    // Validate before touching the kernel, so a bad file at start leaves any pinned policy as is.
    let specs = config::load(&opts.config)?;
    reconcile::plan(&specs, &opts.cgroup_root)
        .with_context(|| format!("policy file {}", opts.config.display()))?;

    opts.pins.prepare()?;
    // Held until the process ends: teardown refuses while it is.
    let _running = AgentLock::running(&opts.pins.root)?;
    let mut ebpf = object::load(&opts.pins)?;
    let maps = KernelMaps::from_ebpf(&mut ebpf)?;
    let tc_maps = TcMaps::from_ebpf(&mut ebpf)?;
    let ring = object::events_ring(&mut ebpf)?;
    let owners: OwnerIndex = Arc::default();
    // Subscribed before the first pass, so an interface created meanwhile is not missed.
    let mut links = LinkEvents::subscribe()?;
    let mut agent = Agent {
        ebpf,
        maps,
        tc_maps,
        tc_state: TcState::default(),
        interfaces: Vec::new(),
        opts,
        owners: owners.clone(),
        applied_text: None,
    };
    if let Some(summary) = agent.reload(false)? {
        log_summary("policy applied", &summary);
    }

    let events = tokio::spawn(events::run(ring, move |id| owners.read().ok()?.get(&id).cloned(), |_, _| {}));
    let config_path = agent.opts.config.clone();
    let mut changes = watch_file(&config_path)?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Nothing announces a program attached ahead of ours: the tc layer's order is checked on
    // a timer as well as on link events.
    let mut order_check = tokio::time::interval(TC_ORDER_CHECK_EVERY);
    order_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("ready");
    loop {
        let (why, only_if_changed) = tokio::select! {
            r = links.next() => {
                r?;
                if let Err(e) = agent.apply_interfaces(false) {
                    tracing::error!(error = format!("{e:#}"), "updating the tc layer after a link event failed; retrying on the next one");
                }
                continue;
            }
            _ = order_check.tick() => {
                if let Err(e) = agent.apply_interfaces(false) {
                    tracing::error!(error = format!("{e:#}"), "checking the tc layer failed; retrying");
                }
                continue;
            }
            _ = hup.recv() => ("SIGHUP", false),
            Some(_) = changes.next() => ("policy file changed", true),
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match agent.reload(only_if_changed) {
            Ok(Some(s)) => log_summary(&format!("policy reloaded ({why})"), &s),
            Ok(None) => {}
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "reload rejected ({why}); the previous policy stays enforced"
            ),
        }
    }
    events.abort();
    tracing::info!("stopping; enforcement stays pinned (use `egress-agent teardown` to remove it)");
    Ok(())
}

/// What may change a watched file: any write, create, rename or delete in its directory.
pub(crate) const FILE_CHANGES: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE);

/// The directory to watch for `file` (a bare name lives in the current one).
pub(crate) fn directory_of(file: &Path) -> PathBuf {
    file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// A stream that yields whenever the file may have changed: any write, create, rename or
/// delete in its directory. Kubernetes updates a mounted ConfigMap by swapping a `..data`
/// symlink, so events for the file's own name alone would miss it; the caller compares contents.
pub(crate) fn watch_file(file: &Path) -> Result<impl futures_util::Stream<Item = ()> + Unpin> {
    watch_dir(&directory_of(file))
}

/// A stream that yields whenever anything in `dir` may have changed (see [`watch_file`]).
pub(crate) fn watch_dir(dir: &Path) -> Result<impl futures_util::Stream<Item = ()> + Unpin + use<>> {
    let inotify = Inotify::init().context("inotify_init")?;
    inotify.watches().add(dir, FILE_CHANGES).with_context(|| format!("watching {}", dir.display()))?;
    let stream = inotify.into_event_stream(vec![0u8; 4096]).context("inotify event stream")?;
    Ok(Box::pin(stream.filter_map(|ev| async move { ev.is_ok().then_some(()) })))
}

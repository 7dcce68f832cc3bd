//! Attaches the tc programs to a pod's host-side veth, adopts what a previous agent attached,
//! and detaches. Two kernel mechanisms, picked once per process:
//!
//! - tcx (Linux 6.6+, commit e420bed02507 "bpf: Add fd-based tcx multi-prog infra"): bpf links,
//!   pinned under `tc/<ifindex>/` like the cgroup links, so they live until the pin is removed;
//! - clsact filters (older kernels): netlink filters owned by the interface's qdisc, not by any
//!   process, so they too outlive the agent. They are placed at a fixed priority and handle, which
//!   lets a restarted agent replace them in place instead of stacking duplicates.
//!
//! Either way the programs run first on the interface (tcx: head of the chain; clsact:
//! priority 1), so a CNI program that redirects frames cannot take them past us.

use std::{fs, sync::OnceLock};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use egress_common::maps::{PROG_TC_FROM_POD, PROG_TC_TO_POD};

use super::{
    attach::{AttachOutcome, ProgramTags, remove_link_dir},
    bpffs::PinLayout,
};

/// Each program and the direction it is attached in, seen from the host side of the veth:
/// ingress is what the pod sends.
pub const TC_ATTACHMENTS: [(&str, TcAttachType); 2] =
    [(PROG_TC_FROM_POD, TcAttachType::Ingress), (PROG_TC_TO_POD, TcAttachType::Egress)];

/// clsact filter priority: 1 runs before any filter a CNI adds with the default priority.
const CLSACT_PRIORITY: u16 = 1;
/// A fixed handle, so a restarted agent finds and replaces its own filter.
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0xef);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMechanism {
    Tcx,
    Clsact,
}

impl TcMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// The mechanism this kernel supports, logged the first time it is asked for.
pub fn mechanism() -> TcMechanism {
    static PICKED: OnceLock<TcMechanism> = OnceLock::new();
    *PICKED.get_or_init(|| {
        // Forcing clsact on a tcx kernel tests (and, if ever needed, works around) the path
        // older kernels take.
        if std::env::var("EGRESSFW_TC_MECHANISM").as_deref() == Ok("clsact") {
            tracing::warn!("EGRESSFW_TC_MECHANISM=clsact: the tc layer uses clsact filters although tcx may exist");
            return TcMechanism::Clsact;
        }
        let current = KernelVersion::current().ok();
        let kernel = current.map_or_else(|| "unknown".into(), |v| v.to_string());
        if current.is_some_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            tracing::info!(kernel, "tc layer uses tcx links (pinned; Linux 6.6+)");
            TcMechanism::Tcx
        } else {
            tracing::warn!(
                kernel,
                "this kernel has no tcx (Linux 6.6+); the tc layer uses clsact filters instead: same enforcement, but they are not bpf links, so `inspect` cannot tie them to pins and another tc user could delete them"
            );
            TcMechanism::Clsact
        }
    })
}

/// Makes sure both tc programs are attached to the interface.
pub fn ensure_attached(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    tags: &ProgramTags,
    ifindex: u32,
    ifname: &str,
) -> Result<AttachOutcome> {
    let mut outcome = AttachOutcome::default();
    for (name, direction) in TC_ATTACHMENTS {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
        match mechanism() {
            TcMechanism::Tcx => tcx_ensure(prog, pins, tags, name, direction, ifindex, ifname, &mut outcome)?,
            TcMechanism::Clsact => clsact_ensure(prog, name, direction, ifname, &mut outcome)?,
        }
    }
    Ok(outcome)
}

#[expect(clippy::too_many_arguments, reason = "one attachment's full description; used once")]
fn tcx_ensure(
    prog: &mut SchedClassifier,
    pins: &PinLayout,
    tags: &ProgramTags,
    name: &str,
    direction: TcAttachType,
    ifindex: u32,
    ifname: &str,
    outcome: &mut AttachOutcome,
) -> Result<()> {
    let context = || format!("attaching {name} to interface {ifname} ({ifindex}) with tcx");
    let dir = pins.tc_links(ifindex);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pin = dir.join(name);
    match live_pinned_link(&pin, direction, ifname).with_context(context)? {
        Some((link, id)) if tags.is_ours(name, id) => {
            drop(link);
            outcome.adopted += 1;
        }
        Some((link, _)) => {
            // Another build: swap the program inside the same link (bpf_link_update), no gap.
            let link: SchedClassifierLink = link.try_into().with_context(context)?;
            let id = prog.attach_to_link(link).with_context(context)?;
            let _: FdLink = prog.take_link(id)?.try_into().with_context(context)?;
            outcome.replaced += 1;
        }
        _ => {
            let _ = fs::remove_file(&pin);
            tcx_attach_first(prog, pins, name, direction, ifindex, ifname)?;
            outcome.attached += 1;
        }
    }
    Ok(())
}

/// The CNI plugin's gate: attaches the programs the node agent pinned (`PinLayout::programs`)
/// to a new pod's host-side interface, first on both hooks, before any of the pod's containers
/// runs. No binding is written: until the agent binds the interface, the program finds no
/// policy for it and drops everything the pod sends (`deny_no_policy`). A repeated call keeps
/// what is already attached.
pub fn attach_gate(pins: &PinLayout, ifindex: u32, ifname: &str) -> Result<()> {
    for (name, direction) in TC_ATTACHMENTS {
        let path = pins.program(name);
        let mut prog = SchedClassifier::from_pin(&path)
            .with_context(|| format!("opening the pinned program {}", path.display()))?;
        match mechanism() {
            TcMechanism::Tcx => {
                let dir = pins.tc_links(ifindex);
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                let pin = dir.join(name);
                if live_pinned_link(&pin, direction, ifname)?.is_some() {
                    continue;
                }
                // Left from an interface that had this index before: its link is gone.
                let _ = fs::remove_file(&pin);
                tcx_attach_first(&mut prog, pins, name, direction, ifindex, ifname)?;
            }
            TcMechanism::Clsact => {
                clsact_ensure(&mut prog, name, direction, ifname, &mut AttachOutcome::default())?
            }
        }
    }
    Ok(())
}

/// The link pinned at `pin` and its program's id, if that program runs on the interface's
/// `direction` hook. A pin whose link does not run there is left from an interface that no
/// longer exists (an ifindex reused).
fn live_pinned_link(
    pin: &std::path::Path,
    direction: TcAttachType,
    ifname: &str,
) -> Result<Option<(FdLink, u32)>> {
    if !pin.exists() {
        return Ok(None);
    }
    let (_, running) = SchedClassifier::query_tcx(ifname, direction)
        .with_context(|| format!("querying the tcx programs of {ifname}"))?;
    let Some(link) = PinnedLink::from_pin(pin).ok().map(FdLink::from) else { return Ok(None) };
    let Some(id) = link.info().ok().map(|i| i.program_id()) else { return Ok(None) };
    Ok(running.iter().any(|p| p.id() == id).then_some((link, id)))
}

/// A new tcx link for `prog` at the head of the chain, pinned.
fn tcx_attach_first(
    prog: &mut SchedClassifier,
    pins: &PinLayout,
    name: &str,
    direction: TcAttachType,
    ifindex: u32,
    ifname: &str,
) -> Result<()> {
    let context = || format!("attaching {name} to interface {ifname} ({ifindex}) with tcx");
    let pin = pins.tc_links(ifindex).join(name);
    let id = prog
        .attach_with_options(ifname, direction, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .with_context(context)?;
    let link: FdLink = prog.take_link(id)?.try_into().with_context(context)?;
    link.pin(&pin).with_context(|| format!("pinning tc link at {}", pin.display()))?;
    Ok(())
}

fn clsact_ensure(
    prog: &mut SchedClassifier,
    name: &str,
    direction: TcAttachType,
    ifname: &str,
    outcome: &mut AttachOutcome,
) -> Result<()> {
    let context = || format!("attaching {name} to interface {ifname} with a clsact filter");
    if let Err(e) = tc::qdisc_add_clsact(ifname) {
        // Present already (ours from before, or a CNI's): fine. Anything else fails below.
        tracing::debug!(interface = ifname, error = %e, "clsact qdisc not added");
    }
    // Replace our filter in place if it is there (no gap), create it otherwise.
    let ours = SchedClassifierLink::attached(ifname, direction, CLSACT_PRIORITY, CLSACT_HANDLE, None)
        .with_context(context)?;
    let id = match prog.attach_to_link(ours) {
        Ok(id) => {
            // Filters cannot be asked which program they run, so ours is always swapped in
            // place; that keeps (or updates) it, so it counts as adopted.
            outcome.adopted += 1;
            id
        }
        Err(_) => {
            let options =
                NlOptions { priority: CLSACT_PRIORITY, handle: CLSACT_HANDLE, ..NlOptions::default() };
            let id = prog
                .attach_with_options(ifname, direction, TcAttachOptions::Netlink(options))
                .with_context(context)?;
            outcome.attached += 1;
            id
        }
    };
    // The filter belongs to the interface, not to us: dropping the handle would delete it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Makes sure our programs run first on the interface: another program attached later ahead
/// of ours (a tcx link put at the head, a clsact filter added at our priority, which cls_bpf
/// runs before older ones) could end classification, passing or redirecting a frame before ours
/// judges it. Ours is moved back to the head: detached and attached again there, since the
/// kernel cannot move an attachment and refuses the same program twice on one hook (so for a
/// moment neither copy runs; that is no worse than the state it repairs, in which the other
/// program already decided first). Returns the directions that were moved.
pub fn ensure_first(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    ifindex: u32,
    ifname: &str,
) -> Result<Vec<&'static str>> {
    let mut moved = Vec::new();
    for (name, direction) in TC_ATTACHMENTS {
        let context = || format!("checking that {name} runs first on interface {ifname} ({ifindex})");
        if runs_first(pins, name, direction, ifindex, ifname).with_context(context)? {
            continue;
        }
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
        match mechanism() {
            TcMechanism::Tcx => {
                let pin = pins.tc_links(ifindex).join(name);
                if pin.exists() {
                    super::query::detach_pinned_link(&pin).with_context(context)?;
                }
                let _ = fs::remove_file(&pin);
                tcx_attach_first(prog, pins, name, direction, ifindex, ifname)?;
            }
            TcMechanism::Clsact => {
                clsact_detach(ifindex, ifname, direction).with_context(context)?;
                clsact_ensure(prog, name, direction, ifname, &mut AttachOutcome::default())?;
            }
        }
        moved.push(direction_name(direction));
    }
    Ok(moved)
}

/// The hooks of the interface on which our program is not the first to run (none: the tc layer,
/// gate or binding, is in place). Reads only; used by the CNI plugin's CHECK.
pub fn hooks_without_us_first(pins: &PinLayout, ifindex: u32, ifname: &str) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (name, direction) in TC_ATTACHMENTS {
        if !runs_first(pins, name, direction, ifindex, ifname)
            .with_context(|| format!("checking that {name} runs first on interface {ifname} ({ifindex})"))?
        {
            missing.push(direction_name(direction));
        }
    }
    Ok(missing)
}

fn runs_first(
    pins: &PinLayout,
    name: &str,
    direction: TcAttachType,
    ifindex: u32,
    ifname: &str,
) -> Result<bool> {
    match mechanism() {
        TcMechanism::Tcx => tcx_first_is_ours(pins, name, direction, ifindex, ifname),
        TcMechanism::Clsact => clsact_first_is_ours(name, direction, ifindex),
    }
}

fn direction_name(direction: TcAttachType) -> &'static str {
    match direction {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
        TcAttachType::Custom(_) => "custom",
    }
}

/// Whether the head of the interface's tcx chain is the program of our pinned link.
fn tcx_first_is_ours(
    pins: &PinLayout,
    name: &str,
    direction: TcAttachType,
    ifindex: u32,
    ifname: &str,
) -> Result<bool> {
    let (_, running) = SchedClassifier::query_tcx(ifname, direction)?;
    let pin = pins.tc_links(ifindex).join(name);
    let ours =
        PinnedLink::from_pin(&pin).ok().and_then(|l| FdLink::from(l).info().ok()).map(|i| i.program_id());
    Ok(ours.is_some() && running.first().map(|p| p.id()) == ours)
}

/// Whether the first clsact filter on the hook is ours (priority, handle and program name).
fn clsact_first_is_ours(name: &str, direction: TcAttachType, ifindex: u32) -> Result<bool> {
    let filters = super::tc_filters::filters(ifindex, direction)?;
    Ok(filters.first().is_some_and(|f| {
        f.kind == "bpf"
            && f.priority == CLSACT_PRIORITY
            && f.handle == u32::from(CLSACT_HANDLE)
            // The kernel keeps 15 characters of a program's name (the plugin attaches the
            // pinned program under that name).
            && f.program_name.as_deref().is_some_and(|n| n.starts_with(name) || (n.len() >= 15 && name.starts_with(n)))
    }))
}

/// Detaches the tc programs from an interface: removes the tcx pins (each link detaches with
/// its last reference) and, when the interface still exists, our clsact filters.
pub fn detach(pins: &PinLayout, ifindex: u32, ifname: Option<&str>) -> Result<usize> {
    let mut removed = remove_link_dir(&pins.tc_links(ifindex))?;
    if let (Some(ifname), TcMechanism::Clsact) = (ifname, mechanism()) {
        for (name, direction) in TC_ATTACHMENTS {
            if clsact_detach(ifindex, ifname, direction)
                .with_context(|| format!("detaching {name} from interface {ifname}"))?
            {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Deletes our clsact filter from one hook, found by its priority and handle: the filter's name
/// cannot tell, since the CNI plugin attaches the pinned program, whose name the kernel keeps
/// only to 15 characters. Returns whether there was one.
fn clsact_detach(ifindex: u32, ifname: &str, direction: TcAttachType) -> Result<bool> {
    let ours =
        |f: &super::tc_filters::Filter| f.priority == CLSACT_PRIORITY && f.handle == u32::from(CLSACT_HANDLE);
    if !super::tc_filters::filters(ifindex, direction)?.iter().any(ours) {
        return Ok(false);
    }
    let link = SchedClassifierLink::attached(ifname, direction, CLSACT_PRIORITY, CLSACT_HANDLE, None)?;
    link.detach().map_err(|e| anyhow!("{e}"))?;
    Ok(true)
}

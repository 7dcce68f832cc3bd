//! Attaches the programs to a workload cgroup through pinned links, adopts what a previous agent
//! pinned, and detaches by removing pins. A link lives as long as its pin: the agent exiting,
//! crashing or being killed changes nothing.

use std::{collections::HashMap, fs, fs::File, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use egress_common::maps::{PROG_SKB_EGRESS, PROG_SOCKOPS};

use super::{
    bpffs::PinLayout,
    object::{ALL_PROGRAMS, TC_PROGRAMS},
};
use crate::cgroup::CgroupRef;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AttachOutcome {
    /// Links newly attached.
    pub attached: usize,
    /// Links a previous agent pinned, running the same program, kept as they are.
    pub adopted: usize,
    /// Links running a different build of a program, replaced without a gap.
    pub replaced: usize,
}

/// Tags (instruction hashes, independent of map fds) of the programs in `ebpf`, and of every
/// program loaded in the kernel by id, to tell whether a pinned link runs our code.
pub struct ProgramTags {
    ours: HashMap<&'static str, u64>,
    kernel: HashMap<u32, u64>,
}

impl ProgramTags {
    /// Whether kernel program `id` is a load of our program `name` (this agent's or an earlier
    /// agent's with the same code).
    pub fn is_ours(&self, name: &str, id: u32) -> bool {
        self.ours.get(name).is_some_and(|t| self.kernel.get(&id) == Some(t))
    }

    pub fn read(ebpf: &Ebpf) -> Result<Self> {
        let mut ours = HashMap::new();
        for name in ALL_PROGRAMS.into_iter().chain(TC_PROGRAMS) {
            let prog = ebpf.program(name).with_context(|| format!("program {name} missing"))?;
            ours.insert(name, prog.info().with_context(|| format!("program info of {name}"))?.tag());
        }
        let kernel = loaded_programs().filter_map(Result::ok).map(|p| (p.id(), p.tag())).collect();
        Ok(Self { ours, kernel })
    }
}

/// Makes sure every program is attached to `cgroup` by a link pinned under the pin directory.
pub fn ensure_attached(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    tags: &ProgramTags,
    cgroup: &CgroupRef,
) -> Result<AttachOutcome> {
    ensure_links(ebpf, &pins.cgroup_links(cgroup.id), tags, cgroup, &ALL_PROGRAMS)
}

/// Attaches the pod-start gate: the programs on the cgroup above all pods, so a pod cgroup with
/// no registered policy is denied from its first packet, before the agent has seen it. All five,
/// not just the packet program: a held-back connect() then fails at once with EPERM instead of
/// hanging on dropped SYNs.
pub fn ensure_gate(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    tags: &ProgramTags,
    above_pods: &CgroupRef,
) -> Result<AttachOutcome> {
    ensure_links(ebpf, &pins.gate_links(), tags, above_pods, &ALL_PROGRAMS)
}

/// Removes the pod-start gate, if attached. Returns whether it was.
pub fn remove_gate(pins: &PinLayout) -> Result<bool> {
    Ok(remove_link_dir(&pins.gate_links())? > 0)
}

fn ensure_links(
    ebpf: &mut Ebpf,
    dir: &Path,
    tags: &ProgramTags,
    cgroup: &CgroupRef,
    programs: &[&'static str],
) -> Result<AttachOutcome> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut outcome = AttachOutcome::default();
    for &name in programs {
        let pin = dir.join(name);
        let existing = pin.exists().then(|| PinnedLink::from_pin(&pin)).transpose();
        let running_tag = match existing {
            Ok(Some(link)) => {
                FdLink::from(link).info().ok().and_then(|i| tags.kernel.get(&i.program_id()).copied())
            }
            // A pin we cannot open is replaced below.
            Ok(None) | Err(_) => None,
        };
        match running_tag {
            Some(tag) if tag == tags.ours[name] => outcome.adopted += 1,
            Some(_) => {
                // Make before break: attach the new build next to the old one (cgroup links are
                // multi-attach, every program must allow), then rename its pin over the old pin,
                // which releases the old link.
                // bpffs refuses names with a dot (reserved for the kernel), hence the underscore.
                let tmp = dir.join(format!("{name}_new"));
                attach_one(ebpf, name, cgroup, &tmp)?;
                fs::rename(&tmp, &pin).with_context(|| format!("replacing {}", pin.display()))?;
                outcome.replaced += 1;
            }
            None => {
                let _ = fs::remove_file(&pin);
                attach_one(ebpf, name, cgroup, &pin)?;
                outcome.attached += 1;
            }
        }
    }
    Ok(outcome)
}

/// Links are always multi-attach: the kernel runs every program attached to a cgroup and its
/// ancestors and passes traffic only if all allow it, and `bpf_link_create` rejects any attach
/// flag (hence `Single`, which passes none). A workload that attaches its own program below
/// cannot override ours.
fn attach_one(ebpf: &mut Ebpf, name: &str, cgroup: &CgroupRef, pin: &Path) -> Result<()> {
    let dir =
        File::open(&cgroup.path).with_context(|| format!("opening cgroup {}", cgroup.path.display()))?;
    let context = || format!("attaching {name} to cgroup {}", cgroup.path.display());
    let link: FdLink = if name == PROG_SKB_EGRESS {
        let prog: &mut CgroupSkb = ebpf.program_mut(name).context("program missing")?.try_into()?;
        let id =
            prog.attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).with_context(context)?;
        prog.take_link(id)?.try_into().with_context(context)?
    } else if name == PROG_SOCKOPS {
        let prog: &mut SockOps = ebpf.program_mut(name).context("program missing")?.try_into()?;
        let id = prog.attach(&dir, CgroupAttachMode::Single).with_context(context)?;
        prog.take_link(id)?.try_into().with_context(context)?
    } else {
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).context("program missing")?.try_into()?;
        let id = prog.attach(&dir, CgroupAttachMode::Single).with_context(context)?;
        prog.take_link(id)?.try_into().with_context(context)?
    };
    link.pin(pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}

/// Removes a cgroup's link pins; the kernel detaches each link as its last reference goes.
pub fn detach(pins: &PinLayout, cgroup_id: u64) -> Result<usize> {
    remove_link_dir(&pins.cgroup_links(cgroup_id))
}

pub(super) fn remove_link_dir(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            removed += 1;
        }
    }
    if dir.exists() {
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(removed)
}

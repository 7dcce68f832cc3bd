//! `egress-agent teardown`: the one explicit way to remove enforcement. Links go first (each
//! detaches as its pin is removed), then the maps, then the directory.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};

use crate::{
    cni, interfaces,
    kernel::{agent_lock::AgentLock, attach, bpffs::PinLayout, tc_maps::TcMaps},
};

pub fn run(pins: &PinLayout, cni_conf_dir: &Path) -> Result<()> {
    // Nothing is touched while an agent runs on these pins: it would put everything back.
    let _alone = if pins.root.exists() { Some(AgentLock::exclusive(&pins.root)?) } else { None };
    // First the plugin's conflist entry: with it and without the pins below, the node would
    // refuse every new pod (the plugin takes missing pins for a node whose agent is starting).
    let unchained = cni::install::unchain(cni_conf_dir)?;
    for path in &unchained {
        println!("took the egressfw CNI plugin out of {}", path.display());
    }
    if unchained.is_empty() && !cni_conf_dir.exists() {
        println!(
            "no CNI configuration directory at {}: if this node has one elsewhere, run teardown with --cni-conf-dir pointing at it",
            cni_conf_dir.display()
        );
    }
    if !pins.root.exists() {
        println!("nothing to remove: {} does not exist", pins.root.display());
        return Ok(());
    }
    // Older pin directories may have no tc maps of this version: their maps go with the rest
    // below, and their tc programs through the pins.
    let mut tc = TcMaps::from_pins(pins).ok();
    let interfaces = interfaces::remove_all(tc.as_mut(), pins)?;
    let mut links = 0;
    let cgroups = pins.pinned_cgroups()?;
    for id in &cgroups {
        links += attach::detach(pins, *id)?;
    }
    if attach::remove_gate(pins)? {
        links += 1;
    }
    // Without its pinned programs the CNI plugin gates nothing any more.
    remove_files(&pins.programs())?;
    let maps = remove_files(&pins.maps())?;
    for dir in [pins.links(), pins.tc(), pins.programs(), pins.maps(), pins.root.clone()] {
        if dir.exists() {
            fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    println!(
        "removed {links} links on {} cgroups, the tc programs on {interfaces} interfaces and {maps} maps from {}; nothing is enforced any more",
        cgroups.len(),
        pins.root.display()
    );
    Ok(())
}

/// Removes the files (pins) in `dir`; returns how many.
fn remove_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

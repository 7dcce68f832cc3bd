//! Reacts to the CNI plugin's records (inotify on the interfaces directory): a pod the plugin
//! just gated is bound as soon as its record says the gate is complete, not at the next tick.
//! The plugin writes a record by renaming a complete file into place, so `MOVED_TO` is a new or
//! updated record and `DELETE` one that DEL dropped.

use std::{path::Path, time::Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;

use super::watch::Trigger;

pub fn start(dir: &Path, tx: mpsc::UnboundedSender<Trigger>) -> Result<tokio::task::JoinHandle<()>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let inotify = Inotify::init().context("inotify_init for the CNI plugin's records")?;
    inotify
        .watches()
        .add(dir, WatchMask::MOVED_TO | WatchMask::DELETE)
        .with_context(|| format!("watching {}", dir.display()))?;
    let mut stream = inotify.into_event_stream(vec![0u8; 4096]).context("inotify event stream")?;
    Ok(tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            if ev.is_ok() && tx.send(Trigger::Watch(Instant::now())).is_err() {
                return;
            }
        }
    }))
}

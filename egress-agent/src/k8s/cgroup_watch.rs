//! Reacts to pod cgroups appearing and going away (inotify on the pods root and the QoS
//! directories), so a new pod is enforced as soon as the kubelet creates its cgroup instead of at
//! the next periodic pass. The pod-start gate covers the moments before that.

use std::time::Instant;

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::mpsc;

use super::{pod_cgroup::PodsRoot, watch::Trigger};

pub fn start(root: &PodsRoot, tx: mpsc::UnboundedSender<Trigger>) -> Result<tokio::task::JoinHandle<()>> {
    let inotify = Inotify::init().context("inotify_init for the pod cgroups")?;
    let mut watches = inotify.watches();
    let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
    for dir in root.pod_parents() {
        // A QoS directory that does not exist yet is picked up when it is created.
        if dir.is_dir() {
            watches.add(&dir, mask).with_context(|| format!("watching {}", dir.display()))?;
        }
    }
    let root_wd =
        watches.add(&root.path, mask).with_context(|| format!("watching {}", root.path.display()))?;
    let qos_dirs: Vec<_> = root.pod_parents().into_iter().skip(1).collect();
    let mut stream = inotify.into_event_stream(vec![0u8; 4096]).context("inotify event stream")?;
    Ok(tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            let Ok(ev) = ev else { continue };
            let new_qos_dir = (ev.wd == root_wd && ev.mask.contains(EventMask::CREATE))
                .then(|| qos_dirs.iter().find(|d| d.file_name() == ev.name.as_deref()))
                .flatten();
            if let Some(dir) = new_qos_dir
                && let Err(e) = watches.add(dir, mask)
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch new QoS cgroup directory");
            }
            if tx.send(Trigger::Cgroup(Instant::now())).is_err() {
                return;
            }
        }
    }))
}

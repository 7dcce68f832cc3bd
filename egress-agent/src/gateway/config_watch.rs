//! What a gateway reload depends on: the configuration file and every file it points at (the
//! parent proxy's credentials, CA bundles). Those are mounted Secrets in Kubernetes, in
//! directories of their own, which the kubelet updates by swapping a `..data` symlink: a watch on
//! the configuration file alone never sees a rotated password, and a reload that compares only
//! the configuration skips it. So the directory of each file is watched, and a reload compares
//! the files' contents as well.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor};

use super::config::GatewayConfig;
use crate::standalone::{FILE_CHANGES as MASK, directory_of};

/// Every file the configuration points at.
pub fn referenced_files(config: &GatewayConfig) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(auth) = config.upstream_proxy.as_ref().and_then(|p| p.auth.as_ref()) {
        out.extend([auth.username_file.clone(), auth.password_file.clone()]);
    }
    out.extend(config.readiness.as_ref().and_then(|r| r.ca_file.clone()));
    out.extend(config.listeners.tls_origination.as_ref().and_then(|o| o.ca_file.clone()));
    out
}

/// The contents of `files`, as hashes (no second copy of a secret is kept): what a reload
/// compares to decide whether anything changed. A file that cannot be read counts as its own
/// state (the reload then fails, naming it, and the previous configuration stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(BTreeMap<PathBuf, Option<u64>>);

impl Fingerprint {
    pub fn of(files: &[PathBuf]) -> Self {
        Self(
            files
                .iter()
                .map(|f| {
                    let hash = std::fs::read(f).ok().map(|bytes| {
                        let mut h = DefaultHasher::new();
                        bytes.hash(&mut h);
                        h.finish()
                    });
                    (f.clone(), hash)
                })
                .collect(),
        )
    }
}

/// inotify on the configuration file's directory and on the directories of the files it points
/// at; `follow` moves the second set when a reload points elsewhere.
pub struct ConfigWatch {
    stream: EventStream<Vec<u8>>,
    config_dir: PathBuf,
    watched: BTreeMap<PathBuf, WatchDescriptor>,
}

impl ConfigWatch {
    pub fn new(config: &Path, files: &[PathBuf]) -> Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let stream = inotify.into_event_stream(vec![0u8; 4096]).context("inotify event stream")?;
        let config_dir = directory_of(config);
        let mut watch = Self { stream, config_dir: config_dir.clone(), watched: BTreeMap::new() };
        let wd = watch
            .stream
            .watches()
            .add(&config_dir, MASK)
            .with_context(|| format!("watching {}", config_dir.display()))?;
        watch.watched.insert(config_dir, wd);
        watch.follow(files);
        Ok(watch)
    }

    /// Watches the directories of `files` (and stops watching those no longer needed). A
    /// directory that cannot be watched is logged: its file is still re-read on every reload
    /// (SIGHUP), only a change to it does not start one.
    pub fn follow(&mut self, files: &[PathBuf]) {
        let wanted: BTreeSet<PathBuf> =
            files.iter().map(|f| directory_of(f)).chain([self.config_dir.clone()]).collect();
        let mut watches = self.stream.watches();
        self.watched.retain(|dir, wd| {
            let keep = wanted.contains(dir);
            if !keep {
                let _ = watches.remove(wd.clone());
            }
            keep
        });
        for dir in wanted {
            if self.watched.contains_key(&dir) {
                continue;
            }
            match watches.add(&dir, MASK) {
                Ok(wd) => {
                    self.watched.insert(dir, wd);
                }
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot watch a directory the gateway configuration points into; a change there applies on SIGHUP or the next reload"
                ),
            }
        }
    }

    /// The next change in any watched directory.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            match self.stream.next().await? {
                Ok(_) => return Some(()),
                Err(e) => tracing::debug!(error = %e, "inotify read failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_changes_the_fingerprint() {
        let dir = std::env::temp_dir().join(format!("egressfw-fingerprint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "old").unwrap();
        let before = Fingerprint::of(std::slice::from_ref(&file));
        assert_eq!(before, Fingerprint::of(std::slice::from_ref(&file)), "unchanged");
        std::fs::write(&file, "new").unwrap();
        assert_ne!(before, Fingerprint::of(std::slice::from_ref(&file)), "rotated");
        std::fs::remove_file(&file).unwrap();
        assert_ne!(before, Fingerprint::of(std::slice::from_ref(&file)), "gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

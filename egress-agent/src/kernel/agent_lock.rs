//! Who is running on this pin directory. A running agent (`run`, `standalone`) holds a shared
//! flock(2) on the pin directory for its whole life; `teardown` takes it exclusively and refuses
//! while any agent holds it, since a running agent would put back, on its next pass, the conflist
//! entry and the pins teardown removes. The lock is on the directory's inode, so it is the same
//! lock through any bind mount (a `kubectl debug node/...` pod sees the node's bpffs under
//! `/host`), and the kernel releases it when the agent dies, SIGKILL included.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, Result, bail};

/// A lock on the pin directory, released on drop (or when the process dies).
#[derive(Debug)]
pub struct AgentLock {
    /// The open directory: the lock lives as long as this descriptor.
    _held: File,
}

impl AgentLock {
    /// Held by a running agent: shared, so the agent being replaced and its replacement never
    /// wait for each other.
    pub fn running(pin_root: &Path) -> Result<Self> {
        let dir = open(pin_root)?;
        flock(&dir, libc::LOCK_SH).with_context(|| format!("locking {}", pin_root.display()))?;
        Ok(Self { _held: dir })
    }

    /// Taken by `teardown`: exclusive, and refused (naming the directory) while an agent runs.
    pub fn exclusive(pin_root: &Path) -> Result<Self> {
        let dir = open(pin_root)?;
        match flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Self { _held: dir }),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => bail!(
                "an egress-agent is running on this node (it holds {}): stop it first, or it puts back \
                 what teardown removes (on Kubernetes: kubectl -n egressfw-system delete daemonset \
                 egress-agent --cascade=foreground, which returns once the agent's pods are gone)",
                pin_root.display()
            ),
            Err(e) => Err(e).with_context(|| format!("locking {}", pin_root.display())),
        }
    }
}

fn open(dir: &Path) -> Result<File> {
    File::open(dir).with_context(|| format!("opening {}", dir.display()))
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    // SAFETY: flock(2) on a descriptor this File owns.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teardown_is_refused_while_an_agent_holds_the_directory_and_allowed_after() {
        let dir = std::env::temp_dir().join(format!("egressfw-agent-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let agent = AgentLock::running(&dir).unwrap();
        // A second agent (a rolling update's replacement) is not kept waiting.
        let replacement = AgentLock::running(&dir).unwrap();
        let refused = AgentLock::exclusive(&dir).unwrap_err().to_string();
        assert!(refused.contains("an egress-agent is running"), "{refused}");
        assert!(refused.contains(&dir.display().to_string()), "{refused}");
        drop(agent);
        drop(replacement);
        AgentLock::exclusive(&dir).expect("no agent holds the directory any more");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

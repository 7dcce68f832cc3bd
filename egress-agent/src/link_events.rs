//! Wakes the agent when a network interface appears, changes or goes away (rtnetlink's link
//! group), so a pod veth that is created or recreated gets the tc programs within one pass
//! instead of waiting for a timer. The messages themselves are not parsed: any of them means
//! "resolve the interface names again", which is cheap.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;

/// RTMGRP_LINK from include/uapi/linux/rtnetlink.h.
const RTMGRP_LINK: u32 = 1;

pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribes to link events in the agent's network namespace.
    pub fn subscribe() -> Result<Self> {
        // SAFETY: plain socket call; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("opening a netlink socket for link events");
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; the fields we need are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: binding a valid sockaddr_nl of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("subscribing to netlink link events");
        }
        // SAFETY: the AsyncFd owns the socket, so it is deregistered before the fd closes.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| e.into_parts().1)
            .context("registering the netlink socket with tokio")?;
        Ok(Self { fd })
    }

    /// Waits for the next batch of link events and drains it.
    pub async fn next(&mut self) -> Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await.context("waiting for link events")?;
            let mut got = false;
            loop {
                // SAFETY: reading into a buffer of the stated size.
                let n = unsafe {
                    libc::recv(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                match io::Error::last_os_error() {
                    e if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The kernel dropped events because we were slow: that too means "look again".
                    e if e.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    e => return Err(e).context("reading link events"),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

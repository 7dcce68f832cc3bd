//! A bounded wait for the kernel's rtnetlink answers: it answers at once, but the agent must
//! never hang on a socket.

use std::{io, os::fd::AsRawFd};

/// Makes receives on `socket` give up after two seconds.
pub fn bound_receives(socket: &impl AsRawFd) -> io::Result<()> {
    let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: setting a socket option from a valid struct of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

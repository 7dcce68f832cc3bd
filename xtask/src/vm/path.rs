//! The PATH of the test binaries inside the VM: the host's, so they find the same tools, minus
//! version-manager shim directories (pyenv's). Under emulation a pyenv shim costs about 4 s per
//! `python3` (a bash script that runs dozens of programs) and the interpreter it selected here
//! 2 s more (its site-packages import certifi at start-up), against 0.4 s for Debian's own
//! /usr/bin/python3. The gateway tests start two Python upstream servers and give them 10 s;
//! they only need the standard library, so the guest uses the distribution's Python.

use std::env;

/// The host's PATH without shim directories.
pub fn for_guest() -> String {
    let host = env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    without_shims(&host)
}

fn without_shims(path: &str) -> String {
    path.split(':')
        .filter(|entry| !entry.trim_end_matches('/').ends_with("/shims"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_directories_are_dropped() {
        let host = "/root/.cargo/bin:/root/.pyenv/plugins/pyenv-virtualenv/shims:/root/.pyenv/shims/:/root/.pyenv/bin:/usr/bin:/bin";
        assert_eq!(without_shims(host), "/root/.cargo/bin:/root/.pyenv/bin:/usr/bin:/bin");
        assert_eq!(without_shims("/usr/bin:/bin"), "/usr/bin:/bin");
    }
}

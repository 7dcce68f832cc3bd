//! The HTTP proxy listener's request-head reader (`gateway::target::from_head_bytes`) on
//! arbitrary bytes: it must never panic, and, since the listener parses again after every
//! read, a decision taken on a prefix (a destination or an error) must be the one the whole
//! input gets.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The agent's `gateway` module with only the files target.rs needs, so that its
/// `super::host` and `super::ip_literal` resolve. The path on the inline module makes it the
/// directory of the modules inside. (A `#[path]` on each inner module would be resolved below
/// `fuzz_targets/gateway/`, which does not exist, so `../` out of it fails.)
#[allow(dead_code, reason = "only the entry point is fuzzed")]
#[path = "../../egress-agent/src/gateway"]
mod gateway {
    pub mod host;
    pub mod ip_literal;
    pub mod target;
}

use gateway::target::from_head_bytes;

fuzz_target!(|data: &[u8]| {
    let whole = from_head_bytes(data);
    let n = data.len();
    let step = (n / 64).max(1);
    for cut in (0..n).step_by(step).chain(n.saturating_sub(8)..n) {
        let prefix = from_head_bytes(&data[..cut]);
        if prefix != Ok(None) {
            assert_eq!(prefix, whole, "the first {cut} of {n} bytes decided differently");
        }
    }
});

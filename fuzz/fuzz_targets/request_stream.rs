//! The HTTP listeners' framer (`gateway::framing::Framer`), which follows the client's byte
//! stream from request head to request head to judge each request's framing before hyper
//! parses it. On arbitrary bytes it must never panic, and how the stream is split into reads
//! must not change a single verdict: the gateway reads whatever the kernel hands it.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The agent's `gateway` module with only the files framing.rs needs (see request_head.rs for
/// why the path sits on the inline module).
#[allow(dead_code, reason = "only the framer is fuzzed")]
#[path = "../../egress-agent/src/gateway"]
mod gateway {
    pub mod framing;
    pub mod host;
    pub mod ip_literal;
    pub mod target;
}

use gateway::framing::Framer;

fn verdicts(
    pieces: impl Iterator<Item = impl AsRef<[u8]>>,
) -> Vec<Option<Result<(), gateway::target::TargetError>>> {
    let mut f = Framer::new(16 * 1024);
    for p in pieces {
        f.feed(p.as_ref());
    }
    std::iter::from_fn(|| f.next_verdict().map(Some)).collect()
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size for the split run; the rest is the stream.
    let Some((&size, stream)) = data.split_first() else { return };
    let whole = verdicts(std::iter::once(stream));
    let split = verdicts(stream.chunks(usize::from(size % 17) + 1));
    assert_eq!(whole, split, "splitting into reads of {} bytes changed the verdicts", size % 17 + 1);
});

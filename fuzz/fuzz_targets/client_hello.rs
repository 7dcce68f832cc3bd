//! The SNI passthrough listener's ClientHello reader on arbitrary bytes: it must never panic,
//! and it must be restartable. The listener calls `parse` again after every read, so a
//! decision taken on a prefix (a ClientHello or an error) must be the one the whole input gets,
//! and it may only ask for more while below its byte limit.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, reason = "the alert helpers are not fuzzed")]
#[path = "../../egress-agent/src/gateway/client_hello.rs"]
mod client_hello;

use client_hello::{HelloError, Progress, parse};

/// Small, so that inputs the fuzzer grows easily reach the limit.
const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data, MAX);
    match &whole {
        Ok(Progress::NeedMore) => assert!(data.len() < MAX, "NeedMore with {} bytes", data.len()),
        Ok(Progress::Done(hello)) => {
            if let Some(name) = &hello.server_name {
                assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
                assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{name:?}");
            }
            assert!(hello.alpn.iter().all(|p| !p.is_empty()));
        }
        Err(HelloError::TooLarge { needed, limit }) => assert!(needed > limit && *limit == MAX),
        Err(e) => assert!(!e.reason().is_empty()),
    }
    // Every prefix would be O(n^2) per input: short inputs get every cut, long ones about 64
    // evenly spread cuts plus the last few bytes (where a ClientHello completes).
    let n = data.len();
    let step = (n / 64).max(1);
    let cuts = (0..n).step_by(step).chain(n.saturating_sub(8)..n);
    for cut in cuts {
        let prefix = parse(&data[..cut], MAX);
        if prefix != Ok(Progress::NeedMore) {
            assert_eq!(prefix, whole, "the first {cut} of {n} bytes decided differently");
        }
    }
});

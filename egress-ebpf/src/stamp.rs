//! The build stamp: one instruction at the start of every program, `r0 = <stamp>`, with the
//! stamp taken from `EGRESSFW_BUILD_STAMP` at build time (0 when unset). It changes nothing a
//! program does (r0 is written again before any use), only its instructions and so its tag: the
//! tests build a second agent with another stamp to stand for "a different build", which a
//! running agent must replace make-before-break (`cargo xtask test` builds it).

const STAMP: i32 = parse(option_env!("EGRESSFW_BUILD_STAMP"));

const fn parse(text: Option<&str>) -> i32 {
    let Some(text) = text else { return 0 };
    let bytes = text.as_bytes();
    let mut value: i32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "EGRESSFW_BUILD_STAMP must be a decimal number");
        value = value * 10 + (bytes[i] - b'0') as i32;
        i += 1;
    }
    value
}

#[inline(always)]
pub fn build_stamp() {
    // SAFETY: writes only r0, which the caller's code sets before reading it.
    unsafe { core::arch::asm!("r0 = {0}", const STAMP, out("r0") _, options(nomem, nostack)) }
}

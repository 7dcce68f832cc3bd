//! Applies the mode to a reason, counts it, and reports denials.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use egress_common::{
    event::{ACTION_AUDITED, ACTION_DENIED, EVENTS_PER_CPU_PER_SEC, VerdictEvent},
    policy::MODE_AUDIT,
    verdict::Reason,
};

use crate::maps::{EGRESS_COUNTERS_V1, EGRESS_EVBUDGET_V1, EGRESS_EVENTS_V1};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Counts the verdict and, for a denial, emits an event (built lazily, only if it will be sent).
/// Returns whether the traffic may pass: allowed, or denied in audit mode.
#[inline(always)]
pub fn settle(reason: Reason, mode: u32, event: impl FnOnce(u8) -> VerdictEvent) -> bool {
    let audited = !reason.is_allow() && mode == MODE_AUDIT;
    if let Some(c) = EGRESS_COUNTERS_V1.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            if audited {
                (*c).audited += 1;
            } else {
                (*c).applied += 1;
            }
        }
    }
    if reason.is_allow() {
        return true;
    }
    if take_event_budget() {
        let action = if audited { ACTION_AUDITED } else { ACTION_DENIED };
        if EGRESS_EVENTS_V1.output::<VerdictEvent>(&event(action), 0).is_err() {
            note_ringbuf_full();
        }
    }
    audited
}

/// A per-CPU budget of events per second, so a flood of denied packets costs a counter
/// increment, not a ring buffer record and a log line each.
#[inline(always)]
fn take_event_budget() -> bool {
    let Some(b) = EGRESS_EVBUDGET_V1.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
    let b = unsafe { &mut *b };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(b.window_start_ns) >= NS_PER_SEC {
        b.window_start_ns = now;
        b.sent_in_window = 0;
    }
    if b.sent_in_window >= EVENTS_PER_CPU_PER_SEC {
        b.suppressed += 1;
        return false;
    }
    b.sent_in_window += 1;
    true
}

#[inline(always)]
fn note_ringbuf_full() {
    if let Some(b) = EGRESS_EVBUDGET_V1.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { (*b).ringbuf_full += 1 };
    }
}

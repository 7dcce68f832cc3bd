//! Applies the mode to a reason, counts it, and reports denials.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use egress_common::{
    event::{ACTION_AUDITED, ACTION_DENIED, EVENTS_PER_CPU_PER_SEC, VerdictEvent},
    policy::MODE_AUDIT,
    verdict::Hook,
    verdict::{CgroupReasonKey, Reason, ReasonCounters},
};

use aya_ebpf::programs::sk_buff::SkBuff;

use crate::{
    governing::Governing,
    maps::{EGRESS_CGCOUNT_V1, EGRESS_COUNTERS_V1, EGRESS_EVBUDGET_V1, EGRESS_EVENTS_V1},
    packet::parse,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Counts the verdict (per reason for the node; denials also for the governing policy's cgroup,
/// 0 when no policy was found) and, for a denial, emits an event (built lazily, only if it will
/// be sent). Returns whether the traffic may pass: allowed, or denied in audit mode.
#[inline(always)]
pub fn settle(reason: Reason, governing: &Governing, event: impl FnOnce(u8) -> VerdictEvent) -> bool {
    // A connect that would be steered is reported in audit mode, like a denial: nothing is
    // rewritten, and the operator sees what enforcing would change.
    let audited = governing.mode == MODE_AUDIT && (!reason.is_allow() || reason == Reason::AllowSteered);
    if let Some(c) = EGRESS_COUNTERS_V1.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { bump(c, audited) };
    }
    if reason.is_allow() && !audited {
        // Allowed traffic is counted per reason for the node only: a per-pod hash update on
        // every allowed packet would cost about a quarter of the program's run time.
        return true;
    }
    count_for_cgroup(governing.policy_cgroup_id, reason, audited);
    if take_event_budget() {
        let action = if audited { ACTION_AUDITED } else { ACTION_DENIED };
        if EGRESS_EVENTS_V1.output::<VerdictEvent>(&event(action), 0).is_err() {
            note_ringbuf_full();
        }
    }
    audited
}

/// Counts an allow verdict (node-wide, as all allows) where the program settles denials apart.
#[inline(always)]
pub fn count_allowed(reason: Reason) {
    if let Some(c) = EGRESS_COUNTERS_V1.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { bump(c, false) };
    }
}

/// SAFETY: `c` points at this CPU's slot of a per-CPU map value.
#[inline(always)]
unsafe fn bump(c: *mut ReasonCounters, audited: bool) {
    // SAFETY: see the function contract; nothing else writes this CPU's slot meanwhile.
    unsafe {
        if audited {
            (*c).audited += 1;
        } else {
            (*c).applied += 1;
        }
    }
}

/// Per-pod counts. The entry is created on first use; if the map is full the verdict still
/// stands and stays counted globally, only the per-cgroup count is lost.
/// Not inlined: a BPF-to-BPF call gets its own stack frame, and the packet program's frame is
/// already close to the 512-byte limit with the event it builds.
#[inline(never)]
fn count_for_cgroup(cgroup_id: u64, reason: Reason, audited: bool) {
    let key = CgroupReasonKey { cgroup_id, reason: reason as u8, reserved: [0; 7] };
    if let Some(c) = EGRESS_CGCOUNT_V1.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of an existing entry.
        unsafe { bump(c, audited) };
        return;
    }
    let first = if audited {
        ReasonCounters { applied: 0, audited: 1 }
    } else {
        ReasonCounters { applied: 1, audited: 0 }
    };
    // Another CPU may have created it meanwhile (NOEXIST fails); that loses one count at most.
    let _ = EGRESS_CGCOUNT_V1.insert(&key, &first, u64::from(BPF_NOEXIST));
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

/// What a packet program decided, for its event.
pub struct Verdict {
    pub hook: Hook,
    pub reason: Reason,
    /// `ACTION_DENIED` or `ACTION_AUDITED`.
    pub action: u8,
    /// The socket's cgroup; 0 where there is no socket (tc).
    pub cgroup_id: u64,
    pub policy_cgroup_id: u64,
}

impl Verdict {
    /// Its event, stamped now, with no traffic fields yet: every program's events start here.
    #[inline(always)]
    pub fn event(&self) -> VerdictEvent {
        VerdictEvent {
            // SAFETY: plain helper call.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            cgroup_id: self.cgroup_id,
            policy_cgroup_id: self.policy_cgroup_id,
            daddr: [0; 16],
            saddr: [0; 16],
            dport: 0,
            sport: 0,
            reason: self.reason as u8,
            family: 0,
            protocol: 0,
            hook: self.hook as u8,
            action: self.action,
            reserved: [0; 7],
        }
    }
}

/// The event for a packet program's denial, its packet fields read from the packet (network
/// header at `L3`) when `describe` is set and it has a parsable IP header, zero otherwise. Not
/// inlined: the event gets a frame of its own, and the packet is read again only when an event
/// is sent, so the allowed path never spends anything on describing it.
#[inline(never)]
pub fn packet_event<const L3: usize>(skb: &SkBuff, verdict: &Verdict, describe: bool) -> VerdictEvent {
    let mut event = verdict.event();
    if !describe {
        return event;
    }
    if let Ok(p) = parse::<L3>(skb) {
        let dst = p.dst.normalize();
        event.daddr = dst.to_event_bytes();
        event.saddr = p.src.to_event_bytes();
        event.family = dst.family();
        event.protocol = p.protocol;
        event.sport = p.sport;
        event.dport = p.dport;
    }
    event
}

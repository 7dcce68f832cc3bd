//! A bounded table of what was seen, by key: counts by outcome, first and last seen, the last
//! reason and rule. The gateway keeps one per (workload, host, port, …) and the node agent one
//! per (workload, address, port, protocol) of what its kernel programs refused or audited: what
//! `egress-agent recommend` reads.
//!
//! - At most `capacity` entries. A new entry in a full table first evicts the tenth of the
//!   entries least recently seen (one selection per tenth, so a flood of distinct keys costs
//!   O(log n) per event, not a scan each), and the evictions are counted: a reader can tell a
//!   quiet destination from one the table forgot.
//! - In memory only: a restart starts an empty table (the snapshots say since when).

use std::{collections::HashMap, hash::Hash, mem::size_of, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

/// Connections (or kernel verdicts) by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub allowed: u64,
    pub denied: u64,
    /// Let through in audit mode; enforcing would have refused them.
    pub audited: u64,
    /// Allowed, but the upstream failed.
    pub failed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.allowed + self.denied + self.audited + self.failed
    }

    pub fn add(&mut self, other: &Counts) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.audited += other.audited;
        self.failed += other.failed;
    }

    /// Let through, whatever became of it upstream.
    pub fn passed(&self) -> u64 {
        self.allowed + self.audited + self.failed
    }
}

/// One outcome to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Audited,
    Failed,
}

/// What a key holds besides its fixed size (the names it owns), for the memory estimate.
pub trait HeapBytes {
    fn heap_bytes(&self) -> usize;
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub counts: Counts,
    pub first: SystemTime,
    pub last: SystemTime,
    /// The last decision's reason and rule.
    pub reason: &'static str,
    pub rule: Option<Arc<str>>,
}

pub struct Table<K> {
    entries: HashMap<K, Seen>,
    evicted: u64,
    /// Bytes the keys own besides their size (names).
    heap_bytes: usize,
    /// The most entries the map has had room for: its buckets, which removals do not give back
    /// (its `capacity()` shrinks as removed entries leave tombstones).
    peak_capacity: usize,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self { entries: HashMap::new(), evicted: 0, heap_bytes: 0, peak_capacity: 0 }
    }
}

impl<K: Hash + Eq + Clone + HeapBytes> Table<K> {
    /// Counts one `outcome` for `key` at `now`, within `capacity` entries; how many entries
    /// went to make room.
    pub fn count(
        &mut self,
        key: K,
        outcome: Outcome,
        reason: &'static str,
        rule: Option<Arc<str>>,
        now: SystemTime,
        capacity: usize,
    ) -> u64 {
        let capacity = capacity.max(1);
        let mut evicted = 0;
        if !self.entries.contains_key(&key) && self.entries.len() >= capacity {
            // Down to nine tenths of the capacity (more when a reload lowered it).
            let excess = self.entries.len() + 1 - capacity;
            evicted = self.evict_oldest(excess + capacity / 10);
        }
        let key_bytes = key.heap_bytes();
        let seen = self.entries.entry(key).or_insert_with(|| Seen {
            counts: Counts::default(),
            first: now,
            last: now,
            reason: "",
            rule: None,
        });
        let new = seen.counts.total() == 0;
        let counts = &mut seen.counts;
        match outcome {
            Outcome::Allowed => counts.allowed += 1,
            Outcome::Denied => counts.denied += 1,
            Outcome::Audited => counts.audited += 1,
            Outcome::Failed => counts.failed += 1,
        }
        seen.last = now;
        seen.reason = reason;
        seen.rule = rule;
        if new {
            self.heap_bytes += key_bytes;
            self.peak_capacity = self.peak_capacity.max(self.entries.capacity());
        }
        evicted
    }

    /// Forgets the `n` entries least recently seen; how many went.
    fn evict_oldest(&mut self, n: usize) -> u64 {
        let mut by_age: Vec<(SystemTime, &K)> = self.entries.iter().map(|(k, s)| (s.last, k)).collect();
        let n = n.min(by_age.len());
        if n < by_age.len() {
            by_age.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
        }
        // Only the keys that go are copied (the map stays borrowed until then).
        let doomed: Vec<K> = by_age[..n].iter().map(|(_, k)| (*k).clone()).collect();
        let mut evicted = 0;
        for key in doomed {
            if self.entries.remove(&key).is_some() {
                self.heap_bytes -= key.heap_bytes();
                evicted += 1;
            }
        }
        self.evicted += evicted;
        evicted
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &Seen)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The table's memory, estimated (keys, counts, names, map overhead).
    pub fn bytes(&self) -> usize {
        // A hashbrown bucket holds the key and the value, plus a control byte; the table keeps
        // at most 7/8 of its buckets full.
        let per_entry = size_of::<K>() + size_of::<Seen>() + 1;
        self.peak_capacity.max(self.entries.capacity()) * per_entry + self.heap_bytes
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

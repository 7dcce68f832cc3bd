//! A bounded table of what was seen, by key: counts by outcome, first and last seen, the last
//! reason and rule. The gateway keeps one per (workload, host, port, …) and the node agent one
//! per (workload, address, port, protocol) of what its kernel programs refused or audited: what
//! `egress-agent recommend` reads.
//!
//! - At most `capacity` entries. A new entry in a full table first evicts a tenth of the
//!   capacity, the entries least recently seen of the namespace that holds the most (one
//!   selection per tenth, so a flood of distinct keys costs O(log n) per event, not a scan
//!   each): a namespace flooding distinct destinations evicts its own, not the rare ones of
//!   namespaces smaller than it (one that holds more than the flooder loses entries until the
//!   two hold about as many). Evictions are counted: a reader can tell a quiet destination from
//!   one the table forgot.
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

/// What the table needs of a key.
pub trait Keyed {
    /// What it holds besides its fixed size (the names it owns), for the memory estimate.
    fn heap_bytes(&self) -> usize;
    /// The namespace it belongs to: eviction takes from the fullest first.
    fn namespace(&self) -> &str;
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub counts: Counts,
    pub first: SystemTime,
    pub last: SystemTime,
    /// The last decision's reason and rule.
    pub reason: &'static str,
    pub rule: Option<Arc<str>>,
    /// The last refusal's: its rule, or its reason when no rule decided (`not_allowed`).
    pub denied_by: Option<(&'static str, Option<Arc<str>>)>,
    /// When it first went through (allowed, audited, or allowed and failed upstream).
    pub first_passed: Option<SystemTime>,
}

impl Seen {
    /// What refused it last, in words: the rule, or the reason.
    pub fn denied_by(&self) -> Option<String> {
        let (reason, rule) = self.denied_by.as_ref()?;
        Some(rule.as_deref().unwrap_or(reason).to_owned())
    }
}

pub struct Table<K> {
    entries: HashMap<K, Seen>,
    /// Entries per namespace.
    per_namespace: HashMap<Box<str>, usize>,
    evicted: u64,
    /// Bytes the keys own besides their size (names).
    heap_bytes: usize,
    /// The most entries the map has had room for: its buckets, which removals do not give back
    /// (its `capacity()` shrinks as removed entries leave tombstones).
    peak_capacity: usize,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            per_namespace: HashMap::new(),
            evicted: 0,
            heap_bytes: 0,
            peak_capacity: 0,
        }
    }
}

impl<K: Hash + Eq + Clone + Keyed> Table<K> {
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
        // A new key's namespace is counted (copied once, for the key's lifetime in the table).
        let namespace: Option<Box<str>> = (!self.entries.contains_key(&key)).then(|| key.namespace().into());
        if namespace.is_some() && self.entries.len() >= capacity {
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
            denied_by: None,
            first_passed: None,
        });
        let counts = &mut seen.counts;
        match outcome {
            Outcome::Allowed => counts.allowed += 1,
            Outcome::Denied => counts.denied += 1,
            Outcome::Audited => counts.audited += 1,
            Outcome::Failed => counts.failed += 1,
        }
        seen.last = now;
        if outcome == Outcome::Denied {
            seen.denied_by = Some((reason, rule.clone()));
        } else if seen.first_passed.is_none() {
            seen.first_passed = Some(now);
        }
        seen.reason = reason;
        seen.rule = rule;
        if let Some(namespace) = namespace {
            *self.per_namespace.entry(namespace).or_default() += 1;
            self.heap_bytes += key_bytes;
            self.peak_capacity = self.peak_capacity.max(self.entries.capacity());
        }
        evicted
    }

    /// Forgets `n` entries: the least recently seen of the namespace with the most entries,
    /// then (when it has fewer) the least recently seen of all; how many went.
    fn evict_oldest(&mut self, n: usize) -> u64 {
        let fullest = self.per_namespace.iter().max_by_key(|(_, count)| **count).map(|(ns, _)| ns.clone());
        let mut evicted = fullest.map_or(0, |ns| self.evict_oldest_of(n, Some(&ns)));
        if evicted < n as u64 {
            evicted += self.evict_oldest_of(n - evicted as usize, None);
        }
        self.evicted += evicted;
        evicted
    }

    /// Forgets the `n` least recently seen entries (of `namespace` only, when given).
    fn evict_oldest_of(&mut self, n: usize, namespace: Option<&str>) -> u64 {
        let mut by_age: Vec<(SystemTime, &K)> = self
            .entries
            .iter()
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace() == ns))
            .map(|(k, s)| (s.last, k))
            .collect();
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
                if let Some(count) = self.per_namespace.get_mut(key.namespace()) {
                    *count -= 1;
                    if *count == 0 {
                        self.per_namespace.remove(key.namespace());
                    }
                }
                evicted += 1;
            }
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Clone, PartialEq, Eq, Hash)]
    struct Key(&'static str, String);

    impl Keyed for Key {
        fn heap_bytes(&self) -> usize {
            self.1.len()
        }

        fn namespace(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn a_namespace_flooding_the_table_evicts_its_own_entries() {
        let mut table = Table::default();
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        // team-b's few destinations, seen long ago.
        for i in 0..5 {
            table.count(
                Key("team-b", format!("rare{i}.example.com")),
                Outcome::Allowed,
                "allowed",
                None,
                at(i),
                100,
            );
        }
        // team-a floods distinct names, many times the capacity.
        for i in 0..1000 {
            table.count(
                Key("team-a", format!("h{i}.example.com")),
                Outcome::Denied,
                "not_allowed",
                None,
                at(100 + i),
                100,
            );
        }
        assert!(table.len() <= 100);
        let team_b = table.iter().filter(|(k, _)| k.0 == "team-b").count();
        assert_eq!(team_b, 5, "team-b's rare destinations outlive team-a's flood");
        assert_eq!(table.evicted() as usize + table.len(), 1005);
        // The fullest namespace gives up its oldest, even when another's are older still.
        let mut small = Table::default();
        for i in 0..10 {
            let namespace = if i < 4 { "b" } else { "a" };
            small.count(Key(namespace, format!("{i}")), Outcome::Allowed, "", None, at(i), 10);
        }
        small.count(Key("c", "new".into()), Outcome::Allowed, "", None, at(50), 10);
        let kept: Vec<&str> = small.iter().map(|(k, _)| k.1.as_str()).collect();
        assert!(!kept.contains(&"4") && !kept.contains(&"5"), "a's oldest went: {kept:?}");
        assert!(kept.contains(&"0") && kept.contains(&"new"), "{kept:?}");
    }
}

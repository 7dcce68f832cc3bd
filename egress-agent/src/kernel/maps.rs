//! Typed handles on the pinned maps, from a freshly loaded object or straight from bpffs.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
};
use egress_common::{
    event::EventBudget,
    maps::{
        MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_CGROUP_COUNTERS, MAP_CONFIG, MAP_COUNTERS, MAP_EVENT_BUDGET,
        MAP_PASSIVE_STATS, MAP_POLICIES, MAP_STEER, PASSIVE_STAT_LOST, PASSIVE_STAT_MARKED,
        PASSIVE_STAT_RELEASED,
    },
    policy::{AllowRules, CgroupPolicy, GlobalConfig, Ipv4AllowKey, Ipv6AllowKey, POLICY_ID_BITS},
    steer::{SteerKey, SteerTarget},
    verdict::{CgroupReasonKey, REASON_SLOTS, ReasonCounters},
};
use ipnet::{Ipv4Net, Ipv6Net};

use super::bpffs::PinLayout;
use crate::policy::compile::CompiledRules;

/// Opens one pinned map by name.
pub(super) fn open_pinned(pins: &PinLayout, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}

pub struct KernelMaps {
    pub policies: HashMap<MapData, u64, CgroupPolicy>,
    pub allow4: LpmTrie<MapData, Ipv4AllowKey, AllowRules>,
    pub allow6: LpmTrie<MapData, Ipv6AllowKey, AllowRules>,
    pub config: Array<MapData, GlobalConfig>,
    pub counters: PerCpuArray<MapData, ReasonCounters>,
    pub event_budget: PerCpuArray<MapData, EventBudget>,
    pub cgroup_counters: PerCpuHashMap<MapData, CgroupReasonKey, ReasonCounters>,
    /// Absent in pins written by an agent older than the map.
    pub passive_stats: Option<PerCpuArray<MapData, u64>>,
    /// Absent in pins written by an agent older than steering (inspect, teardown); a loaded
    /// object always has it.
    pub steer: Option<HashMap<MapData, SteerKey, SteerTarget>>,
}

/// What the sockops program did with the passive marks (accepted connections), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassiveMarkStats {
    pub marked: u64,
    pub released: u64,
    /// Marked connections that closed after the LRU had evicted their mark: replies were lost.
    pub evicted_in_use: u64,
}

impl PassiveMarkStats {
    /// Marks currently held (approximately: a socket marked before a counter reset is missed).
    pub fn live(&self) -> u64 {
        self.marked.saturating_sub(self.released + self.evicted_in_use)
    }
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(|name| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
        })
    }

    /// Opens the pinned maps without loading any program (inspect, teardown).
    pub fn from_pins(pins: &PinLayout) -> Result<Self> {
        Self::from_source(|name| open_pinned(pins, name))
    }

    fn from_source(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            policies: get(MAP_POLICIES)?.try_into().context(MAP_POLICIES)?,
            allow4: get(MAP_ALLOW_V4)?.try_into().context(MAP_ALLOW_V4)?,
            allow6: get(MAP_ALLOW_V6)?.try_into().context(MAP_ALLOW_V6)?,
            config: get(MAP_CONFIG)?.try_into().context(MAP_CONFIG)?,
            counters: get(MAP_COUNTERS)?.try_into().context(MAP_COUNTERS)?,
            event_budget: get(MAP_EVENT_BUDGET)?.try_into().context(MAP_EVENT_BUDGET)?,
            cgroup_counters: get(MAP_CGROUP_COUNTERS)?.try_into().context(MAP_CGROUP_COUNTERS)?,
            passive_stats: get(MAP_PASSIVE_STATS)
                .ok()
                .map(|m| m.try_into().context(MAP_PASSIVE_STATS))
                .transpose()?,
            steer: get(MAP_STEER).ok().map(|m| m.try_into().context(MAP_STEER)).transpose()?,
        })
    }

    pub fn policies(&self) -> Result<BTreeMap<u64, CgroupPolicy>> {
        self.policies.iter().map(|r| r.context("reading the policy map")).collect()
    }

    /// Number of (IPv4, IPv6) allow entries.
    pub fn allow_entry_counts(&self) -> Result<(usize, usize)> {
        Ok((self.allow4.keys().count(), self.allow6.keys().count()))
    }

    /// Every allow entry, grouped by policy id.
    pub fn allow_entries(&self) -> Result<BTreeMap<u32, CompiledRules>> {
        let mut out: BTreeMap<u32, CompiledRules> = BTreeMap::new();
        for item in self.allow4.iter() {
            let (key, rules) = item.context("reading the IPv4 allow trie")?;
            let (id, net) = v4_from_key(&key);
            out.entry(id).or_default().v4.insert(net, rules);
        }
        for item in self.allow6.iter() {
            let (key, rules) = item.context("reading the IPv6 allow trie")?;
            let (id, net) = v6_from_key(&key);
            out.entry(id).or_default().v6.insert(net, rules);
        }
        for item in self.steer.iter().flat_map(HashMap::iter) {
            let (key, target) = item.context("reading the steering table")?;
            out.entry(key.policy_id).or_default().steer.insert(key.port, target);
        }
        Ok(out)
    }

    fn steer_map(&mut self) -> Result<&mut HashMap<MapData, SteerKey, SteerTarget>> {
        self.steer.as_mut().with_context(|| format!("map {MAP_STEER} is not pinned (an older agent's pins)"))
    }

    pub fn write_rules(&mut self, policy_id: u32, rules: &CompiledRules) -> Result<()> {
        for (net, value) in &rules.v4 {
            self.allow4
                .insert(&v4_key(policy_id, net), value, 0)
                .with_context(|| format!("writing allow entry {net} (policy {policy_id})"))?;
        }
        for (net, value) in &rules.v6 {
            self.allow6
                .insert(&v6_key(policy_id, net), value, 0)
                .with_context(|| format!("writing allow entry {net} (policy {policy_id})"))?;
        }
        for (port, target) in &rules.steer {
            self.steer_map()?
                .insert(steer_key(policy_id, *port), target, 0)
                .with_context(|| format!("writing the steering of port {port} (policy {policy_id})"))?;
        }
        Ok(())
    }

    pub fn remove_rules(&mut self, policy_id: u32, rules: &CompiledRules) -> Result<()> {
        for net in rules.v4.keys() {
            self.allow4
                .remove(&v4_key(policy_id, net))
                .with_context(|| format!("removing allow entry {net} (policy {policy_id})"))?;
        }
        for net in rules.v6.keys() {
            self.allow6
                .remove(&v6_key(policy_id, net))
                .with_context(|| format!("removing allow entry {net} (policy {policy_id})"))?;
        }
        for port in rules.steer.keys() {
            self.steer_map()?
                .remove(&steer_key(policy_id, *port))
                .with_context(|| format!("removing the steering of port {port} (policy {policy_id})"))?;
        }
        Ok(())
    }

    /// Removes whatever of `rules` is present under `policy_id`, ignoring entries that are not
    /// (taking back a write that failed midway).
    pub fn remove_rules_present(&mut self, policy_id: u32, rules: &CompiledRules) {
        for net in rules.v4.keys() {
            let _ = self.allow4.remove(&v4_key(policy_id, net));
        }
        for net in rules.v6.keys() {
            let _ = self.allow6.remove(&v6_key(policy_id, net));
        }
        if let Some(steer) = self.steer.as_mut() {
            for port in rules.steer.keys() {
                let _ = steer.remove(&steer_key(policy_id, *port));
            }
        }
    }

    pub fn level_mask(&self) -> Result<u32> {
        Ok(self.config.get(&0, 0).context("reading the config map")?.level_mask)
    }

    pub fn set_level_mask(&mut self, level_mask: u32) -> Result<()> {
        self.config.set(0, GlobalConfig { level_mask, reserved: 0 }, 0).context("writing the config map")
    }

    /// Counters summed over CPUs, indexed by reason number.
    pub fn counters(&self) -> Result<Vec<ReasonCounters>> {
        (0..REASON_SLOTS)
            .map(|i| {
                let per_cpu = self.counters.get(&i, 0).context("reading the counters map")?;
                Ok(sum_cpus(&per_cpu))
            })
            .collect()
    }

    /// Per-cgroup counters summed over CPUs, keyed by (policy cgroup id, reason number).
    pub fn cgroup_counters(&self) -> Result<BTreeMap<(u64, u8), ReasonCounters>> {
        let mut out = BTreeMap::new();
        for entry in self.cgroup_counters.iter() {
            let (key, per_cpu) = entry.context("reading the per-cgroup counters map")?;
            out.insert((key.cgroup_id, key.reason), sum_cpus(&per_cpu));
        }
        Ok(out)
    }

    /// Drops the counters of cgroups that no longer hold a policy (the map is bounded).
    pub fn forget_counters_except(&mut self, keep: &std::collections::BTreeSet<u64>) -> Result<usize> {
        let stale: Vec<CgroupReasonKey> = self
            .cgroup_counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id != 0 && !keep.contains(&k.cgroup_id))
            .collect();
        for key in &stale {
            // Already gone is fine: another agent run may have removed it.
            let _ = self.cgroup_counters.remove(key);
        }
        Ok(stale.len())
    }

    /// (suppressed by the rate limit, lost to a full ring buffer), summed over CPUs.
    pub fn event_losses(&self) -> Result<(u64, u64)> {
        let per_cpu = self.event_budget.get(&0, 0).context("reading the event budget map")?;
        Ok(per_cpu.iter().fold((0, 0), |(s, f), b| (s + b.suppressed, f + b.ringbuf_full)))
    }
}

impl KernelMaps {
    /// The passive-mark statistics; zero when the pins predate them.
    pub fn passive_marks(&self) -> Result<PassiveMarkStats> {
        let Some(stats) = &self.passive_stats else { return Ok(PassiveMarkStats::default()) };
        let read = |slot: u32| -> Result<u64> {
            Ok(stats.get(&slot, 0).context("reading the passive-mark statistics")?.iter().sum())
        };
        Ok(PassiveMarkStats {
            marked: read(PASSIVE_STAT_MARKED)?,
            released: read(PASSIVE_STAT_RELEASED)?,
            evicted_in_use: read(PASSIVE_STAT_LOST)?,
        })
    }
}

/// One counter value from its per-CPU slots.
fn sum_cpus(per_cpu: &[ReasonCounters]) -> ReasonCounters {
    per_cpu.iter().fold(ReasonCounters::default(), |acc, c| ReasonCounters {
        applied: acc.applied + c.applied,
        audited: acc.audited + c.audited,
    })
}

fn steer_key(policy_id: u32, port: u16) -> SteerKey {
    SteerKey { policy_id, port, reserved: 0 }
}

fn v4_key(policy_id: u32, net: &Ipv4Net) -> Key<Ipv4AllowKey> {
    Key::new(
        POLICY_ID_BITS + u32::from(net.prefix_len()),
        Ipv4AllowKey { policy_id_be: policy_id.to_be_bytes(), addr: net.network().octets() },
    )
}

fn v6_key(policy_id: u32, net: &Ipv6Net) -> Key<Ipv6AllowKey> {
    Key::new(
        POLICY_ID_BITS + u32::from(net.prefix_len()),
        Ipv6AllowKey { policy_id_be: policy_id.to_be_bytes(), addr: net.network().octets() },
    )
}

fn v4_from_key(key: &Key<Ipv4AllowKey>) -> (u32, Ipv4Net) {
    let data = key.data();
    let len = key.prefix_len().saturating_sub(POLICY_ID_BITS).min(32) as u8;
    (u32::from_be_bytes(data.policy_id_be), Ipv4Net::new(data.addr.into(), len).expect("len <= 32"))
}

fn v6_from_key(key: &Key<Ipv6AllowKey>) -> (u32, Ipv6Net) {
    let data = key.data();
    let len = key.prefix_len().saturating_sub(POLICY_ID_BITS).min(128) as u8;
    (u32::from_be_bytes(data.policy_id_be), Ipv6Net::new(data.addr.into(), len).expect("len <= 128"))
}

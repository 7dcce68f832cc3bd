//! Typed handles on the tc layer's maps: which policy judges each interface, and which pod
//! addresses may be sent from it (under which policy).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use egress_common::{
    maps::{MAP_TC_INTERFACES, MAP_TC_SOURCES_V4, MAP_TC_SOURCES_V6},
    tc::{PolicyBinding, SourceKey4, SourceKey6},
};

use super::{bpffs::PinLayout, maps::open_pinned};

pub struct TcMaps {
    pub interfaces: HashMap<MapData, u32, PolicyBinding>,
    pub sources4: HashMap<MapData, SourceKey4, PolicyBinding>,
    pub sources6: HashMap<MapData, SourceKey6, PolicyBinding>,
}

/// An address bound to an interface: the key of a source map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BoundSource {
    pub ifindex: u32,
    pub addr: IpAddr,
}

impl TcMaps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Self::from_maps(take(MAP_TC_INTERFACES)?, take(MAP_TC_SOURCES_V4)?, take(MAP_TC_SOURCES_V6)?)
    }

    /// Opens the pinned maps without loading any program (inspect, teardown).
    pub fn from_pins(pins: &PinLayout) -> Result<Self> {
        let open = |name: &str| open_pinned(pins, name);
        Self::from_maps(open(MAP_TC_INTERFACES)?, open(MAP_TC_SOURCES_V4)?, open(MAP_TC_SOURCES_V6)?)
    }

    fn from_maps(interfaces: Map, sources4: Map, sources6: Map) -> Result<Self> {
        Ok(Self {
            interfaces: interfaces.try_into().context(MAP_TC_INTERFACES)?,
            sources4: sources4.try_into().context(MAP_TC_SOURCES_V4)?,
            sources6: sources6.try_into().context(MAP_TC_SOURCES_V6)?,
        })
    }

    /// ifindex -> policy cgroup id.
    pub fn interfaces(&self) -> Result<BTreeMap<u32, u64>> {
        self.interfaces
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.policy_cgroup_id)).context("reading the tc interface map"))
            .collect()
    }

    /// (interface, pod address) -> policy cgroup id.
    pub fn sources(&self) -> Result<BTreeMap<BoundSource, u64>> {
        let mut out = BTreeMap::new();
        for r in self.sources4.iter() {
            let (k, v) = r.context("reading the tc IPv4 source map")?;
            out.insert(BoundSource { ifindex: k.ifindex, addr: k.addr.into() }, v.policy_cgroup_id);
        }
        for r in self.sources6.iter() {
            let (k, v) = r.context("reading the tc IPv6 source map")?;
            out.insert(BoundSource { ifindex: k.ifindex, addr: k.addr.into() }, v.policy_cgroup_id);
        }
        Ok(out)
    }

    pub fn bind_interface(&mut self, ifindex: u32, policy_cgroup_id: u64) -> Result<()> {
        self.interfaces
            .insert(ifindex, PolicyBinding { policy_cgroup_id }, 0)
            .with_context(|| format!("binding interface {ifindex} to cgroup id {policy_cgroup_id}"))
    }

    pub fn unbind_interface(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.interfaces.remove(&ifindex))
            .with_context(|| format!("unbinding interface {ifindex}"))
    }

    pub fn bind_source(&mut self, source: BoundSource, policy_cgroup_id: u64) -> Result<()> {
        let value = PolicyBinding { policy_cgroup_id };
        let ifindex = source.ifindex;
        match source.addr {
            IpAddr::V4(a) => self.sources4.insert(SourceKey4 { ifindex, addr: a.octets() }, value, 0),
            IpAddr::V6(a) => self.sources6.insert(SourceKey6 { ifindex, addr: a.octets() }, value, 0),
        }
        .with_context(|| {
            format!("binding source {} on interface {ifindex} to cgroup id {policy_cgroup_id}", source.addr)
        })
    }

    pub fn unbind_source(&mut self, source: BoundSource) -> Result<()> {
        let ifindex = source.ifindex;
        ignore_missing(match source.addr {
            IpAddr::V4(a) => self.sources4.remove(&SourceKey4 { ifindex, addr: a.octets() }),
            IpAddr::V6(a) => self.sources6.remove(&SourceKey6 { ifindex, addr: a.octets() }),
        })
        .with_context(|| format!("unbinding source {} from interface {ifindex}", source.addr))
    }
}

/// Removing what is already gone is success.
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

//! The eBPF object, built from egress-ebpf by build.rs and embedded in the binary.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{CgroupSkb, CgroupSockAddr, SchedClassifier, SockOps},
};
use egress_common::maps::{
    MAP_EVENTS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SENDMSG4,
    PROG_SENDMSG6, PROG_SKB_EGRESS, PROG_SOCKOPS, PROG_TC_FROM_POD, PROG_TC_TO_POD,
};

use super::bpffs::PinLayout;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf"));

/// The socket-address programs, in attach order: getpeername before connect, so no socket is
/// steered before its original peer can be shown.
pub const SOCK_ADDR_PROGRAMS: [&str; 6] =
    [PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6];

/// Every program, as named in the object and under each cgroup's links directory, in attach
/// order. The sockops program comes first so that connections accepted once the packet program
/// runs are already marked (and steered ones are released at close).
pub const ALL_PROGRAMS: [&str; 8] = [
    PROG_SOCKOPS,
    PROG_SKB_EGRESS,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
];

/// The tc programs, attached to pods' host-side veths (see `tc_attach`).
pub const TC_PROGRAMS: [&str; 2] = [PROG_TC_FROM_POD, PROG_TC_TO_POD];

/// The connect hooks' switch for keeping a steered MPTCP socket's record (egress-ebpf steer.rs).
const MPTCP_OWNER_LOOKUP: &str = "MPTCP_OWNER_LOOKUP";

/// Loads the object, reusing the maps pinned under `pins` (creating and pinning them the first
/// time), and loads every program into the kernel (the verifier runs here).
///
/// First with the connect hooks' MPTCP owner lookup (`bpf_skc_to_mptcp_sock`, which needs Linux
/// 5.19 and MPTCP in the kernel's BTF); where the verifier refuses that, once more without it,
/// and a warning says what that costs. An error of the second attempt is the real one.
pub fn load(pins: &PinLayout) -> Result<Ebpf> {
    match load_with(pins, true) {
        Ok(ebpf) => Ok(ebpf),
        Err(first) => {
            let ebpf = load_with(pins, false)?;
            tracing::warn!(
                error = format!("{first:#}"),
                "this kernel's connect hooks cannot look up an MPTCP socket from its subflow (bpf_skc_to_mptcp_sock: Linux 5.19+ with MPTCP in its BTF): a steered MPTCP socket is carried to the gateway, but getpeername() on it reports the gateway"
            );
            Ok(ebpf)
        }
    }
}

fn load_with(pins: &PinLayout, mptcp_owner_lookup: bool) -> Result<Ebpf> {
    let maps = pins.maps();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps)
        .override_global(MPTCP_OWNER_LOOKUP, &u8::from(mptcp_owner_lookup), true)
        .load(OBJECT)
        .with_context(|| format!("loading the eBPF object (maps pinned under {})", maps.display()))?;
    let skb: &mut CgroupSkb = ebpf
        .program_mut(PROG_SKB_EGRESS)
        .with_context(|| format!("program {PROG_SKB_EGRESS} missing from the object"))?
        .try_into()?;
    skb.load().with_context(|| format!("loading {PROG_SKB_EGRESS} (verifier)"))?;
    let ops: &mut SockOps = ebpf
        .program_mut(PROG_SOCKOPS)
        .with_context(|| format!("program {PROG_SOCKOPS} missing from the object"))?
        .try_into()?;
    ops.load().with_context(|| format!("loading {PROG_SOCKOPS} (verifier)"))?;
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name} (verifier)"))?;
    }
    for name in TC_PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok(ebpf)
}

/// Pins the tc programs under `programs/` for the CNI plugin's gate, replacing what an earlier
/// agent pinned there in one step (a new pin renamed over the old one), so the plugin always
/// finds a complete program, of this build from now on.
pub fn pin_tc_programs(ebpf: &mut Ebpf, pins: &PinLayout) -> Result<()> {
    let dir = pins.programs();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in TC_PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        let pin = pins.program(name);
        // bpffs refuses names with a dot (reserved for the kernel), hence the underscore.
        let tmp = dir.join(format!("{name}_new"));
        let _ = std::fs::remove_file(&tmp);
        prog.pin(&tmp).with_context(|| format!("pinning {name} at {}", tmp.display()))?;
        std::fs::rename(&tmp, &pin).with_context(|| format!("replacing {}", pin.display()))?;
    }
    Ok(())
}

/// Takes the events ring buffer out of the loaded object.
pub fn events_ring(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    ebpf.take_map(MAP_EVENTS)
        .with_context(|| format!("map {MAP_EVENTS} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("{MAP_EVENTS} is not a ring buffer"))
}

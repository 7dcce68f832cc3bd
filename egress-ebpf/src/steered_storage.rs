//! Where a steered socket's original destination is kept: socket-local storage
//! (`BPF_MAP_TYPE_SK_STORAGE`). The kernel frees a socket's entry with the socket, so nothing is
//! left behind by a connect that fails, a socket that is never closed cleanly, or a busy node:
//! no eviction, no close callback, no cleanup by the agent. The map holds no entries of its own
//! (its size is the number of sockets that have one).
//!
//! Defined here rather than with aya-ebpf's `SkStorage`, which has no pinning field: the map is
//! pinned by name like every other, so a new agent's getpeername program reads the records of
//! sockets steered before it started.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock_addr,
    },
    helpers::generated::{bpf_sk_storage_get, bpf_skc_to_mptcp_sock},
};
use egress_common::steer::SteeredPeer;

/// libbpf's `LIBBPF_PIN_BY_NAME`, which aya honours: pinned under the default pin directory.
const PIN_BY_NAME: usize = 1;

/// A BTF map definition (section `.maps`): each field's type encodes one attribute, read from
/// the object's BTF by the loader. `repr(C)` keeps the fields in this order in the BTF.
#[repr(C)]
pub struct SteeredStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SteeredPeer,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are never dereferenced; the loader replaces the whole static with the map.
unsafe impl Sync for SteeredStorage {}

impl SteeredStorage {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    /// The record of the socket behind this socket-address context; with `create`, a zeroed
    /// one is made if it has none. `None`: no record (or no memory for a new one).
    #[inline(always)]
    pub fn get(&self, sa: *mut bpf_sock_addr, create: bool) -> Option<&mut SteeredPeer> {
        // SAFETY: the kernel passes a valid context whose socket lives while the program runs.
        self.get_sock(unsafe { (*sa).__bindgen_anon_1.sk }.cast(), create)
    }

    /// The record of the MPTCP socket that owns the context's socket, when that socket is the
    /// subflow of one (the kernel runs connect() hooks for the subflow, while the application
    /// holds the MPTCP socket). `Ok(None)`: not a subflow (plain TCP, or a kernel without
    /// MPTCP); `Err(())`: a subflow whose owner has no record and none could be made.
    #[inline(always)]
    pub fn get_mptcp_owner(&self, sa: *mut bpf_sock_addr) -> Result<Option<&mut SteeredPeer>, ()> {
        // SAFETY: as in `get`; the helper returns null or the owning socket, which lives at
        // least as long as its subflow.
        let owner = unsafe { bpf_skc_to_mptcp_sock((*sa).__bindgen_anon_1.sk.cast()) };
        if owner.is_null() {
            return Ok(None);
        }
        self.get_sock(owner.cast(), true).map(Some).ok_or(())
    }

    #[inline(always)]
    fn get_sock(&self, sk: *mut c_void, create: bool) -> Option<&mut SteeredPeer> {
        let flags = if create { u64::from(BPF_SK_STORAGE_GET_F_CREATE) } else { 0 };
        // SAFETY: `sk` is a socket the kernel handed this run; the helper returns null or a
        // pointer to that socket's value, valid for the run.
        unsafe {
            let value = bpf_sk_storage_get(ptr::from_ref(self).cast_mut().cast(), sk, ptr::null_mut(), flags);
            value.cast::<SteeredPeer>().as_mut()
        }
    }
}

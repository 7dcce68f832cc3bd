//! The contract between the egressfw kernel programs and userspace.
//!
//! Everything here is `#![no_std]`, `#[repr(C)]`, `Copy`, free of `bool` and implicit padding, so
//! the same bytes mean the same thing on both sides of a map. Byte order is stated in each field's
//! documentation. The pure decision logic ([`decide`]) also lives here so it is unit-tested in
//! userspace and runs unchanged in the kernel.
#![no_std]

pub mod addr;
pub mod decide;
pub mod event;
mod layout;
pub mod maps;
pub mod policy;
pub mod steer;
pub mod tc;
pub mod verdict;

#[cfg(feature = "user")]
mod pod_impls;

//! Nothing for the host: the programs live in the `egress-ebpf` binary (bpfel target). This
//! library exists so egress-agent can name the crate as a build-dependency, which makes cargo
//! rebuild the eBPF object when this crate or egress-common changes.
#![no_std]

//! Empty host-side library: lets `agent/build.rs` depend on this crate so cargo rebuilds the
//! agent when the eBPF programs change. The programs themselves are the `awaitlab` binary.
#![no_std]

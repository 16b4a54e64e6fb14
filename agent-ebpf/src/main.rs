//! awaitlab's eBPF programs.
//!
//! Only hooks that every supported kernel lets us use: BTF tracepoints (`tp_btf`) on stable
//! tracepoints. No kprobes, no fentry, and no kernel struct offsets compiled in: every field read
//! goes through offsets that the agent resolves from the running kernel's BTF (`Config`).
//! Programs must never block or loop unboundedly, and count every record they cannot deliver.
#![no_std]
#![no_main]

mod common;
mod sched;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

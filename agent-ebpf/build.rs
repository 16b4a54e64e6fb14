//! Rebuild the eBPF object when the linker changes (a new bpf-linker can change the output).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}

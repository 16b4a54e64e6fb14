//! Maps, configuration and field readers shared by the programs.
//!
//! Every kernel field is read at an offset from [`KERNEL`], which the agent resolves from the
//! running kernel's BTF, so a kernel whose structs moved still works as long as its BTF says
//! where they are.

use agent_common::{Config, Counter, Hist, Kernel, ThreadCpu, COUNTERS};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

/// Aggregation mode: the database round-trip and connect histograms (`DB_AGG_*` indexes).
#[map]
pub static DB_AGG: PerCpuArray<Hist> = PerCpuArray::with_max_entries(2, 0);

/// An all-zero histogram, never written: the initial value of a new `REQ_AGG` entry (a
/// histogram does not fit on the 512-byte BPF stack).
#[map]
pub static ZERO_HIST: Array<Hist> = Array::with_max_entries(1, 0);

/// Entry 0 holds the configuration, written by the agent before any program is attached.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Loss and traffic counters, indexed by `agent_common::Counter`.
#[map]
pub static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// Finished requests, database round trips and connects, read by the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(agent_common::EVENTS_BYTES, 0);

/// On/off-CPU totals per target thread (key: thread id).
#[map]
pub static THREADS: HashMap<u32, ThreadCpu> = HashMap::with_max_entries(16384, 0);

/// When the current task of each CPU went on CPU (any task, target or not): the start of the
/// slice of a thread we first see while it runs or as it leaves the CPU.
#[map]
pub static LAST_SWITCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Start of the running task's current slice on this CPU (0 before the first switch we saw).
#[inline(always)]
pub fn slice_start() -> u64 {
    LAST_SWITCH.get(0).copied().unwrap_or(0)
}

/// Above this much unread data a submit wakes the agent; below it the agent's own timer picks
/// the records up. A wakeup per record (the default) costs microseconds of irq_work per request.
const WAKEUP_BYTES: u64 = 512 * 1024;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Flags for `submit`: wake the reader only when a batch is waiting.
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    let c = CONFIG.get(0)?;
    if c.netns_inum == 0 {
        return None;
    }
    Some(c)
}

#[inline(always)]
pub fn count(c: Counter) {
    add(c, 1);
}

/// Adds `n` to a per-CPU counter, wrapping: a counter that goes up and down subtracts by adding
/// `n.wrapping_neg()`, and another CPU's slot may hold the matching addition (user space sums
/// the slots with wrapping arithmetic).
#[inline(always)]
pub fn add(c: Counter, n: u64) {
    if let Some(p) = COUNTERS_MAP.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *p = (*p).wrapping_add(n) };
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments, always allowed.
    unsafe { bpf_ktime_get_ns() }
}

/// Offsets and syscall numbers of the running kernel, written by the agent before loading.
/// Read-only and frozen: the verifier reads its fields as constants. Only ever read through
/// [`kernel`], so the compiler cannot fold the all-zero value it is compiled with.
#[unsafe(no_mangle)]
static KERNEL: Kernel = unsafe { core::mem::zeroed() };

/// Reads one field of [`KERNEL`]: `kernel(|k| &k.offsets.sk_net)`.
#[inline(always)]
pub fn kernel<T: Copy + 'static>(f: impl FnOnce(&'static Kernel) -> &'static T) -> T {
    // SAFETY: a field of a static; volatile so the load stays a load of the global.
    unsafe { core::ptr::read_volatile(f(&KERNEL)) }
}

/// Reads the `T` at `base + off`, where `base` is a pointer the verifier knows the BTF type of
/// (a tracepoint argument, a helper's BTF return, or a pointer read this way) and `off` a
/// constant from [`KERNEL`]. The verifier checks the access against the type, and the kernel
/// turns a fault (a NULL `base`) into 0: a plain load instead of a `bpf_probe_read_kernel` call.
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: see above; the load is guarded by the kernel's exception table.
    unsafe { core::ptr::read((base + off as u64) as *const T) }
}

/// The target's `struct net *`, learnt from the first socket whose namespace inode matched.
/// While the target lives no other namespace can have that address, so afterwards one pointer
/// comparison decides, instead of a second field read.
#[map]
pub static TARGET_NET: Array<u64> = Array::with_max_entries(1, 0);

/// Whether a `struct sock *` belongs to the target namespace.
#[inline(always)]
pub fn sk_in_target(c: &Config, sk: u64) -> bool {
    let net: u64 = field(sk, kernel(|k| &k.offsets.sk_net));
    let Some(cached) = TARGET_NET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: array value pointer valid for this program run.
    let known = unsafe { *cached };
    if known != 0 {
        return net == known;
    }
    if field::<u32>(net, kernel(|k| &k.offsets.net_inum)) == c.netns_inum {
        // SAFETY: as above; racing writers all write the same value.
        unsafe { *cached = net };
        return true;
    }
    false
}

/// Network namespace inode of a `struct task_struct *` (0 while it exits: nsproxy is NULL).
#[inline(always)]
pub fn task_netns(task: u64) -> u32 {
    let nsproxy: u64 = field(task, kernel(|k| &k.offsets.task_nsproxy));
    let net: u64 = field(nsproxy, kernel(|k| &k.offsets.nsproxy_net_ns));
    field(net, kernel(|k| &k.offsets.net_inum))
}

#[inline(always)]
pub fn port_in(ports: &[u16; agent_common::MAX_PORTS], p: u16) -> bool {
    if p == 0 {
        return false;
    }
    let mut i = 0;
    while i < agent_common::MAX_PORTS {
        if ports[i] == p {
            return true;
        }
        i += 1;
    }
    false
}

/// On-CPU nanoseconds of thread `tid` up to `t`, counting the slice it is running now.
#[inline(always)]
pub fn thread_on_cpu(tid: u32, tgid: u32, t: u64) -> u64 {
    if let Some(p) = THREADS.get_ptr_mut(tid) {
        // SAFETY: map value pointer valid for this program run.
        let th = unsafe { &*p };
        let running = if th.last_in != 0 && t > th.last_in {
            t - th.last_in
        } else {
            0
        };
        return th.on_ns + running;
    }
    // First sight of a running thread: its clock starts with the slice it is running.
    let start = slice_start();
    let last_in = if start != 0 && start <= t { start } else { t };
    let th = ThreadCpu {
        tgid,
        last_in,
        ..ThreadCpu::default()
    };
    if THREADS.insert(tid, th, 0).is_err() {
        count(Counter::ThreadMapFull);
    }
    t - last_in
}

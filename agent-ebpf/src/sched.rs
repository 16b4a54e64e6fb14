//! On-CPU and off-CPU time of the target's threads.
//!
//! A thread belongs to the target while its `nsproxy->net_ns` is the target namespace, so threads
//! started before the agent attached, and workers respawned later, are counted alike.
//!
//! An exiting thread must not get a new entry: `sched_process_exit` moves its totals to the
//! "exited" counters and removes its entry, but the thread keeps its namespaces until
//! `exit_task_namespaces()` later in `do_exit()` (kernel/exit.c), and is often switched out and
//! in again meanwhile (unmapping its memory, closing its files). An entry made then would keep
//! `last_in` or `last_out` set forever, and every reader would count a dead thread as running
//! (or waiting) until the agent detached. Slices of such a thread go straight to the "exited"
//! on-CPU counter instead.

use agent_common::{Counter, ThreadCpu, PF_EXITING};
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::common::{add, config, count, field, kernel, now, task_netns, LAST_SWITCH, THREADS};

/// `tp_btf/sched_switch`: `TP_PROTO(bool preempt, struct task_struct *prev,
/// struct task_struct *next, unsigned int prev_state)` (include/trace/events/sched.h; the
/// `prev_state` argument was added in 5.18 after the two we read).
#[btf_tracepoint(function = "sched_switch")]
pub fn awl_sched_switch(ctx: BtfTracePointContext) -> i32 {
    try_sched_switch(&ctx);
    0
}

#[inline(always)]
fn try_sched_switch(ctx: &BtfTracePointContext) -> Option<()> {
    let c = config()?;
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let t = now();
    let slice = LAST_SWITCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
    let slice_start = unsafe { core::mem::replace(&mut *slice, t) };
    if task_netns(prev) == c.netns_inum {
        let (tid, tgid) = task_ids(prev);
        switch_out(tid, tgid, t, slice_start, exiting(prev));
    }
    if task_netns(next) == c.netns_inum {
        let (tid, tgid) = task_ids(next);
        switch_in(tid, tgid, t, exiting(next));
    }
    Some(())
}

/// Thread id and process id of a task.
#[inline(always)]
fn task_ids(task: u64) -> (u32, u32) {
    (
        field(task, kernel(|k| &k.offsets.task_pid)),
        field(task, kernel(|k| &k.offsets.task_tgid)),
    )
}

/// Whether a task is in `do_exit()` (see the module doc).
#[inline(always)]
fn exiting(task: u64) -> bool {
    field::<u32>(task, kernel(|k| &k.offsets.task_flags)) & PF_EXITING != 0
}

#[inline(always)]
fn switch_out(tid: u32, tgid: u32, t: u64, slice_start: u64, exiting: bool) {
    // The slice that ends now began at the previous switch on this CPU; that also covers a
    // thread first seen here (already running when we attached, or just moved into the target).
    let slice = if slice_start != 0 && t > slice_start {
        t - slice_start
    } else {
        0
    };
    match THREADS.get_ptr_mut(tid) {
        Some(p) => {
            // SAFETY: map value pointer valid for this program run.
            let th = unsafe { &mut *p };
            // Its switch-in was not seen (that run could not read the task): the slice ending
            // now began at `slice_start`, so it waited from `last_out` until then.
            if th.last_out != 0 && slice_start > th.last_out {
                th.off_ns += slice_start - th.last_out;
            }
            th.on_ns += slice;
            th.last_in = 0;
            th.last_out = t;
        }
        // Past its exit tracepoint (or never seen before it began to exit): count the slice as
        // an exited thread's, make no entry.
        None if exiting => add(Counter::ExitedOnCpuNs, slice),
        None => {
            let th = ThreadCpu {
                tgid,
                on_ns: slice,
                last_out: t,
                ..ThreadCpu::default()
            };
            if THREADS.insert(tid, th, 0).is_err() {
                count(Counter::ThreadMapFull);
            }
        }
    }
}

#[inline(always)]
fn switch_in(tid: u32, tgid: u32, t: u64, exiting: bool) {
    match THREADS.get_ptr_mut(tid) {
        Some(p) => {
            // SAFETY: as above.
            let th = unsafe { &mut *p };
            if th.last_out != 0 && t > th.last_out {
                th.off_ns += t - th.last_out;
            }
            th.last_out = 0;
            th.last_in = t;
        }
        // Its slice is counted when it leaves the CPU (switch_out, from LAST_SWITCH).
        None if exiting => {}
        None => {
            let th = ThreadCpu {
                tgid,
                last_in: t,
                ..ThreadCpu::default()
            };
            if THREADS.insert(tid, th, 0).is_err() {
                count(Counter::ThreadMapFull);
            }
        }
    }
}

/// `tp_btf/sched_process_exit`: `TP_PROTO(struct task_struct *p, ...)`, run by the exiting
/// thread itself. Its totals move to the per-CPU "exited" counters so nothing is lost.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn awl_sched_exit(_ctx: BtfTracePointContext) -> i32 {
    try_exit();
    0
}

#[inline(always)]
fn try_exit() -> Option<()> {
    config()?;
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    let p = THREADS.get_ptr(tid)?;
    // SAFETY: map value pointer valid for this program run.
    let th = unsafe { *p };
    let t = now();
    let mut on = th.on_ns;
    if th.last_in != 0 && t > th.last_in {
        on += t - th.last_in;
    }
    add(Counter::ExitedOnCpuNs, on);
    add(Counter::ExitedOffCpuNs, th.off_ns);
    let _ = THREADS.remove(tid);
    crate::sock::forget_thread(tid);
    Some(())
}

//! The clocks the agent reads. `monotonic_ns` is CLOCK_MONOTONIC, the clock of the probes'
//! `bpf_ktime_get_ns` timestamps and of the delay line's release timer, so user-space readings
//! and kernel records line up; `thread_cpu_ns` is the calling thread's CPU time.

/// CLOCK_MONOTONIC in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in nanoseconds (the clock of the kernel's packet time stamps).
pub(crate) fn realtime_ns() -> u64 {
    read(libc::CLOCK_REALTIME)
}

/// The calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID) in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    read(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer, and both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Both clocks against the standard library's: a sleep moves the monotonic clock by at least
    /// its length and the thread's CPU clock by much less; a spin of 20 ms of `Instant` moves
    /// the CPU clock by at most that (it may be preempted, never ahead).
    #[test]
    fn clocks_move_as_the_thread_sleeps_and_spins() {
        let (m0, c0) = (monotonic_ns(), thread_cpu_ns());
        std::thread::sleep(Duration::from_millis(50));
        let (m1, c1) = (monotonic_ns(), thread_cpu_ns());
        assert!(m1 - m0 >= 50_000_000, "{} ns", m1 - m0);
        assert!(
            c1 - c0 < 25_000_000,
            "a sleeping thread used {} ns",
            c1 - c0
        );

        let start = Instant::now();
        let c2 = thread_cpu_ns();
        while start.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        // The CPU clock is read inside the wall-clock interval at both ends.
        let c3 = thread_cpu_ns();
        let spun = start.elapsed().as_nanos() as u64;
        let used = c3 - c2;
        assert!(used > 0 && used <= spun, "used {used} ns in {spun} ns");
    }
}

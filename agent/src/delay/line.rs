//! The user-space delay line: packets queued by the NFQUEUE rule are held for the requested
//! delay and then accepted, in arrival order.
//!
//! Two threads. The reader receives packet ids from the netlink socket and stamps each with its
//! release time, counted from the kernel's time stamp of the packet when the message has one
//! (the line keeps receive time stamps on while it runs, `TimeStamps`): the reader's own clock
//! would leave out the time the reader took to wake, which on a line idle between packets (a
//! TCP request every 100 ms) was most of the error. The releaser sleeps on an absolute
//! nanosecond timer (`clock_nanosleep`, `TIMER_ABSTIME`, timer slack 1 ns; on long waits it
//! wakes early and spins the rest, `Timer`) until the oldest packet is due, then accepts every
//! packet due by then with one batch verdict: a fixed delay keeps the FIFO sorted by release
//! time, and jitter is clamped so that it never reorders (reordering would make TCP
//! retransmit). Holding time, bypasses and CPU are counted.
//!
//! It must never drop or alter a packet: the only verdict is ACCEPT, and on stop everything still
//! held is accepted at once.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use super::nfq::{self, Msg, Received, Socket};

use crate::clock::{monotonic_ns, realtime_ns, thread_cpu_ns};

/// Release times for successive packets: arrival + delay ± uniform jitter, never earlier than
/// the previous packet's (no reordering), never before arrival.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    delay_ns: u64,
    jitter_ns: u64,
    last_due: u64,
    rng: u64,
}

impl Schedule {
    pub fn new(delay: Duration, jitter: Duration, seed: u64) -> Schedule {
        Schedule {
            delay_ns: delay.as_nanos() as u64,
            jitter_ns: jitter.as_nanos() as u64,
            last_due: 0,
            rng: seed | 1,
        }
    }

    pub fn due(&mut self, arrival_ns: u64) -> u64 {
        let mut due = arrival_ns + self.delay_ns;
        if self.jitter_ns > 0 {
            // xorshift64*: cheap and good enough for a uniform offset.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % (2 * self.jitter_ns + 1);
            due = (due + r).saturating_sub(self.jitter_ns).max(arrival_ns);
        }
        due = due.max(self.last_due);
        self.last_due = due;
        due
    }
}

/// Counters shared by the threads and whoever reads the line's figures.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Packets received from the queue.
    pub seen: AtomicU64,
    /// Packets accepted after their hold.
    pub released: AtomicU64,
    /// Packets that came with the kernel's time stamp (their hold counts from their arrival).
    pub stamped: AtomicU64,
    /// Packet ids skipped (the kernel assigned them but the socket could not deliver them).
    pub id_gaps: AtomicU64,
    /// Receive errors with ENOBUFS (socket buffer overflow; those packets were failed open).
    pub enobufs: AtomicU64,
    /// CPU time of the two threads, updated as they run.
    pub cpu_ns: AtomicU64,
}

/// Holding-time figures (release time minus receive time), in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct HoldStats {
    pub packets: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

struct Shared {
    queue: Mutex<VecDeque<(u32, u64, u64)>>, // (id, arrival, due)
    wake: Condvar,
    stop: AtomicBool,
    counters: Counters,
    holds: Mutex<hdrhistogram::Histogram<u64>>,
}

/// A running delay line. Stopping (or dropping) accepts everything still held.
pub(crate) struct DelayLine {
    shared: Arc<Shared>,
    socket: Arc<Socket>,
    queue_num: u16,
    threads: Vec<JoinHandle<()>>,
    /// Held for the line's life (None if the kernel refused: the reader's clock then serves).
    _stamps: Option<TimeStamps>,
}

/// Keeps the kernel's receive time stamps on while it lives: a socket that asked for them
/// (`SO_TIMESTAMPNS`) turns on the global switch (`net_enable_timestamp`), and then every
/// packet is stamped as it arrives, or as NFQUEUE queues it, and NFQUEUE passes the stamp on
/// (`NFQA_TIMESTAMP`). Closing the socket turns the switch back off when no other socket
/// wants stamps. The socket is never bound and carries no traffic.
struct TimeStamps {
    _socket: std::os::fd::OwnedFd,
}

impl TimeStamps {
    fn new() -> std::io::Result<TimeStamps> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned (and closed) by OwnedFd from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new socket nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        nfq::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &(1 as libc::c_int),
        )?;
        Ok(TimeStamps { _socket: fd })
    }
}

/// A packet's arrival on CLOCK_MONOTONIC: `mono_now` less the age its kernel time stamp gives
/// (`real_now` and the stamp on CLOCK_REALTIME), or `mono_now` without a stamp or with one that
/// is not of the last second (a clock step, or a stamp that is not an arrival's).
fn arrival_ns(stamp_us: Option<u64>, mono_now: u64, real_now: u64) -> u64 {
    match stamp_us.map(|us| real_now.checked_sub(us.saturating_mul(1_000))) {
        Some(Some(age)) if age < 1_000_000_000 => mono_now - age.min(mono_now),
        _ => mono_now,
    }
}

impl DelayLine {
    /// Binds `queue_num` on `socket` (created in the target namespace) and starts the threads.
    pub fn start(
        socket: Socket,
        queue_num: u16,
        maxlen: u32,
        delay: Duration,
        jitter: Duration,
    ) -> std::io::Result<DelayLine> {
        socket.request(&Msg::cmd(1, queue_num, true), 1)?;
        socket.request(
            &Msg::params(
                2,
                queue_num,
                maxlen,
                nfq::NFQA_CFG_F_FAIL_OPEN | nfq::NFQA_CFG_F_GSO,
            ),
            2,
        )?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::with_capacity(maxlen.min(1 << 20) as usize)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            // 1 µs .. 120 s at 3 significant digits (0.1 %).
            holds: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            ),
        });
        let socket = Arc::new(socket);
        let stamps = TimeStamps::new()
            .map_err(|e| {
                tracing::warn!("delay line: no kernel time stamps ({e}); the reader's clock serves")
            })
            .ok();
        let mut line = DelayLine {
            shared,
            socket,
            queue_num,
            threads: Vec::new(),
            _stamps: stamps,
        };
        let seed = monotonic_ns();
        let (sh, so) = (line.shared.clone(), line.socket.clone());
        line.threads.push(
            std::thread::Builder::new()
                .name("awl-delay-rx".into())
                .spawn(move || reader(&sh, &so, queue_num, Schedule::new(delay, jitter, seed)))?,
        );
        let (sh, so) = (line.shared.clone(), line.socket.clone());
        line.threads.push(
            std::thread::Builder::new()
                .name("awl-delay-tx".into())
                .spawn(move || releaser(&sh, &so, queue_num))?,
        );
        Ok(line)
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn holds(&self) -> HoldStats {
        let h = self.shared.holds.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            return HoldStats::default();
        }
        HoldStats {
            packets: h.len(),
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            max_us: h.max() as f64,
        }
    }

    /// Stops both threads, accepts what is still held, and unbinds the queue.
    pub fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Unbinding makes the kernel drop anything still queued, so accept it all first. Ids only
        // grow, so "up to u32::MAX" covers every packet the line ever saw.
        let _ = self
            .socket
            .send(&Msg::accept_upto(self.queue_num, u32::MAX));
        let _ = self.socket.request(&Msg::cmd(3, self.queue_num, false), 3);
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the calling thread a SCHED_FIFO thread of `priority` with 1 ns timer slack. Only for
/// threads that block (in recv, a condvar or a timer) and never spin.
pub fn realtime(priority: i32) -> std::io::Result<()> {
    // SAFETY: prctl/sched_setscheduler on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        let p = libc::sched_param {
            sched_priority: priority,
        };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Each thread of the line runs at a low real-time priority with 1 ns timer slack.
///
/// The default 50 µs slack would be a quarter of the error budget. SCHED_FIFO keeps the line on
/// time when the CPUs are busy with the traffic itself or anything else; both threads need it,
/// because they share a lock and a preempted normal-priority holder would stall the releaser
/// (priority inversion). Neither thread ever spins: each blocks in recv, a condvar or the timer.
/// Best effort: without the privilege the line still works, only less punctually.
fn line_thread_realtime(which: &str) {
    if let Err(e) = realtime(10) {
        tracing::warn!("delay line {which}: SCHED_FIFO refused ({e}); timing will be less exact");
    }
}

fn reader(sh: &Shared, so: &Socket, queue_num: u16, mut sched: Schedule) {
    line_thread_realtime("reader");
    let c = &sh.counters;
    // COPY_META messages are ~150 bytes; 1 KiB leaves room for every attribute the kernel adds.
    let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 1024]).collect();
    let mut lens = Vec::with_capacity(64);
    let mut last_id: Option<u32> = None;
    let mut ids = Vec::with_capacity(1024);
    let mut holds = Vec::with_capacity(1024);
    let mut last_cpu = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        match so.recv_many(&mut bufs, &mut lens) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                c.enobufs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::error!("delay line: receiving from the queue: {e}");
                break;
            }
        };
        let (mono_now, real_now) = (monotonic_ns(), realtime_ns());
        ids.clear();
        let mut stamped = 0;
        for (buf, &n) in bufs.iter().zip(&lens) {
            nfq::parse(&buf[..n], |r| {
                if let Received::Packet { id, stamp_us } = r {
                    stamped += u64::from(stamp_us.is_some());
                    ids.push((id, arrival_ns(stamp_us, mono_now, real_now)));
                }
            });
        }
        c.stamped.fetch_add(stamped, Ordering::Relaxed);
        if ids.is_empty() {
            continue;
        }
        let now = monotonic_ns();
        let (mut direct, mut direct_n) = (None, 0u64);
        let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = q.is_empty();
        for &(id, arrival) in &ids {
            if let Some(prev) = last_id {
                let gap = id.wrapping_sub(prev).wrapping_sub(1);
                if gap != 0 && gap < u32::MAX / 2 {
                    c.id_gaps.fetch_add(gap as u64, Ordering::Relaxed);
                }
            }
            last_id = Some(id);
            let due = sched.due(arrival);
            if q.is_empty() && due <= now {
                // Nothing is held before it and it is due already (a zero delay): accepted
                // here, without waking the releaser. Its batch verdict also covers packets the
                // releaser has taken and not yet accepted, all of them due.
                direct = Some(id);
                direct_n += 1;
                holds.push((now - arrival.min(now)) / 1000);
            } else {
                q.push_back((id, arrival, due));
            }
        }
        let wake = was_empty && !q.is_empty();
        drop(q);
        c.seen.fetch_add(ids.len() as u64, Ordering::Relaxed);
        if let Some(id) = direct {
            if let Err(e) = so.send(&Msg::accept_upto(queue_num, id)) {
                tracing::error!("delay line: verdict: {e}");
            }
            c.released.fetch_add(direct_n, Ordering::Relaxed);
            record_holds(sh, &mut holds);
        }
        if wake {
            sh.wake.notify_one();
        }
        let cpu = thread_cpu_ns();
        c.cpu_ns.fetch_add(cpu - last_cpu, Ordering::Relaxed);
        last_cpu = cpu;
    }
    let cpu = thread_cpu_ns();
    c.cpu_ns.fetch_add(cpu - last_cpu, Ordering::Relaxed);
}

fn releaser(sh: &Shared, so: &Socket, queue_num: u16) {
    line_thread_realtime("releaser");
    let c = &sh.counters;
    let mut last_cpu = 0;
    let mut holds = Vec::with_capacity(4096);
    let mut timer = Timer::default();
    loop {
        let head_due = {
            let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.is_empty() && !sh.stop.load(Ordering::Relaxed) {
                q = sh
                    .wake
                    .wait_timeout(q, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            match q.front() {
                Some(&(_, _, due)) if !sh.stop.load(Ordering::Relaxed) => due,
                _ => break,
            }
        };
        // At most 100 ms at a time, so that a stop during a long hold is noticed promptly.
        let cap = monotonic_ns() + 100_000_000;
        if head_due <= cap {
            timer.wait_until(head_due);
        } else {
            sleep_until(cap);
        }
        let now = monotonic_ns();
        if now < head_due {
            continue;
        }
        let mut upto = None;
        let mut popped = 0u64;
        {
            let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(&(id, arrival, due)) = q.front() {
                if due > now {
                    break;
                }
                q.pop_front();
                upto = Some(id);
                popped += 1;
                holds.push((now - arrival) / 1000);
            }
        }
        if let Some(id) = upto {
            if let Err(e) = so.send(&Msg::accept_upto(queue_num, id)) {
                tracing::error!("delay line: verdict: {e}");
            }
            c.released.fetch_add(popped, Ordering::Relaxed);
        }
        record_holds(sh, &mut holds);
        let cpu = thread_cpu_ns();
        c.cpu_ns.fetch_add(cpu - last_cpu, Ordering::Relaxed);
        last_cpu = cpu;
    }
    let cpu = thread_cpu_ns();
    c.cpu_ns.fetch_add(cpu - last_cpu, Ordering::Relaxed);
}

/// Adds the held times (µs) to the line's histogram and clears them, unless the histogram is in
/// use: never wait for a reader of the figures (a normal-priority thread); the samples are kept
/// for the next time.
fn record_holds(sh: &Shared, holds: &mut Vec<u64>) {
    if holds.is_empty() {
        return;
    }
    if let Ok(mut h) = sh.holds.try_lock() {
        for &us in holds.iter() {
            let _ = h.record(us.max(1));
        }
        holds.clear();
    }
}

/// The releaser's wait for a due time. A timer that ends a long sleep fires late by the host's
/// wake-up latency (on a 2-core VM 0.1 to 0.4 ms after 100 ms idle, against microseconds on a
/// busy CPU), so for a wait of `LONG` or more it sleeps until `late_ns` and a half before the
/// due time (`late_ns`: a moving average of how late such wakes were, at most `MAX_SPIN`) and
/// spins the rest. Short waits, which a busy line makes, only sleep.
#[derive(Default)]
struct Timer {
    late_ns: u64,
}

impl Timer {
    const LONG: u64 = 2_000_000;
    const MAX_SPIN: u64 = 300_000;

    fn wait_until(&mut self, due: u64) {
        let now = monotonic_ns();
        if due <= now {
            return;
        }
        if due - now < Self::LONG {
            sleep_until(due);
            return;
        }
        let wake = due - (self.late_ns + self.late_ns / 2 + 5_000).min(Self::MAX_SPIN);
        sleep_until(wake);
        let woke = monotonic_ns();
        self.late_ns = (self.late_ns * 7 + woke.saturating_sub(wake).min(Self::MAX_SPIN)) / 8;
        while monotonic_ns() < due {
            std::hint::spin_loop();
        }
    }
}

fn sleep_until(t_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (t_ns / 1_000_000_000) as _,
        tv_nsec: (t_ns % 1_000_000_000) as _,
    };
    // SAFETY: ts is valid; a null remainder is allowed with TIMER_ABSTIME.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The arrival is the stamp's age before now on the monotonic clock; no stamp, a stamp from
    /// the future (the real clock stepped back) or older than a second: now.
    #[test]
    fn arrival_is_the_stamps_age_before_now() {
        let (mono, real) = (5_000_000_000, 1_700_000_000_000_000_000);
        assert_eq!(
            arrival_ns(Some(real / 1_000 - 250), mono, real),
            mono - 250_000
        );
        assert_eq!(arrival_ns(None, mono, real), mono);
        assert_eq!(arrival_ns(Some(real / 1_000 + 1), mono, real), mono);
        assert_eq!(arrival_ns(Some(real / 1_000 - 1_000_001), mono, real), mono);
        assert_eq!(arrival_ns(Some(u64::MAX), mono, real), mono);
    }

    #[test]
    fn fixed_delay_adds_exactly_the_delay() {
        let mut s = Schedule::new(Duration::from_millis(100), Duration::ZERO, 1);
        assert_eq!(s.due(1_000), 1_000 + 100_000_000);
        assert_eq!(s.due(5_000), 5_000 + 100_000_000);
    }

    proptest! {
        /// Jitter stays within ±jitter of arrival + delay unless it would reorder, and release
        /// times never go backwards.
        #[test]
        fn jitter_is_bounded_and_never_reorders(gaps in proptest::collection::vec(0u64..5_000_000, 1..200),
                                                delay_ms in 0u64..300, jitter_ms in 0u64..50, seed: u64) {
            let mut s = Schedule::new(Duration::from_millis(delay_ms), Duration::from_millis(jitter_ms), seed);
            let (d, j) = (delay_ms * 1_000_000, jitter_ms * 1_000_000);
            let mut t = 10_000_000_000u64;
            let mut prev = 0;
            for g in gaps {
                t += g;
                let due = s.due(t);
                prop_assert!(due >= prev);
                prop_assert!(due >= t);
                prop_assert!(due >= (t + d).saturating_sub(j));
                // Later than the upper bound only when held back by the previous packet.
                prop_assert!(due <= t + d + j || due == prev);
                prev = due;
            }
        }
    }
}

//! Types that cross the kernel/user boundary of awaitlab.
//!
//! Every record here is `#[repr(C)]` with explicit-width fields and no implicit padding, and its
//! size is pinned by a compile-time assertion, so the eBPF object and the agent agree on layout
//! whatever compiler built either side. Nothing here may depend on `std`: the same file is
//! compiled for `bpfel-unknown-none`. Kernel struct offsets are never constants here: user space
//! resolves them from BTF at load time and hands them to the programs in [`Kernel`].
#![no_std]

/// Bytes of the ring buffer of records (per-request mode; aggregation mode loads it with one
/// page).
pub const EVENTS_BYTES: u32 = 8 * 1024 * 1024;
/// Ports per role the programs compare against (0 = unused slot).
pub const MAX_PORTS: usize = 8;
/// Bytes of a request's first read kept for user space (method and path).
pub const HEAD_LEN: usize = 64;
/// Bytes of a response's first write kept for user space (status line).
pub const STATUS_LEN: usize = 16;

/// Offsets of kernel struct fields, resolved from `/sys/kernel/btf/vmlinux` at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `task_struct.pid` (the thread id)
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id)
    pub task_tgid: u32,
    /// `nsproxy.net_ns`
    pub nsproxy_net_ns: u32,
    /// `net.ns.inum` (offset of `ns` in `struct net` plus `inum` in `ns_common`)
    pub net_inum: u32,
    /// `sock.__sk_common.skc_net` (a `possible_net_t` whose first field is `struct net *`)
    pub sk_net: u32,
    /// `sock.__sk_common.skc_num` (local port, host byte order)
    pub sk_num: u32,
    /// `sock.__sk_common.skc_dport` (remote port, network byte order)
    pub sk_dport: u32,
    /// `sock.__sk_common.skc_family`
    pub sk_family: u32,
    /// `pt_regs` field holding the syscall number (`orig_ax` on x86_64, `syscallno` on arm64)
    pub regs_nr: u32,
    /// `pt_regs` field holding the second syscall argument (`si` on x86_64, `regs[1]` on arm64)
    pub regs_arg1: u32,
    /// `task_struct.flags` (`PF_*` bits)
    pub task_flags: u32,
}
const _: () = assert!(core::mem::size_of::<Offsets>() == 48);

/// `PF_EXITING` in `task_struct.flags` (include/linux/sched.h, unchanged since 2.6): set by
/// `exit_signals()` at the start of `do_exit()`, before the `sched_process_exit` tracepoint.
pub const PF_EXITING: u32 = 0x0000_0004;

/// Syscall numbers of the running architecture whose second argument is a user buffer or iovec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallNrs {
    pub read: u32,
    pub write: u32,
    pub recvfrom: u32,
    pub sendto: u32,
    pub recvmsg: u32,
    pub sendmsg: u32,
    pub readv: u32,
    pub writev: u32,
}
const _: () = assert!(core::mem::size_of::<SyscallNrs>() == 32);

/// What the programs know of the running kernel: the read-only global `KERNEL` of the object,
/// set once at load time. The verifier reads a frozen read-only global as a constant, so a
/// field read at one of these offsets is a plain load it checks against the kernel's BTF, not a
/// `bpf_probe_read_kernel` call (about 15 ns each, several per request).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    pub offsets: Offsets,
    pub syscalls: SyscallNrs,
}
const _: () = assert!(core::mem::size_of::<Kernel>() == 80);

/// What the programs measure (entry 0 of the `CONFIG` array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Inode of the target network namespace; 0 disables every program.
    pub netns_inum: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Local ports of the HTTP server (accepted connections).
    pub http_ports: [u16; MAX_PORTS],
    /// Remote ports of the database (client connections).
    pub db_ports: [u16; MAX_PORTS],
}
const _: () = assert!(core::mem::size_of::<Config>() == 40);

/// Copy the first bytes of requests and responses (method, path, status).
pub const CONFIG_CAPTURE_PAYLOAD: u32 = 1;
/// Aggregation mode: requests, round trips and connects go into the per-CPU histograms of
/// `REQ_AGG` and `DB_AGG` instead of one ring-buffer record each.
pub const CONFIG_AGGREGATE: u32 = 2;
/// A measuring aid, not a mode to run (`watch --probe-floor`): the socket I/O programs check
/// the socket's namespace and return. `cargo xtask bench probes --floor` measures with it what
/// the hooks themselves cost a server, before any work.
pub const CONFIG_FLOOR: u32 = 4;
/// Aggregation mode: request keys past the slots of `REQ_SLOT_HIST` go to the per-CPU hash
/// `REQ_AGG` (set when the configured number of keys exceeds [`REQ_SLOTS`]).
pub const CONFIG_KEY_HASH: u32 = 8;

/// Aggregation mode: the first request keys (at most this many) get a slot in the per-CPU
/// array `REQ_SLOT_HIST`, and a connection remembers its last key's slot, so a keep-alive
/// connection repeating its request finds its histogram without a hash lookup. Later keys
/// live in the per-CPU hash `REQ_AGG`. Each slot takes a histogram per CPU from the start
/// (about 2.3 KB).
pub const REQ_SLOTS: u32 = 32;

/// What a ring-buffer record is; the first field of every record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Request = 1,
    DbRoundTrip = 2,
    DbConnect = 3,
}

/// Common first part of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// Process id of the thread the record is about.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when the record was written (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);

/// The request's thread served it alone: no other request was read on it while this one waited.
/// Per-request database figures and on-CPU time are meaningful only with this bit.
pub const REQ_EXCLUSIVE_THREAD: u32 = 1;
/// The request ended because the connection closed (otherwise: the next request began).
pub const REQ_END_CLOSE: u32 = 2;
/// The request was finalised without any response byte written.
pub const REQ_NO_RESPONSE: u32 = 4;
/// The head bytes could not be read from user memory (not a plain read/recv syscall).
pub const REQ_NO_HEAD: u32 = 8;

/// One finished HTTP request on an accepted connection of a server port.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestEvent {
    pub hdr: EventHeader,
    /// Opaque connection id (only compared for equality).
    pub sock: u64,
    /// First request byte read by the application.
    pub start_ns: u64,
    /// First response byte written.
    pub first_send_ns: u64,
    /// Last response byte written.
    pub end_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Database round-trip time spent by the serving thread during the request.
    pub db_wait_ns: u64,
    /// Database TCP connect time spent by the serving thread during the request.
    pub db_connect_ns: u64,
    /// On-CPU time of the serving thread from the first request byte to the first response byte;
    /// 0 unless `REQ_EXCLUSIVE_THREAD` (only then is it the request's own).
    pub on_cpu_ns: u64,
    /// 1-based index of the request on its connection (1 = the first).
    pub seq: u32,
    pub db_round_trips: u32,
    pub db_connects: u32,
    /// `REQ_*` bits.
    pub flags: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub head_len: u16,
    pub status_len: u16,
    pub head: [u8; HEAD_LEN],
    pub status: [u8; STATUS_LEN],
}
const _: () = assert!(core::mem::size_of::<RequestEvent>() == 200);

/// One database round trip: the first send after the last receive, up to the next receive.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbRoundTripEvent {
    pub hdr: EventHeader,
    pub sock: u64,
    pub start_ns: u64,
    pub dur_ns: u64,
    /// Bytes sent before the reply began.
    pub bytes_out: u32,
    /// 1 when the round trip was added to a request's figures.
    pub attributed: u32,
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DbRoundTripEvent>() == 64);

/// One TCP connect to a database port (SYN_SENT to ESTABLISHED).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbConnectEvent {
    pub hdr: EventHeader,
    pub sock: u64,
    pub start_ns: u64,
    pub dur_ns: u64,
    pub remote_port: u16,
    /// 1 when the connect was added to the figures of the request its thread was serving.
    pub attributed: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(core::mem::size_of::<DbConnectEvent>() == 56);

/// On/off-CPU totals of one target thread (value of the `THREADS` map, key = thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadCpu {
    pub tgid: u32,
    pub _pad: u32,
    pub on_ns: u64,
    pub off_ns: u64,
    /// When the thread last went on CPU (0 = off CPU now).
    pub last_in: u64,
    /// When the thread last went off CPU (0 = on CPU now or never seen off).
    pub last_out: u64,
}
const _: () = assert!(core::mem::size_of::<ThreadCpu>() == 40);

/// Indexes of the per-CPU `COUNTERS` array. Append only: the numbers are part of the ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A ring-buffer reservation failed: a record was lost.
    RingbufFull = 0,
    /// A connection could not be tracked: the `CONNS` map was full.
    ConnMapFull = 1,
    /// A thread could not be tracked: a per-thread map was full.
    ThreadMapFull = 2,
    /// Traffic on a connection whose state was unknown (opened before attach, joined mid-response).
    UnknownSocket = 3,
    HttpConnsOpened = 4,
    HttpConnsClosed = 5,
    DbConnsOpened = 6,
    DbConnsClosed = 7,
    /// Requests finalised in the kernel (compare with records received to see loss).
    Requests = 8,
    DbRoundTrips = 9,
    DbConnects = 10,
    /// A head or status could not be copied from user memory.
    PayloadReadFailed = 11,
    DbConnectFailed = 12,
    /// On/off-CPU nanoseconds of target threads that have exited (their map entries are gone).
    ExitedOnCpuNs = 13,
    ExitedOffCpuNs = 14,
    /// Round trips added to a request's figures.
    DbRoundTripsAttributed = 15,
    /// Requests in the server now: read, no response byte written yet. Per-CPU slots go up on
    /// one CPU and down on another, so they wrap: only their wrapping sum is meaningful.
    RequestsInServer = 16,
    /// Sum of the start times (first request byte, CLOCK_MONOTONIC ns) of the requests in the
    /// server now (wrapping, as above).
    RequestsInServerStartNs = 17,
    /// Nanoseconds requests spent in the server (first request byte to first response byte, or
    /// to the end of a request never answered), summed as they leave it.
    RequestsLeftServerNs = 18,
    /// Aggregation mode: a request whose (method and path, process, status) found `REQ_AGG`
    /// full; it is counted under the overflow key (`AggKey::OVERFLOW`).
    AggMapFull = 19,
    /// Round-trip nanoseconds added to a request's figures (the time of `DbRoundTripsAttributed`).
    DbWaitAttributedNs = 20,
    /// Connects added to a request's figures, and their nanoseconds.
    DbConnectsAttributed = 21,
    DbConnectAttributedNs = 22,
    /// What finished requests carried when they finished: the round trips and connects pinned
    /// to them and their nanoseconds. With the four above, user space counts the database work
    /// of the requests that finished in an interval without the pinned work of those still in
    /// the server at its end.
    FinishedDbRoundTrips = 23,
    FinishedDbWaitNs = 24,
    FinishedDbConnects = 25,
    FinishedDbConnectNs = 26,
}
/// Number of slots in `COUNTERS`.
pub const COUNTERS: u32 = 27;

/// Histogram of the aggregation mode: log-linear, [`HIST_SUB`] buckets per power of two from
/// 2^[`HIST_MIN_LOG2`] ns (64 ns; anything below lands in bucket 0) up to 2^[`HIST_MAX_LOG2`] ns
/// (73 minutes; anything above lands in the last bucket). Reading a bucket as its midpoint is
/// off by at most half a bucket's width over its lower bound: 1 / (2 x 16) = 3.125 %.
pub const HIST_SUB_LOG2: u32 = 4;
pub const HIST_SUB: u32 = 1 << HIST_SUB_LOG2;
pub const HIST_MIN_LOG2: u32 = 6;
pub const HIST_MAX_LOG2: u32 = 42;
pub const HIST_BUCKETS: usize = ((HIST_MAX_LOG2 - HIST_MIN_LOG2) * HIST_SUB) as usize;

/// Index of the highest set bit of `v` (0 for 0 and 1), by halving: no count-leading-zeros
/// instruction in BPF, and the same code runs on both sides.
#[inline(always)]
pub fn log2_floor(v: u64) -> u32 {
    let mut x = v;
    let mut k = 0;
    if x >= 1 << 32 {
        x >>= 32;
        k += 32;
    }
    if x >= 1 << 16 {
        x >>= 16;
        k += 16;
    }
    if x >= 1 << 8 {
        x >>= 8;
        k += 8;
    }
    if x >= 1 << 4 {
        x >>= 4;
        k += 4;
    }
    if x >= 1 << 2 {
        x >>= 2;
        k += 2;
    }
    if x >= 1 << 1 {
        k += 1;
    }
    k
}

/// The bucket of a duration of `ns` nanoseconds.
#[inline(always)]
pub fn hist_bucket(ns: u64) -> usize {
    if ns < 1 << HIST_MIN_LOG2 {
        return 0;
    }
    let k = log2_floor(ns);
    if k >= HIST_MAX_LOG2 {
        return HIST_BUCKETS - 1;
    }
    let sub = (ns >> (k - HIST_SUB_LOG2)) & (HIST_SUB as u64 - 1);
    ((k - HIST_MIN_LOG2) * HIST_SUB) as usize + sub as usize
}

/// The lowest duration and the width (ns) of bucket `i`: it holds `[low, low + width)`.
pub fn hist_bucket_range(i: usize) -> (u64, u64) {
    let i = i.min(HIST_BUCKETS - 1) as u64;
    let k = HIST_MIN_LOG2 as u64 + i / HIST_SUB as u64;
    let sub = i % HIST_SUB as u64;
    let width = 1u64 << (k - HIST_SUB_LOG2 as u64);
    ((HIST_SUB as u64 + sub) * width, width)
}

/// One histogram with its count and exact sum.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Hist {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u32; HIST_BUCKETS],
}
const _: () = assert!(core::mem::size_of::<Hist>() == 16 + 4 * HIST_BUCKETS);

impl Default for Hist {
    fn default() -> Self {
        Hist {
            count: 0,
            sum_ns: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

impl Hist {
    #[inline(always)]
    pub fn add(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns += ns;
        let b = hist_bucket(ns);
        if b < HIST_BUCKETS {
            self.buckets[b] = self.buckets[b].wrapping_add(1);
        }
    }
}

/// Key of `REQ_AGG`: what a request's server-time histogram is kept by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    /// [`head_hash`] of the request head (method and path); 0 without a head.
    pub head: u64,
    /// Serving process.
    pub tgid: u32,
    /// Status code, 0 when no status line was seen.
    pub status: u16,
    /// `REQ_EXCLUSIVE_THREAD` and `REQ_NO_RESPONSE` bits of the request.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<AggKey>() == 16);

impl AggKey {
    /// Where requests go when `REQ_AGG` is full (index 0 of `REQ_AGG_OVERFLOW`).
    pub const OVERFLOW: AggKey = AggKey {
        head: u64::MAX,
        tgid: 0,
        status: 0,
        flags: 0,
    };
}

/// Indexes of `DB_AGG`.
pub const DB_AGG_ROUND_TRIP: u32 = 0;
pub const DB_AGG_CONNECT: u32 = 1;

/// Hash of a request head's method and path (up to the query, the fragment or the version),
/// with every run of digits read as one `0`: `/posts/12/` and `/posts/345/` are one key. The
/// agent turns a key back into a label from the head kept in `HEADS`, so a collision only
/// merges two paths' histograms. FNV-1a, 64 bits.
#[inline(always)]
pub fn head_hash(head: &[u8; HEAD_LEN], len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut spaces = 0;
    let mut prev_digit = false;
    let mut i = 0;
    while i < HEAD_LEN {
        if i >= len {
            break;
        }
        let mut b = head[i];
        if b == b'\r' || b == b'\n' || b == b'?' || b == b'#' {
            break;
        }
        if b == b' ' {
            spaces += 1;
            if spaces == 2 {
                break;
            }
        }
        let digit = b.is_ascii_digit();
        if !(digit && prev_digit) {
            if digit {
                b = b'0';
            }
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        prev_digit = digit;
        i += 1;
    }
    h
}

/// Status code of a status line's first bytes (`HTTP/1.1 200 OK`), 0 when it is not one.
#[inline(always)]
pub fn status_code(line: &[u8; STATUS_LEN], len: usize) -> u16 {
    if len < 12 || line[0] != b'H' || line[1] != b'T' || line[8] != b' ' {
        return 0;
    }
    let (a, b, c) = (line[9], line[10], line[11]);
    if !a.is_ascii_digit() || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return 0;
    }
    (a - b'0') as u16 * 100 + (b - b'0') as u16 * 10 + (c - b'0') as u16
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data records with explicit padding and no references.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Kernel {}
    unsafe impl aya::Pod for super::ThreadCpu {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::Hist {}
}

impl RequestEvent {
    /// Decodes a record from ring-buffer bytes (unaligned, any length check done here).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        read_record(b)
    }
}
impl DbRoundTripEvent {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        read_record(b)
    }
}
impl DbConnectEvent {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        read_record(b)
    }
}
impl EventHeader {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        read_record(b)
    }
}

fn read_record<T: Copy>(b: &[u8]) -> Option<T> {
    if b.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; every T here is a repr(C) record of integers and byte arrays, valid
    // for any bit pattern, and read_unaligned makes no alignment assumption.
    Some(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_floor_is_the_highest_set_bit() {
        for v in (0..64).map(|k| 1u64 << k).flat_map(|p| [p - 1, p, p + 1]) {
            let want = if v <= 1 { 0 } else { 63 - v.leading_zeros() };
            assert_eq!(log2_floor(v), want, "{v}");
        }
        assert_eq!(log2_floor(u64::MAX), 63);
    }

    /// Every duration lands in the bucket whose range holds it, and the midpoint is within
    /// 3.125 % of it (the error the docs state); the buckets tile the range without gaps.
    #[test]
    fn buckets_hold_their_values_and_tile_the_range() {
        let mut v = 64u64;
        while v < 1 << HIST_MAX_LOG2 {
            let b = hist_bucket(v);
            let (low, width) = hist_bucket_range(b);
            assert!(
                low <= v && v < low + width,
                "{v} in bucket {b} = [{low}, +{width})"
            );
            let mid = (low + width / 2) as f64;
            assert!(
                (mid - v as f64).abs() / v as f64 <= 1.0 / 32.0 + 1e-12,
                "{v}"
            );
            v += 1 + v / 97;
        }
        for b in 1..HIST_BUCKETS {
            let (low, width) = hist_bucket_range(b - 1);
            assert_eq!(hist_bucket_range(b).0, low + width);
        }
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
    }

    fn head(s: &[u8]) -> ([u8; HEAD_LEN], usize) {
        let mut h = [0u8; HEAD_LEN];
        let n = s.len().min(HEAD_LEN);
        h[..n].copy_from_slice(&s[..n]);
        (h, n)
    }

    #[test]
    fn head_hash_keys_method_and_path_with_numbers_collapsed() {
        let k = |s: &[u8]| {
            let (h, n) = head(s);
            head_hash(&h, n)
        };
        let a = k(b"GET /posts/12/ HTTP/1.1\r\nHost: x\r\n");
        assert_eq!(a, k(b"GET /posts/345/ HTTP/1.0\r\n"));
        assert_eq!(a, k(b"GET /posts/9/?page=2 HTTP/1.1\r\n"));
        assert_ne!(a, k(b"POST /posts/12/ HTTP/1.1\r\n"));
        assert_ne!(a, k(b"GET /posts/12/x HTTP/1.1\r\n"));
        assert_ne!(k(b"GET /a1b HTTP/1.1"), k(b"GET /a1 HTTP/1.1"));
        // Bytes after the copied length do not count.
        let (mut h, n) = head(b"GET /x HTTP/1.1");
        h[n] = b'y';
        assert_eq!(head_hash(&h, n), k(b"GET /x HTTP/1.1"));
    }

    #[test]
    fn status_codes() {
        let s = |b: &[u8]| {
            let mut l = [0u8; STATUS_LEN];
            let n = b.len().min(STATUS_LEN);
            l[..n].copy_from_slice(&b[..n]);
            status_code(&l, n)
        };
        assert_eq!(s(b"HTTP/1.1 200 OK\r\n"), 200);
        assert_eq!(s(b"HTTP/1.0 503 Service"), 503);
        assert_eq!(s(b"HTTP/1.1 20"), 0);
        assert_eq!(s(b"HTTP/1.1 2x0 OK"), 0);
        assert_eq!(s(b"hello world, no"), 0);
    }
}

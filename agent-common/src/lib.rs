//! Types that cross the kernel/user boundary of awaitlab.
//!
//! Every record here is `#[repr(C)]` with explicit-width fields and no implicit padding, and its
//! size is pinned by a compile-time assertion, so the eBPF object and the agent agree on layout
//! whatever compiler built either side. Nothing here may depend on `std`: the same file is
//! compiled for `bpfel-unknown-none`. Kernel struct offsets are never constants here: user space
//! resolves them from BTF at load time and hands them to the programs in [`Config`].
#![no_std]

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
    /// Size of `struct pt_regs`, 0 when the payload capture is disabled.
    pub regs_size: u32,
    /// `task_struct.flags` (`PF_*` bits)
    pub task_flags: u32,
}
const _: () = assert!(core::mem::size_of::<Offsets>() == 52);

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

/// The one configuration value of the programs (entry 0 of the `CONFIG` array map).
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
    pub offsets: Offsets,
    pub syscalls: SyscallNrs,
}
const _: () = assert!(core::mem::size_of::<Config>() == 124);

/// Copy the first bytes of requests and responses (method, path, status).
pub const CONFIG_CAPTURE_PAYLOAD: u32 = 1;

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
    /// On-CPU time of the serving thread from the first request byte to the first response byte.
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
    pub _pad: [u16; 3],
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
}
/// Number of slots in `COUNTERS`.
pub const COUNTERS: u32 = 19;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data records with explicit padding and no references.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ThreadCpu {}
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

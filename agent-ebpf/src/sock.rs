//! HTTP requests on accepted connections of the server ports, and database round trips and
//! connects on client connections to the database ports.
//!
//! The data path hangs off `sock_send_length` / `sock_recv_length`, which the kernel fires from
//! `sock_sendmsg` / `sock_recvmsg` for every socket I/O (send, write, sendmsg, sendfile, ...), in the
//! caller's context, after the data was copied. Connection life comes from `inet_sock_set_state`.
//! A socket is classified the first time it is seen, from its own fields, so connections opened
//! before the agent attached are measured like new ones. Nothing here parses HTTP: the first bytes
//! of a request and a response are copied for the agent to parse.

use agent_common::{
    head_hash, status_code, AggKey, Config, Counter, DbConnectEvent, DbRoundTripEvent, EventHeader,
    EventKind, Hist, RequestEvent, SyscallNrs, CONFIG_AGGREGATE, CONFIG_CAPTURE_PAYLOAD,
    CONFIG_FLOOR, CONFIG_KEY_HASH, DB_AGG_CONNECT, DB_AGG_ROUND_TRIP, HEAD_LEN, REQ_END_CLOSE,
    REQ_EXCLUSIVE_THREAD, REQ_NO_HEAD, REQ_NO_RESPONSE, REQ_SLOTS, STATUS_LEN,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};

use crate::common::{
    add, config, count, field, kernel, now, port_in, sk_in_target, submit_flags, thread_on_cpu,
    DB_AGG, EVENTS, ZERO_HIST,
};

const ROLE_HTTP: u32 = 1;
const ROLE_DB: u32 = 2;

/// HTTP connection states.
const H_IDLE: u32 = 0;
const H_RECV: u32 = 1;
const H_RESP: u32 = 2;
/// Database connection states (0, the zeroed start, is idle).
const D_SENT: u32 = 1;
const D_RECVD: u32 = 2;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const MSG_PEEK: i32 = 2;

/// TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

#[repr(C)]
#[derive(Clone, Copy)]
struct Conn {
    role: u32,
    state: u32,
    /// Requests started on this connection (the current one's number, 1-based).
    seq: u32,
    flags: u32,
    /// Thread that read the current request, or made the pending database send.
    tid: u32,
    tgid: u32,
    db_round_trips: u32,
    db_connects: u32,
    /// A thread that read a request here while another it had read waited (sticky, like
    /// `ThreadReq::multiplexed`): its next requests here skip the `THREAD_REQ` lookup.
    shared_tid: u32,
    /// Aggregation mode: where `slot_key`'s histogram is: 0 unknown, `SLOT_HASH` in `REQ_AGG`,
    /// else its `REQ_SLOT_HIST` index plus one.
    slot: u32,
    /// The key of this connection's last finished request (meaningful when `slot` is not 0).
    slot_key: AggKey,
    start_ns: u64,
    first_send_ns: u64,
    last_send_ns: u64,
    bytes_in: u64,
    bytes_out: u64,
    db_wait_ns: u64,
    db_connect_ns: u64,
    cpu_start_ns: u64,
    on_cpu_ns: u64,
    local_port: u16,
    remote_port: u16,
    head_len: u16,
    status_len: u16,
    head: [u8; HEAD_LEN],
    status: [u8; STATUS_LEN],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Connecting {
    start_ns: u64,
    tid: u32,
    tgid: u32,
    remote_port: u16,
    _pad: [u16; 3],
}

/// The request a thread is serving: the last one it read.
#[repr(C)]
#[derive(Clone, Copy)]
struct ThreadReq {
    sock: u64,
    seq: u32,
    /// Sticky: this thread once read a request while another it had read was unanswered
    /// (an event loop). Work it does cannot be pinned to one request.
    multiplexed: u32,
}

/// Tracked connections (key: `struct sock *`). Entries go at TCP_CLOSE.
#[map]
static CONNS: HashMap<u64, Conn> = HashMap::with_max_entries(32768, 0);

/// Database connects in flight (SYN_SENT seen, ESTABLISHED not yet).
#[map]
static CONNECTING: HashMap<u64, Connecting> = HashMap::with_max_entries(4096, 0);

#[map]
static THREAD_REQ: HashMap<u32, ThreadReq> = HashMap::with_max_entries(16384, 0);

/// An all-zero `Conn`, never written: the initial value of a `CONNS` entry.
#[map]
static ZERO_CONN: Array<Conn> = Array::with_max_entries(1, 0);

/// `BPF_F_NO_PREALLOC`: a per-CPU entry takes memory (a histogram per CPU) only once used.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_NOEXIST: u64 = 1;

/// Aggregation mode: server-time histograms of the first request keys, per CPU, one slot
/// each (`REQ_SLOTS`; the agent may make it smaller). A slot is never given back.
#[map]
static REQ_SLOT_HIST: PerCpuArray<Hist> = PerCpuArray::with_max_entries(REQ_SLOTS, 0);

/// The slot of each key in `REQ_SLOT_HIST`.
#[map]
static REQ_SLOT_OF: HashMap<AggKey, u32> = HashMap::with_max_entries(REQ_SLOTS, 0);

/// The key that owns each slot given out: inserting here (`BPF_NOEXIST`, atomic per slot) is
/// how a CPU takes a slot. Core's atomics have no fetch-and-add on the BPF target, and the
/// compiler intrinsic behind them is an unstable feature whose signature changes between
/// nightlies.
#[map]
static REQ_SLOT_OWNER: HashMap<u32, AggKey> = HashMap::with_max_entries(REQ_SLOTS, 0);

/// The next free slot, as far as any CPU knows (written without a lock: a CPU that finds its
/// slot taken tries the next ones).
#[map]
static REQ_SLOTS_USED: Array<u32> = Array::with_max_entries(1, 0);

/// Slots a CPU tries for a new key before giving up on the array (only CPUs racing for new
/// keys at the same moment take more than one).
const SLOT_TRIES: u32 = 4;

/// `Conn::slot` of a key whose histogram is in `REQ_AGG`.
const SLOT_HASH: u32 = u32::MAX;

/// Aggregation mode: server-time histograms of the keys past the slots, per CPU (used only
/// with `CONFIG_KEY_HASH`).
#[map]
static REQ_AGG: PerCpuHashMap<AggKey, Hist> =
    PerCpuHashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Requests that found `REQ_AGG` full (counted in `AggMapFull` as well).
#[map]
static REQ_AGG_OVERFLOW: PerCpuArray<Hist> = PerCpuArray::with_max_entries(1, 0);

/// The first request head seen for each `AggKey::head`, for the agent to name it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Head {
    len: u32,
    bytes: [u8; HEAD_LEN],
}

#[map]
static HEADS: HashMap<u64, Head> = HashMap::with_max_entries(1024, 0);

/// Called when a target thread exits.
#[inline(always)]
pub fn forget_thread(tid: u32) {
    let _ = THREAD_REQ.remove(tid);
}

/// `tp_btf/sock_recv_length`: `TP_PROTO(struct sock *sk, int ret, int flags)`
/// (include/trace/events/sock.h, fired by `sock_recvmsg_nosec`; Linux 6.3+).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn awl_sock_recv(ctx: BtfTracePointContext) -> i32 {
    let _ = try_io(&ctx, false);
    0
}

/// `tp_btf/sock_send_length`: `TP_PROTO(struct sock *sk, int ret, int flags)`
/// (fired by `sock_sendmsg_nosec`; Linux 6.3+).
#[btf_tracepoint(function = "sock_send_length")]
pub fn awl_sock_send(ctx: BtfTracePointContext) -> i32 {
    let _ = try_io(&ctx, true);
    0
}

#[inline(always)]
fn try_io(ctx: &BtfTracePointContext, is_send: bool) -> Option<()> {
    let c = config()?;
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || (!is_send && flags & MSG_PEEK != 0) {
        return None;
    }
    // Namespace first: on a busy host most socket I/O is someone else's, and two field reads
    // are cheaper than a hash lookup that misses.
    if !sk_in_target(c, sk) || c.flags & CONFIG_FLOOR != 0 {
        return None;
    }
    let t = now();
    let p = match CONNS.get_ptr_mut(sk) {
        Some(p) => p,
        None => classify(c, sk)?,
    };
    // SAFETY: map value pointer valid for this program run.
    let conn = unsafe { &mut *p };
    if conn.role == ROLE_HTTP {
        if is_send {
            http_send(c, conn, ret as u64, t);
        } else {
            http_recv(c, sk, conn, ret as u64, t);
        }
    } else if conn.role != ROLE_DB {
        // An entry another CPU has just inserted (zeroed) and not yet given its role (`track`).
        return None;
    } else if is_send {
        if conn.state != D_SENT {
            conn.state = D_SENT;
            conn.start_ns = t;
            conn.bytes_out = 0;
            conn.tid = bpf_get_current_pid_tgid() as u32;
        }
        conn.bytes_out += ret as u64;
    } else if conn.state == D_SENT {
        conn.state = D_RECVD;
        db_round_trip(c, sk, conn, t);
    }
    Some(())
}

/// First sight of a socket of the target: decide from its ports whether it is ours, and track it.
#[inline(always)]
fn classify(c: &Config, sk: u64) -> Option<*mut Conn> {
    let family: u16 = field(sk, kernel(|k| &k.offsets.sk_family));
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let (lport, rport) = sk_ports(sk);
    let role = if port_in(&c.http_ports, lport) {
        ROLE_HTTP
    } else if port_in(&c.db_ports, rport) {
        ROLE_DB
    } else {
        return None;
    };
    track(sk, role, lport, rport)
}

/// Local and remote port of a socket, host byte order.
#[inline(always)]
fn sk_ports(sk: u64) -> (u16, u16) {
    let lport: u16 = field(sk, kernel(|k| &k.offsets.sk_num));
    let rport: u16 = field(sk, kernel(|k| &k.offsets.sk_dport));
    (lport, u16::from_be(rport))
}

#[inline(always)]
fn track(sk: u64, role: u32, lport: u16, rport: u16) -> Option<*mut Conn> {
    // From a zeroed map value (all-zero is the idle state): a `Conn` zeroed on the stack
    // compiles to a byte-at-a-time `memset` loop, about 1,000 instructions per connection.
    let zero = ZERO_CONN.get(0)?;
    if CONNS.insert(sk, zero, 0).is_err() {
        count(Counter::ConnMapFull);
        return None;
    }
    let p = CONNS.get_ptr_mut(sk)?;
    // SAFETY: map value pointer valid for this program run.
    let conn = unsafe { &mut *p };
    // Until its role is set, a program on another CPU that finds the entry ignores it.
    conn.local_port = lport;
    conn.remote_port = rport;
    conn.role = role;
    Some(p)
}

/// Stores zero in a field. Plain zero stores to neighbouring fields are merged by LLVM into a
/// call of `memset`, which on BPF is a loop of about 5 instructions a byte.
#[inline(always)]
fn clear<T: Default>(field: &mut T) {
    // SAFETY: a valid, aligned &mut.
    unsafe { core::ptr::write_volatile(field, T::default()) };
}

#[inline(always)]
fn http_recv(c: &Config, sk: u64, conn: &mut Conn, n: u64, t: u64) {
    if conn.state == H_RECV {
        conn.bytes_in += n;
        return;
    }
    if conn.state == H_RESP {
        finalize(c, sk, conn, 0, t);
    }
    let id = bpf_get_current_pid_tgid();
    let tid = id as u32;
    conn.state = H_RECV;
    enter_server(t);
    conn.seq += 1;
    conn.flags = if conn.shared_tid != tid && serve(sk, conn.seq, tid) {
        REQ_EXCLUSIVE_THREAD
    } else {
        conn.shared_tid = tid;
        0
    };
    conn.tid = tid;
    conn.tgid = (id >> 32) as u32;
    conn.start_ns = t;
    conn.bytes_in = n;
    clear(&mut conn.first_send_ns);
    clear(&mut conn.last_send_ns);
    clear(&mut conn.bytes_out);
    clear(&mut conn.db_round_trips);
    clear(&mut conn.db_connects);
    clear(&mut conn.db_wait_ns);
    clear(&mut conn.db_connect_ns);
    clear(&mut conn.on_cpu_ns);
    clear(&mut conn.status_len);
    // On-CPU time per request goes only into records, and means something only for a request
    // its thread serves alone: aggregation mode and shared threads (an event loop) skip the
    // two thread map lookups (the threads' totals still come from sched_switch).
    conn.cpu_start_ns = if c.flags & CONFIG_AGGREGATE == 0 && conn.flags & REQ_EXCLUSIVE_THREAD != 0
    {
        thread_on_cpu(tid, conn.tgid, t)
    } else {
        0
    };
    clear(&mut conn.head_len);
    if c.flags & CONFIG_CAPTURE_PAYLOAD != 0 {
        match copy_user(&mut conn.head, n) {
            Some(len) => conn.head_len = len,
            None => conn.flags |= REQ_NO_HEAD,
        }
    }
}

/// Records that thread `tid` now serves request `seq` of `sk`, and returns whether it serves it
/// alone. An event loop shows up as a thread that reads a second request before answering the
/// first; that first request loses its exclusive bit too.
#[inline(always)]
fn serve(sk: u64, seq: u32, tid: u32) -> bool {
    let Some(prev) = THREAD_REQ.get_ptr_mut(tid) else {
        let tr = ThreadReq {
            sock: sk,
            seq,
            multiplexed: 0,
        };
        if THREAD_REQ.insert(tid, tr, 0).is_err() {
            count(Counter::ThreadMapFull);
        }
        return true;
    };
    // SAFETY: map value pointer valid for this program run.
    let prev = unsafe { &mut *prev };
    if prev.multiplexed == 0 && prev.sock != sk {
        if let Some(pc) = CONNS.get_ptr_mut(prev.sock) {
            // SAFETY: as above.
            let pc = unsafe { &mut *pc };
            if pc.seq == prev.seq && pc.state == H_RECV {
                prev.multiplexed = 1;
                pc.flags &= !REQ_EXCLUSIVE_THREAD;
            }
        }
    }
    prev.sock = sk;
    prev.seq = seq;
    prev.multiplexed == 0
}

#[inline(always)]
fn http_send(c: &Config, conn: &mut Conn, n: u64, t: u64) {
    if conn.state == H_IDLE {
        // A response we did not see the request of (attached mid-request).
        count(Counter::UnknownSocket);
        return;
    }
    if conn.state == H_RECV {
        conn.state = H_RESP;
        leave_server(conn.start_ns, t);
        conn.first_send_ns = t;
        if c.flags & CONFIG_CAPTURE_PAYLOAD != 0 {
            // Straight into the connection: a zeroed buffer on the stack costs a `memset`
            // loop. The bytes count only up to `status_len`, which stays 0 on failure.
            if let Some(len) = copy_user(&mut conn.status, n) {
                conn.status_len = len;
            }
        }
    }
    conn.last_send_ns = t;
    conn.bytes_out += n;
    // On-CPU time up to the first response byte: later writes of the same response are the
    // kernel copying, and one map lookup less per write matters on fast servers.
    if conn.first_send_ns == t
        && c.flags & CONFIG_AGGREGATE == 0
        && conn.flags & REQ_EXCLUSIVE_THREAD != 0
        && bpf_get_current_pid_tgid() as u32 == conn.tid
    {
        let cpu = thread_on_cpu(conn.tid, conn.tgid, t);
        conn.on_cpu_ns = cpu.saturating_sub(conn.cpu_start_ns);
    }
}

/// A request is in the server from its first byte read to its first response byte written (or
/// its end, unanswered). These counters let user space integrate the time requests spent in the
/// server over any interval, the ones still in it at the interval's end included: the honest
/// denominator of the database's share (a request's round trips all fall inside that time).
#[inline(always)]
fn enter_server(t: u64) {
    add(Counter::RequestsInServer, 1);
    add(Counter::RequestsInServerStartNs, t);
}

#[inline(always)]
fn leave_server(start: u64, t: u64) {
    add(Counter::RequestsInServer, 1u64.wrapping_neg());
    add(Counter::RequestsInServerStartNs, start.wrapping_neg());
    add(Counter::RequestsLeftServerNs, t.saturating_sub(start));
}

/// Emits the request record (or adds it to its histogram) and returns the connection to idle.
#[inline(always)]
fn finalize(c: &Config, sk: u64, conn: &mut Conn, extra_flags: u32, t: u64) {
    let mut flags = conn.flags | extra_flags;
    if conn.state != H_RESP {
        flags |= REQ_NO_RESPONSE;
        if conn.state == H_RECV {
            leave_server(conn.start_ns, t);
        }
    }
    conn.state = H_IDLE;
    count(Counter::Requests);
    // Skipped on servers without a database (no cost there).
    if conn.db_round_trips != 0 {
        add(Counter::FinishedDbRoundTrips, conn.db_round_trips as u64);
        add(Counter::FinishedDbWaitNs, conn.db_wait_ns);
    }
    if conn.db_connects != 0 {
        add(Counter::FinishedDbConnects, conn.db_connects as u64);
        add(Counter::FinishedDbConnectNs, conn.db_connect_ns);
    }
    let end = if conn.last_send_ns != 0 {
        conn.last_send_ns
    } else {
        t
    };
    if c.flags & CONFIG_AGGREGATE != 0 {
        aggregate_request(c, conn, flags, end.saturating_sub(conn.start_ns));
        return;
    }
    let Some(mut e) = EVENTS.reserve::<RequestEvent>(0) else {
        count(Counter::RingbufFull);
        return;
    };
    let ev = RequestEvent {
        hdr: EventHeader {
            kind: EventKind::Request as u32,
            tgid: conn.tgid,
            tid: conn.tid,
            _pad: 0,
            ts_ns: t,
        },
        sock: sk,
        start_ns: conn.start_ns,
        first_send_ns: conn.first_send_ns,
        end_ns: end,
        bytes_in: conn.bytes_in,
        bytes_out: conn.bytes_out,
        db_wait_ns: conn.db_wait_ns,
        db_connect_ns: conn.db_connect_ns,
        on_cpu_ns: conn.on_cpu_ns,
        seq: conn.seq,
        db_round_trips: conn.db_round_trips,
        db_connects: conn.db_connects,
        flags,
        local_port: conn.local_port,
        remote_port: conn.remote_port,
        head_len: conn.head_len,
        status_len: conn.status_len,
        head: conn.head,
        status: conn.status,
    };
    e.write(ev);
    e.submit(submit_flags());
}

/// Aggregation mode: adds a finished request to the histogram of its key.
#[inline(always)]
fn aggregate_request(c: &Config, conn: &mut Conn, flags: u32, server_ns: u64) {
    let head_len = conn.head_len as usize;
    let key = AggKey {
        head: if head_len > 0 {
            head_hash(&conn.head, head_len)
        } else {
            0
        },
        tgid: conn.tgid,
        status: status_code(&conn.status, conn.status_len as usize),
        flags: (flags & (REQ_EXCLUSIVE_THREAD | REQ_NO_RESPONSE)) as u16,
    };
    // A keep-alive connection mostly repeats its last key: then no hash lookup at all.
    let p = if conn.slot != 0 && conn.slot != SLOT_HASH && conn.slot_key == key {
        REQ_SLOT_HIST.get_ptr_mut(conn.slot - 1)
    } else {
        hist_of(c, conn, &key, head_len)
    };
    let p = match p {
        Some(p) => p,
        None => {
            count(Counter::AggMapFull);
            match REQ_AGG_OVERFLOW.get_ptr_mut(0) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU map value, no other writer on this CPU while the program runs.
    unsafe { (*p).add(server_ns) };
}

/// The histogram of a key the connection has not just used: its slot, or its `REQ_AGG` entry,
/// made when new. Remembers where it is on the connection. None when every place is full.
#[inline(always)]
fn hist_of(c: &Config, conn: &mut Conn, key: &AggKey, head_len: usize) -> Option<*mut Hist> {
    let in_hash = conn.slot == SLOT_HASH && conn.slot_key == *key;
    conn.slot_key = *key;
    conn.slot = 0;
    if !in_hash {
        if let Some(s) = REQ_SLOT_OF.get_ptr(key) {
            // SAFETY: map value pointer valid for this program run.
            let s = unsafe { *s };
            conn.slot = s + 1;
            return REQ_SLOT_HIST.get_ptr_mut(s);
        }
    }
    if c.flags & CONFIG_KEY_HASH != 0 {
        if let Some(p) = REQ_AGG.get_ptr_mut(key) {
            conn.slot = SLOT_HASH;
            return Some(p);
        }
    }
    let (p, slot) = new_key(c, key)?;
    conn.slot = slot;
    if key.head != 0 && HEADS.get_ptr(key.head).is_none() {
        let h = Head {
            len: head_len as u32,
            bytes: conn.head,
        };
        let _ = HEADS.insert(key.head, h, BPF_NOEXIST);
    }
    Some(p)
}

/// A key no CPU had given a place: a free slot while there is one, else a new `REQ_AGG` entry
/// (zeroed; another CPU may have made it meanwhile). Returns its histogram and `Conn::slot`.
#[inline(always)]
fn new_key(c: &Config, key: &AggKey) -> Option<(*mut Hist, u32)> {
    if let Some(used) = REQ_SLOTS_USED.get_ptr_mut(0) {
        // SAFETY: array value pointer valid for this program run (shared by all CPUs: read and
        // written whole, any value it holds is only a place to start trying).
        let mut s = unsafe { *used };
        let mut tries = 0;
        // `get_ptr_mut` fails past the array's size, which the agent may have made smaller.
        while tries < SLOT_TRIES {
            let Some(p) = REQ_SLOT_HIST.get_ptr_mut(s) else {
                break;
            };
            if REQ_SLOT_OWNER.insert(s, key, BPF_NOEXIST).is_ok() {
                // SAFETY: as above. Only forwards, as far as this CPU can tell.
                unsafe {
                    if *used <= s {
                        *used = s + 1;
                    }
                }
                if REQ_SLOT_OF.insert(key, s, BPF_NOEXIST).is_ok() {
                    return Some((p, s + 1));
                }
                // Another CPU gave the key a slot first: use that one (this one stays unused).
                // SAFETY: map value pointer valid for this program run.
                let theirs = unsafe { *REQ_SLOT_OF.get_ptr(key)? };
                return Some((REQ_SLOT_HIST.get_ptr_mut(theirs)?, theirs + 1));
            }
            s += 1;
            tries += 1;
        }
    }
    if c.flags & CONFIG_KEY_HASH == 0 {
        return None;
    }
    let zero = ZERO_HIST.get(0)?;
    let _ = REQ_AGG.insert(key, zero, BPF_NOEXIST);
    Some((REQ_AGG.get_ptr_mut(key)?, SLOT_HASH))
}

/// Aggregation mode: adds a duration to one of the database histograms.
#[inline(always)]
fn aggregate_db(which: u32, ns: u64) {
    if let Some(p) = DB_AGG.get_ptr_mut(which) {
        // SAFETY: per-CPU map value, as above.
        unsafe { (*p).add(ns) };
    }
}

#[inline(always)]
fn db_round_trip(c: &Config, sk: u64, conn: &mut Conn, t: u64) {
    let dur = t.saturating_sub(conn.start_ns);
    count(Counter::DbRoundTrips);
    let id = bpf_get_current_pid_tgid();
    let attributed = attribute(id as u32, dur, false);
    if attributed {
        count(Counter::DbRoundTripsAttributed);
    }
    if c.flags & CONFIG_AGGREGATE != 0 {
        aggregate_db(DB_AGG_ROUND_TRIP, dur);
        return;
    }
    let Some(mut e) = EVENTS.reserve::<DbRoundTripEvent>(0) else {
        count(Counter::RingbufFull);
        return;
    };
    e.write(DbRoundTripEvent {
        hdr: EventHeader {
            kind: EventKind::DbRoundTrip as u32,
            tgid: (id >> 32) as u32,
            tid: id as u32,
            _pad: 0,
            ts_ns: t,
        },
        sock: sk,
        start_ns: conn.start_ns,
        dur_ns: dur,
        bytes_out: conn.bytes_out as u32,
        attributed: attributed as u32,
        remote_port: conn.remote_port,
        local_port: conn.local_port,
        _pad: 0,
    });
    e.submit(submit_flags());
}

/// Adds database time to the request thread `tid` is serving, when that is unambiguous.
#[inline(always)]
fn attribute(tid: u32, dur: u64, is_connect: bool) -> bool {
    let Some(tr) = THREAD_REQ.get_ptr(tid) else {
        return false;
    };
    // SAFETY: map value pointer valid for this program run.
    let tr = unsafe { *tr };
    if tr.multiplexed != 0 {
        return false;
    }
    let Some(p) = CONNS.get_ptr_mut(tr.sock) else {
        return false;
    };
    // SAFETY: as above.
    let conn = unsafe { &mut *p };
    if conn.seq != tr.seq || conn.state == H_IDLE || conn.role != ROLE_HTTP {
        return false;
    }
    if is_connect {
        conn.db_connects += 1;
        conn.db_connect_ns += dur;
        count(Counter::DbConnectsAttributed);
        add(Counter::DbConnectAttributedNs, dur);
    } else {
        conn.db_round_trips += 1;
        conn.db_wait_ns += dur;
        add(Counter::DbWaitAttributedNs, dur);
    }
    true
}

/// The user buffer of the current syscall (read, write, their socket and vector forms), from
/// its saved registers; None for any other syscall.
#[inline(always)]
fn user_buf() -> Option<u64> {
    // SAFETY: helpers without preconditions; both return BTF pointers the verifier tracks.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    // The syscall number is an int (arm64's syscallno) or the low half of a long (x86_64).
    let nr: u32 = field(regs, kernel(|k| &k.offsets.regs_nr));
    let arg1: u64 = field(regs, kernel(|k| &k.offsets.regs_arg1));
    let is = |f: fn(&'static SyscallNrs) -> &'static u32| nr == kernel(|k| f(&k.syscalls));
    if is(|s| &s.read) || is(|s| &s.write) || is(|s| &s.recvfrom) || is(|s| &s.sendto) {
        Some(arg1)
    } else if is(|s| &s.recvmsg) || is(|s| &s.sendmsg) {
        // struct user_msghdr: msg_iov at 16 on LP64 (uapi, stable); iovec.iov_base first.
        let iov: u64 = read_user(arg1 + 16)?;
        read_user(iov)
    } else if is(|s| &s.readv) || is(|s| &s.writev) {
        read_user(arg1)
    } else {
        None
    }
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: bpf_probe_read_user tolerates any address.
    let r = unsafe { bpf_probe_read_user((&mut v as *mut u64).cast(), 8, addr as *const _) };
    if r != 0 {
        return None;
    }
    Some(v)
}

/// Copies the first bytes (at most `N`, at most the `n` the syscall moved) of the current
/// syscall's user buffer into `dst`, and returns how many; None when there is no buffer or the
/// read failed (counted).
#[inline(always)]
fn copy_user<const N: usize>(dst: &mut [u8; N], n: u64) -> Option<u16> {
    let buf = user_buf()?;
    let len = if n < N as u64 { n as u32 } else { N as u32 };
    // Bound for the verifier: len is in 1..=N.
    let len = len & (2 * N as u32 - 1);
    if len == 0 || len > N as u32 {
        return None;
    }
    // SAFETY: dst has N bytes and len <= N.
    let r = unsafe { bpf_probe_read_user(dst.as_mut_ptr().cast(), len, buf as *const _) };
    if r != 0 {
        count(Counter::PayloadReadFailed);
        return None;
    }
    Some(len as u16)
}

/// `tp_btf/inet_sock_set_state`: `TP_PROTO(const struct sock *sk, const int oldstate,
/// const int newstate)` (include/trace/events/sock.h). Fires in process and softirq context;
/// the namespace is taken from the socket, never from the current task.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn awl_sock_state(ctx: BtfTracePointContext) -> i32 {
    let _ = try_state(&ctx);
    0
}

#[inline(always)]
fn try_state(ctx: &BtfTracePointContext) -> Option<()> {
    let c = config()?;
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let t = now();

    if let Some(p) = CONNS.get_ptr_mut(sk) {
        // SAFETY: map value pointer valid for this program run.
        let conn = unsafe { &mut *p };
        if conn.role == ROLE_HTTP {
            let server_done = new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK || new == TCP_CLOSE;
            let peer_done = new == TCP_CLOSE_WAIT;
            // A response ends with either side's close; a request still being read, only
            // when the socket is gone.
            let answered = conn.state == H_RESP && (server_done || peer_done);
            let abandoned = conn.state == H_RECV && new == TCP_CLOSE;
            if answered || abandoned {
                finalize(c, sk, conn, REQ_END_CLOSE, t);
            }
        }
        if new == TCP_CLOSE {
            count(if conn.role == ROLE_HTTP {
                Counter::HttpConnsClosed
            } else {
                Counter::DbConnsClosed
            });
            let _ = CONNS.remove(sk);
        }
        // Connecting sockets are never in CONNS before ESTABLISHED.
        return Some(());
    }

    if !sk_in_target(c, sk) {
        return None;
    }
    let (lport, rport) = sk_ports(sk);
    if old == TCP_CLOSE && new == TCP_SYN_SENT && port_in(&c.db_ports, rport) {
        let id = bpf_get_current_pid_tgid();
        let cn = Connecting {
            start_ns: t,
            tid: id as u32,
            tgid: (id >> 32) as u32,
            remote_port: rport,
            _pad: [0; 3],
        };
        if CONNECTING.insert(sk, cn, 0).is_err() {
            count(Counter::ConnMapFull);
        }
    } else if old == TCP_SYN_SENT {
        let cn = unsafe { *CONNECTING.get_ptr(sk)? };
        let _ = CONNECTING.remove(sk);
        if new != TCP_ESTABLISHED {
            count(Counter::DbConnectFailed);
            return Some(());
        }
        let dur = t.saturating_sub(cn.start_ns);
        count(Counter::DbConnsOpened);
        count(Counter::DbConnects);
        let attributed = attribute(cn.tid, dur, true);
        track(sk, ROLE_DB, lport, rport);
        if c.flags & CONFIG_AGGREGATE != 0 {
            aggregate_db(DB_AGG_CONNECT, dur);
            return Some(());
        }
        let Some(mut e) = EVENTS.reserve::<DbConnectEvent>(0) else {
            count(Counter::RingbufFull);
            return Some(());
        };
        e.write(DbConnectEvent {
            hdr: EventHeader {
                kind: EventKind::DbConnect as u32,
                tgid: cn.tgid,
                tid: cn.tid,
                _pad: 0,
                ts_ns: t,
            },
            sock: sk,
            start_ns: cn.start_ns,
            dur_ns: dur,
            remote_port: rport,
            attributed: attributed as u16,
            _pad: [0; 2],
        });
        e.submit(submit_flags());
    } else if old == TCP_SYN_RECV && new == TCP_ESTABLISHED && port_in(&c.http_ports, lport) {
        count(Counter::HttpConnsOpened);
        track(sk, ROLE_HTTP, lport, rport);
    } else if new == TCP_CLOSE && old != TCP_LISTEN {
        // Untracked (opened before attach and idle since): still a connection that closed.
        if port_in(&c.http_ports, lport) {
            count(Counter::HttpConnsClosed);
        } else if port_in(&c.db_ports, rport) {
            count(Counter::DbConnsClosed);
        }
    }
    Some(())
}

//! The one place that turns raw probe records into what everyone reads: per-request records,
//! histograms, per-interval and whole-run summaries. Outputs (the `watch` lines, NDJSON, and later
//! metrics and result files) read from here and never recompute.
//!
//! It keeps no unbounded state: histograms are fixed-size, labels are interned into a bounded set.

pub mod http;
pub mod summary;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use agent_common::{
    hist_bucket_range, AggKey, Counter, DbConnectEvent, DbRoundTripEvent, EventHeader, EventKind,
    Hist, RequestEvent, ThreadCpu, COUNTERS, HIST_BUCKETS, REQ_END_CLOSE, REQ_EXCLUSIVE_THREAD,
    REQ_NO_HEAD, REQ_NO_RESPONSE,
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Nanosecond histogram, 3 significant digits (<= 0.1 % relative error), 1 ns .. 1 h.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds are valid")
}

/// One finished request, as written to NDJSON by `watch --json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub method: &'static str,
    pub path: Arc<str>,
    /// 0 when no status line was seen.
    pub status: u16,
    /// CLOCK_MONOTONIC nanoseconds of the first request byte read.
    pub start_ns: u64,
    /// First request byte read to last response byte written.
    pub server_ns: u64,
    /// First request byte read to first response byte written.
    pub first_byte_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Database round trips made by the serving thread during the request.
    pub db_round_trips: u32,
    pub db_wait_ns: u64,
    pub db_connects: u32,
    pub db_connect_ns: u64,
    /// On-CPU time of the serving thread from the first request byte to the first response byte;
    /// 0 unless `exclusive_thread` (only then is it the request's own).
    pub on_cpu_ns: u64,
    /// The serving thread served only this request meanwhile: the per-request database and CPU
    /// figures are this request's own. False for event-loop threads.
    pub exclusive_thread: bool,
    /// 1-based index of the request on its connection.
    pub seq: u32,
    /// "next" (another request followed on the connection) or "close".
    pub ended_by: &'static str,
    pub responded: bool,
    pub local_port: u16,
    pub remote_port: u16,
}

/// A decoded ring-buffer record.
#[derive(Debug, Clone)]
pub enum Record {
    Request(RequestRecord),
    DbRoundTrip {
        start_ns: u64,
        dur_ns: u64,
        attributed: bool,
    },
    DbConnect {
        dur_ns: u64,
        attributed: bool,
    },
}

/// Database work the kernel pinned to requests (on a sync server, all of it): in an interval,
/// and carried by the requests that finished in it. The difference is the pinned work of
/// requests still in the server when the interval ends, which per-request figures leave out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    pub round_trips: u64,
    pub wait_ns: u64,
    pub connects: u64,
    pub connect_ns: u64,
    pub finished_round_trips: u64,
    pub finished_wait_ns: u64,
    pub finished_connects: u64,
    pub finished_connect_ns: u64,
}

impl Pinned {
    /// The kernel's cumulative counts (aggregation mode).
    fn of(c: &[u64; COUNTERS as usize]) -> Pinned {
        let k = |x: Counter| c[x as usize];
        Pinned {
            round_trips: k(Counter::DbRoundTripsAttributed),
            wait_ns: k(Counter::DbWaitAttributedNs),
            connects: k(Counter::DbConnectsAttributed),
            connect_ns: k(Counter::DbConnectAttributedNs),
            finished_round_trips: k(Counter::FinishedDbRoundTrips),
            finished_wait_ns: k(Counter::FinishedDbWaitNs),
            finished_connects: k(Counter::FinishedDbConnects),
            finished_connect_ns: k(Counter::FinishedDbConnectNs),
        }
    }

    /// Adds `now - before`, field by field (cumulative counts).
    fn add_since(&mut self, now: &Pinned, before: &Pinned) {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.round_trips += d(now.round_trips, before.round_trips);
        self.wait_ns += d(now.wait_ns, before.wait_ns);
        self.connects += d(now.connects, before.connects);
        self.connect_ns += d(now.connect_ns, before.connect_ns);
        self.finished_round_trips += d(now.finished_round_trips, before.finished_round_trips);
        self.finished_wait_ns += d(now.finished_wait_ns, before.finished_wait_ns);
        self.finished_connects += d(now.finished_connects, before.finished_connects);
        self.finished_connect_ns += d(now.finished_connect_ns, before.finished_connect_ns);
    }
}

/// Counts and histograms over some interval.
#[derive(Clone)]
pub struct Stats {
    pub requests: u64,
    pub responded: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub by_label: BTreeMap<usize, u64>,
    /// Requests by serving process (tgid): a handful of server processes per interval.
    pub by_pid: BTreeMap<u32, u64>,
    pub server: Histogram<u64>,
    pub db_rtt: Histogram<u64>,
    pub db_connect: Histogram<u64>,
    pub db_round_trips: u64,
    pub db_wait_ns: u64,
    pub db_connects: u64,
    pub db_connect_ns: u64,
    /// What of the database work the kernel could pin to one request.
    pub pinned: Pinned,
    pub exclusive_requests: u64,
    pub server_ns_sum: u64,
    /// Threads that read at least one request (at most `MAX_SERVING_THREADS`).
    pub serving_tids: BTreeSet<u32>,
    /// Start of the interval (CLOCK_MONOTONIC ns): `db_wait_ns` counts round trips from here
    /// on, so one that began before it adds only its part inside.
    pub since_ns: u64,
}

/// Bound of [`Stats::serving_tids`]: a server has a handful of such threads; more means the
/// target is not one server, and the serving-thread figures stop growing rather than memory.
pub(crate) const MAX_SERVING_THREADS: usize = 1024;

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: 0,
            responded: 0,
            by_status: BTreeMap::new(),
            by_label: BTreeMap::new(),
            by_pid: BTreeMap::new(),
            server: new_hist(),
            db_rtt: new_hist(),
            db_connect: new_hist(),
            db_round_trips: 0,
            db_wait_ns: 0,
            db_connects: 0,
            db_connect_ns: 0,
            pinned: Pinned::default(),
            exclusive_requests: 0,
            server_ns_sum: 0,
            serving_tids: BTreeSet::new(),
            since_ns: 0,
        }
    }
}

impl Stats {
    fn add(&mut self, r: &Record, label: Option<usize>) {
        match r {
            Record::Request(q) => {
                self.requests += 1;
                if q.responded {
                    self.responded += 1;
                }
                *self.by_status.entry(q.status).or_default() += 1;
                if let Some(l) = label {
                    *self.by_label.entry(l).or_default() += 1;
                }
                *self.by_pid.entry(q.pid).or_default() += 1;
                self.server.saturating_record(q.server_ns.max(1));
                self.server_ns_sum += q.server_ns;
                if q.exclusive_thread {
                    self.exclusive_requests += 1;
                }
                if self.serving_tids.len() < MAX_SERVING_THREADS {
                    self.serving_tids.insert(q.tid);
                }
                let p = &mut self.pinned;
                p.finished_round_trips += u64::from(q.db_round_trips);
                p.finished_wait_ns += q.db_wait_ns;
                p.finished_connects += u64::from(q.db_connects);
                p.finished_connect_ns += q.db_connect_ns;
            }
            Record::DbRoundTrip {
                start_ns,
                dur_ns,
                attributed,
            } => {
                self.db_round_trips += 1;
                let wait = if *start_ns < self.since_ns {
                    (start_ns + dur_ns).saturating_sub(self.since_ns)
                } else {
                    *dur_ns
                };
                self.db_wait_ns += wait;
                self.db_rtt.saturating_record((*dur_ns).max(1));
                if *attributed {
                    self.pinned.round_trips += 1;
                    self.pinned.wait_ns += wait;
                }
            }
            Record::DbConnect { dur_ns, attributed } => {
                self.db_connects += 1;
                self.db_connect_ns += dur_ns;
                self.db_connect.saturating_record((*dur_ns).max(1));
                if *attributed {
                    self.pinned.connects += 1;
                    self.pinned.connect_ns += dur_ns;
                }
            }
        }
    }
}

impl Stats {
    /// Aggregation mode: `d` more requests of one kernel key, named `label`.
    fn add_requests(&mut self, key: &AggKey, label: usize, d: &HistSum) {
        let n = d.count;
        if n == 0 {
            return;
        }
        self.requests += n;
        if u32::from(key.flags) & REQ_NO_RESPONSE == 0 {
            self.responded += n;
        }
        if u32::from(key.flags) & REQ_EXCLUSIVE_THREAD != 0 {
            self.exclusive_requests += n;
        }
        *self.by_status.entry(key.status).or_default() += n;
        *self.by_label.entry(label).or_default() += n;
        *self.by_pid.entry(key.tgid).or_default() += n;
        self.server_ns_sum += d.sum_ns;
        d.record_into(&mut self.server);
    }

    /// Aggregation mode: more round trips.
    fn add_round_trips(&mut self, d: &HistSum) {
        self.db_round_trips += d.count;
        self.db_wait_ns += d.sum_ns;
        d.record_into(&mut self.db_rtt);
    }

    fn add_connects(&mut self, d: &HistSum) {
        self.db_connects += d.count;
        self.db_connect_ns += d.sum_ns;
        d.record_into(&mut self.db_connect);
    }

    fn add_serving(&mut self, tids: &[u32]) {
        for &t in tids {
            if self.serving_tids.len() >= MAX_SERVING_THREADS {
                break;
            }
            self.serving_tids.insert(t);
        }
    }
}

/// A kernel histogram ([`agent_common::Hist`]) summed over CPUs, or the difference of two
/// such sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HistSum {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: Vec<u64>,
}

impl Default for HistSum {
    fn default() -> Self {
        HistSum {
            count: 0,
            sum_ns: 0,
            buckets: vec![0; HIST_BUCKETS],
        }
    }
}

impl HistSum {
    pub(crate) fn add(&mut self, h: &Hist) {
        self.count += h.count;
        self.sum_ns += h.sum_ns;
        for (a, b) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *a += u64::from(*b);
        }
    }

    /// What `self` gained since `earlier` (both cumulative).
    fn since(&self, earlier: &HistSum) -> HistSum {
        HistSum {
            count: self.count.saturating_sub(earlier.count),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The non-empty buckets as (midpoint ns, count): a bucket read as its midpoint is off by at
    /// most 3.125 % of the value (see `agent_common::HIST_SUB_LOG2`).
    pub(crate) fn values(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| {
                let (low, width) = hist_bucket_range(i);
                (low + width / 2, n)
            })
    }

    fn record_into(&self, h: &mut Histogram<u64>) {
        for (v, n) in self.values() {
            h.saturating_record_n(v.max(1), n);
        }
    }
}

/// Aggregation mode: what the kernel's maps hold at one instant (cumulative since attach).
#[derive(Default)]
pub(crate) struct KernelAggregates {
    /// Server-time histograms by key; the overflow (`AggKey::OVERFLOW`) among them.
    pub requests: Vec<(AggKey, HistSum)>,
    pub db_round_trip: HistSum,
    pub db_connect: HistSum,
    /// Threads that have read a request (and are alive).
    pub serving_tids: Vec<u32>,
}

/// What an aggregated histogram measures, for observers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Measured {
    /// Server time of requests with this label id and status code.
    Server {
        label: usize,
        status: u16,
    },
    DbRoundTrip,
    DbConnect,
}

/// Decodes one ring-buffer record. Unknown kinds and short records are None (and counted by
/// the caller as malformed).
pub(crate) fn decode(bytes: &[u8], labels: &mut http::LabelSet) -> Option<(Record, Option<usize>)> {
    let hdr = EventHeader::from_bytes(bytes)?;
    match hdr.kind {
        k if k == EventKind::Request as u32 => {
            let e = RequestEvent::from_bytes(bytes)?;
            // No head (or a failed copy) parses as `OTHER /?`, like any unparseable one.
            let head = match e.flags & REQ_NO_HEAD {
                0 => &e.head[..(e.head_len as usize).min(e.head.len())],
                _ => &[],
            };
            let (method, path, label) = labels.request(head);
            let status =
                http::parse_status(&e.status[..(e.status_len as usize).min(e.status.len())]);
            let rec = RequestRecord {
                kind: "request",
                pid: e.hdr.tgid,
                tid: e.hdr.tid,
                method,
                path,
                status,
                start_ns: e.start_ns,
                server_ns: e.end_ns.saturating_sub(e.start_ns),
                first_byte_ns: if e.first_send_ns != 0 {
                    e.first_send_ns.saturating_sub(e.start_ns)
                } else {
                    0
                },
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
                db_round_trips: e.db_round_trips,
                db_wait_ns: e.db_wait_ns,
                db_connects: e.db_connects,
                db_connect_ns: e.db_connect_ns,
                on_cpu_ns: e.on_cpu_ns,
                exclusive_thread: e.flags & REQ_EXCLUSIVE_THREAD != 0,
                seq: e.seq,
                ended_by: if e.flags & REQ_END_CLOSE != 0 {
                    "close"
                } else {
                    "next"
                },
                responded: e.flags & REQ_NO_RESPONSE == 0,
                local_port: e.local_port,
                remote_port: e.remote_port,
            };
            Some((Record::Request(rec), Some(label)))
        }
        k if k == EventKind::DbRoundTrip as u32 => {
            let e = DbRoundTripEvent::from_bytes(bytes)?;
            Some((
                Record::DbRoundTrip {
                    start_ns: e.start_ns,
                    dur_ns: e.dur_ns,
                    attributed: e.attributed != 0,
                },
                None,
            ))
        }
        k if k == EventKind::DbConnect as u32 => {
            let e = DbConnectEvent::from_bytes(bytes)?;
            Some((
                Record::DbConnect {
                    dur_ns: e.dur_ns,
                    attributed: e.attributed != 0,
                },
                None,
            ))
        }
        _ => None,
    }
}

/// CPU totals of the target's threads at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTotals {
    pub on_ns: u64,
    pub off_ns: u64,
    pub threads: u64,
}

/// One thread's (on-CPU, off-CPU) nanoseconds at `now`, counting the slice in progress.
fn thread_at(now: u64, th: &ThreadCpu) -> (u64, u64) {
    let mut on = th.on_ns;
    let mut off = th.off_ns;
    if th.last_in != 0 && now > th.last_in {
        on += now - th.last_in;
    }
    if th.last_out != 0 && now > th.last_out {
        off += now - th.last_out;
    }
    (on, off)
}

impl CpuTotals {
    /// Totals at `now` (CLOCK_MONOTONIC ns), counting the slices in progress.
    pub fn at(
        now: u64,
        threads: &[(u32, ThreadCpu)],
        counters: &[u64; COUNTERS as usize],
    ) -> CpuTotals {
        let mut t = CpuTotals {
            on_ns: counters[Counter::ExitedOnCpuNs as usize],
            off_ns: counters[Counter::ExitedOffCpuNs as usize],
            threads: threads.len() as u64,
        };
        for (_, th) in threads {
            let (on, off) = thread_at(now, th);
            t.on_ns += on;
            t.off_ns += off;
        }
        t
    }

    /// Off-CPU share of thread time between two snapshots.
    pub(crate) fn off_share_since(&self, earlier: &CpuTotals) -> Option<f64> {
        let on = self.on_ns.saturating_sub(earlier.on_ns);
        let off = self.off_ns.saturating_sub(earlier.off_ns);
        let all = on + off;
        (all > 0).then(|| off as f64 / all as f64)
    }
}

/// What the kernel's maps say at one instant; a summary is the difference of two readings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// CLOCK_MONOTONIC nanoseconds of the reading.
    pub at_ns: u64,
    pub cpu: CpuTotals,
    /// Per thread id: (on-CPU, off-CPU) nanoseconds since the thread was first seen.
    pub threads: BTreeMap<u32, (u64, u64)>,
    /// Time requests spent in the server (first request byte read to first response byte
    /// written), integrated up to this instant: requests that left it, plus the time so far of
    /// those still in it. The difference of two readings is the request time inside the
    /// interval, cut exactly at both ends.
    pub in_server_ns: u64,
    /// Requests in the server at this instant: read, not answered yet.
    pub in_server: u64,
}

impl Reading {
    pub fn at(
        now: u64,
        threads: &[(u32, ThreadCpu)],
        counters: &[u64; COUNTERS as usize],
    ) -> Reading {
        let c = |k: Counter| counters[k as usize];
        // The two in-server counters are wrapping sums (see agent_common::Counter): n requests
        // in the server whose starts sum to S have spent n * now - S so far.
        let inside = c(Counter::RequestsInServer)
            .wrapping_mul(now)
            .wrapping_sub(c(Counter::RequestsInServerStartNs));
        Reading {
            at_ns: now,
            cpu: CpuTotals::at(now, threads, counters),
            threads: threads
                .iter()
                .map(|(tid, th)| (*tid, thread_at(now, th)))
                .collect(),
            in_server_ns: c(Counter::RequestsLeftServerNs).wrapping_add(inside),
            in_server: c(Counter::RequestsInServer),
        }
    }
}

/// The kernel's cumulative figures at one instant, as handed to observers once an interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot<'a> {
    /// The kernel's counters (monotonic since attach), indexed by `agent_common::Counter`.
    pub counters: &'a [u64; COUNTERS as usize],
    /// CPU totals of the target's threads since attach.
    pub cpu: CpuTotals,
    /// The same over the threads that have served requests (`Stats::serving_tids`) and are
    /// alive: their time since attach. It drops when such a thread exits.
    pub serving_cpu: CpuTotals,
    /// Records the agent could not decode, since attach.
    pub malformed: u64,
}

/// Receives what the aggregator decoded, as it decodes it (the Prometheus exporter is one).
/// Observers convert units and export; they do not recompute what the aggregator computes.
pub(crate) trait Observer: Send {
    /// One decoded record; for requests, `label` is its (method, path) id in `labels`.
    fn record(&mut self, rec: &Record, label: Option<usize>, labels: &http::LabelSet);
    /// The cumulative kernel counters and CPU totals, once an interval.
    fn snapshot(&mut self, snap: &Snapshot<'_>);
    /// Aggregation mode: what one histogram gained since the last call, as (value ns, count).
    fn aggregated(&mut self, what: Measured, values: &[(u64, u64)], labels: &http::LabelSet);
}

/// The running aggregation of one attach.
pub struct Aggregator {
    pub labels: http::LabelSet,
    pub total: Stats,
    /// The interval since the last `take_window`, kept only once a reader asks for it
    /// (`keep_windows`: `watch`'s interval lines); the runner and the daemon read `total` and
    /// the observers, and would pay for a second histogram record per request.
    window: Option<Stats>,
    /// Records the agent could not decode (should stay 0).
    pub malformed: u64,
    observers: Vec<Box<dyn Observer>>,
    /// Aggregation mode: the maps as last read, and the label of each head hash.
    last: BTreeMap<AggKey, HistSum>,
    last_round_trip: HistSum,
    last_connect: HistSum,
    last_pinned: Pinned,
    head_labels: BTreeMap<u64, usize>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Aggregator {
            labels: http::LabelSet::new(64),
            total: Stats::default(),
            window: None,
            malformed: 0,
            observers: Vec::new(),
            last: BTreeMap::new(),
            last_round_trip: HistSum::default(),
            last_connect: HistSum::default(),
            last_pinned: Pinned::default(),
            head_labels: BTreeMap::new(),
        }
    }

    /// Adds an observer that sees every record from now on, and every snapshot.
    pub(crate) fn add_observer(&mut self, o: Box<dyn Observer>) {
        self.observers.push(o);
    }

    /// Hands the kernel's cumulative counters and the CPU totals of `reading` to the observers.
    pub(crate) fn snapshot(&mut self, counters: &[u64; COUNTERS as usize], reading: &Reading) {
        let mut serving_cpu = CpuTotals::default();
        for tid in &self.total.serving_tids {
            if let Some((on, off)) = reading.threads.get(tid) {
                serving_cpu.on_ns += on;
                serving_cpu.off_ns += off;
                serving_cpu.threads += 1;
            }
        }
        let snap = Snapshot {
            counters,
            cpu: reading.cpu,
            serving_cpu,
            malformed: self.malformed,
        };
        for o in &mut self.observers {
            o.snapshot(&snap);
        }
    }

    /// Accounts one raw record; returns it decoded.
    pub fn push(&mut self, bytes: &[u8]) -> Option<Record> {
        let Some((rec, label)) = decode(bytes, &mut self.labels) else {
            self.malformed += 1;
            return None;
        };
        self.total.add(&rec, label);
        if let Some(w) = &mut self.window {
            w.add(&rec, label);
        }
        for o in &mut self.observers {
            o.record(&rec, label, &self.labels);
        }
        Some(rec)
    }

    /// Aggregation mode: adds what the kernel's histograms gained since the last call to the
    /// totals, the window and the observers. `head` finds the request head of a hash (for its
    /// label); `counters` are the kernel's, read with the maps.
    pub(crate) fn absorb(
        &mut self,
        k: &KernelAggregates,
        counters: &[u64; COUNTERS as usize],
        mut head: impl FnMut(u64) -> Option<Vec<u8>>,
    ) {
        for (key, now) in &k.requests {
            let d = match self.last.get(key) {
                Some(before) => now.since(before),
                None => now.clone(),
            };
            if d.count == 0 {
                continue;
            }
            let label = self.label_of(key.head, &mut head);
            self.total.add_requests(key, label, &d);
            if let Some(w) = &mut self.window {
                w.add_requests(key, label, &d);
            }
            let values: Vec<(u64, u64)> = d.values().collect();
            for o in &mut self.observers {
                o.aggregated(
                    Measured::Server {
                        label,
                        status: key.status,
                    },
                    &values,
                    &self.labels,
                );
            }
            self.last.insert(*key, now.clone());
        }
        let pinned = Pinned::of(counters);
        let rt = k.db_round_trip.since(&self.last_round_trip);
        let cn = k.db_connect.since(&self.last_connect);
        self.last_round_trip = k.db_round_trip.clone();
        self.last_connect = k.db_connect.clone();
        for s in std::iter::once(&mut self.total).chain(&mut self.window) {
            s.add_round_trips(&rt);
            s.add_connects(&cn);
            s.pinned.add_since(&pinned, &self.last_pinned);
            s.add_serving(&k.serving_tids);
        }
        self.last_pinned = pinned;
        for (what, d) in [(Measured::DbRoundTrip, &rt), (Measured::DbConnect, &cn)] {
            if d.count > 0 {
                let values: Vec<(u64, u64)> = d.values().collect();
                for o in &mut self.observers {
                    o.aggregated(what, &values, &self.labels);
                }
            }
        }
    }

    /// The label id of a head hash: parsed once from the head the kernel kept.
    fn label_of(&mut self, hash: u64, head: &mut impl FnMut(u64) -> Option<Vec<u8>>) -> usize {
        if hash == AggKey::OVERFLOW.head {
            return 0;
        }
        if let Some(&l) = self.head_labels.get(&hash) {
            return l;
        }
        let h = head(hash).filter(|_| hash != 0).unwrap_or_default();
        let (_, _, l) = self.labels.request(&h);
        self.head_labels.insert(hash, l);
        l
    }

    /// Keeps intervals from now on, for `take_window`.
    pub(crate) fn keep_windows(&mut self) {
        self.window.get_or_insert_with(Stats::default);
    }

    /// Ends the current interval and returns it (empty unless `keep_windows` was called).
    pub(crate) fn take_window(&mut self) -> Stats {
        self.window.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        let ms = |ns: u64| ns as f64 / 1e6;
        Quantiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1e6,
        }
    }
}

/// Per-request database figures and the database's share of server time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ratios {
    /// Round trips per finished request: those the kernel pinned to the requests that
    /// finished, and those it could pin to none (an event loop's) within the interval. Pinned
    /// round trips of requests still in the server at the interval's end are left out, so on a
    /// sync server this is each request's own count (it read 7.35 instead of 7 on a cell of
    /// 17 requests when they were counted).
    pub db_round_trips_per_request: Option<f64>,
    /// Their time, the same way.
    pub db_wait_ms_per_request: Option<f64>,
    /// Connects per finished request and their time, the same way.
    #[serde(default)]
    pub db_connects_per_request: Option<f64>,
    #[serde(default)]
    pub db_connect_ms_per_request: Option<f64>,
    /// Database wait over the time requests spent in the server (first request byte to first
    /// response byte), both within the interval, requests still in the server at its end
    /// included.
    pub db_wait_share_of_server_time: Option<f64>,
    /// Share of round trips that the kernel pinned to one request (1.0 on sync servers).
    pub attributed_share: Option<f64>,
}

impl Stats {
    /// `in_server_ns`: the request time in the server over the same interval (the difference of
    /// two [`Reading`]s), without which the database's share is not computed.
    pub fn ratios(&self, in_server_ns: Option<u64>) -> Ratios {
        let p = &self.pinned;
        // Finished requests' pinned work, and the unpinned work of the interval.
        let of_finished = |finished: u64, all: u64, pinned: u64| {
            (self.requests > 0)
                .then(|| (finished + all.saturating_sub(pinned)) as f64 / self.requests as f64)
        };
        let ms = |x: Option<f64>| x.map(|ns| ns / 1e6);
        Ratios {
            db_round_trips_per_request: of_finished(
                p.finished_round_trips,
                self.db_round_trips,
                p.round_trips,
            ),
            db_wait_ms_per_request: ms(of_finished(p.finished_wait_ns, self.db_wait_ns, p.wait_ns)),
            db_connects_per_request: of_finished(p.finished_connects, self.db_connects, p.connects),
            db_connect_ms_per_request: ms(of_finished(
                p.finished_connect_ns,
                self.db_connect_ns,
                p.connect_ns,
            )),
            // Not db_wait / server_ns_sum: the round trips of requests still in the server when
            // the interval ends are in the numerator while those requests are in no record, so
            // that ratio read 1.06 on a closed-loop cell with hundreds of requests in flight.
            // Every round trip of a request lies within its time in the server (read, database
            // work, response) and one request's round trips do not overlap, so over the same
            // interval this share cannot exceed 1 (up to requests already in flight when the
            // probes attached, whose start the kernel never saw).
            db_wait_share_of_server_time: in_server_ns
                .filter(|&n| n > 0)
                .map(|n| self.db_wait_ns as f64 / n as f64),
            attributed_share: (self.db_round_trips > 0)
                .then(|| p.round_trips as f64 / self.db_round_trips as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_bytes(start: u64, end: u64, rtts: u32, flags: u32) -> Vec<u8> {
        let mut head = [0u8; agent_common::HEAD_LEN];
        let h = b"GET /posts/io_read/ HTTP/1.1\r\n";
        head[..h.len()].copy_from_slice(h);
        let mut status = [0u8; agent_common::STATUS_LEN];
        status.copy_from_slice(b"HTTP/1.1 200 OK\r");
        let e = RequestEvent {
            hdr: EventHeader {
                kind: EventKind::Request as u32,
                tgid: 1,
                tid: 2,
                _pad: 0,
                ts_ns: end,
            },
            sock: 7,
            start_ns: start,
            first_send_ns: end,
            end_ns: end,
            bytes_in: 30,
            bytes_out: 100,
            // Each pinned round trip took 2 ms.
            db_wait_ns: u64::from(rtts) * 2_000_000,
            db_connect_ns: 0,
            on_cpu_ns: 1,
            seq: 1,
            db_round_trips: rtts,
            db_connects: 0,
            flags,
            local_port: 8000,
            remote_port: 40000,
            head_len: h.len() as u16,
            status_len: 16,
            head,
            status,
        };
        // SAFETY: repr(C) POD record viewed as bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&e as *const RequestEvent).cast::<u8>(),
                size_of::<RequestEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_request_record() {
        let mut a = Aggregator::new();
        let Some(Record::Request(r)) =
            a.push(&req_bytes(1_000, 3_001_000, 4, REQ_EXCLUSIVE_THREAD))
        else {
            panic!("not a request")
        };
        assert_eq!(
            (r.method, &*r.path, r.status),
            ("GET", "/posts/io_read/", 200)
        );
        assert_eq!(r.server_ns, 3_000_000);
        assert_eq!(r.db_round_trips, 4);
        assert!(r.exclusive_thread && r.responded);
        assert_eq!(r.ended_by, "next");
        assert_eq!(a.total.requests, 1);
        assert!(a.push(&[1, 2, 3]).is_none());
        assert_eq!(a.malformed, 1);
    }

    /// Regression: observers see every decoded record (with its label) and every snapshot,
    /// and nothing for undecodable bytes.
    #[test]
    fn observers_see_records_and_snapshots() {
        use std::sync::{Arc, Mutex};
        #[derive(Default)]
        struct Seen {
            requests: Vec<(String, u64)>,
            snapshots: Vec<(u64, u64)>,
        }
        struct Obs(Arc<Mutex<Seen>>);
        impl Observer for Obs {
            fn record(&mut self, rec: &Record, label: Option<usize>, labels: &http::LabelSet) {
                if let (Record::Request(r), Some(l)) = (rec, label) {
                    let (m, p) = labels.get(l);
                    self.0
                        .lock()
                        .unwrap()
                        .requests
                        .push((format!("{m} {p}"), r.server_ns));
                }
            }
            fn snapshot(&mut self, s: &Snapshot<'_>) {
                self.0
                    .lock()
                    .unwrap()
                    .snapshots
                    .push((s.counters[Counter::RingbufFull as usize], s.malformed));
            }
            fn aggregated(&mut self, _: Measured, _: &[(u64, u64)], _: &http::LabelSet) {}
        }
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut a = Aggregator::new();
        a.add_observer(Box::new(Obs(seen.clone())));
        a.push(&req_bytes(0, 7_000, 0, 0));
        a.push(&[0xff; 3]);
        let mut counters = [0u64; COUNTERS as usize];
        counters[Counter::RingbufFull as usize] = 2;
        a.snapshot(&counters, &Reading::default());
        let s = seen.lock().unwrap();
        assert_eq!(s.requests, vec![("GET /posts/io_read/".to_string(), 7_000)]);
        assert_eq!(s.snapshots, vec![(2, 1)]);
    }

    /// A sync server's interval: three requests finished with two round trips of 2 ms pinned
    /// to each, a fourth is still in the server at the end with two pinned round trips made,
    /// and one round trip of 2 ms was pinned to no request. Per finished request that is its
    /// own two and a third of the unpinned one; counting every round trip of the interval
    /// would read 9 / 3 = 3.
    #[test]
    fn ratios_are_exact_totals() {
        let mut s = Stats::default();
        for _ in 0..3 {
            s.add(
                &Record::Request(
                    match decode(&req_bytes(0, 10_000_000, 2, 0), &mut http::LabelSet::new(4))
                        .unwrap()
                        .0
                    {
                        Record::Request(r) => r,
                        _ => unreachable!(),
                    },
                ),
                None,
            );
        }
        // 6 of the finished requests, 2 of the one in flight, 1 pinned to none.
        for attributed in [true, true, true, true, true, true, true, true, false] {
            s.add(
                &Record::DbRoundTrip {
                    start_ns: 0,
                    dur_ns: 2_000_000,
                    attributed,
                },
                None,
            );
        }
        let r = s.ratios(Some(45_000_000));
        assert_eq!(r.db_round_trips_per_request, Some(7.0 / 3.0));
        assert_eq!(r.db_wait_ms_per_request, Some(14.0 / 3.0));
        // The share counts the in-flight request's wait and time in the server too.
        assert_eq!(r.db_wait_share_of_server_time, Some(18.0 / 45.0));
        assert_eq!(r.attributed_share, Some(8.0 / 9.0));
        // No connect at all: zero per request, not unknown.
        assert_eq!(r.db_connects_per_request, Some(0.0));
        assert_eq!(s.ratios(None).db_wait_share_of_server_time, None);
    }

    /// The kernel's in-server counters, as sock.rs keeps them: per-CPU slots that a request
    /// enters on one CPU and may leave on another, summed with wrapping arithmetic.
    struct InServer {
        slots: [[u64; COUNTERS as usize]; 2],
    }

    impl InServer {
        fn enter(&mut self, cpu: usize, t: u64) {
            let s = &mut self.slots[cpu];
            s[Counter::RequestsInServer as usize] =
                s[Counter::RequestsInServer as usize].wrapping_add(1);
            s[Counter::RequestsInServerStartNs as usize] =
                s[Counter::RequestsInServerStartNs as usize].wrapping_add(t);
        }
        fn leave(&mut self, cpu: usize, start: u64, t: u64) {
            let s = &mut self.slots[cpu];
            s[Counter::RequestsInServer as usize] =
                s[Counter::RequestsInServer as usize].wrapping_sub(1);
            s[Counter::RequestsInServerStartNs as usize] =
                s[Counter::RequestsInServerStartNs as usize].wrapping_sub(start);
            s[Counter::RequestsLeftServerNs as usize] += t - start;
        }
        fn summed(&self) -> [u64; COUNTERS as usize] {
            let mut out = [0u64; COUNTERS as usize];
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.slots[0][i].wrapping_add(self.slots[1][i]);
            }
            out
        }
    }

    /// A request: start, end, and its round trips (start, end).
    type Req = (u64, u64, Vec<(u64, u64)>);

    /// Requests (start, end, round trips inside) replayed in time order against the kernel's
    /// counters and the records user space would see; returns (old share, new share) over the
    /// window [m, e]: the old one divided by the server time of the records finished in it.
    fn shares(reqs: &[Req], m: u64, e: u64) -> (Option<f64>, Option<f64>) {
        let mut k = InServer {
            slots: [[0; COUNTERS as usize]; 2],
        };
        let mut events: Vec<(u64, usize, bool)> = Vec::new();
        for (i, (s, f, _)) in reqs.iter().enumerate() {
            events.push((*s, i, true));
            events.push((*f, i, false));
        }
        events.sort();
        let mut at_m = None;
        let mut at_e = None;
        for &(t, i, enter) in &events {
            if at_m.is_none() && t > m {
                at_m = Some(Reading::at(m, &[], &k.summed()));
            }
            if at_e.is_none() && t > e {
                at_e = Some(Reading::at(e, &[], &k.summed()));
            }
            // Enter on CPU i % 2, leave on the other one: the per-CPU slots wrap.
            if enter {
                k.enter(i % 2, t)
            } else {
                k.leave((i + 1) % 2, reqs[i].0, t)
            }
        }
        let at_m = at_m.unwrap_or_else(|| Reading::at(m, &[], &k.summed()));
        let at_e = at_e.unwrap_or_else(|| Reading::at(e, &[], &k.summed()));
        let mut st = Stats {
            since_ns: m,
            ..Stats::default()
        };
        for (s, f, rts) in reqs {
            if *f > m && *f <= e {
                st.requests += 1;
                st.server_ns_sum += f - s;
            }
            for &(a, b) in rts {
                if b > m && b <= e {
                    st.add(
                        &Record::DbRoundTrip {
                            start_ns: a,
                            dur_ns: b - a,
                            attributed: false,
                        },
                        None,
                    );
                }
            }
        }
        let old = (st.server_ns_sum > 0).then(|| st.db_wait_ns as f64 / st.server_ns_sum as f64);
        (
            old,
            st.ratios(Some(at_e.in_server_ns.wrapping_sub(at_m.in_server_ns)))
                .db_wait_share_of_server_time,
        )
    }

    /// Regression: a cell cut while many requests waited on the database read a database share
    /// of server time of 1.06 (their round trips counted, their server time not).
    #[test]
    fn db_share_stays_below_one_when_the_window_cuts_requests() {
        // One request finished in the window (10 of 100 ms waiting), ten cut at its end after
        // 90 ms of round trips each.
        let mut reqs = vec![(1_000, 101_000, vec![(10_000, 20_000)])];
        for _ in 0..10 {
            reqs.push((100_000, 1_000_000, vec![(100_000, 190_000)]));
        }
        let (old, new) = shares(&reqs, 0, 200_000);
        assert!(
            old.unwrap() > 1.0,
            "the old definition exceeded 1 here: {old:?}"
        );
        // Truth by hand: wait 10 + 10 x 90 us; time in server 100 + 10 x 100 us.
        let want = (10_000.0 + 10.0 * 90_000.0) / (100_000.0 + 10.0 * 100_000.0);
        assert!((new.unwrap() - want).abs() < 1e-12, "{new:?} vs {want}");
    }

    proptest::proptest! {
        /// Whatever the requests and the window, round trips inside their requests give a share
        /// of at most 1 (1e-9: float rounding).
        #[test]
        fn db_share_never_exceeds_one(
            raw in proptest::collection::vec((0u64..1_000_000, 1u64..500_000, proptest::collection::vec(1u64..100, 0..5)), 1..40),
            m in 0u64..1_000_000,
            len in 1u64..1_000_000,
        ) {
            let reqs: Vec<Req> = raw
                .iter()
                .map(|(s, d, parts)| {
                    // Round trips back to back inside [s, s + d], sized by the given weights.
                    let total: u64 = parts.iter().sum::<u64>().max(1);
                    let mut t = *s;
                    let rts = parts.iter().map(|w| { let a = t; t += d * w / total; (a, t) }).filter(|(a, b)| b > a).collect();
                    (*s, s + d, rts)
                })
                .collect();
            let (_, new) = shares(&reqs, m, m + len);
            if let Some(x) = new {
                proptest::prop_assert!(x <= 1.0 + 1e-9, "share {x}");
            }
        }
    }

    #[test]
    fn cpu_totals_count_slices_in_progress_and_exited_threads() {
        let mut counters = [0u64; COUNTERS as usize];
        counters[Counter::ExitedOnCpuNs as usize] = 100;
        counters[Counter::ExitedOffCpuNs as usize] = 50;
        let running = ThreadCpu {
            tgid: 1,
            _pad: 0,
            on_ns: 10,
            off_ns: 20,
            last_in: 1_000,
            last_out: 0,
        };
        let sleeping = ThreadCpu {
            tgid: 1,
            _pad: 0,
            on_ns: 5,
            off_ns: 5,
            last_in: 0,
            last_out: 1_500,
        };
        let t = CpuTotals::at(2_000, &[(1, running), (2, sleeping)], &counters);
        assert_eq!(t.on_ns, 100 + 10 + 1_000 + 5);
        assert_eq!(t.off_ns, 50 + 20 + 5 + 500);
        let later = CpuTotals {
            on_ns: t.on_ns + 25,
            off_ns: t.off_ns + 75,
            threads: 2,
        };
        assert_eq!(later.off_share_since(&t), Some(0.75));
        assert_eq!(t.off_share_since(&t), None);
    }

    /// Aggregation mode against per-request records of the same requests: the same counts,
    /// labels, statuses, processes and sums; quantiles within the histogram's stated error
    /// (3.125 % from reading a bucket as its midpoint, plus hdrhistogram's 0.1 %); a second
    /// reading adds only what the maps gained; observers see every value once.
    #[test]
    fn aggregated_maps_give_the_records_figures() {
        use agent_common::{head_hash, HEAD_LEN};
        use std::sync::{Arc, Mutex};
        let heads: [&[u8]; 2] = [b"GET /posts/1/ HTTP/1.1\r\n", b"POST /posts/ HTTP/1.1\r\n"];
        let hash = |h: &[u8]| {
            let mut b = [0u8; HEAD_LEN];
            b[..h.len()].copy_from_slice(h);
            head_hash(&b, h.len())
        };
        // Two keys (paths), durations spread over four decades, one key per path.
        let durations = |path: usize| {
            (0..5000u64).map(move |i| 40_000 + (i * i * 37 + path as u64 * 977) % 90_000_000)
        };
        let mut kernel = KernelAggregates::default();
        let mut records = Stats::default();
        let mut labels = http::LabelSet::new(64);
        for (path, h) in heads.iter().enumerate() {
            let key = AggKey {
                head: hash(h),
                tgid: 7,
                status: 200 + path as u16,
                flags: REQ_EXCLUSIVE_THREAD as u16,
            };
            // Two CPUs' copies of the key, summed as the agent sums them.
            let (mut a, mut b) = (Hist::default(), Hist::default());
            for (i, d) in durations(path).enumerate() {
                if i % 2 == 0 {
                    a.add(d)
                } else {
                    b.add(d)
                }
                let (m, p) = http::parse_request_head(h);
                let l = labels.intern(m, &p);
                records.add(
                    &Record::Request(RequestRecord {
                        method: m,
                        path: p.into(),
                        status: key.status,
                        pid: 7,
                        tid: 70,
                        server_ns: d,
                        exclusive_thread: true,
                        responded: true,
                        ..RequestRecord::default()
                    }),
                    Some(l),
                );
            }
            let mut sum = HistSum::default();
            sum.add(&a);
            sum.add(&b);
            kernel.requests.push((key, sum));
        }
        kernel.requests.push((AggKey::OVERFLOW, HistSum::default()));
        let mut rt = Hist::default();
        for i in 0..300u64 {
            rt.add(100_000 + i * 1_000);
            records.add(
                &Record::DbRoundTrip {
                    start_ns: 1,
                    dur_ns: 100_000 + i * 1_000,
                    attributed: true,
                },
                None,
            );
        }
        kernel.db_round_trip.add(&rt);
        kernel.serving_tids = vec![70];
        // The kernel's pinned counts, as it keeps them for the same traffic.
        let mut counters = [0u64; COUNTERS as usize];
        let p = records.pinned;
        for (k, v) in [
            (Counter::DbRoundTripsAttributed, p.round_trips),
            (Counter::DbWaitAttributedNs, p.wait_ns),
            (Counter::DbConnectsAttributed, p.connects),
            (Counter::DbConnectAttributedNs, p.connect_ns),
            (Counter::FinishedDbRoundTrips, p.finished_round_trips),
            (Counter::FinishedDbWaitNs, p.finished_wait_ns),
            (Counter::FinishedDbConnects, p.finished_connects),
            (Counter::FinishedDbConnectNs, p.finished_connect_ns),
        ] {
            counters[k as usize] = v;
        }

        struct Count(Arc<Mutex<u64>>);
        impl Observer for Count {
            fn record(&mut self, _: &Record, _: Option<usize>, _: &http::LabelSet) {}
            fn snapshot(&mut self, _: &Snapshot<'_>) {}
            fn aggregated(&mut self, _: Measured, v: &[(u64, u64)], _: &http::LabelSet) {
                *self.0.lock().unwrap() += v.iter().map(|x| x.1).sum::<u64>();
            }
        }
        let observed = Arc::new(Mutex::new(0));
        let mut agg = Aggregator::new();
        agg.keep_windows();
        agg.add_observer(Box::new(Count(observed.clone())));
        let head_of = |k: u64| heads.iter().find(|h| hash(h) == k).map(|h| h.to_vec());
        agg.absorb(&kernel, &counters, head_of);
        // Unchanged maps add nothing.
        agg.absorb(&kernel, &counters, head_of);
        let t = &agg.total;
        assert_eq!(t.requests, records.requests);
        assert_eq!(t.responded, records.responded);
        assert_eq!(t.exclusive_requests, records.exclusive_requests);
        assert_eq!(t.by_status, records.by_status);
        assert_eq!(t.by_pid, records.by_pid);
        assert_eq!(t.server_ns_sum, records.server_ns_sum);
        assert_eq!(
            (t.db_round_trips, t.db_wait_ns),
            (records.db_round_trips, records.db_wait_ns)
        );
        assert_eq!(t.pinned.round_trips, 300);
        assert_eq!(t.pinned, records.pinned);
        assert_eq!(t.ratios(None), records.ratios(None));
        assert_eq!(t.serving_tids, records.serving_tids);
        let named = |s: &Stats, l: &http::LabelSet| -> BTreeMap<String, u64> {
            s.by_label
                .iter()
                .map(|(id, n)| {
                    let (m, p) = l.get(*id);
                    (format!("{m} {p}"), *n)
                })
                .collect()
        };
        assert_eq!(named(t, &agg.labels), named(&records, &labels));
        for (a, r) in [(&t.server, &records.server), (&t.db_rtt, &records.db_rtt)] {
            for q in [0.5, 0.9, 0.99] {
                let (x, y) = (a.value_at_quantile(q) as f64, r.value_at_quantile(q) as f64);
                assert!((x - y).abs() / y <= 1.0 / 32.0 + 0.002, "q{q}: {x} vs {y}");
            }
        }
        assert_eq!(*observed.lock().unwrap(), records.requests + 300);
        // More requests on one key: only they are added.
        let mut more = Hist::default();
        more.add(5_000_000);
        kernel.requests[0].1.add(&more);
        agg.absorb(&kernel, &counters, head_of);
        assert_eq!(agg.total.requests, records.requests + 1);
        assert_eq!(agg.take_window().requests, records.requests + 1);
        agg.absorb(&kernel, &counters, head_of);
        assert_eq!(agg.take_window().requests, 0);
    }
}

//! Recording without a channel hop per request: each runtime worker thread owns a shard
//! (totals, HDR histograms and the per-second slots of the current run), found through a
//! thread-local, and locked only by that thread and by the once-a-second collector (so the lock
//! is uncontended on the hot path). The collector merges the shards' finished seconds into the
//! series and, at the end, their totals into the report.
//!
//! Histograms are in nanoseconds, 1 ns .. 1 h, 3 significant digits (<= 0.1 % relative
//! error). A request is counted in the second in which it completed, seconds counted from the
//! origin the run gives (the start of the unix second it started in, so that they are Locust's
//! whole wall-clock seconds). This module must not allocate per request: maps grow only when a
//! new status code or a new second first appears.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::probe::aggregate::new_hist;

/// How a request failed when it got no HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The connect was refused (ECONNREFUSED): nothing listens.
    Refused,
    /// The peer reset the connection (ECONNRESET, EPIPE) before the response was complete.
    Reset,
    /// The peer closed the connection (FIN) before the response was complete.
    ClosedWithoutResponse,
    /// `--timeout` expired.
    Timeout,
    /// Any other connect error (unreachable, address not available, ...).
    Connect,
    /// The response was not valid HTTP/1.
    Protocol,
}

impl ErrorKind {
    pub(crate) const ALL: [ErrorKind; 6] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::ClosedWithoutResponse,
        ErrorKind::Timeout,
        ErrorKind::Connect,
        ErrorKind::Protocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::ClosedWithoutResponse => "closed_without_response",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Protocol => "protocol",
        }
    }
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    Error(ErrorKind),
}

impl Outcome {
    /// The study's definition: an HTTP status >= 400 or a connection error.
    pub(crate) fn is_failure(self) -> bool {
        match self {
            Outcome::Status(s) => s >= 400,
            Outcome::Error(_) => true,
        }
    }

    /// The failure's class, for labels that must stay few (the metrics' `kind`): `http_4xx` or
    /// `http_5xx` for a status, the error kind's name otherwise (the names the JSON report and
    /// the CSVs use); `None` for a success.
    pub(crate) fn failure_class(self) -> Option<&'static str> {
        match self {
            Outcome::Status(s) if s < 400 => None,
            Outcome::Status(s) if s < 500 => Some(HTTP_CLASSES[0]),
            Outcome::Status(_) => Some(HTTP_CLASSES[1]),
            Outcome::Error(k) => Some(k.name()),
        }
    }
}

const HTTP_CLASSES: [&str; 2] = ["http_4xx", "http_5xx"];

/// Every value `Outcome::failure_class` can take.
pub(crate) fn failure_classes() -> impl Iterator<Item = &'static str> {
    HTTP_CLASSES
        .into_iter()
        .chain(ErrorKind::ALL.into_iter().map(ErrorKind::name))
}

/// Whole-run figures of one shard, or of all shards merged.
#[derive(Clone)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
    pub bytes: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: [u64; ErrorKind::ALL.len()],
    /// Every completed request (as Locust's statistics), successes and failures.
    pub latency: Histogram<u64>,
    pub latency_sum_ns: u128,
    pub latency_ok: Histogram<u64>,
    pub connect: Histogram<u64>,
    /// Open model: requests whose worker picked them up after their due time.
    pub late: u64,
    /// Open model: actual start minus due time, for every request.
    pub start_lag: Histogram<u64>,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            requests: 0,
            failures: 0,
            bytes: 0,
            statuses: BTreeMap::new(),
            errors: [0; ErrorKind::ALL.len()],
            latency: new_hist(),
            latency_sum_ns: 0,
            latency_ok: new_hist(),
            connect: new_hist(),
            late: 0,
            start_lag: new_hist(),
        }
    }
}

impl Totals {
    pub(crate) fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.failures += o.failures;
        self.bytes += o.bytes;
        for (k, v) in &o.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (a, b) in self.errors.iter_mut().zip(o.errors) {
            *a += b;
        }
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&o.latency);
        self.latency_sum_ns += o.latency_sum_ns;
        let _ = self.latency_ok.add(&o.latency_ok);
        let _ = self.connect.add(&o.connect);
        self.late += o.late;
        let _ = self.start_lag.add(&o.start_lag);
    }

    pub(crate) fn error_count(&self, k: ErrorKind) -> u64 {
        self.errors[k as usize]
    }
}

/// What completed within one second of the run.
#[derive(Clone)]
pub(crate) struct Second {
    pub requests: u64,
    pub failures: u64,
    pub bytes: u64,
    pub latency: Histogram<u64>,
    pub latency_sum_ns: u128,
    /// When the first request of the second completed, nanoseconds into it (`u32::MAX` while
    /// none has): Locust's chart needs it (`chart::Tally`).
    pub first_done_ns: u32,
}

impl Default for Second {
    fn default() -> Self {
        Second {
            requests: 0,
            failures: 0,
            bytes: 0,
            latency: new_hist(),
            latency_sum_ns: 0,
            first_done_ns: u32::MAX,
        }
    }
}

impl Second {
    pub(crate) fn merge(&mut self, o: &Second) {
        self.requests += o.requests;
        self.failures += o.failures;
        self.bytes += o.bytes;
        let _ = self.latency.add(&o.latency);
        self.latency_sum_ns += o.latency_sum_ns;
        self.first_done_ns = self.first_done_ns.min(o.first_done_ns);
    }
}

#[derive(Default)]
struct Shard {
    totals: Totals,
    /// Seconds not yet collected (normally the current one, briefly also the previous).
    seconds: BTreeMap<u64, Second>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

static NEXT_RUN: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's shard of each run in progress (several runs may share a runtime).
    static LOCAL: RefCell<Vec<(u64, Arc<Mutex<Shard>>)>> = const { RefCell::new(Vec::new()) };
}

/// The per-run registry of shards.
pub(crate) struct Recorder {
    id: u64,
    /// Second 0 starts here.
    origin: Instant,
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
    /// Prometheus series fed alongside the histograms (`--metrics-addr`), if any.
    metrics: Option<crate::metrics::LoadMetrics>,
}

impl Recorder {
    /// Seconds are counted from `origin`.
    pub fn new(origin: Instant) -> Recorder {
        Recorder {
            id: NEXT_RUN.fetch_add(1, Ordering::Relaxed),
            origin,
            shards: Mutex::new(Vec::new()),
            metrics: None,
        }
    }

    /// Also counts every request into `m` (atomic counters and one histogram observation).
    pub(crate) fn with_metrics(mut self, m: Option<crate::metrics::LoadMetrics>) -> Recorder {
        self.metrics = m;
        self
    }

    /// Runs `f` on this thread's shard, creating and registering it on first use.
    fn with<R>(&self, f: impl FnOnce(&mut Shard) -> R) -> R {
        LOCAL.with(|cell| {
            let mut local = cell.borrow_mut();
            let i = match local.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    // Drop shards of finished runs (only this thread still holds them).
                    local.retain(|(_, s)| Arc::strong_count(s) > 1);
                    let s = Arc::new(Mutex::new(Shard::default()));
                    self.shards
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(s.clone());
                    local.push((self.id, s));
                    local.len() - 1
                }
            };
            // Locked through the thread-local's own reference: no reference-count traffic per
            // request. `f` never records again, so the RefCell is not borrowed twice.
            let mut g = local[i].1.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut g)
        })
    }

    /// One completed request: `done` is when its last byte arrived (or it failed), `latency`
    /// runs from its start (the due time in the open model).
    pub fn request(&self, done: Instant, latency: Duration, outcome: Outcome, bytes: u64) {
        if let Some(m) = &self.metrics {
            m.observe_response(latency, outcome);
        }
        let since = done.saturating_duration_since(self.origin);
        let (sec, into) = (since.as_secs(), since.subsec_nanos());
        let lat = ns(latency);
        let fail = outcome.is_failure();
        self.with(|s| {
            let t = &mut s.totals;
            t.requests += 1;
            t.bytes += bytes;
            t.latency.saturating_record(lat);
            t.latency_sum_ns += u128::from(lat);
            match outcome {
                Outcome::Status(code) => *t.statuses.entry(code).or_default() += 1,
                Outcome::Error(k) => t.errors[k as usize] += 1,
            }
            if fail {
                t.failures += 1;
            } else {
                t.latency_ok.saturating_record(lat);
            }
            let sl = s.seconds.entry(sec).or_default();
            sl.requests += 1;
            sl.bytes += bytes;
            sl.latency.saturating_record(lat);
            sl.latency_sum_ns += u128::from(lat);
            if fail {
                sl.failures += 1;
            }
            sl.first_done_ns = sl.first_done_ns.min(into);
        })
    }

    /// A connection was established after `d`.
    pub fn connect(&self, d: Duration) {
        let v = ns(d);
        self.with(|s| s.totals.connect.saturating_record(v))
    }

    /// Open model: a request started `lag` after its due time; `late` if no worker was free.
    pub(crate) fn start_lag(&self, lag: Duration, late: bool) {
        let v = ns(lag);
        self.with(|s| {
            s.totals.start_lag.saturating_record(v);
            if late {
                s.totals.late += 1;
            }
        })
    }

    /// The shards registered so far (the list is cloned: recording threads are not held up).
    fn all_shards(&self) -> Vec<Arc<Mutex<Shard>>> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Removes and merges every second before `before` from all shards.
    pub(crate) fn take_seconds(&self, before: u64) -> BTreeMap<u64, Second> {
        let mut out: BTreeMap<u64, Second> = BTreeMap::new();
        for sh in self.all_shards() {
            let taken = {
                let mut g = sh.lock().unwrap_or_else(|e| e.into_inner());
                let keep = g.seconds.split_off(&before);
                std::mem::replace(&mut g.seconds, keep)
            };
            for (k, v) in taken {
                match out.get_mut(&k) {
                    Some(m) => m.merge(&v),
                    None => {
                        out.insert(k, v);
                    }
                }
            }
        }
        out
    }

    /// Whole-run totals of all shards so far.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for sh in self.all_shards() {
            t.merge(&sh.lock().unwrap_or_else(|e| e.into_inner()).totals);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_from_several_threads_merge_exactly() {
        let start = Instant::now();
        let rec = Arc::new(Recorder::new(start));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    for j in 0..1000u64 {
                        let outcome = if j % 10 == 0 {
                            Outcome::Status(500)
                        } else {
                            Outcome::Status(200)
                        };
                        rec.request(
                            start + Duration::from_millis(j),
                            Duration::from_micros(100 * (i + 1)),
                            outcome,
                            10,
                        );
                    }
                    rec.request(
                        start,
                        Duration::from_millis(1),
                        Outcome::Error(ErrorKind::Reset),
                        0,
                    );
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = rec.totals();
        assert_eq!(t.requests, 4004);
        assert_eq!(t.failures, 404);
        assert_eq!(t.statuses[&500], 400);
        assert_eq!(t.statuses[&200], 3600);
        assert_eq!(t.error_count(ErrorKind::Reset), 4);
        assert_eq!(t.bytes, 40_000);
        // 3 significant digits: 100 us is recorded within 0.1 %.
        let min = t.latency.min();
        assert!((99_900..=100_100).contains(&min), "{min}");
        assert_eq!(t.latency_ok.len(), 3600);
        // Every request completed in second 0 (j < 1000 ms).
        let secs = rec.take_seconds(1);
        assert_eq!(secs.len(), 1);
        assert_eq!(secs[&0].requests, 4004);
        assert_eq!(secs[&0].failures, 404);
        assert!(rec.take_seconds(1).is_empty());
    }

    #[test]
    fn seconds_are_split_by_completion_time() {
        let start = Instant::now();
        let rec = Recorder::new(start);
        rec.request(
            start + Duration::from_millis(999),
            Duration::from_millis(1),
            Outcome::Status(200),
            0,
        );
        rec.request(
            start + Duration::from_millis(1000),
            Duration::from_millis(1),
            Outcome::Status(200),
            0,
        );
        rec.request(
            start + Duration::from_millis(2500),
            Duration::from_millis(1),
            Outcome::Status(404),
            0,
        );
        let first = rec.take_seconds(2);
        assert_eq!(first.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(first[&0].first_done_ns, 999_000_000);
        assert_eq!(first[&1].first_done_ns, 0);
        let rest = rec.take_seconds(10);
        assert_eq!(rest[&2].failures, 1);
        assert_eq!(rest[&2].first_done_ns, 500_000_000);
    }
}

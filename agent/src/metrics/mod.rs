//! Prometheus metrics: what the probes, the load generator and the delay back ends measured, in
//! Prometheus's conventions (base units, `_seconds`, `_total`, bounded label sets), and a small
//! HTTP server that exposes them (`server`).
//!
//! There is no global registry: a command creates one [`Registry`], hands it to the types here
//! (each registers its own families once) and serves it. The probe figures come from the
//! aggregate layer through its `Observer` hook; this module converts units and exports, it must
//! not recompute what `aggregate` computes. Label sets are bounded: `target` is one per watched
//! namespace or container, (`method`, `route`) comes from `aggregate::http::LabelSet` (at most 65
//! values), status classes, causes, kinds and states are fixed lists, and the experiment cell and
//! delay back end keep one series at a time.

pub mod server;

use std::time::Duration;

use agent_common::{Counter as K, COUNTERS};
use prometheus::{
    CounterVec, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::{
    probe::aggregate::{http::LabelSet, CpuTotals, Observer, Record, Snapshot},
    probe::ProbeStatus,
};

pub use prometheus::Registry as MetricsRegistry;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric family: {0}")]
    Register(#[from] prometheus::Error),
    #[error("metrics server on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Server request time buckets (seconds): 1 ms to 2 min. The study's requests run from a few ms
/// (io routes, no delay) to tens of seconds (queued behind a blocked event loop).
pub(crate) const SERVER_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Database round-trip and connect buckets (seconds): 50 µs to 5 s; injected delays are 0-200 ms.
pub(crate) const DB_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2,
    0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Status classes of server responses; `other` is "no status line seen".
pub(crate) const STATUS_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "other"];

fn status_class(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        500..=599 => 3,
        _ => 4,
    }
}

/// Loss causes exported by `awaitlab_lost_events_total`, with the kernel counter each follows
/// (`None`: the agent's own count of undecodable records).
const LOST: &[(&str, Option<K>)] = &[
    ("ringbuf_full", Some(K::RingbufFull)),
    ("conn_map_full", Some(K::ConnMapFull)),
    ("thread_map_full", Some(K::ThreadMapFull)),
    ("payload_read_failed", Some(K::PayloadReadFailed)),
    ("unknown_socket", Some(K::UnknownSocket)),
    ("malformed", None),
];

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The probe families, labelled by `target` (one value per watched namespace or container).
#[derive(Clone)]
pub struct ProbeMetrics {
    requests: IntCounterVec,
    server: HistogramVec,
    db_rtt: HistogramVec,
    db_connect: HistogramVec,
    db_round_trips: IntCounterVec,
    conns_opened: IntCounterVec,
    conns_closed: IntCounterVec,
    connect_failures: IntCounterVec,
    thread_seconds: CounterVec,
    lost: IntCounterVec,
    probe_live: IntGaugeVec,
    attached: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> Result<T, MetricsError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl ProbeMetrics {
    /// Registers the probe families in `r` (once per registry).
    pub fn new(r: &Registry) -> Result<ProbeMetrics, MetricsError> {
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["target"],
            )
        };
        Ok(ProbeMetrics {
            requests: reg(r, IntCounterVec::new(
                Opts::new("awaitlab_http_server_requests_total", "HTTP requests the target's server finished, by method, normalised route and status class."),
                &["target", "method", "route", "status_class"],
            )?)?,
            server: reg(r, hist("awaitlab_http_server_request_duration_seconds", "Server time of each request: first request byte read to last response byte written.", SERVER_BUCKETS)?)?,
            db_rtt: reg(r, hist("awaitlab_db_round_trip_duration_seconds", "Database round trips: first send after the last receive to the next receive.", DB_BUCKETS)?)?,
            db_connect: reg(r, hist("awaitlab_db_connect_duration_seconds", "Database TCP connects: SYN_SENT to ESTABLISHED.", DB_BUCKETS)?)?,
            db_round_trips: reg(r, IntCounterVec::new(Opts::new("awaitlab_db_round_trips_total", "Database round trips made by the target."), &["target"])?)?,
            conns_opened: reg(r, IntCounterVec::new(
                Opts::new("awaitlab_connections_opened_total", "Connections opened: accepted on an HTTP port (role=http) or made to a database port (role=db)."),
                &["target", "role"],
            )?)?,
            conns_closed: reg(r, IntCounterVec::new(Opts::new("awaitlab_connections_closed_total", "Connections closed, by role (http, db)."), &["target", "role"])?)?,
            connect_failures: reg(r, IntCounterVec::new(Opts::new("awaitlab_db_connect_failures_total", "Database connects that failed."), &["target"])?)?,
            thread_seconds: reg(r, CounterVec::new(
                Opts::new("awaitlab_thread_time_seconds_total", "Time the target's threads spent on the CPU (state=on_cpu) and off it (state=off_cpu: waiting on I/O, locks or the run queue)."),
                &["target", "state"],
            )?)?,
            lost: reg(r, IntCounterVec::new(
                Opts::new("awaitlab_lost_events_total", "Events not measured, by cause (ring buffer full, maps full, payload copy failed, traffic on connections joined mid-way, undecodable records)."),
                &["target", "cause"],
            )?)?,
            probe_live: reg(r, IntGaugeVec::new(Opts::new("awaitlab_probe_live", "1 when the eBPF program is attached, 0 when the kernel could not load it."), &["target", "program"])?)?,
            attached: reg(r, IntGaugeVec::new(Opts::new("awaitlab_target_attached", "1 while the probes are attached to the target."), &["target"])?)?,
        })
    }

    /// An aggregate observer for one attach to `target`. Make a new one for each attach: it
    /// follows that attach's kernel counters (which start at zero), and adds to the same
    /// Prometheus series, so counters keep rising across a container's restarts.
    pub(crate) fn observer(&self, target: &str) -> TargetObserver {
        // Series that exist before anything happens, so that rates read 0 rather than nothing.
        for (cause, _) in LOST {
            self.lost.with_label_values(&[target, cause]);
        }
        for role in ["http", "db"] {
            self.conns_opened.with_label_values(&[target, role]);
            self.conns_closed.with_label_values(&[target, role]);
        }
        TargetObserver {
            target: target.to_string(),
            m: self.clone(),
            server: self.server.with_label_values(&[target]),
            db_rtt: self.db_rtt.with_label_values(&[target]),
            db_connect: self.db_connect.with_label_values(&[target]),
            db_round_trips: self.db_round_trips.with_label_values(&[target]),
            by_label: Vec::new(),
            last_counters: [0; COUNTERS as usize],
            last_cpu: CpuTotals::default(),
            last_malformed: 0,
        }
    }

    /// Publishes which programs are live and that the target is attached.
    pub(crate) fn set_attached(&self, target: &str, probes: &[ProbeStatus]) {
        for p in probes {
            self.probe_live
                .with_label_values(&[target, p.program.as_str()])
                .set(i64::from(p.live));
        }
        self.attached.with_label_values(&[target]).set(1);
    }

    /// The target's probes are detached (its counters stay, so rates across a restart hold).
    pub(crate) fn set_detached(&self, target: &str) {
        self.attached.with_label_values(&[target]).set(0);
        for p in [
            "awl_sock_state",
            "awl_sock_recv",
            "awl_sock_send",
            "awl_sched_switch",
            "awl_sched_exit",
        ] {
            let _ = self.probe_live.remove_label_values(&[target, p]);
        }
    }
}

/// Feeds one attach's records and snapshots into [`ProbeMetrics`].
pub(crate) struct TargetObserver {
    target: String,
    m: ProbeMetrics,
    server: prometheus::Histogram,
    db_rtt: prometheus::Histogram,
    db_connect: prometheus::Histogram,
    db_round_trips: IntCounter,
    /// Request counters by label id and status class, resolved once (a label lookup hashes).
    by_label: Vec<[Option<IntCounter>; 5]>,
    last_counters: [u64; COUNTERS as usize],
    last_cpu: CpuTotals,
    last_malformed: u64,
}

impl TargetObserver {
    fn request_counter(&mut self, label: usize, status: u16, labels: &LabelSet) -> &IntCounter {
        if self.by_label.len() <= label {
            self.by_label.resize_with(label + 1, Default::default);
        }
        let class = status_class(status);
        let (target, m) = (&self.target, &self.m);
        self.by_label[label][class].get_or_insert_with(|| {
            let (method, route) = labels.get(label);
            m.requests
                .with_label_values(&[target.as_str(), method, route, STATUS_CLASSES[class]])
        })
    }

    /// Adds what a cumulative total gained since the last snapshot.
    fn follow(last: &mut u64, now: u64) -> u64 {
        // Totals of one attach only grow; a smaller value would be a new attach fed to an old
        // observer, whose whole value is new.
        let d = if now >= *last { now - *last } else { now };
        *last = now;
        d
    }
}

impl Observer for TargetObserver {
    fn record(&mut self, rec: &Record, label: Option<usize>, labels: &LabelSet) {
        match rec {
            Record::Request(r) => {
                self.server.observe(secs(r.server_ns));
                self.request_counter(label.unwrap_or(0), r.status, labels)
                    .inc();
            }
            Record::DbRoundTrip { dur_ns, .. } => {
                self.db_rtt.observe(secs(*dur_ns));
                self.db_round_trips.inc();
            }
            Record::DbConnect { dur_ns } => self.db_connect.observe(secs(*dur_ns)),
        }
    }

    fn snapshot(&mut self, s: &Snapshot<'_>) {
        let t = self.target.as_str();
        let mut kernel =
            |c: K| Self::follow(&mut self.last_counters[c as usize], s.counters[c as usize]);
        let http_open = kernel(K::HttpConnsOpened);
        let http_close = kernel(K::HttpConnsClosed);
        let db_open = kernel(K::DbConnsOpened);
        let db_close = kernel(K::DbConnsClosed);
        let failed = kernel(K::DbConnectFailed);
        let mut lost = [0u64; LOST.len()];
        for (i, (_, c)) in LOST.iter().enumerate() {
            lost[i] = match c {
                Some(c) => kernel(*c),
                None => Self::follow(&mut self.last_malformed, s.malformed),
            };
        }
        let m = &self.m;
        m.conns_opened
            .with_label_values(&[t, "http"])
            .inc_by(http_open);
        m.conns_closed
            .with_label_values(&[t, "http"])
            .inc_by(http_close);
        m.conns_opened.with_label_values(&[t, "db"]).inc_by(db_open);
        m.conns_closed
            .with_label_values(&[t, "db"])
            .inc_by(db_close);
        m.connect_failures.with_label_values(&[t]).inc_by(failed);
        for (i, (cause, _)) in LOST.iter().enumerate() {
            m.lost.with_label_values(&[t, cause]).inc_by(lost[i]);
        }
        let on = Self::follow(&mut self.last_cpu.on_ns, s.cpu.on_ns);
        let off = Self::follow(&mut self.last_cpu.off_ns, s.cpu.off_ns);
        m.thread_seconds
            .with_label_values(&[t, "on_cpu"])
            .inc_by(secs(on));
        m.thread_seconds
            .with_label_values(&[t, "off_cpu"])
            .inc_by(secs(off));
    }
}

/// Client latency buckets (seconds): the server buckets plus the long tail a client sees when
/// requests queue (the study's client had no timeout).
pub(crate) const CLIENT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// The load generator's figures. Cheap to clone; every clone feeds the same series.
///
/// The generator calls [`LoadMetrics::set_users`] when its user count changes and
/// [`LoadMetrics::observe_response`] once per finished request (success or failure).
#[derive(Clone)]
pub struct LoadMetrics {
    users: IntGauge,
    requests: IntCounter,
    failures: IntCounterVec,
    latency: prometheus::Histogram,
}

impl LoadMetrics {
    pub fn new(r: &Registry) -> Result<LoadMetrics, MetricsError> {
        let failures = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "awaitlab_load_failures_total",
                    "Generated requests that failed (HTTP status >= 400 or a connection error), by kind.",
                ),
                &["kind"],
            )?,
        )?;
        for k in crate::load::record::failure_classes() {
            failures.with_label_values(&[k]);
        }
        Ok(LoadMetrics {
            users: reg(r, IntGauge::new("awaitlab_load_users", "Closed-loop users the load generator runs now.")?)?,
            requests: reg(r, IntCounter::new("awaitlab_load_requests_total", "Requests the load generator finished, failed or not.")?)?,
            failures,
            latency: reg(r, prometheus::Histogram::with_opts(
                HistogramOpts::new("awaitlab_http_client_request_duration_seconds", "Client latency of each generated request: connect (if any) to the end of the response or the error.")
                    .buckets(CLIENT_BUCKETS.to_vec()),
            )?)?,
        })
    }

    /// The number of users running now.
    pub fn set_users(&self, n: u64) {
        self.users.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One finished request: counts it, its failure kind if it failed, and its latency.
    pub fn observe_response(&self, latency: Duration, outcome: crate::load::record::Outcome) {
        self.requests.inc();
        if let Some(kind) = outcome.failure_class() {
            self.failures.with_label_values(&[kind]).inc();
        }
        self.latency.observe(latency.as_secs_f64());
    }
}

/// The injected delay: what was asked for and what the back end measured it achieves.
#[derive(Clone)]
pub struct DelayMetrics {
    requested: GaugeVec,
    achieved: GaugeVec,
}

impl DelayMetrics {
    pub fn new(r: &Registry) -> Result<DelayMetrics, MetricsError> {
        Ok(DelayMetrics {
            requested: reg(
                r,
                GaugeVec::new(
                    Opts::new("awaitlab_delay_requested_seconds", "Delay requested on the target's outgoing packets."),
                    &["backend"],
                )?,
            )?,
            achieved: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "awaitlab_delay_achieved_seconds",
                        "Delay the back end measured on delayed packets (median), when it measures it.",
                    ),
                    &["backend"],
                )?,
            )?,
        })
    }

    /// Sets the delay in force. `backend` names the mechanism (`netem`, `nfqueue`); only the
    /// latest back end keeps a series. `achieved` is None when the back end cannot measure it.
    pub fn set(&self, requested: Duration, achieved: Option<Duration>, backend: &str) {
        self.requested.reset();
        self.achieved.reset();
        self.requested
            .with_label_values(&[backend])
            .set(requested.as_secs_f64());
        if let Some(a) = achieved {
            self.achieved
                .with_label_values(&[backend])
                .set(a.as_secs_f64());
        }
    }

    /// No delay in force: both gauges read 0 (a panel shows "0 ms", not a gap).
    pub fn clear(&self, backend: &str) {
        self.set(Duration::ZERO, Some(Duration::ZERO), backend);
    }
}

/// The experiment cell being run, as `awaitlab_experiment_cell_info{setup,route,delay_ms} 1`.
/// One series at a time: setting a new cell removes the previous one, so the label set stays
/// bounded however many cells a run has. Dashboards join other series to it with
/// `* on() group_left(setup, route, delay_ms)`.
#[derive(Clone)]
pub struct ExperimentMetrics {
    cell: IntGaugeVec,
    repetition: Gauge,
}

impl ExperimentMetrics {
    pub fn new(r: &Registry) -> Result<ExperimentMetrics, MetricsError> {
        Ok(ExperimentMetrics {
            cell: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "awaitlab_experiment_cell_info",
                        "The experiment cell being run (1 while it runs).",
                    ),
                    &["setup", "route", "delay_ms"],
                )?,
            )?,
            repetition: reg(
                r,
                Gauge::new(
                    "awaitlab_experiment_repetition",
                    "Repetition number of the cell being run (1-based).",
                )?,
            )?,
        })
    }

    /// Marks `(setup, route, delay_ms)` as the cell running now.
    pub fn set_cell(&self, setup: &str, route: &str, delay_ms: u64, repetition: u32) {
        self.cell.reset();
        self.cell
            .with_label_values(&[setup, route, &delay_ms.to_string()])
            .set(1);
        self.repetition.set(f64::from(repetition));
    }
}

/// The text exposition of `r` (Prometheus text format 0.0.4).
pub fn encode(r: &Registry) -> Vec<u8> {
    use prometheus::Encoder as _;
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on a malformed family, which `register` already refused.
    let _ = prometheus::TextEncoder::new().encode(&r.gather(), &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the first sample of `name` (a histogram's `_count`) carrying `labels`,
    /// read from the text exposition that Prometheus scrapes.
    fn value(r: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = String::from_utf8(encode(r)).unwrap();
        let count = format!("{name}_count");
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            let ok = (metric == name || metric == count)
                && labels
                    .iter()
                    .all(|(k, val)| series.contains(&format!("{k}=\"{val}\"")));
            ok.then(|| v.parse().unwrap())
        })
    }

    #[test]
    fn status_classes() {
        assert_eq!(STATUS_CLASSES[status_class(200)], "2xx");
        assert_eq!(STATUS_CLASSES[status_class(304)], "3xx");
        assert_eq!(STATUS_CLASSES[status_class(404)], "4xx");
        assert_eq!(STATUS_CLASSES[status_class(503)], "5xx");
        assert_eq!(STATUS_CLASSES[status_class(0)], "other");
        assert_eq!(STATUS_CLASSES[status_class(999)], "other");
    }

    #[test]
    fn kernel_counters_are_followed_across_snapshots_and_reattaches() {
        let r = Registry::new();
        let m = ProbeMetrics::new(&r).unwrap();
        let mut c = [0u64; COUNTERS as usize];
        let mut o = m.observer("t");
        c[K::RingbufFull as usize] = 3;
        c[K::DbConnsOpened as usize] = 5;
        let cpu = CpuTotals {
            on_ns: 1_500_000_000,
            off_ns: 500_000_000,
            threads: 1,
        };
        o.snapshot(&Snapshot {
            counters: &c,
            cpu,
            malformed: 1,
        });
        c[K::RingbufFull as usize] = 4;
        o.snapshot(&Snapshot {
            counters: &c,
            cpu,
            malformed: 1,
        });
        assert_eq!(
            value(
                &r,
                "awaitlab_lost_events_total",
                &[("cause", "ringbuf_full")]
            ),
            Some(4.0)
        );
        assert_eq!(
            value(&r, "awaitlab_lost_events_total", &[("cause", "malformed")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &r,
                "awaitlab_lost_events_total",
                &[("cause", "conn_map_full")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&r, "awaitlab_connections_opened_total", &[("role", "db")]),
            Some(5.0)
        );
        assert_eq!(
            value(
                &r,
                "awaitlab_thread_time_seconds_total",
                &[("state", "on_cpu")]
            ),
            Some(1.5)
        );
        // A restart: a new attach whose kernel counters start again at zero adds on top.
        let mut o2 = m.observer("t");
        c[K::RingbufFull as usize] = 2;
        o2.snapshot(&Snapshot {
            counters: &c,
            cpu: CpuTotals {
                on_ns: 500_000_000,
                off_ns: 0,
                threads: 1,
            },
            malformed: 0,
        });
        assert_eq!(
            value(
                &r,
                "awaitlab_lost_events_total",
                &[("cause", "ringbuf_full")]
            ),
            Some(6.0)
        );
        assert_eq!(
            value(
                &r,
                "awaitlab_thread_time_seconds_total",
                &[("state", "on_cpu")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&r, "awaitlab_connections_opened_total", &[("role", "db")]),
            Some(10.0)
        );
    }

    #[test]
    fn records_update_the_families_in_seconds() {
        let r = Registry::new();
        let m = ProbeMetrics::new(&r).unwrap();
        let mut labels = LabelSet::new(8);
        let label = labels.intern("GET", "/posts/io_read/".into());
        let rec = crate::probe::aggregate::RequestRecord {
            kind: "request",
            pid: 1,
            tid: 1,
            method: "GET",
            path: "/posts/io_read/".into(),
            status: 503,
            start_ns: 0,
            server_ns: 20_000_000,
            first_byte_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            db_round_trips: 0,
            db_wait_ns: 0,
            db_connects: 0,
            db_connect_ns: 0,
            on_cpu_ns: 0,
            exclusive_thread: true,
            seq: 1,
            ended_by: "close",
            responded: true,
            local_port: 8000,
            remote_port: 1,
        };
        let mut o = m.observer("srv");
        o.record(&Record::Request(rec), Some(label), &labels);
        o.record(
            &Record::DbRoundTrip {
                start_ns: 0,
                dur_ns: 100_000_000,
                attributed: true,
            },
            None,
            &labels,
        );
        let labels = [
            ("target", "srv"),
            ("method", "GET"),
            ("route", "/posts/io_read/"),
            ("status_class", "5xx"),
        ];
        assert_eq!(
            value(&r, "awaitlab_http_server_requests_total", &labels),
            Some(1.0)
        );
        assert_eq!(
            value(&r, "awaitlab_db_round_trips_total", &[("target", "srv")]),
            Some(1.0)
        );
        assert_eq!(
            value(
                &r,
                "awaitlab_db_round_trip_duration_seconds",
                &[("target", "srv")]
            ),
            Some(1.0)
        );
        let text = String::from_utf8(encode(&r)).unwrap();
        // 100 ms falls in the 0.1 bucket (le is inclusive) and not in 0.05.
        assert!(
            text.contains(
                "awaitlab_db_round_trip_duration_seconds_bucket{target=\"srv\",le=\"0.1\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "awaitlab_db_round_trip_duration_seconds_bucket{target=\"srv\",le=\"0.05\"} 0"
            ),
            "{text}"
        );
    }

    #[test]
    fn load_outcomes_and_single_series_labels() {
        use crate::load::record::{ErrorKind, Outcome};
        let r = Registry::new();
        let l = LoadMetrics::new(&r).unwrap();
        l.set_users(7);
        l.observe_response(Duration::from_millis(5), Outcome::Status(200));
        l.observe_response(Duration::from_millis(5), Outcome::Status(302));
        l.observe_response(Duration::from_millis(5), Outcome::Status(500));
        l.observe_response(Duration::from_millis(5), Outcome::Error(ErrorKind::Reset));
        assert_eq!(value(&r, "awaitlab_load_requests_total", &[]), Some(4.0));
        assert_eq!(
            value(&r, "awaitlab_load_failures_total", &[("kind", "http_5xx")]),
            Some(1.0)
        );
        assert_eq!(
            value(&r, "awaitlab_load_failures_total", &[("kind", "reset")]),
            Some(1.0)
        );
        assert_eq!(
            value(&r, "awaitlab_load_failures_total", &[("kind", "http_4xx")]),
            Some(0.0)
        );
        assert_eq!(value(&r, "awaitlab_load_users", &[]), Some(7.0));

        let d = DelayMetrics::new(&r).unwrap();
        d.set(
            Duration::from_millis(100),
            Some(Duration::from_micros(100_400)),
            "netem",
        );
        d.set(Duration::from_millis(200), None, "nfqueue");
        assert_eq!(
            value(
                &r,
                "awaitlab_delay_requested_seconds",
                &[("backend", "netem")]
            ),
            None
        );
        assert_eq!(
            value(
                &r,
                "awaitlab_delay_requested_seconds",
                &[("backend", "nfqueue")]
            ),
            Some(0.2)
        );

        let e = ExperimentMetrics::new(&r).unwrap();
        for delay in [0, 100, 200] {
            e.set_cell("sync", "io_read", delay, 1);
        }
        let text = String::from_utf8(encode(&r)).unwrap();
        assert_eq!(
            text.matches("awaitlab_experiment_cell_info{").count(),
            1,
            "{text}"
        );
        assert!(text.contains("delay_ms=\"200\""));
    }
}

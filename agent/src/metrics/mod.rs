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

mod buckets;
pub mod server;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_common::{Counter as K, COUNTERS};
use prometheus::{
    CounterVec, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::{
    probe::aggregate::{http::LabelSet, CpuTotals, Measured, Observer, Record, Snapshot},
    probe::ProbeStatus,
};

pub use prometheus::Registry as MetricsRegistry;

/// A registry for one command, with what every exposition carries: `awaitlab_build_info` and
/// the agent process's own figures (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// open file descriptors, start time), read from /proc/self at each scrape.
pub fn registry() -> Result<Registry, MetricsError> {
    let r = Registry::new();
    let info = IntGaugeVec::new(
        Opts::new(
            "awaitlab_build_info",
            "The agent's version (1 while it runs).",
        ),
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    r.register(Box::new(info))?;
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(r)
}

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

/// The `http_response_status_code` label of a response: the code, or "" when the probe saw no
/// status line (OpenTelemetry leaves the attribute out then; Prometheus has no absent label).
fn status_code(status: u16) -> String {
    if (100..=599).contains(&status) {
        status.to_string()
    } else {
        String::new()
    }
}

/// OpenTelemetry's `db.system.name` for a database port: the well-known port of each system the
/// probes read, `other_sql` otherwise.
pub(crate) fn db_system(port: u16) -> &'static str {
    match port {
        5432 => "postgresql",
        3306 => "mysql",
        1433 => "microsoft.sql_server",
        _ => "other_sql",
    }
}

/// Label names of the server histogram, after `target` (OpenTelemetry's HTTP server attributes).
const HTTP_SERVER_LABELS: [&str; 4] = [
    "target",
    "http_request_method",
    "http_route",
    "http_response_status_code",
];

/// Loss causes exported by `awaitlab_lost_events_total`, with the kernel counter each follows
/// (`None`: the agent's own count of undecodable records).
const LOST: &[(&str, Option<K>)] = &[
    ("ringbuf_full", Some(K::RingbufFull)),
    ("conn_map_full", Some(K::ConnMapFull)),
    ("thread_map_full", Some(K::ThreadMapFull)),
    ("payload_read_failed", Some(K::PayloadReadFailed)),
    ("unknown_socket", Some(K::UnknownSocket)),
    ("agg_map_full", Some(K::AggMapFull)),
    ("malformed", None),
];

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The probe families, labelled by `target` (one value per watched namespace or container).
#[derive(Clone)]
pub struct ProbeMetrics {
    server: HistogramVec,
    db_rtt: HistogramVec,
    db_connect: HistogramVec,
    conns_opened: IntCounterVec,
    conns_closed: IntCounterVec,
    connect_failures: IntCounterVec,
    thread_seconds: CounterVec,
    serving_seconds: CounterVec,
    lost: IntCounterVec,
    probe_live: IntGaugeVec,
    attached: IntGaugeVec,
    /// The label sets made for each target, so that all its series can go (`expire`).
    known: Arc<Mutex<HashMap<String, TargetSeries>>>,
}

/// What series one target has, and since when it is detached.
#[derive(Default)]
struct TargetSeries {
    /// (method, route, status code) of its server histograms.
    server: HashSet<[String; 3]>,
    db_system: Option<&'static str>,
    programs: Vec<String>,
    detached_at: Option<Instant>,
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
        let hist = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets::latency().to_vec()),
                labels,
            )
        };
        Ok(ProbeMetrics {
            server: reg(r, hist("http_server_request_duration_seconds", "Server time of each request the target served (OpenTelemetry http.server.request.duration): first request byte read to last response byte written. Its _count is the requests served.", &HTTP_SERVER_LABELS)?)?,
            db_rtt: reg(r, hist("db_client_operation_duration_seconds", "Database round trips the target made (OpenTelemetry db.client.operation.duration, one operation per round trip): first send after the last receive to the next receive.", &["target", "db_system_name"])?)?,
            db_connect: reg(r, hist("db_client_connection_create_time_seconds", "Database TCP connects the target made (OpenTelemetry db.client.connection.create_time): SYN_SENT to ESTABLISHED.", &["target", "db_system_name"])?)?,
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
            serving_seconds: reg(r, CounterVec::new(
                Opts::new("awaitlab_serving_thread_time_seconds_total", "The same as awaitlab_thread_time_seconds_total over the threads that served requests only (idle pool and accept threads left out), while they live."),
                &["target", "state"],
            )?)?,
            lost: reg(r, IntCounterVec::new(
                Opts::new("awaitlab_lost_events_total", "Events not measured, by cause (ring buffer full, maps full, payload copy failed, traffic on connections joined mid-way, undecodable records)."),
                &["target", "cause"],
            )?)?,
            probe_live: reg(r, IntGaugeVec::new(Opts::new("awaitlab_probe_live", "1 when the eBPF program is attached, 0 when the kernel could not load it."), &["target", "program"])?)?,
            attached: reg(r, IntGaugeVec::new(Opts::new("awaitlab_target_attached", "1 while the probes are attached to the target; 0 after, until its series expire."), &["target"])?)?,
            known: Arc::default(),
        })
    }

    /// An aggregate observer for one attach to `target`. Make a new one for each attach: it
    /// follows that attach's kernel counters (which start at zero), and adds to the same
    /// Prometheus series, so counters keep rising across a container's restarts.
    /// `db_port` names the database system (`db_system`).
    pub(crate) fn observer(&self, target: &str, db_port: Option<u16>) -> TargetObserver {
        // Series that exist before anything happens, so that rates read 0 rather than nothing.
        for (cause, _) in LOST {
            self.lost.with_label_values(&[target, cause]);
        }
        for role in ["http", "db"] {
            self.conns_opened.with_label_values(&[target, role]);
            self.conns_closed.with_label_values(&[target, role]);
        }
        let system = db_system(db_port.unwrap_or(0));
        self.known_for(target, |k| k.db_system = Some(system));
        TargetObserver {
            target: target.to_string(),
            m: self.clone(),
            db_rtt: self.db_rtt.with_label_values(&[target, system]),
            db_connect: self.db_connect.with_label_values(&[target, system]),
            by_label: Vec::new(),
            last_counters: [0; COUNTERS as usize],
            last_cpu: CpuTotals::default(),
            last_serving: CpuTotals::default(),
            last_malformed: 0,
        }
    }

    fn known_for<R>(&self, target: &str, f: impl FnOnce(&mut TargetSeries) -> R) -> R {
        let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        f(k.entry(target.to_string()).or_default())
    }

    /// Publishes which programs are live and that the target is attached.
    pub(crate) fn set_attached(&self, target: &str, probes: &[ProbeStatus]) {
        for p in probes {
            self.probe_live
                .with_label_values(&[target, p.program.as_str()])
                .set(i64::from(p.live));
        }
        self.attached.with_label_values(&[target]).set(1);
        self.known_for(target, |k| {
            k.programs = probes.iter().map(|p| p.program.clone()).collect();
            k.detached_at = None;
        });
    }

    /// The target's probes are detached. Its counters stay, so that rates across a restart
    /// hold, until [`ProbeMetrics::expire`] removes them.
    pub(crate) fn set_detached(&self, target: &str) {
        self.attached.with_label_values(&[target]).set(0);
        let programs = self.known_for(target, |k| {
            k.detached_at.get_or_insert_with(Instant::now);
            std::mem::take(&mut k.programs)
        });
        for p in programs {
            let _ = self.probe_live.remove_label_values(&[target, &p]);
        }
    }

    /// Removes every series of the targets detached for longer than `grace` (a container that
    /// is gone for good); returns how many targets went. A target attached again within the
    /// grace period keeps its series, and its counters go on from where they were.
    pub(crate) fn expire(&self, grace: Duration) -> Vec<String> {
        let gone: Vec<(String, TargetSeries)> = {
            let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<String> = k
                .iter()
                .filter(|(_, s)| s.detached_at.is_some_and(|t| t.elapsed() >= grace))
                .map(|(t, _)| t.clone())
                .collect();
            old.into_iter()
                .filter_map(|t| k.remove(&t).map(|s| (t, s)))
                .collect()
        };
        for (t, s) in &gone {
            let t = t.as_str();
            for [method, route, code] in &s.server {
                let _ = self.server.remove_label_values(&[t, method, route, code]);
            }
            if let Some(system) = s.db_system {
                let _ = self.db_rtt.remove_label_values(&[t, system]);
                let _ = self.db_connect.remove_label_values(&[t, system]);
            }
            for role in ["http", "db"] {
                let _ = self.conns_opened.remove_label_values(&[t, role]);
                let _ = self.conns_closed.remove_label_values(&[t, role]);
            }
            let _ = self.connect_failures.remove_label_values(&[t]);
            for state in ["on_cpu", "off_cpu"] {
                let _ = self.thread_seconds.remove_label_values(&[t, state]);
                let _ = self.serving_seconds.remove_label_values(&[t, state]);
            }
            for (cause, _) in LOST {
                let _ = self.lost.remove_label_values(&[t, cause]);
            }
            let _ = self.attached.remove_label_values(&[t]);
        }
        gone.into_iter().map(|(t, _)| t).collect()
    }
}

/// Feeds one attach's records and snapshots into [`ProbeMetrics`].
pub(crate) struct TargetObserver {
    target: String,
    m: ProbeMetrics,
    db_rtt: prometheus::Histogram,
    db_connect: prometheus::Histogram,
    /// Server histograms by label id, then status code, resolved once (a label lookup hashes).
    by_label: Vec<Vec<(u16, prometheus::Histogram)>>,
    last_counters: [u64; COUNTERS as usize],
    last_cpu: CpuTotals,
    last_serving: CpuTotals,
    last_malformed: u64,
}

impl TargetObserver {
    fn server_histogram(
        &mut self,
        label: usize,
        status: u16,
        labels: &LabelSet,
    ) -> &prometheus::Histogram {
        if self.by_label.len() <= label {
            self.by_label.resize_with(label + 1, Default::default);
        }
        let by_status = &mut self.by_label[label];
        let i = match by_status.iter().position(|(s, _)| *s == status) {
            Some(i) => i,
            None => {
                let (method, route) = labels.get(label);
                let code = status_code(status);
                let h = self
                    .m
                    .server
                    .with_label_values(&[&self.target, method, route, &code]);
                self.m.known_for(&self.target, |k| {
                    k.server
                        .insert([method.to_string(), route.to_string(), code]);
                });
                by_status.push((status, h));
                by_status.len() - 1
            }
        };
        &by_status[i].1
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
                self.server_histogram(label.unwrap_or(0), r.status, labels)
                    .observe(secs(r.server_ns));
            }
            Record::DbRoundTrip { dur_ns, .. } => {
                self.db_rtt.observe(secs(*dur_ns));
            }
            Record::DbConnect { dur_ns, .. } => self.db_connect.observe(secs(*dur_ns)),
        }
    }

    fn aggregated(&mut self, what: Measured, values: &[(u64, u64)], labels: &LabelSet) {
        let h = match what {
            Measured::Server { label, status } => {
                self.server_histogram(label, status, labels).clone()
            }
            Measured::DbRoundTrip => self.db_rtt.clone(),
            Measured::DbConnect => self.db_connect.clone(),
        };
        // A kernel bucket lies within one of these buckets unless it straddles a boundary;
        // then all its count goes to the side of its midpoint (at most 3.125 % off).
        for &(ns, n) in values {
            for _ in 0..n {
                h.observe(secs(ns));
            }
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
        // A serving thread that exits takes its time out of the total: count what the live
        // ones gained, never a drop.
        let gained = |last: &mut u64, now: u64| {
            let d = now.saturating_sub(*last);
            *last = now;
            d
        };
        let on = gained(&mut self.last_serving.on_ns, s.serving_cpu.on_ns);
        let off = gained(&mut self.last_serving.off_ns, s.serving_cpu.off_ns);
        m.serving_seconds
            .with_label_values(&[t, "on_cpu"])
            .inc_by(secs(on));
        m.serving_seconds
            .with_label_values(&[t, "off_cpu"])
            .inc_by(secs(off));
    }
}

/// The load generator's figures. Cheap to clone; every clone feeds the same series.
///
/// The generator calls [`LoadMetrics::set_users`] when its user count changes and
/// [`LoadMetrics::observe_response`] once per finished request (success or failure).
#[derive(Clone)]
pub struct LoadMetrics {
    users: IntGauge,
    chart: Gauge,
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
            chart: reg(r, Gauge::new("awaitlab_load_chart_successes_per_second", "Locust's report chart value now: requests/s minus failures/s, each the mean of the per-second counts over the 10 s that end 2 s before the last completion. Its maximum over a cell is the study's Max sRPS.")?)?,
            failures,
            latency: reg(r, prometheus::Histogram::with_opts(
                HistogramOpts::new("http_client_request_duration_seconds", "Client latency of each request the load generator finished, failed or not (OpenTelemetry http.client.request.duration): connect (if any) to the end of the response or the error. Its _count is the requests finished.")
                    .buckets(buckets::latency().to_vec()),
            )?)?,
        })
    }

    /// The number of users running now.
    pub fn set_users(&self, n: u64) {
        self.users.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Locust's chart value now (requests/s - failures/s, computed by `load::chart`).
    pub fn set_chart_rate(&self, v: f64) {
        self.chart.set(v);
    }

    /// One finished request: counts it, its failure kind if it failed, and its latency.
    pub fn observe_response(&self, latency: Duration, outcome: crate::load::record::Outcome) {
        if let Some(kind) = outcome.failure_class() {
            self.failures.with_label_values(&[kind]).inc();
        }
        self.latency.observe(latency.as_secs_f64());
    }
}

/// The injected delay on each target: what was asked for and what the back end measured it
/// achieves. One back end per target keeps a series (the latest one set).
#[derive(Clone)]
pub struct DelayMetrics {
    requested: GaugeVec,
    achieved: GaugeVec,
    backends: Arc<Mutex<HashMap<String, String>>>,
}

impl DelayMetrics {
    pub fn new(r: &Registry) -> Result<DelayMetrics, MetricsError> {
        let gauge =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["target", "backend"]);
        Ok(DelayMetrics {
            requested: reg(
                r,
                gauge(
                    "awaitlab_delay_requested_seconds",
                    "Delay requested on the target's outgoing packets.",
                )?,
            )?,
            achieved: reg(
                r,
                gauge(
                    "awaitlab_delay_achieved_seconds",
                    "Delay the back end measured on delayed packets (median), when it measures it.",
                )?,
            )?,
            backends: Arc::default(),
        })
    }

    /// Sets the delay in force on `target`. `backend` names the mechanism (`netem`,
    /// `nfqueue`); `achieved` is None when the back end cannot measure it.
    pub fn set(
        &self,
        target: &str,
        requested: Duration,
        achieved: Option<Duration>,
        backend: &str,
    ) {
        let previous = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_string(), backend.to_string());
        if let Some(p) = previous.filter(|p| p != backend) {
            let _ = self.requested.remove_label_values(&[target, &p]);
            let _ = self.achieved.remove_label_values(&[target, &p]);
        }
        self.requested
            .with_label_values(&[target, backend])
            .set(requested.as_secs_f64());
        match achieved {
            Some(a) => self
                .achieved
                .with_label_values(&[target, backend])
                .set(a.as_secs_f64()),
            None => {
                let _ = self.achieved.remove_label_values(&[target, backend]);
            }
        }
    }

    /// No delay in force on `target`: both gauges read 0 (a panel shows "0 ms", not a gap).
    pub fn clear(&self, target: &str, backend: &str) {
        self.set(target, Duration::ZERO, Some(Duration::ZERO), backend);
    }

    /// Removes `target`'s series (a container gone for good).
    pub fn remove(&self, target: &str) {
        let backend = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target);
        if let Some(b) = backend {
            let _ = self.requested.remove_label_values(&[target, &b]);
            let _ = self.achieved.remove_label_values(&[target, &b]);
        }
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
    fn status_codes_and_db_systems() {
        assert_eq!(status_code(200), "200");
        assert_eq!(status_code(503), "503");
        assert_eq!(status_code(0), "");
        assert_eq!(status_code(999), "");
        assert_eq!(db_system(5432), "postgresql");
        assert_eq!(db_system(15432), "other_sql");
    }

    #[test]
    fn kernel_counters_are_followed_across_snapshots_and_reattaches() {
        let r = Registry::new();
        let m = ProbeMetrics::new(&r).unwrap();
        let mut c = [0u64; COUNTERS as usize];
        let mut o = m.observer("t", None);
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
            serving_cpu: cpu,
            malformed: 1,
        });
        c[K::RingbufFull as usize] = 4;
        o.snapshot(&Snapshot {
            counters: &c,
            cpu,
            serving_cpu: cpu,
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
        let serving = [("state", "off_cpu")];
        assert_eq!(
            value(&r, "awaitlab_serving_thread_time_seconds_total", &serving),
            Some(0.5)
        );
        // A serving thread exits: its time leaves the total, and nothing is taken back.
        o.snapshot(&Snapshot {
            counters: &c,
            cpu,
            serving_cpu: CpuTotals {
                on_ns: 1_000_000_000,
                off_ns: 200_000_000,
                threads: 0,
            },
            malformed: 1,
        });
        o.snapshot(&Snapshot {
            counters: &c,
            cpu,
            serving_cpu: CpuTotals {
                on_ns: 1_000_000_000,
                off_ns: 300_000_000,
                threads: 0,
            },
            malformed: 1,
        });
        let v = value(&r, "awaitlab_serving_thread_time_seconds_total", &serving).unwrap();
        assert!((v - 0.6).abs() < 1e-9, "{v}");
        // A restart: a new attach whose kernel counters start again at zero adds on top.
        let mut o2 = m.observer("t", None);
        c[K::RingbufFull as usize] = 2;
        o2.snapshot(&Snapshot {
            counters: &c,
            cpu: CpuTotals {
                on_ns: 500_000_000,
                off_ns: 0,
                threads: 1,
            },
            serving_cpu: CpuTotals::default(),
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
        let label = labels.intern("GET", "/posts/io_read/");
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
        let mut o = m.observer("srv", Some(5432));
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
            ("http_request_method", "GET"),
            ("http_route", "/posts/io_read/"),
            ("http_response_status_code", "503"),
        ];
        assert_eq!(
            value(&r, "http_server_request_duration_seconds", &labels),
            Some(1.0)
        );
        let db = [("target", "srv"), ("db_system_name", "postgresql")];
        assert_eq!(
            value(&r, "db_client_operation_duration_seconds", &db),
            Some(1.0)
        );
        let text = String::from_utf8(encode(&r)).unwrap();
        // 100 ms falls in the 0.1 bucket (le is inclusive) and not in the one below.
        let bucket = |le: &str| {
            format!(
                "db_client_operation_duration_seconds_bucket{{db_system_name=\"postgresql\",target=\"srv\",le=\"{le}\"}}"
            )
        };
        assert!(text.contains(&format!("{} 1", bucket("0.1"))), "{text}");
        let below = buckets::latency().iter().rev().find(|&&b| b < 0.1).unwrap();
        assert!(
            text.contains(&format!("{} 0", bucket(&below.to_string()))),
            "{text}"
        );
        // The process's own figures and the build are in every registry made by `registry()`.
        let full = registry().unwrap();
        let text = String::from_utf8(encode(&full)).unwrap();
        assert!(text.contains("awaitlab_build_info{version=\""), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }

    /// A target's series stay while it is detached within the grace period (a restart keeps
    /// its counters) and all go after it; other targets keep theirs.
    #[test]
    fn a_detached_targets_series_expire_after_the_grace_period() {
        let r = Registry::new();
        let m = ProbeMetrics::new(&r).unwrap();
        let mut labels = LabelSet::new(8);
        let label = labels.intern("GET", "/a");
        let req = |status| {
            Record::Request(crate::probe::aggregate::RequestRecord {
                status,
                server_ns: 1_000_000,
                ..crate::probe::aggregate::RequestRecord::default()
            })
        };
        for t in ["gone", "kept"] {
            let mut o = m.observer(t, Some(5432));
            o.record(&req(200), Some(label), &labels);
            o.record(&req(500), Some(label), &labels);
            o.record(
                &Record::DbConnect {
                    dur_ns: 1000,
                    attributed: false,
                },
                None,
                &labels,
            );
            m.set_attached(t, &[]);
        }
        let series = |t: &str| {
            let text = String::from_utf8(encode(&r)).unwrap();
            text.lines()
                .filter(|l| l.contains(&format!("target=\"{t}\"")))
                .count()
        };
        let before = series("gone");
        assert!(
            before > 1000,
            "{before}: two server histograms and two db ones"
        );
        m.set_detached("gone");
        assert!(m.expire(Duration::from_secs(3600)).is_empty());
        assert_eq!(series("gone"), before);
        assert_eq!(m.expire(Duration::ZERO), ["gone"]);
        assert_eq!(
            series("gone"),
            0,
            "{}",
            String::from_utf8(encode(&r)).unwrap()
        );
        assert_eq!(series("kept"), before);
        // Attached again later: it starts afresh.
        let mut o = m.observer("gone", Some(5432));
        o.record(&req(200), Some(label), &labels);
        assert!(series("gone") > 0);
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
        assert_eq!(
            value(&r, "http_client_request_duration_seconds", &[]),
            Some(4.0)
        );
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
            "server",
            Duration::from_millis(100),
            Some(Duration::from_micros(100_400)),
            "netem",
        );
        d.set("server", Duration::from_millis(200), None, "nfqueue");
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
        // A target gone for good takes its delay series with it.
        d.remove("server");
        let text = String::from_utf8(encode(&r)).unwrap();
        assert!(!text.contains("awaitlab_delay_"), "{text}");

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

//! The load generator: the study's closed-loop users (ramp, hold, stages, optional wait time)
//! or an open model (a request rate, latency from each request's due time), one HTTP/1
//! connection per user, exact latency histograms, the per-second series, and the study's
//! Max sRPS and Total successes.
//!
//! `run` is the library entry point for the CLI and the experiment runner: it runs on the
//! caller's tokio runtime (multi-thread, so that users spread over the cores), reports progress
//! once a second through a callback and stops early on a cancellation token. It sends traffic
//! only to the one address the URL resolves to, and leaves no task or connection behind when it
//! returns.
//!
//! Files: `schedule` (users/rate over time), `template` (the request), `client` (one user's
//! connection), `record` (per-thread shards), `metrics` (the study's figures), `report` (the
//! JSON summary), `locust` (CSV files).

pub mod chart;
pub mod client;
pub mod locust;
pub mod record;
pub mod report;
pub mod schedule;
mod spec;
pub mod template;
mod users;

pub use spec::*;
use users::*;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper::Uri;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use record::{ErrorKind, Outcome};
pub use report::{LoadReport, Percentiles, SeriesPoint, REPORT_VERSION};
pub use schedule::{ClosedSchedule, OpenSchedule, Stage};
pub use template::{BodySpec, RequestSpec, Route};

use record::Recorder;
use report::SeriesBuilder;
use template::{Rng, Template};

/// Once a second, for the progress line and the experiment runner.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub elapsed: Duration,
    pub planned: Duration,
    pub users: u32,
    /// Completed in the last second.
    pub requests_last_s: u64,
    pub failures_last_s: u64,
    pub p50_ms_last_s: Option<f64>,
    pub requests: u64,
    pub failures: u64,
}

/// Runs the load described by `spec` on the current tokio runtime. `observer` is called once a
/// second; `cancel` ends the run early (the report then says `stopped_early`).
pub async fn run(
    spec: &LoadSpec,
    observer: &mut (dyn FnMut(&Progress) + Send),
    cancel: CancellationToken,
) -> Result<LoadReport, LoadError> {
    run_with_metrics(spec, observer, cancel, None).await
}

/// [`run`], also feeding `metrics` (Prometheus) with every request and the user count.
pub(crate) async fn run_with_metrics(
    spec: &LoadSpec,
    observer: &mut (dyn FnMut(&Progress) + Send),
    cancel: CancellationToken,
    metrics: Option<crate::metrics::LoadMetrics>,
) -> Result<LoadReport, LoadError> {
    let users_gauge = metrics.clone();
    if let Some(m) = &users_gauge {
        // A new run's chart starts at 0, not at the previous run's last value.
        m.set_chart_rate(0.0);
    }
    let observer = &mut |p: &Progress| {
        if let Some(m) = &users_gauge {
            m.set_users(u64::from(p.users));
        }
        observer(p)
    };
    let (target, template) = validate(spec)?;
    let addr = resolve(&target).await?;
    let planned = spec.planned();
    let (wait, open, stages, model_name) = match &spec.model {
        Model::Closed { schedule, wait } => (*wait, None, schedule.stages.clone(), "closed"),
        Model::Open { schedule, .. } => (
            Wait::None,
            Some(schedule.clone()),
            schedule.stages.clone(),
            "open",
        ),
    };
    let mut tasks = Lanes::new(spec.threads())?;
    let start = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let started_unix_ms = wall.as_millis() as u64;
    // Seconds are counted from the start of the unix second the run started in, not from the
    // start: Locust counts completions per `int(time.time())` and averages its chart over those
    // seconds, so run-relative seconds would shift every average by the start's fraction of a
    // second and Max sRPS would not be Locust's.
    let into_second = Duration::from_nanos(u64::from(wall.subsec_nanos()));
    let origin = start.checked_sub(into_second).unwrap_or(start);
    let sh = Arc::new(Shared {
        addr,
        template,
        rec: Recorder::new(origin).with_metrics(metrics),
        timeout: spec.timeout,
        wait,
        target_users: AtomicU32::new(0),
        slots: match &spec.model {
            Model::Closed { schedule, .. } => (0..schedule.max_users())
                .map(|_| AtomicU32::new(0))
                .collect(),
            Model::Open { .. } => Vec::new(),
        },
        active: AtomicU32::new(0),
        aborted: AtomicU64::new(0),
        next_ticket: AtomicU64::new(0),
        gate: tokio::sync::Mutex::new(()),
        waiting: AtomicU32::new(0),
        workers: AtomicU32::new(0),
        starved: AtomicBool::new(false),
        max_in_flight: match &spec.model {
            Model::Open { max_in_flight, .. } => *max_in_flight,
            Model::Closed { .. } => 0,
        },
        lanes: tasks.handles.clone(),
        open,
        start,
        planned_s: planned.as_secs_f64(),
        seed: started_unix_ms ^ u64::from(std::process::id()) << 32,
    });

    let mut spawned: u32 = 0;
    let mut max_users: u32 = 0;
    if let Model::Open { .. } = &spec.model {
        sh.workers.store(1, Ordering::SeqCst);
        spawn_open_worker(&sh, 0);
    }
    let end = start + planned;
    let mut series = SeriesBuilder::default();
    let mut next_second: u64 = 1;
    let (mut requests, mut failures) = (0u64, 0u64);
    let stopped_early = AtomicBool::new(false);
    loop {
        let now = Instant::now();
        let t = now.saturating_duration_since(start).as_secs_f64();
        if let Model::Closed { schedule, .. } = &spec.model {
            let want = schedule.users_at(t).min(sh.slots.len() as u32);
            sh.target_users.store(want, Ordering::Relaxed);
            while spawned < want {
                let generation = sh.slots[spawned as usize].fetch_add(1, Ordering::Relaxed) + 1;
                tasks.spawn(closed_user(sh.clone(), spawned, generation));
                spawned += 1;
            }
            // Users above the target leave after their request; their indices are reused.
            spawned = spawned.min(want);
            max_users = max_users.max(want);
        }
        // Collect each second once it is over (plus a little slack for records being written).
        let collect_at = origin + Duration::from_secs(next_second) + Duration::from_millis(20);
        if now >= collect_at {
            let users = sh.active.load(Ordering::Relaxed);
            let secs = sh.rec.take_seconds(next_second);
            // Stragglers of earlier seconds first (a shard that stalled past the collector),
            // then the second that just ended.
            for (s, sd) in &secs {
                series.push(*s, sd, users);
                requests += sd.requests;
                failures += sd.failures;
            }
            let empty = record::Second::default();
            let last = secs.get(&(next_second - 1)).unwrap_or(&empty);
            if !secs.contains_key(&(next_second - 1)) {
                series.push(next_second - 1, last, users);
            }
            if let Some(m) = &users_gauge {
                m.set_chart_rate(series.current_successes_per_s(next_second as f64));
            }
            let last = (
                last.requests,
                last.failures,
                (last.requests > 0).then(|| last.latency.value_at_quantile(0.5) as f64 / 1e6),
            );
            observer(&Progress {
                elapsed: now.saturating_duration_since(start),
                planned,
                users,
                requests_last_s: last.0,
                failures_last_s: last.1,
                p50_ms_last_s: last.2,
                requests,
                failures,
            });
            next_second += 1;
            continue;
        }
        if now >= end {
            break;
        }
        let mut wake = collect_at.min(end);
        if let Model::Closed { schedule, .. } = &spec.model {
            if let Some(n) = schedule.next_change_after(t) {
                wake = wake.min(start + Duration::from_secs_f64(n));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                stopped_early.store(true, Ordering::Relaxed);
                break;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    let ended = Instant::now();
    // The run is over: requests still in flight are cut off (as Locust stops its users).
    let users_at_end = sh.active.load(Ordering::Relaxed);
    if sh.open.is_some() {
        max_users = sh.workers.load(Ordering::SeqCst);
    }
    tasks.shutdown().await;
    let actual = ended.saturating_duration_since(start);
    // Records of the final (partial) second.
    let rest = sh.rec.take_seconds(u64::MAX);
    for (s, sd) in &rest {
        series.push(*s, sd, users_at_end);
    }
    let totals = sh.rec.totals();
    let mut points = series.points;
    let tallies: Vec<chart::Tally> = points.iter().map(SeriesPoint::tally).collect();
    for (i, p) in points.iter_mut().enumerate() {
        (p.current_rps, p.current_fail_per_sec) = chart::current_rates(&tallies, i as f64 + 1.0);
    }
    let per_second: Vec<(u64, u64)> = points.iter().map(|p| (p.requests, p.failures)).collect();
    let mut report = LoadReport {
        version: REPORT_VERSION,
        url: spec.url.clone(),
        method: sh.template.method().to_string(),
        name: sh.template.path().to_owned(),
        model: model_name.into(),
        stages,
        started_unix_ms,
        planned_duration_s: planned.as_secs_f64(),
        actual_duration_s: actual.as_secs_f64(),
        stopped_early: stopped_early.load(Ordering::Relaxed),
        requests: totals.requests,
        successes: totals.requests - totals.failures,
        failures: totals.failures,
        total_successes: chart::total_successes(totals.requests, totals.failures),
        // Set below from the report's own chart.
        max_srps: 0.0,
        max_srps_5s_window: chart::max_srps_5s_window(&per_second, actual.as_secs_f64()),
        failures_by_kind: report::failures_by_kind(&totals),
        status_counts: totals
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        bytes_received: totals.bytes,
        latency_ms: Percentiles::of(&totals.latency, Some(totals.latency_sum_ns)),
        success_latency_ms: Percentiles::of(&totals.latency_ok, None),
        connect_ms: Percentiles::of(&totals.connect, None),
        late_starts: totals.late,
        start_lag_ms: Percentiles::of(&totals.start_lag, None),
        in_flight_at_end: sh.aborted.load(Ordering::Relaxed),
        max_users,
        threads: spec.threads(),
        series: points,
    };
    report.max_srps = chart::max_srps(&report.chart());
    Ok(report)
}

impl LoadReport {
    /// Writes `DIR/PREFIX_stats.csv`, `..._stats_history.csv`, `..._failures.csv`.
    pub(crate) fn write_locust_csv(
        &self,
        dir: &Path,
        prefix: &str,
    ) -> std::io::Result<Vec<PathBuf>> {
        locust::write(self, dir, prefix)
    }

    /// The points of Locust 2.13's report chart for this run (`chart::chart`), from the series:
    /// `max_srps` is the largest. Up to the planned end, which the run overshoots by a moment:
    /// Locust's run-time timer quits before its chart's point at that end.
    pub fn chart(&self) -> Vec<f64> {
        let tallies: Vec<chart::Tally> = self.series.iter().map(SeriesPoint::tally).collect();
        let into_second = (self.started_unix_ms % 1000) as f64 / 1000.0;
        chart::chart(
            &tallies,
            into_second,
            self.actual_duration_s.min(self.planned_duration_s),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the caller asked for is a usage error (exit 64); what the machine refused is not.
    #[test]
    fn usage_errors_are_the_callers_only() {
        let io = || std::io::Error::other("no threads left");
        assert!(LoadError::Invalid("x".into()).is_usage());
        assert!(LoadError::Scheme("ftp".into()).is_usage());
        assert!(!LoadError::Thread {
            index: 0,
            source: io()
        }
        .is_usage());
        assert!(!LoadError::Resolve {
            host: "h".into(),
            source: io()
        }
        .is_usage());
        assert!(!LoadError::NoAddress { host: "h".into() }.is_usage());
    }

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8000/posts/cpu/?a=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path_and_query.as_str()),
            ("127.0.0.1", 8000, "/posts/cpu/?a=1")
        );
        assert_eq!(
            parse_url("http://example.test").unwrap().path_and_query,
            "/"
        );
        assert_eq!(parse_url("http://example.test").unwrap().port, 80);
        assert!(matches!(parse_url("https://x/"), Err(LoadError::Scheme(_))));
        assert!(matches!(parse_url("ftp://x/"), Err(LoadError::Scheme(_))));
        for bad in [
            "",
            "x",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://a b/",
            "127.0.0.1:80",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            join_url("http://h:1", "/posts/cpu/"),
            "http://h:1/posts/cpu/"
        );
        assert_eq!(
            join_url("http://h:1/x/y", "/posts/cpu/"),
            "http://h:1/posts/cpu/"
        );
    }

    #[test]
    fn waits() {
        assert_eq!(Wait::parse("1s").unwrap(), Wait::Constant { seconds: 1.0 });
        assert_eq!(
            Wait::parse("0.5-2").unwrap(),
            Wait::Uniform {
                min_s: 0.5,
                max_s: 2.0
            }
        );
        assert!(Wait::parse("3-1").is_err());
        assert!(Wait::parse("x").is_err());
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let d = Wait::Uniform {
                min_s: 0.5,
                max_s: 2.0,
            }
            .sample(&mut rng)
            .unwrap()
            .as_secs_f64();
            assert!((0.5..2.0).contains(&d));
        }
    }
}

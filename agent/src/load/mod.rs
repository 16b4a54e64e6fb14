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

pub mod client;
pub mod locust;
pub mod metrics;
pub mod record;
pub mod report;
pub mod schedule;
pub mod template;

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
pub use report::{LoadReport, Quantiles, SeriesPoint, REPORT_VERSION};
pub use schedule::{ClosedSchedule, OpenSchedule, Stage};
pub use template::{BodySpec, RequestSpec, Route};

use record::Recorder;
use report::SeriesBuilder;
use template::{Rng, Template};

/// Think time between a user's requests (closed model).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Wait {
    /// Send the next request as soon as the previous one ends (the study).
    #[default]
    None,
    Constant {
        seconds: f64,
    },
    Uniform {
        min_s: f64,
        max_s: f64,
    },
}

impl Wait {
    /// Parses `2`, `500ms`, `1s-3s` or `0.5-2` (seconds).
    pub fn parse(s: &str) -> Result<Wait, schedule::ScheduleError> {
        let bad = || {
            schedule::ScheduleError::Invalid(format!(
                "malformed wait {s:?}: expected e.g. 1s or 0.5s-2s"
            ))
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let a = schedule::parse_duration(a)
                    .map_err(|_| bad())?
                    .as_secs_f64();
                let b = schedule::parse_duration(b)
                    .map_err(|_| bad())?
                    .as_secs_f64();
                if a > b {
                    return Err(bad());
                }
                Ok(Wait::Uniform { min_s: a, max_s: b })
            }
            None => Ok(Wait::Constant {
                seconds: schedule::parse_duration(s)
                    .map_err(|_| bad())?
                    .as_secs_f64(),
            }),
        }
    }

    fn sample(self, rng: &mut Rng) -> Option<Duration> {
        let s = match self {
            Wait::None => return None,
            Wait::Constant { seconds } => seconds,
            Wait::Uniform { min_s, max_s } => min_s + (max_s - min_s) * rng.unit(),
        };
        (s > 0.0).then(|| Duration::from_secs_f64(s))
    }
}

/// Closed or open model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Model {
    Closed {
        schedule: ClosedSchedule,
        wait: Wait,
    },
    /// `max_in_flight` connections (workers) serve the arrivals; an arrival that finds none
    /// free starts late and is counted in `late_starts`.
    Open {
        schedule: OpenSchedule,
        max_in_flight: u32,
    },
}

/// Everything a run needs; build it in code or from the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// `http://host[:port]/path[?query]`.
    pub url: String,
    pub request: RequestSpec,
    pub model: Model,
    /// Per-request limit (connect included); none by default, as in the study.
    pub timeout: Option<Duration>,
    /// Reuse connections the server keeps open (default); false sends `Connection: close`.
    pub keep_alive: bool,
}

impl LoadSpec {
    /// The study's run on `route` of the server at `base` (e.g. `http://127.0.0.1:8000`).
    pub fn study(base: &str, route: Route) -> LoadSpec {
        LoadSpec {
            url: join_url(base, route.path()),
            request: route.request(),
            model: Model::Closed {
                schedule: ClosedSchedule::study(),
                wait: Wait::None,
            },
            timeout: None,
            keep_alive: true,
        }
    }

    pub fn planned(&self) -> Duration {
        match &self.model {
            Model::Closed { schedule, .. } => schedule.duration(),
            Model::Open { schedule, .. } => schedule.duration(),
        }
    }
}

/// `base` with its path replaced by `path`.
pub fn join_url(base: &str, path: &str) -> String {
    let b = base.trim_end_matches('/');
    match b.find("://") {
        Some(i) => match b[i + 3..].find('/') {
            Some(j) => format!("{}{path}", &b[..i + 3 + j]),
            None => format!("{b}{path}"),
        },
        None => format!("{b}{path}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("unsupported scheme {0:?} (only http:// is supported)")]
    Scheme(String),
    #[error(transparent)]
    Schedule(#[from] schedule::ScheduleError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("starting load thread {index}: {source}")]
    Thread {
        index: usize,
        source: std::io::Error,
    },
}

impl LoadError {
    /// Errors in what the caller asked for (exit 64), as opposed to the environment.
    pub fn is_usage(&self) -> bool {
        match self {
            LoadError::Url { .. }
            | LoadError::Scheme(_)
            | LoadError::Schedule(_)
            | LoadError::Template(_)
            | LoadError::Invalid(_) => true,
            LoadError::Resolve { .. } | LoadError::NoAddress { .. } | LoadError::Thread { .. } => {
                false
            }
        }
    }
}

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

/// The parsed target.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Host header value.
    pub authority: String,
    pub path_and_query: String,
}

/// Checks the URL (scheme http, a host, a port that fits).
pub fn parse_url(url: &str) -> Result<Target, LoadError> {
    let bad = |why: &str| LoadError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(LoadError::Scheme(other.to_owned())),
        None => return Err(bad("expected http://HOST[:PORT]/PATH")),
    }
    let auth = uri.authority().ok_or_else(|| bad("no host"))?;
    if auth.as_str().contains('@') {
        return Err(bad("user info is not supported"));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // `Authority` accepts any digits as a port; only 1..=65535 can be connected to.
    let port = match auth.as_str().rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().map_err(|_| bad("port out of range"))?
        }
        _ => 80,
    };
    if port == 0 {
        return Err(bad("port 0"));
    }
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let pq = if pq.is_empty() { "/" } else { pq };
    Ok(Target {
        host,
        port,
        authority: auth.as_str().to_owned(),
        path_and_query: pq.to_owned(),
    })
}

/// Checks everything that does not need the network.
pub fn validate(spec: &LoadSpec) -> Result<(Target, Template), LoadError> {
    let target = parse_url(&spec.url)?;
    let template = Template::new(&spec.request, &target.path_and_query, &target.authority)?;
    match &spec.model {
        Model::Closed { schedule, wait } => {
            ClosedSchedule::new(schedule.stages.clone())?;
            match *wait {
                Wait::Constant { seconds } if !(seconds.is_finite() && seconds >= 0.0) => {
                    return Err(LoadError::Invalid("wait must be >= 0".into()))
                }
                Wait::Uniform { min_s, max_s }
                    if !(min_s.is_finite()
                        && max_s.is_finite()
                        && 0.0 <= min_s
                        && min_s <= max_s) =>
                {
                    return Err(LoadError::Invalid(
                        "wait range must be 0 <= MIN <= MAX".into(),
                    ))
                }
                _ => {}
            }
        }
        Model::Open {
            schedule,
            max_in_flight,
        } => {
            OpenSchedule::new(schedule.stages.clone())?;
            if *max_in_flight == 0 {
                return Err(LoadError::Invalid(
                    "max in flight must be greater than 0".into(),
                ));
            }
        }
    }
    if let Some(t) = spec.timeout {
        if t.is_zero() {
            return Err(LoadError::Invalid("timeout must be greater than 0".into()));
        }
    }
    Ok((target, template))
}

/// Resolves the target's host to the one address every user connects to (IPv4 first).
pub async fn resolve(target: &Target) -> Result<SocketAddr, LoadError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| LoadError::Resolve {
            host: target.host.clone(),
            source,
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| LoadError::NoAddress {
            host: target.host.clone(),
        })
}

/// What every user shares.
struct Shared {
    addr: SocketAddr,
    template: Template,
    rec: Recorder,
    timeout: Option<Duration>,
    keep_alive: bool,
    wait: Wait,
    /// Closed model: users with an index at or above this stop after their current request.
    target_users: AtomicU32,
    /// Closed model: the generation of the user holding each index. When the target falls and
    /// rises again, a new user takes over the index and the old one, should it still be
    /// finishing a request, leaves instead of continuing beside it.
    slots: Vec<AtomicU32>,
    /// Users running (closed) or requests in flight (open).
    active: AtomicU32,
    /// Requests cut off by the end of the run.
    aborted: AtomicU64,
    /// Open model: next arrival to serve.
    next_ticket: AtomicU64,
    /// Open model: the free worker holding the gate is the one that takes the next arrival
    /// (when it is due); the other free workers queue behind it.
    gate: tokio::sync::Mutex<()>,
    /// Open model: free workers queued at the gate.
    waiting: AtomicU32,
    /// Open model: workers started so far (at most `max_in_flight`).
    workers: AtomicU32,
    /// Open model: the last arrival left no free worker queued and none could be started, so
    /// the next one waits for a busy worker.
    starved: AtomicBool,
    max_in_flight: u32,
    /// The user threads' runtimes (workers start more workers on them).
    lanes: Vec<tokio::runtime::Handle>,
    open: Option<OpenSchedule>,
    start: Instant,
    planned_s: f64,
    seed: u64,
}

/// Counts a request as in flight until it is recorded; counts it as aborted if its task is
/// cancelled before that (the end of the run drops the future mid-request).
struct InFlight<'a> {
    sh: &'a Shared,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.sh.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One request of a user: build, send (with the optional timeout), record.
async fn one_request(
    sh: &Shared,
    conn: &mut client::UserConn,
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    started: Instant,
) {
    let mut guard = InFlight { sh, done: false };
    let req = sh.template.build(rng, buf);
    let ex =
        client::with_timeout(sh.timeout, conn.send(sh.addr, sh.keep_alive, req, &sh.rec)).await;
    let ex = ex.unwrap_or_else(|| {
        conn.reset();
        client::Exchange {
            outcome: Outcome::Error(ErrorKind::Timeout),
            bytes: 0,
        }
    });
    let done = Instant::now();
    sh.rec.request(
        done,
        done.saturating_duration_since(started),
        ex.outcome,
        ex.bytes,
    );
    guard.done = true;
}

async fn closed_user(sh: Arc<Shared>, index: u32, generation: u32) {
    sh.active.fetch_add(1, Ordering::Relaxed);
    struct Leave<'a>(&'a AtomicU32);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _leave = Leave(&sh.active);
    let mut rng = Rng::new(
        sh.seed
            .wrapping_add(u64::from(index).wrapping_mul(0x2545_F491_4F6C_DD1D)),
    );
    let mut conn = client::UserConn::default();
    let mut buf = Vec::new();
    while index < sh.target_users.load(Ordering::Relaxed)
        && sh.slots[index as usize].load(Ordering::Relaxed) == generation
    {
        one_request(&sh, &mut conn, &mut rng, &mut buf, Instant::now()).await;
        if let Some(w) = sh.wait.sample(&mut rng) {
            tokio::time::sleep(w).await;
        }
    }
}

/// Starts open-model worker `index` on the next user thread.
fn spawn_open_worker(sh: &Arc<Shared>, index: u32) {
    let lane = &sh.lanes[index as usize % sh.lanes.len()];
    // Not tracked by `Lanes`: the end of the run drops these with their thread's runtime.
    drop(lane.spawn(open_worker(sh.clone(), index)));
}

/// One connection serving arrivals. Workers start on demand: when a worker takes an arrival
/// and no other free worker is queued for the next one, it starts one more (up to
/// `max_in_flight`). So there are about as many workers, and connections, as requests in
/// flight, and each connection is reused; an arrival that finds every worker busy and the
/// limit reached starts late.
async fn open_worker(sh: Arc<Shared>, index: u32) {
    let schedule = sh.open.as_ref().expect("open model");
    let mut rng = Rng::new(
        sh.seed
            .wrapping_add(u64::from(index).wrapping_mul(0x2545_F491_4F6C_DD1D)),
    );
    let mut conn = client::UserConn::default();
    let mut buf = Vec::new();
    loop {
        sh.waiting.fetch_add(1, Ordering::SeqCst);
        let gate = sh.gate.lock().await;
        sh.waiting.fetch_sub(1, Ordering::SeqCst);
        let i = sh.next_ticket.fetch_add(1, Ordering::Relaxed);
        let Some(t) = schedule.arrival(i) else { break };
        if t >= sh.planned_s {
            break;
        }
        let due = sh.start + Duration::from_secs_f64(t);
        let now = Instant::now();
        // Late: no worker was free for it and it is past its due time. (Being a timer tick
        // past due with a worker ready is not late; the latency counts that lag either way.)
        let late = sh.starved.swap(false, Ordering::SeqCst) && now > due;
        if now < due {
            tokio::time::sleep_until(due.into()).await;
        }
        drop(gate);
        if sh.waiting.load(Ordering::SeqCst) == 0 {
            let n = sh.workers.fetch_add(1, Ordering::SeqCst);
            if n < sh.max_in_flight {
                spawn_open_worker(&sh, n);
            } else {
                sh.workers.fetch_sub(1, Ordering::SeqCst);
                sh.starved.store(true, Ordering::SeqCst);
            }
        }
        sh.active.fetch_add(1, Ordering::Relaxed);
        sh.rec
            .start_lag(Instant::now().saturating_duration_since(due), late);
        // Latency from the due time, not from when the request could start: no coordinated
        // omission.
        one_request(&sh, &mut conn, &mut rng, &mut buf, due).await;
        sh.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The threads that run the users: one current-thread runtime per core, users dealt round-robin.
/// A user's request, its connection and its recording then never leave one thread (no work
/// stealing, no cross-thread wakeups), as in wrk's design; the caller's runtime only runs the
/// schedule and the collector.
struct Lanes {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next: usize,
}

impl Lanes {
    fn new() -> Result<Lanes, LoadError> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut lanes = Lanes {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
            tasks: Vec::new(),
            next: 0,
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| LoadError::Thread { index: i, source })?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            lanes.handles.push(rt.handle().clone());
            let th = std::thread::Builder::new()
                .name(format!("awl-load-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                    });
                })
                .map_err(|source| LoadError::Thread { index: i, source })?;
            lanes.stops.push(tx);
            lanes.threads.push(th);
        }
        Ok(lanes)
    }

    fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = &self.handles[self.next % self.handles.len()];
        self.next += 1;
        self.tasks.push(h.spawn(f));
    }

    /// Cuts every user off, waits until each has dropped its connection, stops the threads.
    async fn shutdown(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let mut panic = None;
        for t in self.tasks.drain(..) {
            if let Err(e) = t.await {
                if e.is_panic() && panic.is_none() {
                    panic = Some(e.into_panic());
                }
            }
        }
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        // A user task that panicked is a bug: surface it rather than report a short count.
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Lanes {
    /// Reached only when `run` is dropped mid-way (its caller gave up): stop everything.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
    }
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
pub async fn run_with_metrics(
    spec: &LoadSpec,
    observer: &mut (dyn FnMut(&Progress) + Send),
    cancel: CancellationToken,
    metrics: Option<crate::metrics::LoadMetrics>,
) -> Result<LoadReport, LoadError> {
    let users_gauge = metrics.clone();
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
    let mut tasks = Lanes::new()?;
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
        keep_alive: spec.keep_alive,
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
    let tallies: Vec<metrics::Tally> = points.iter().map(SeriesPoint::tally).collect();
    for (i, p) in points.iter_mut().enumerate() {
        (p.current_rps, p.current_fail_per_sec) = metrics::current_rates(&tallies, i as f64 + 1.0);
    }
    let per_second: Vec<(u64, u64)> = points.iter().map(|p| (p.requests, p.failures)).collect();
    let report = LoadReport {
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
        total_successes: metrics::total_successes(totals.requests, totals.failures),
        // Up to the planned end, which the run overshoots by a moment: Locust's run-time timer
        // quits before its chart's point at that end.
        max_srps: metrics::max_srps(
            &tallies,
            into_second.as_secs_f64(),
            actual.min(planned).as_secs_f64(),
        ),
        max_srps_5s_window: metrics::max_srps_5s_window(&per_second, actual.as_secs_f64()),
        failures_by_kind: report::failures_by_kind(&totals),
        status_counts: totals
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        bytes_received: totals.bytes,
        latency_ms: Quantiles::of(&totals.latency, Some(totals.latency_sum_ns)),
        success_latency_ms: Quantiles::of(&totals.latency_ok, None),
        connect_ms: Quantiles::of(&totals.connect, None),
        late_starts: totals.late,
        start_lag_ms: Quantiles::of(&totals.start_lag, None),
        in_flight_at_end: sh.aborted.load(Ordering::Relaxed),
        max_users,
        series: points,
    };
    Ok(report)
}

impl LoadReport {
    /// Writes `DIR/PREFIX_stats.csv`, `..._stats_history.csv`, `..._failures.csv`.
    pub fn write_locust_csv(&self, dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>> {
        locust::write(self, dir, prefix)
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

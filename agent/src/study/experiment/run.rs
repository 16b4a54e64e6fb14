//! Runs the matrix in its planned order (randomised blocks by default: see `RunConfig::plan`).
//! Before every cell it starts a fresh server for the cell's setup (the first cell brings the
//! system up and seeds the database once; PostgreSQL restarts only when max_connections
//! changes), attaches the probes to the server's namespace when it moved, waits until PostgreSQL
//! has no client left, resets the database, runs the same short unmeasured warm-up (no added
//! delay), waits for the server to go idle and resets the database again; then it marks the
//! probes, sets the delay, runs the load profile, takes the probes' summary of the cell, clears
//! the delay, and writes the cell's files atomically.
//!
//! It must always clear the delay (the guard does, also on error or Ctrl-C), never write a cell
//! that did not finish, and leave nothing running: the system under test is torn down by its
//! guard, and leftovers of a killed run are removed when the next run starts.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use clap::ValueEnum as _;
use tokio_util::sync::CancellationToken;

use super::config::{random_seed, Order, ProfileName, RunConfig};
use crate::{
    delay,
    load::{self, LoadSpec},
    probe::namespace::Target,
    probe::{session::Session, ProbeSpec},
    study::results::{
        CellKey, CellResult, DelayOutcome, Index, LoadOutcome, ResultsDir, Second, Warmup,
        RESULTS_VERSION,
    },
    study::sut::{self, Sut},
};

/// Name of the system under test a run brings up (one run at a time per host).
pub(crate) const RUN_NAME: &str = "awlrun";

/// Set by the SIGINT/SIGTERM handler: finish nothing new, clean up, exit.
#[derive(Clone, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.token.cancel();
    }
    pub(crate) fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// The run's Prometheus series (`--metrics-addr`): the probes, the load, the delay and the cell.
pub(crate) struct RunMetrics {
    pub probes: crate::metrics::ProbeMetrics,
    pub load: crate::metrics::LoadMetrics,
    pub delay: crate::metrics::DelayMetrics,
    pub cell: crate::metrics::ExperimentMetrics,
}

impl RunMetrics {
    pub fn new(r: &prometheus::Registry) -> anyhow::Result<RunMetrics> {
        Ok(RunMetrics {
            probes: crate::metrics::ProbeMetrics::new(r)?,
            load: crate::metrics::LoadMetrics::new(r)?,
            delay: crate::metrics::DelayMetrics::new(r)?,
            cell: crate::metrics::ExperimentMetrics::new(r)?,
        })
    }
}

/// What the caller learns at the end.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub done: usize,
    pub skipped: usize,
    pub interrupted: bool,
    /// Seconds of measured load in the cells run now, and the wall time of the run.
    pub load_s: f64,
    pub wall_s: f64,
    /// Where the wall time went, in seconds, in the order of a cell (`Phases`).
    pub phases: Phases,
}

/// The run's wall time by phase of a cell, in seconds: what the run costs beyond its load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Starting a fresh server (and, for the first cell, the system and its seed).
    pub server_s: f64,
    /// Waiting for the server and the database to go idle, before the cell and after its
    /// warm-up.
    pub settle_s: f64,
    /// Resetting the database to the seed.
    pub reset_s: f64,
    /// The warm-up's load.
    pub warmup_s: f64,
    /// The measured load.
    pub load_s: f64,
    /// The rest of a cell's measurement: the probes' mark and summary, the delay set and
    /// cleared, the load's start and end.
    pub measure_other_s: f64,
    /// Writing the cell's records.
    pub write_s: f64,
}

impl Phases {
    /// (name, seconds) in the order of a cell.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("fresh server", self.server_s),
            ("settle", self.settle_s),
            ("reset", self.reset_s),
            ("warm-up", self.warmup_s),
            ("load", self.load_s),
            ("measurement other than load", self.measure_other_s),
            ("write", self.write_s),
        ]
    }
}

/// Runs `f` and adds its wall time to `acc` (seconds).
fn timed<T>(acc: &mut f64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *acc += t.elapsed().as_secs_f64();
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A new run directory `results_dir/YYYYmmdd-HHMMSS` (UTC), or the one being resumed.
pub(crate) fn run_dir(cfg: &RunConfig, resume: Option<&Path>) -> PathBuf {
    if let Some(r) = resume {
        return r.to_path_buf();
    }
    let secs = unix_now() as i64;
    let (d, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    cfg.results_dir.join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    ))
}

fn route(r: &str) -> anyhow::Result<load::Route> {
    load::Route::from_str(r, true).map_err(|e| anyhow!("route {r}: {e}"))
}

/// The load of one cell.
fn load_spec(cfg: &RunConfig, base: &str, route_name: &str) -> anyhow::Result<LoadSpec> {
    let mut spec = LoadSpec::study(base, route(route_name)?);
    let schedule = match cfg.profile {
        ProfileName::Study => return Ok(spec),
        ProfileName::Quick => load::ClosedSchedule::quick(),
        ProfileName::Smoke => load::ClosedSchedule::ramp(100, 20.0, 15.0)?,
    };
    spec.model = load::Model::Closed {
        schedule,
        wait: load::Wait::None,
    };
    Ok(spec)
}

fn load_outcome(r: &load::LoadReport) -> LoadOutcome {
    LoadOutcome {
        planned_s: r.planned_duration_s,
        actual_s: r.actual_duration_s,
        requests: r.requests,
        failures: r.failures,
        total_successes: r.total_successes,
        max_srps: r.max_srps,
        max_srps_5s_window: r.max_srps_5s_window,
        failures_by_kind: r
            .failures_by_kind
            .iter()
            .map(|f| (f.kind.clone(), f.count))
            .collect(),
        latency: crate::probe::aggregate::Quantiles {
            count: r.latency_ms.count,
            p50_ms: r.latency_ms.p50,
            p90_ms: r.latency_ms.p90,
            p99_ms: r.latency_ms.p99,
            max_ms: r.latency_ms.max,
            mean_ms: r.latency_ms.mean,
        },
        series: r
            .series
            .iter()
            .map(|s| Second {
                t_s: f64::from(s.second) + 1.0,
                users: u64::from(s.users),
                requests: s.requests,
                successes: s.successes,
                failures: s.failures,
                p50_ms: (s.latency_ms.count > 0).then_some(s.latency_ms.p50),
                p95_ms: (s.latency_ms.count > 0).then_some(s.latency_ms.p95),
            })
            .collect(),
        in_flight_at_end: r.in_flight_at_end,
    }
}

/// CPU clock ticks (user + system) used so far by every process in network namespace `inum`:
/// the server's workers, however the back end started them.
fn netns_cpu_ticks(inum: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut ticks = 0;
    for e in procs.flatten() {
        let path = e.path();
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if std::fs::metadata(path.join("ns/net"))
            .map(|m| m.ino() as u32)
            .ok()
            != Some(inum)
        {
            continue;
        }
        // Fields 14 and 15 (utime, stime) follow the parenthesised command name.
        if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks
}

/// The server's database sessions, as a `pg_stat_activity` condition: every client session but
/// our own; with a connection pool (async-pooled, once the warm-up has opened it) only the busy
/// ones, as the pool keeps its idle connections by design.
fn server_sessions(sut: &Sut) -> &'static str {
    if sut.state().setup.pool_size() > 0 {
        "backend_type = 'client backend' AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
    } else {
        "backend_type = 'client backend' AND pid <> pg_backend_pid()"
    }
}

/// Requests the probes have seen finish since they were attached, in either mode.
fn finished_requests(session: &Session) -> Option<u64> {
    let c = session.probes().counters().ok()?;
    Some(c[agent_common::Counter::Requests as usize])
}

/// Waits until PostgreSQL has no client connection but ours and the server has been quiet for
/// `quiet`: a closed-loop run (the warm-up too) leaves requests queued in the server when the
/// load stops, and a killed server's database sessions end only once their statement does.
/// Idle means: no database client, no request finished, and (almost) no CPU used by the
/// server's namespace for `quiet` (a second after load). The CPU test catches the cpu route,
/// whose queued requests use no database and finish only every ~0.8 s. A fresh server has had
/// no load: only the old one's sessions are waited for (`quiet` zero, checked at once).
fn drain(
    sut: &Sut,
    netns_inum: u32,
    session: Option<&mut Session>,
    timeout: Duration,
    quiet: Duration,
) -> anyhow::Result<Option<String>> {
    let sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {}",
        server_sessions(sut)
    );
    let t0 = Instant::now();
    let mut session = session;
    let mut finished = session.as_deref().and_then(finished_requests);
    let mut quiet_since: Option<Instant> = None;
    let mut ticks = netns_cpu_ticks(netns_inum);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            std::thread::sleep(Duration::from_millis(250));
        }
        let now_ticks = netns_cpu_ticks(netns_inum);
        // 2 ticks (20 ms at the usual 100 Hz) in 250 ms: housekeeping, not a request.
        let busy = now_ticks.saturating_sub(ticks) > 2;
        ticks = now_ticks;
        // A full server ("too many clients already", even for the superuser) is a busy one.
        let conns: u64 = sut
            .psql(&[&sessions])
            .ok()
            .and_then(|out| out.trim().parse().ok())
            .unwrap_or(u64::MAX);
        let finished_now = session.as_deref_mut().map_or(0, |s| {
            s.drain(|_| {});
            // The kernel's count, not the records drained: in aggregation mode none come.
            let now = finished_requests(s).unwrap_or(0);
            now.saturating_sub(finished.replace(now).unwrap_or(now))
        });
        if conns == 0 && finished_now == 0 && !busy {
            let q = *quiet_since.get_or_insert_with(Instant::now);
            if q.elapsed() >= quiet {
                return Ok(None);
            }
        } else {
            quiet_since = None;
        }
        if t0.elapsed() > timeout {
            return Ok(Some(format!(
                "the server had not drained after {} s ({} database connections left{})",
                timeout.as_secs(),
                if conns == u64::MAX {
                    "too many".to_string()
                } else {
                    conns.to_string()
                },
                if busy { ", still using CPU" } else { "" }
            )));
        }
    }
}

/// Resolves the server's namespace and attaches the probes to it (None when probes are off).
fn attach(
    cfg: &RunConfig,
    rt: &tokio::runtime::Runtime,
    system: &Sut,
    metrics: Option<&RunMetrics>,
) -> anyhow::Result<(Target, Option<Session>)> {
    let target = Target::resolve(system.netns())
        .with_context(|| format!("the server's namespace {}", system.netns()))?;
    if !cfg.probes {
        return Ok((target, None));
    }
    let _enter = rt.enter();
    let spec = ProbeSpec {
        netns_inum: target.netns_inum,
        http_ports: vec![sut::SERVER_PORT],
        db_ports: vec![system.db_port()],
        capture_payload: true,
        aggregate: false,
        floor: false,
        sizes: Default::default(),
    };
    let mut session = Session::attach(&spec, system.netns()).context("attaching the probes")?;
    if let Some(m) = metrics {
        // One series per run ("server"), whichever setup and namespace serve it now.
        session.agg.add_observer(Box::new(
            m.probes.observer("server", Some(system.db_port())),
        ));
        m.probes.set_attached("server", session.probes().status());
    }
    Ok((target, Some(session)))
}

/// Progress lines are redrawn on a terminal, and printed every 10 s otherwise (CI, a log file).
fn stderr_is_tty() -> bool {
    // SAFETY: isatty has no preconditions.
    unsafe { libc::isatty(2) == 1 }
}

/// One line of progress on stderr.
fn progress(t: &Tally, cell: &CellKey, p: &load::Progress) {
    let tty = stderr_is_tty();
    // Not a terminal (CI, a log file): one line every 10 s instead of a redrawn one.
    if !tty && !p.elapsed.as_secs().is_multiple_of(10) {
        return;
    }
    let left = seconds_left(
        t,
        t.started.elapsed().as_secs_f64(),
        p.planned.as_secs_f64(),
    );
    eprint!(
        "{}[{}/{}] {} {} {} ms r{}: {:>4.0}/{:.0} s, {} users, {:.0} req/s, {} failures; {} left{}",
        if tty { "\r\x1b[2K" } else { "" },
        t.done + t.skipped + 1,
        t.total,
        cell.setup,
        cell.route,
        cell.delay_ms,
        cell.rep,
        p.elapsed.as_secs_f64(),
        p.planned.as_secs_f64(),
        p.users,
        p.requests_last_s as f64,
        p.failures,
        time_left(left),
        if tty { "" } else { "\n" }
    );
}

/// Seconds a run still needs, `now_s` into it while a cell of `planned_s` of load runs: each
/// cell left (this one too) takes what the finished ones took on average, less what this one
/// has already used. Before any cell finished a cell counts as its load and 20 s for the fresh
/// server and the warm-up.
fn seconds_left(t: &Tally, now_s: f64, planned_s: f64) -> f64 {
    let per_cell = if t.done > 0 {
        t.done_s / t.done as f64
    } else {
        planned_s + 20.0
    };
    let cells = t.total.saturating_sub(t.done + t.skipped) as f64;
    (per_cell * cells - (now_s - t.done_s)).max(0.0)
}

/// The progress line's estimate: whole minutes, and no "about 0 min" in the last one.
fn time_left(s: f64) -> String {
    if s < 60.0 {
        "under a minute".to_string()
    } else {
        format!("about {:.0} min", s / 60.0)
    }
}

/// What happens before a cell's load starts (its progress line follows).
fn announce(t: &Tally, key: &CellKey) {
    let tty = stderr_is_tty();
    eprint!(
        "{}[{}/{}] {}: a fresh server and its warm-up{}",
        if tty { "\r\x1b[2K" } else { "" },
        t.done + t.skipped + 1,
        t.total,
        key.stem(),
        if tty { "" } else { "\n" }
    );
}

/// Users of the warm-up: more than one, so that an async server serves requests side by side
/// (its threads and several database connections start), and few, so that the warm-up leaves
/// little queued behind its end on any route.
const WARMUP_USERS: u32 = 4;

/// What every step of a cell needs.
struct Ctx<'a> {
    cfg: &'a RunConfig,
    rt: &'a tokio::runtime::Runtime,
    stop: &'a Stop,
    metrics: Option<&'a RunMetrics>,
}

/// The server of the current cell and the probes on its namespace.
struct Server {
    system: Sut,
    target: Target,
    session: Option<Session>,
}

/// A fresh server for `setup` before every cell, so that no cell starts warm or busy because of
/// the one before it. The first cell brings the system up and seeds the database once; later
/// cells replace the server (PostgreSQL restarts only when max_connections changes). The probes
/// are attached again when the new server lives in another namespace (a new container); in the
/// same namespace (the netns back end) they keep watching it.
fn fresh_server(
    cx: &Ctx<'_>,
    current: &mut Option<Server>,
    setup: sut::Setup,
) -> anyhow::Result<()> {
    let cfg = cx.cfg;
    match current.as_mut() {
        None => {
            eprintln!(
                "\nawaitlab: bringing up {} ({:?} back end, {:?} stack)",
                setup.name(),
                cfg.backend,
                cfg.stack
            );
            let opts = sut::Options::new(setup, cfg.stack, RUN_NAME);
            let system = Sut::up(cfg.backend, &opts)
                .with_context(|| format!("bringing up {}", setup.name()))?;
            let seed = system.seed().context("seeding the database")?;
            if seed.seeded {
                eprintln!(
                    "awaitlab: seeded {} posts in {:.1} s",
                    seed.rows, seed.seconds
                );
            }
            let (target, session) = attach(cfg, cx.rt, &system, cx.metrics)?;
            *current = Some(Server {
                system,
                target,
                session,
            });
        }
        Some(s) => {
            let netns_before = s.system.netns().to_string();
            s.system
                .switch(setup, cfg.stack)
                .with_context(|| format!("starting a fresh {} server", setup.name()))?;
            let target = Target::resolve(s.system.netns())
                .with_context(|| format!("the server's namespace {}", s.system.netns()))?;
            if same_namespace(
                (&netns_before, s.target.netns_inum),
                (s.system.netns(), target.netns_inum),
            ) {
                // The target is new all the same (the delay enters the namespace through it).
                s.target = target;
            } else {
                // Detach first: the old namespace is gone, and one attach at a time is enough.
                drop(s.session.take());
                (s.target, s.session) = attach(cfg, cx.rt, &s.system, cx.metrics)?;
            }
        }
    }
    Ok(())
}

/// Whether a server's namespace, given as (path, inode number) before and after a restart, is
/// still the same one. The same path (netns: a named namespace that outlives its servers) is the
/// same namespace. A new path (docker: /proc/PID/ns/net of a new container) is a new one, even
/// when the kernel hands it the old one's inode number, as it did here: the probes learn the
/// namespace's address from its first socket and would not see the new one.
fn same_namespace(before: (&str, u32), after: (&str, u32)) -> bool {
    before == after
}

/// How long a server that has had load must be idle before it counts as drained.
const AFTER_LOAD_QUIET: Duration = Duration::from_secs(1);

/// Waits for the server to go idle (`drain`, quiet for `quiet`). If it does not within the drain
/// timeout, the database sessions still open are terminated so that the cell starts with none,
/// and the cell's notes say so.
fn settle(
    cx: &Ctx<'_>,
    s: &mut Server,
    when: &str,
    quiet: Duration,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(cx.cfg.drain_timeout_s);
    if let Some(n) = drain(
        &s.system,
        s.target.netns_inum,
        s.session.as_mut(),
        timeout,
        quiet,
    )? {
        let cut = s
            .system
            .psql(&[&format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {}",
                server_sessions(&s.system)
            )])
            .context("terminating the database sessions left")?;
        notes.push(format!(
            "{when}: {n}; {} database sessions were terminated",
            cut.trim()
        ));
    }
    Ok(())
}

/// The load of the warm-up: `WARMUP_USERS` closed-loop users on the cell's route for `seconds`.
fn warmup_spec(base: &str, route_name: &str, seconds: f64) -> anyhow::Result<LoadSpec> {
    let mut spec = LoadSpec::study(base, route(route_name)?);
    let users = f64::from(WARMUP_USERS);
    let schedule = load::ClosedSchedule::new(vec![
        load::Stage {
            target: users,
            duration_s: 0.0,
        },
        load::Stage {
            target: users,
            duration_s: seconds,
        },
    ])?;
    spec.model = load::Model::Closed {
        schedule,
        wait: load::Wait::None,
    };
    Ok(spec)
}

/// Runs `spec` while pumping the probes' ring buffer (so that it never fills and the drain
/// checks see what finished); `observer` sees the progress once a second.
fn run_load(
    cx: &Ctx<'_>,
    session: &mut Option<Session>,
    spec: &LoadSpec,
    observer: &mut (dyn FnMut(&load::Progress) + Send),
    load_metrics: Option<crate::metrics::LoadMetrics>,
) -> Result<load::LoadReport, load::LoadError> {
    let token = cx.stop.token.clone();
    let snapshots = cx.metrics.is_some();
    cx.rt.block_on(async {
        let finished = CancellationToken::new();
        let pump = async {
            if let Some(s) = session.as_mut() {
                let mut last = Instant::now();
                while !finished.is_cancelled() {
                    s.pump(Duration::from_millis(50), |_| {}).await;
                    if snapshots && last.elapsed() >= Duration::from_secs(1) {
                        last = Instant::now();
                        let _ = s.snapshot();
                    }
                }
            }
        };
        let load = async {
            let r = load::run_with_metrics(spec, observer, token, load_metrics).await;
            finished.cancel();
            r
        };
        let (r, ()) = tokio::join!(load, pump);
        r
    })
}

/// The unmeasured warm-up of a cell on its fresh server: the cell's route, no added delay (so
/// that every cell's warm-up does the same work whatever its delay), then the server drains and
/// the database is reset, so the cell starts from exactly the seed. None when `warmup_s` is 0 or
/// the run was stopped.
fn warm_up(
    cx: &Ctx<'_>,
    s: &mut Server,
    key: &CellKey,
    notes: &mut Vec<String>,
    ph: &mut Phases,
) -> anyhow::Result<Option<Warmup>> {
    let seconds = cx.cfg.warmup_s;
    if seconds <= 0.0 {
        return Ok(None);
    }
    let spec = warmup_spec(s.system.url(), &key.route, seconds)?;
    // Not the run's load metrics: the warm-up counts in no load figure.
    let report = timed(&mut ph.warmup_s, || {
        run_load(cx, &mut s.session, &spec, &mut |_| {}, None)
    })
    .with_context(|| format!("warm-up of {}", key.stem()))?;
    if report.stopped_early || cx.stop.requested() {
        return Ok(None);
    }
    if report.total_successes == 0 {
        notes.push(format!(
            "the warm-up had no successful request ({} failures)",
            report.failures
        ));
    }
    timed(&mut ph.settle_s, || {
        settle(cx, s, "after the warm-up", AFTER_LOAD_QUIET, notes)
    })?;
    let posts_removed = timed(&mut ph.reset_s, || s.system.reset())
        .context("resetting the database after the warm-up")?;
    Ok(Some(Warmup {
        planned_s: seconds,
        users: WARMUP_USERS,
        requests: report.requests,
        failures: report.failures,
        in_flight_at_end: report.in_flight_at_end,
        posts_removed,
    }))
}

/// Counts of a run in progress, for the progress line.
/// `done` cells ran in this process, `skipped` were finished before (a resumed run).
struct Tally {
    done: usize,
    skipped: usize,
    total: usize,
    started: Instant,
    /// Seconds from `started` to the end of the last cell done.
    done_s: f64,
    /// Seconds of measured load so far.
    load_s: f64,
    phases: Phases,
}

/// The measured part of a cell: mark the probes, set the delay, run the load, clear the delay,
/// take the probes' summary. None when the run was stopped meanwhile.
fn measure(
    cx: &Ctx<'_>,
    s: &mut Server,
    key: &CellKey,
    tally: &Tally,
    warmup: Option<Warmup>,
    mut notes: Vec<String>,
) -> anyhow::Result<Option<(CellResult, load::LoadReport)>> {
    let (cfg, metrics) = (cx.cfg, cx.metrics);
    let mark = match s.session.as_mut() {
        Some(p) => Some(p.mark()?),
        None => None,
    };
    if let Some(m) = metrics {
        m.cell
            .set_cell(&key.setup, &key.route, u64::from(key.delay_ms), key.rep);
    }
    let guard = if key.delay_ms > 0 {
        let spec = delay::DelaySpec {
            delay: Duration::from_millis(u64::from(key.delay_ms)),
            jitter: Duration::ZERO,
            ..Default::default()
        };
        let g = delay::set(&s.target, &spec, cfg.delay_backend)
            .with_context(|| format!("setting {} ms of delay", key.delay_ms))?;
        if let Some(m) = metrics {
            m.delay.set(
                "server",
                spec.delay,
                None,
                &format!("{:?}", g.backend()).to_lowercase(),
            );
        }
        Some(g)
    } else {
        None
    };
    let spec = load_spec(cfg, s.system.url(), &key.route)?;
    // PostgreSQL's refusals for want of a slot during the load: its log's count before and after.
    let refusals_before = s.system.db_refusals();
    let started_unix_s = unix_now();
    let mut observer = |p: &load::Progress| {
        // The delay the line achieves so far, for the dashboards (once a second).
        if let (Some(m), Some(g)) = (metrics, guard.as_ref()) {
            if let Some(hold) = g.hold_p50() {
                let backend = format!("{:?}", g.backend()).to_lowercase();
                m.delay.set("server", g.requested(), Some(hold), &backend);
            }
        }
        progress(tally, key, p)
    };
    let report = run_load(
        cx,
        &mut s.session,
        &spec,
        &mut observer,
        metrics.map(|m| m.load.clone()),
    );
    eprintln!();
    let delay = match guard {
        Some(g) => {
            let a = g.remove();
            let backend = format!("{:?}", a.backend).to_lowercase();
            if let Some(m) = metrics {
                m.delay.clear("server", &backend);
            }
            if a.bypassed > 0 {
                notes.push(format!(
                    "{} packets passed the delay line undelayed (queue overflow)",
                    a.bypassed
                ));
            }
            // The delay line's own hold times where it ran; otherwise (netem) the growth
            // of the server's TCP round-trip times.
            let from_sockets = match (a.socket_rtt_before.median_ms, a.socket_rtt_now.median_ms) {
                (Some(b), Some(n)) => Some(n - b),
                (None, Some(n)) => Some(n),
                _ => None,
            };
            let achieved = a
                .hold
                .as_ref()
                .filter(|h| h.packets > 0)
                .map(|h| h.p50_us / 1000.0)
                .or(from_sockets);
            DelayOutcome {
                requested_ms: f64::from(key.delay_ms),
                achieved_ms: achieved,
                backend,
            }
        }
        None => DelayOutcome {
            requested_ms: 0.0,
            achieved_ms: Some(0.0),
            backend: "none".into(),
        },
    };
    let report = report.with_context(|| format!("load of cell {}", key.stem()))?;
    if report.stopped_early || cx.stop.requested() {
        return Ok(None);
    }
    let db_refusals = match (refusals_before, s.system.db_refusals()) {
        (Ok(b), Ok(a)) => Some(a.saturating_sub(b)),
        (Err(e), _) | (_, Err(e)) => {
            notes.push(format!("PostgreSQL's refusals were not counted: {e}"));
            None
        }
    };
    let system_record = match s.system.system() {
        Ok(r) => Some(r.clone()),
        Err(e) => {
            notes.push(format!("the system under test was not recorded: {e}"));
            None
        }
    };
    let probes = match (s.session.as_mut(), mark) {
        (Some(p), Some(m)) => Some(p.summary_since(&m)?),
        _ => None,
    };
    if report.in_flight_at_end > 0 {
        notes.push(format!(
            "{} requests were still in flight when the load ended (not counted)",
            report.in_flight_at_end
        ));
    }
    let cell = CellResult {
        version: RESULTS_VERSION,
        key: key.clone(),
        started_unix_s,
        server_pids: s.system.server_pids().to_vec(),
        warmup,
        backend: cfg.backend.name().into(),
        stack: cfg.stack.name().into(),
        profile: format!("{:?}", cfg.profile).to_lowercase(),
        delay,
        load: load_outcome(&report),
        probes,
        db_refusals,
        system: system_record,
        notes,
        failed: None,
    };
    Ok(Some((cell, report)))
}

/// Which part of a system that no longer answers as alive is gone: PostgreSQL, the server, or
/// (a back end whose processes this host cannot see) the system as a whole.
fn what_died(system: &Sut) -> String {
    // A killed child of this process stays a zombie until reaped: gone all the same.
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next().map(String::from))
            })
            .is_none_or(|state| state == "Z" || state == "X")
    };
    let st = system.state();
    if st.db_pid != 0 && gone(st.db_pid) {
        format!("PostgreSQL (pid {}) died during the cell", st.db_pid)
    } else if !st.server_pids.is_empty() && st.server_pids.iter().all(|&p| gone(p)) {
        format!(
            "the server (pid {}) died during the cell",
            st.server_pids[0]
        )
    } else {
        "the system under test stopped answering as alive during the cell".to_string()
    }
}

/// Writes a finished cell: its Locust CSVs, then its record (the record last: it marks the cell
/// done for `--resume`).
fn write_cell(
    dir: &ResultsDir,
    cell: &CellResult,
    report: &load::LoadReport,
) -> anyhow::Result<()> {
    let key = &cell.key;
    report
        .write_locust_csv(&dir.root.join("cells"), &key.stem())
        .with_context(|| format!("writing the Locust CSVs of {}", key.stem()))?;
    dir.write_cell(cell)?;
    eprintln!(
        "awaitlab: {} done: {} successes, max sRPS {:.1}, {} failures",
        key.stem(),
        cell.load.total_successes,
        cell.load.max_srps,
        cell.load.failures
    );
    Ok(())
}

/// The run's configuration with its seed drawn (random order), and its plan. A resumed run
/// keeps the design recorded in its index.json (order, seed, warm-up; runs from before
/// randomised blocks ran in the fixed order without warm-up), refuses another `--seed`, and must
/// plan the same cells.
fn design(cfg: &RunConfig, resumed: Option<&Index>) -> anyhow::Result<(RunConfig, Vec<CellKey>)> {
    let mut cfg = cfg.clone();
    match resumed {
        None => {
            if cfg.order == Order::Random && cfg.seed.is_none() {
                cfg.seed = Some(random_seed());
            }
        }
        Some(old) => {
            let rec = &old.config;
            let recorded_seed = rec.get("seed").and_then(serde_json::Value::as_u64);
            if let (Some(given), Some(recorded)) = (cfg.seed, recorded_seed) {
                if given != recorded {
                    bail!("the run to resume was planned with seed {recorded}, not {given}");
                }
            }
            cfg.seed = recorded_seed;
            cfg.order = match rec.get("order") {
                Some(v) => serde_json::from_value(v.clone()).context("the recorded order")?,
                None => Order::Fixed,
            };
            cfg.warmup_s = rec
                .get("warmup_s")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0);
        }
    }
    let planned = cfg.plan(cfg.seed.unwrap_or(0));
    if let Some(old) = resumed {
        if old.planned != planned {
            bail!(
                "the run to resume was run with another matrix; resume with the same configuration"
            );
        }
    }
    Ok((cfg, planned))
}

/// Runs (or resumes) the experiment described by `cfg`.
pub fn run(
    cfg: &RunConfig,
    resume: Option<&Path>,
    stop: &Stop,
    metrics_at: Option<crate::metrics::server::MetricsAt>,
) -> anyhow::Result<RunOutcome> {
    cfg.validate()?;
    let resumed = match resume {
        Some(r) => {
            let d = ResultsDir::open(r)?;
            let old = d.index()?;
            Some((d, old))
        }
        None => None,
    };
    let (cfg, planned) =
        design(cfg, resumed.as_ref().map(|(_, i)| i)).with_context(|| match resume {
            Some(r) => format!("resuming {}", r.display()),
            None => "planning the run".into(),
        })?;
    let cfg = &cfg;
    let dir = match resumed {
        Some((d, _)) => d,
        None => {
            let index = Index {
                version: RESULTS_VERSION,
                created_unix_s: unix_now(),
                config: serde_json::to_value(cfg).context("serialising the configuration")?,
                planned: planned.clone(),
            };
            ResultsDir::create(&run_dir(cfg, None), &index)?
        }
    };
    if let Some(seed) = cfg.seed.filter(|_| cfg.order == Order::Random) {
        eprintln!(
            "awaitlab: {} blocks in random order, seed {seed} (--seed {seed} plans the same order)",
            cfg.repeat
        );
    }
    // A killed earlier run may have left a delay rule or a system under test behind.
    for removed in delay::cleanup_leftovers() {
        eprintln!("awaitlab: removed a leftover delay: {removed}");
    }
    if let Ok(true) = cfg.backend.backend().down(RUN_NAME) {
        eprintln!("awaitlab: removed a system under test left by an earlier run");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let registry = crate::metrics::registry()?;
    let metrics = match metrics_at {
        Some(at) => {
            let m = RunMetrics::new(&registry)?;
            let server = rt.block_on(crate::metrics::server::serve_metrics_at(
                at,
                registry.clone(),
            ))?;
            Some((m, server))
        }
        None => None,
    };
    let cx = Ctx {
        cfg,
        rt: &rt,
        stop,
        metrics: metrics.as_ref().map(|(m, _)| m),
    };
    let todo: Vec<&CellKey> = planned.iter().filter(|c| !dir.is_done(c)).collect();
    let mut tally = Tally {
        done: 0,
        skipped: planned.len() - todo.len(),
        total: planned.len(),
        started: Instant::now(),
        done_s: 0.0,
        load_s: 0.0,
        phases: Phases::default(),
    };
    let mut current: Option<Server> = None;
    for key in todo {
        if stop.requested() {
            break;
        }
        let setup = sut::Setup::from_str(&key.setup, true)
            .map_err(|e| anyhow!("setup {}: {e}", key.setup))?;
        announce(&tally, key);
        let mut ph = tally.phases;
        timed(&mut ph.server_s, || fresh_server(&cx, &mut current, setup))?;
        let s = current.as_mut().expect("started above");
        let mut notes = Vec::new();
        // The last cell's server is gone, but its database sessions end only once their statement
        // does; a queued io_create could add a row after the reset. The fresh server has had no
        // load, so no quiet time is waited for.
        timed(&mut ph.settle_s, || {
            settle(&cx, s, "before the cell", Duration::ZERO, &mut notes)
        })?;
        timed(&mut ph.reset_s, || s.system.reset())
            .context("resetting the database to the seed")?;
        let warmup = warm_up(&cx, s, key, &mut notes, &mut ph)?;
        if stop.requested() {
            break;
        }
        let mut measured = 0.0;
        let Some((mut cell, report)) = timed(&mut measured, || {
            measure(&cx, s, key, &tally, warmup, notes)
        })?
        else {
            break;
        };
        ph.load_s += report.actual_duration_s;
        ph.measure_other_s += (measured - report.actual_duration_s).max(0.0);
        // PostgreSQL or the server died during the cell (killed, out of memory): its numbers
        // are recorded, marked failed, and the next cell gets a whole new system.
        let died = (!s.system.alive()).then(|| what_died(&s.system));
        cell.failed = died.clone();
        timed(&mut ph.write_s, || write_cell(&dir, &cell, &report))?;
        tally.phases = ph;
        tally.done += 1;
        tally.done_s = tally.started.elapsed().as_secs_f64();
        tally.load_s += report.actual_duration_s;
        if let Some(why) = died {
            eprintln!("awaitlab: {}: {why}; recorded as failed", key.stem());
            if let Some(dead) = current.take() {
                drop(dead.session);
                if let Err(e) = dead.system.down() {
                    eprintln!("awaitlab: taking down the dead system: {e:#}");
                }
            }
            if cfg.fail_fast {
                bail!("{}: {why} (--fail-fast)", key.stem());
            }
        }
    }
    if let Some(s) = current {
        drop(s.session);
        s.system
            .down()
            .context("tearing down the system under test")?;
    }
    let interrupted = stop.requested();
    Ok(RunOutcome {
        dir: dir.root.clone(),
        done: tally.done,
        skipped: tally.skipped,
        interrupted,
        load_s: tally.load_s,
        wall_s: tally.started.elapsed().as_secs_f64(),
        phases: tally.phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(cfg: &RunConfig, planned: Vec<CellKey>) -> Index {
        Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config: serde_json::to_value(cfg).unwrap(),
            planned,
        }
    }

    #[test]
    fn the_time_left_reads_in_minutes_and_the_last_one_says_so() {
        assert_eq!(time_left(0.0), "under a minute");
        assert_eq!(time_left(59.9), "under a minute");
        assert_eq!(time_left(60.0), "about 1 min");
        assert_eq!(time_left(149.0), "about 2 min");
        assert_eq!(time_left(24.0 * 60.0 - 25.0), "about 24 min");
    }

    #[test]
    fn the_time_left_falls_as_a_cell_runs_and_counts_from_the_cells_done() {
        // 27 cells, 2 done in 120 s (60 s each), 1 skipped from an earlier run: 24 cells left,
        // this one among them.
        let t = Tally {
            done: 2,
            skipped: 1,
            total: 27,
            started: Instant::now(),
            done_s: 120.0,
            load_s: 0.0,
            phases: Phases::default(),
        };
        assert_eq!(seconds_left(&t, 120.0, 30.0), 24.0 * 60.0);
        // 10 and 25 s into the cell: exactly that much less, whatever the cell's own length.
        assert_eq!(seconds_left(&t, 130.0, 30.0), 24.0 * 60.0 - 10.0);
        assert_eq!(seconds_left(&t, 145.0, 30.0), 24.0 * 60.0 - 25.0);
        // Before the first cell is done: the planned load and 20 s per cell.
        let first = Tally {
            done: 0,
            skipped: 0,
            done_s: 0.0,
            ..t
        };
        assert_eq!(seconds_left(&first, 5.0, 30.0), 27.0 * 50.0 - 5.0);
        // A cell that overruns the average does not make the estimate negative.
        let last = Tally {
            done: 26,
            skipped: 0,
            done_s: 26.0 * 60.0,
            ..t
        };
        assert_eq!(seconds_left(&last, 26.0 * 60.0 + 90.0, 30.0), 0.0);
    }

    #[test]
    fn a_new_run_draws_and_records_a_seed_and_a_resumed_one_keeps_its_design() {
        let cfg = RunConfig {
            repeat: 2,
            ..RunConfig::default()
        };
        let (first, planned) = design(&cfg, None).unwrap();
        let seed = first.seed.expect("a random order draws a seed");
        assert_eq!(planned, cfg.plan(seed));
        let old = index_of(&first, planned.clone());
        // Resumed without a seed, or with the same one, or with another order or warm-up
        // asked for: the recorded design.
        for given in [
            cfg.clone(),
            RunConfig {
                seed: Some(seed),
                ..cfg.clone()
            },
            RunConfig {
                order: Order::Fixed,
                warmup_s: 1.0,
                ..cfg.clone()
            },
        ] {
            let (again, p) = design(&given, Some(&old)).unwrap();
            assert_eq!(
                (again.seed, again.order, again.warmup_s, &p),
                (Some(seed), Order::Random, first.warmup_s, &planned)
            );
        }
        let e = design(
            &RunConfig {
                seed: Some(seed + 1),
                ..cfg.clone()
            },
            Some(&old),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("seed {seed}")), "{e}");
        let e = design(
            &RunConfig {
                delays_ms: vec![0, 100],
                ..cfg.clone()
            },
            Some(&old),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("another matrix"), "{e}");
    }

    #[test]
    fn a_run_from_before_the_design_resumes_in_the_fixed_order_without_warmup() {
        let cfg = RunConfig::default();
        let mut config = serde_json::to_value(&cfg).unwrap();
        for k in ["order", "seed", "warmup_s"] {
            config.as_object_mut().unwrap().remove(k);
        }
        let old = Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config,
            planned: cfg.cells(),
        };
        let (again, p) = design(&cfg, Some(&old)).unwrap();
        assert_eq!(
            (again.order, again.seed, again.warmup_s),
            (Order::Fixed, None, 0.0)
        );
        assert_eq!(p, cfg.cells());
        // A fixed run draws no seed: it would name no order.
        let (fixed, _) = design(
            &RunConfig {
                order: Order::Fixed,
                ..cfg
            },
            None,
        )
        .unwrap();
        assert_eq!(fixed.seed, None);
    }

    /// Regression: a new container whose namespace had the old one's inode number kept the
    /// probes of the old namespace, which saw no request of the cell.
    #[test]
    fn a_new_namespace_path_is_a_new_namespace_whatever_its_number() {
        assert!(same_namespace(
            ("/run/netns/awlruns", 7),
            ("/run/netns/awlruns", 7)
        ));
        assert!(!same_namespace(
            ("/proc/10/ns/net", 7),
            ("/proc/20/ns/net", 7)
        ));
        assert!(!same_namespace(
            ("/run/netns/awlruns", 7),
            ("/run/netns/awlruns", 8)
        ));
    }

    #[test]
    fn the_warmup_is_a_few_users_held_from_the_start() {
        let spec = warmup_spec("http://10.0.0.2:8000", "io_create", 5.0).unwrap();
        let load::Model::Closed { schedule, .. } = &spec.model else {
            panic!("{spec:?}")
        };
        assert_eq!(schedule.duration(), Duration::from_secs(5));
        assert_eq!(schedule.max_users(), WARMUP_USERS);
        assert_eq!(
            schedule.users_at(0.0),
            WARMUP_USERS,
            "all users from the first instant"
        );
        assert!(spec.url.ends_with("/posts/io_create/"), "{}", spec.url);
    }
}

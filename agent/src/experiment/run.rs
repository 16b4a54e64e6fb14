//! Runs the matrix: for each setup, bring the system under test up (seeded once), attach the
//! probes to the server's namespace, and for each cell reset the database, wait for the server to
//! drain, set the delay, run the load profile, take the probes' summary of the cell, clear the
//! delay, and write the cell's files atomically.
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

use super::config::{Backend, DelayBackend, ProfileName, RunConfig, Stack};
use crate::{
    load::{self, LoadSpec},
    netem,
    probes::{session::ProbeSession, ProbeSpec},
    results::{CellKey, CellResult, DelayOutcome, Index, LoadOutcome, ResultsDir, Second, RESULTS_VERSION},
    sut::{self, Sut},
    target::Target,
};

/// Name of the system under test a run brings up (one run at a time per host).
pub const RUN_NAME: &str = "awlrun";

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
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// The run's Prometheus series (`--metrics-addr`): the probes, the load, the delay and the cell.
pub struct RunMetrics {
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
pub struct Outcome {
    pub dir: PathBuf,
    pub done: usize,
    pub skipped: usize,
    pub interrupted: bool,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A new run directory `results_dir/YYYYmmdd-HHMMSS` (UTC), or the one being resumed.
pub fn run_dir(cfg: &RunConfig, resume: Option<&Path>) -> PathBuf {
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
    cfg.results_dir.join(format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", s / 3600, s / 60 % 60, s % 60))
}

fn sut_backend(b: Backend) -> sut::BackendKind {
    match b {
        Backend::Netns => sut::BackendKind::Netns,
        Backend::Docker => sut::BackendKind::Docker,
    }
}

fn sut_stack(s: Stack) -> sut::Stack {
    match s {
        Stack::Study => sut::Stack::Study,
        Stack::Current => sut::Stack::Current,
    }
}

fn delay_choice(d: DelayBackend) -> netem::BackendChoice {
    match d {
        DelayBackend::Auto => netem::BackendChoice::Auto,
        DelayBackend::Netem => netem::BackendChoice::Netem,
        DelayBackend::Nfqueue => netem::BackendChoice::Nfqueue,
    }
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
    spec.model = load::Model::Closed { schedule, wait: load::Wait::None };
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
        failures_by_kind: r.failures_by_kind.iter().map(|f| (f.kind.clone(), f.count)).collect(),
        latency: crate::aggregate::Quantiles {
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
    }
}

/// Waits until PostgreSQL has no client connection but ours and the server has been quiet for a
/// second: a closed-loop run leaves requests queued in the server when the load stops, and they
/// would pollute the next cell.
/// CPU clock ticks (user + system) used so far by every process in network namespace `inum`:
/// the server's workers, however the back end started them.
fn netns_cpu_ticks(inum: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    let mut ticks = 0;
    for e in procs.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::fs::metadata(path.join("ns/net")).map(|m| m.ino() as u32).ok() != Some(inum) {
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

/// Idle means: no database client, no request finished, and (almost) no CPU used by the
/// server's namespace for a whole second. The CPU test catches the cpu route, whose queued
/// requests use no database and finish only every ~0.8 s.
fn drain(sut: &Sut, netns_inum: u32, session: Option<&mut ProbeSession>, timeout: Duration) -> anyhow::Result<Option<String>> {
    let t0 = Instant::now();
    let mut session = session;
    let mut quiet_since: Option<Instant> = None;
    let mut ticks = netns_cpu_ticks(netns_inum);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now_ticks = netns_cpu_ticks(netns_inum);
        // 2 ticks (20 ms at the usual 100 Hz) in 250 ms: housekeeping, not a request.
        let busy = now_ticks.saturating_sub(ticks) > 2;
        ticks = now_ticks;
        // A full server ("too many clients already", even for the superuser) is a busy one.
        let conns: u64 = sut
            .psql(&["SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"])
            .ok()
            .and_then(|out| out.trim().parse().ok())
            .unwrap_or(u64::MAX);
        let finished_now = session.as_deref_mut().map_or(0, |s| {
            let before = s.agg.total.requests;
            s.drain(|_| {});
            s.agg.total.requests - before
        });
        if conns == 0 && finished_now == 0 && !busy {
            let q = *quiet_since.get_or_insert_with(Instant::now);
            if q.elapsed() >= Duration::from_secs(1) {
                return Ok(None);
            }
        } else {
            quiet_since = None;
        }
        if t0.elapsed() > timeout {
            return Ok(Some(format!(
                "the server had not drained after {} s ({} database connections left{})",
                timeout.as_secs(),
                if conns == u64::MAX { "too many".to_string() } else { conns.to_string() },
                if busy { ", still using CPU" } else { "" }
            )));
        }
    }
}

/// Resolves the server's namespace and attaches the probes to it (None when probes are off).
fn attach(cfg: &RunConfig, rt: &tokio::runtime::Runtime, system: &Sut, metrics: Option<&RunMetrics>) -> anyhow::Result<(Target, Option<ProbeSession>)> {
    let target = Target::resolve(system.netns()).with_context(|| format!("the server's namespace {}", system.netns()))?;
    if !cfg.probes {
        return Ok((target, None));
    }
    let _enter = rt.enter();
    let spec = ProbeSpec {
        netns_inum: target.netns_inum,
        http_ports: vec![sut::SERVER_PORT],
        db_ports: vec![system.db_port()],
        capture_payload: true,
    };
    let mut session = ProbeSession::attach(&spec, system.netns()).context("attaching the probes")?;
    if let Some(m) = metrics {
        // One series per run ("server"), whichever setup and namespace serve it now.
        session.agg.add_observer(Box::new(m.probes.observer("server")));
        m.probes.set_attached("server", session.probes().status());
    }
    Ok((target, Some(session)))
}

/// One line of progress on stderr.
/// `done` cells ran in this process, `skipped` were finished before (a resumed run).
fn progress(done: usize, skipped: usize, total: usize, started: Instant, cell: &CellKey, p: &load::Progress) {
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(2) } == 1;
    // Not a terminal (CI, a log file): one line every 10 s instead of a redrawn one.
    if !tty && !p.elapsed.as_secs().is_multiple_of(10) {
        return;
    }
    let per_cell = if done > 0 { started.elapsed().as_secs_f64() / done as f64 } else { p.planned.as_secs_f64() + 20.0 };
    let left = per_cell * total.saturating_sub(done + skipped) as f64 - p.elapsed.as_secs_f64();
    eprint!(
        "{}[{}/{}] {} {} {} ms r{}: {:>4.0}/{:.0} s, {} users, {:.0} req/s, {} failures; about {:.0} min left{}",
        if tty { "\r\x1b[2K" } else { "" },
        done + skipped + 1,
        total,
        cell.setup,
        cell.route,
        cell.delay_ms,
        cell.rep,
        p.elapsed.as_secs_f64(),
        p.planned.as_secs_f64(),
        p.users,
        p.requests_last_s as f64,
        p.failures,
        left.max(0.0) / 60.0,
        if tty { "" } else { "\n" }
    );
}

/// Runs (or resumes) the experiment described by `cfg`.
pub fn run(cfg: &RunConfig, resume: Option<&Path>, stop: &Stop, metrics_addr: Option<std::net::SocketAddr>) -> anyhow::Result<Outcome> {
    cfg.validate()?;
    let dir_path = run_dir(cfg, resume);
    let planned = cfg.cells();
    let index = Index {
        version: RESULTS_VERSION,
        created_unix_s: unix_now(),
        config: serde_json::to_value(cfg).context("serialising the configuration")?,
        planned: planned.clone(),
    };
    let dir = match resume {
        Some(r) => {
            let d = ResultsDir::open(r)?;
            let old = d.index()?;
            if old.planned != planned {
                bail!("{} was run with another matrix; resume with the same configuration", r.display());
            }
            d
        }
        None => ResultsDir::create(&dir_path, &index)?,
    };
    // A killed earlier run may have left a delay rule or a system under test behind.
    for removed in netem::cleanup_leftovers() {
        eprintln!("awaitlab: removed a leftover delay: {removed}");
    }
    if let Ok(true) = sut_backend(cfg.backend).backend().down(RUN_NAME) {
        eprintln!("awaitlab: removed a system under test left by an earlier run");
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let registry = prometheus::Registry::new();
    let metrics = match metrics_addr {
        Some(addr) => {
            let m = RunMetrics::new(&registry)?;
            let server = rt.block_on(crate::metrics::server::serve_metrics(addr, registry.clone()))?;
            eprintln!("awaitlab: metrics on http://{}/metrics", server.addr);
            Some((m, server))
        }
        None => None,
    };
    let metrics = metrics.as_ref().map(|(m, _)| m);
    let started = Instant::now();
    let total = planned.len();
    let mut done = 0usize;
    let mut skipped = 0usize;
    let setups: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for c in &planned {
            if !v.contains(&c.setup) {
                v.push(c.setup.clone());
            }
        }
        v
    };
    let mut system: Option<Sut> = None;
    for setup_name in setups {
        let cells: Vec<&CellKey> = planned.iter().filter(|c| c.setup == setup_name && !dir.is_done(c)).collect();
        skipped += planned.iter().filter(|c| c.setup == setup_name).count() - cells.len();
        if cells.is_empty() || stop.requested() {
            continue;
        }
        let setup = sut::Setup::from_str(&setup_name, true).map_err(|e| anyhow!("setup {setup_name}: {e}"))?;
        eprintln!("\nawaitlab: bringing up {setup_name} ({:?} back end, {:?} stack)", cfg.backend, cfg.stack);
        // One database for the whole run, seeded once: later setups only replace the server
        // (and restart PostgreSQL when max_connections changes).
        match system.as_mut() {
            None => {
                let opts = sut::Options::new(setup, sut_stack(cfg.stack), RUN_NAME);
                let s = Sut::up(sut_backend(cfg.backend), &opts).with_context(|| format!("bringing up {setup_name}"))?;
                let seed = s.seed().context("seeding the database")?;
                if seed.seeded {
                    eprintln!("awaitlab: seeded {} posts in {:.1} s", seed.rows, seed.seconds);
                }
                system = Some(s);
            }
            Some(s) => s.switch(setup, sut_stack(cfg.stack)).with_context(|| format!("switching to {setup_name}"))?,
        }
        let system = system.as_mut().expect("brought up above");
        let (mut target, mut session) = attach(cfg, &rt, system, metrics)?;

        for key in cells {
            if stop.requested() {
                break;
            }
            let mut notes = Vec::new();
            if let Some(n) = drain(system, target.netns_inum, session.as_mut(), Duration::from_secs(cfg.drain_timeout_s))? {
                // Requests queued by the last cell would pollute this one: start a fresh server.
                drop(session.take());
                system.switch(setup, sut_stack(cfg.stack)).context("restarting the server")?;
                (target, session) = attach(cfg, &rt, system, metrics)?;
                notes.push(format!("{n}; the server was restarted before the cell"));
            }
            // Only once the server is idle: a queued io_create would add rows after the reset.
            system.reset().context("resetting the database to the seed")?;
            let mark = match session.as_mut() {
                Some(s) => Some(s.mark()?),
                None => None,
            };
            if let Some(m) = metrics {
                m.cell.set_cell(&key.setup, &key.route, u64::from(key.delay_ms), key.rep);
            }
            let guard = if key.delay_ms > 0 {
                let spec = netem::DelaySpec { delay: Duration::from_millis(u64::from(key.delay_ms)), jitter: Duration::ZERO, devs: Vec::new() };
                let g = netem::set(&target, &spec, delay_choice(cfg.delay_backend)).with_context(|| format!("setting {} ms of delay", key.delay_ms))?;
                if let Some(m) = metrics {
                    m.delay.set(spec.delay, None, &format!("{:?}", g.backend()).to_lowercase());
                }
                Some(g)
            } else {
                None
            };
            let spec = load_spec(cfg, system.url(), &key.route)?;
            // PostgreSQL's refusals for want of a slot during the load: its log's count before and after.
            let refusals_before = system.db_refusals();
            let started_unix_s = unix_now();
            let token = stop.token.clone();
            let report = rt.block_on(async {
                let finished = CancellationToken::new();
                let pump = async {
                    if let Some(s) = session.as_mut() {
                        let mut last = Instant::now();
                        while !finished.is_cancelled() {
                            s.pump(Duration::from_millis(50), |_| {}).await;
                            if metrics.is_some() && last.elapsed() >= Duration::from_secs(1) {
                                last = Instant::now();
                                let _ = s.snapshot();
                            }
                        }
                    }
                };
                let load = async {
                    let mut observer = |p: &load::Progress| progress(done, skipped, total, started, key, p);
                    let r = load::run_with_metrics(&spec, &mut observer, token, metrics.map(|m| m.load.clone())).await;
                    finished.cancel();
                    r
                };
                let (r, ()) = tokio::join!(load, pump);
                r
            });
            eprintln!();
            let delay = match guard {
                Some(g) => {
                    let a = g.remove();
                    let backend = format!("{:?}", a.backend).to_lowercase();
                    if let Some(m) = metrics {
                        m.delay.clear(&backend);
                    }
                    if a.bypassed > 0 {
                        notes.push(format!("{} packets passed the delay line undelayed (queue overflow)", a.bypassed));
                    }
                    // The delay line's own hold times where it ran; otherwise (netem) the growth
                    // of the server's TCP round-trip times.
                    let from_sockets = match (a.socket_rtt_before.median_ms, a.socket_rtt_now.median_ms) {
                        (Some(b), Some(n)) => Some(n - b),
                        (None, Some(n)) => Some(n),
                        _ => None,
                    };
                    let achieved = a.hold.as_ref().filter(|h| h.packets > 0).map(|h| h.p50_us / 1000.0).or(from_sockets);
                    DelayOutcome { requested_ms: f64::from(key.delay_ms), achieved_ms: achieved, backend }
                }
                None => DelayOutcome { requested_ms: 0.0, achieved_ms: Some(0.0), backend: "none".into() },
            };
            let report = report.with_context(|| format!("load of cell {}", key.stem()))?;
            if report.stopped_early || stop.requested() {
                break;
            }
            let db_refusals = match (refusals_before, system.db_refusals()) {
                (Ok(b), Ok(a)) => Some(a.saturating_sub(b)),
                (Err(e), _) | (_, Err(e)) => {
                    notes.push(format!("PostgreSQL's refusals were not counted: {e}"));
                    None
                }
            };
            let system_record = match system.system() {
                Ok(r) => Some(r.clone()),
                Err(e) => {
                    notes.push(format!("the system under test was not recorded: {e}"));
                    None
                }
            };
            let probes = match (session.as_mut(), mark) {
                (Some(s), Some(m)) => Some(s.summary_since(&m)?),
                _ => None,
            };
            if report.in_flight_at_end > 0 {
                notes.push(format!("{} requests were still in flight when the load ended (not counted)", report.in_flight_at_end));
            }
            let cell = CellResult {
                version: RESULTS_VERSION,
                key: key.clone(),
                started_unix_s,
                backend: sut_backend(cfg.backend).name().into(),
                stack: sut_stack(cfg.stack).name().into(),
                profile: format!("{:?}", cfg.profile).to_lowercase(),
                delay,
                load: load_outcome(&report),
                probes,
                db_refusals,
                system: system_record,
                notes,
            };
            report
                .write_locust_csv(&dir.root.join("cells"), &key.stem())
                .with_context(|| format!("writing the Locust CSVs of {}", key.stem()))?;
            dir.write_cell(&cell)?;
            done += 1;
            eprintln!(
                "awaitlab: {} done: {} successes, max sRPS {:.1}, {} failures",
                key.stem(),
                cell.load.total_successes,
                cell.load.max_srps,
                cell.load.failures
            );
        }
        drop(session);
    }
    if let Some(s) = system {
        s.down().context("tearing down the system under test")?;
    }
    let interrupted = stop.requested();
    Ok(Outcome { dir: dir.root.clone(), done, skipped, interrupted })
}

//! `awaitlab load URL`: drive an HTTP server with the study's closed-loop users, stages or an
//! open model; print a progress line on stderr once a second, then a summary (or the JSON
//! report with `--json`), and optionally write Locust-compatible CSV files.
//!
//! This module only turns flags into a `LoadSpec` and prints; the generator is `crate::load`.
//! Ctrl-C or SIGTERM ends the run early and still prints and writes what was measured.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::{
    fail,
    load::{
        self,
        schedule::{parse_duration, parse_stages},
        BodySpec, ClosedSchedule, LoadError, LoadReport, LoadSpec, Model, OpenSchedule, Progress,
        RequestSpec, Route, Wait,
    },
    EXIT_USAGE,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// 0 -> 500 users at 5 users/s, then 500 users for 80 s (180 s, the study).
    Study,
    /// The study's shape in 30 s: 0 -> 500 at 30 users/s, hold to 30 s.
    Quick,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Target: http://HOST:PORT/PATH (the port and the path optional). With --route, only scheme, host and port are used.
    pub url: String,
    /// One of the study's routes: cpu (GET /posts/cpu/), io_read (GET /posts/io_read/),
    /// io_create (POST /posts/io_create/ with the study's random form fields).
    #[arg(long, value_enum)]
    pub route: Option<Route>,
    /// Load profile (closed model).
    #[arg(long, value_enum, conflicts_with_all = ["users", "stages", "rate"])]
    pub profile: Option<Profile>,
    /// Closed model: number of users (each sends its next request when the previous ends).
    #[arg(long, conflicts_with_all = ["stages", "rate"])]
    pub users: Option<i64>,
    /// Closed model: users started per second until --users are running (default: all at once).
    #[arg(long, requires = "users")]
    pub spawn_rate: Option<f64>,
    /// Closed model: stages TARGET@DURATION, e.g. "500@100s,500@80s" (ramp to 500 users over
    /// 100 s, then hold 80 s).
    #[arg(long, conflicts_with = "rate")]
    pub stages: Option<String>,
    /// Open model: requests per second (due times evenly spaced; latency from each due time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open model: ramp from 0 to --rate over this long (e.g. 10s).
    #[arg(long, requires = "rate")]
    pub ramp: Option<String>,
    /// Open model: most requests in flight (one connection each); arrivals that find none free
    /// start late and are counted.
    #[arg(long, default_value_t = 1000, requires = "rate")]
    pub max_in_flight: u32,
    /// Run time with --users or --rate (e.g. 180s, 3m).
    #[arg(long, short = 't')]
    pub run_time: Option<String>,
    /// Closed model: wait between a user's requests: constant (2s) or uniform range (0.5s-2s).
    /// Default: none.
    #[arg(long)]
    pub wait: Option<String>,
    /// HTTP method (default GET, or the route's).
    #[arg(long, short = 'X')]
    pub method: Option<String>,
    /// Extra header "Name: value" (repeatable); {rand:N} becomes N random letters.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Form field k=v (repeatable), sent urlencoded; {rand:N} becomes N random letters.
    #[arg(long = "form", conflicts_with_all = ["json_body", "body"])]
    pub form: Vec<String>,
    /// JSON body (sent as is, placeholders expanded).
    #[arg(long, conflicts_with = "body")]
    pub json_body: Option<String>,
    /// Raw body (placeholders expanded).
    #[arg(long)]
    pub body: Option<String>,
    /// Per-request timeout, connect included (default: none, as in the study).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Send `Connection: close` and open a new connection for every request.
    #[arg(long)]
    pub no_keepalive: bool,
    /// Threads that run the users (default: half the cores, leaving the rest to a server on
    /// this host).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the JSON report on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,
    /// Write Locust-compatible CSVs: PATH_stats.csv, PATH_stats_history.csv, PATH_failures.csv.
    #[arg(long)]
    pub csv_prefix: Option<PathBuf>,
    /// Do not check that the server accepts a connection before starting.
    #[arg(long)]
    pub no_check: bool,
    /// Serve Prometheus metrics (users, requests, failures by kind, client latency) at
    /// http://ADDR/metrics while the load runs (e.g. 127.0.0.1:9465; port 0 picks a free one).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    fail(&anyhow::anyhow!("{msg}"), EXIT_USAGE)
}

/// Flags to spec; every error here is a usage error.
pub(crate) fn spec_from_args(a: &Args) -> Result<LoadSpec, String> {
    let dur = |s: &str| {
        parse_duration(s)
            .map(|d| d.as_secs_f64())
            .map_err(|e| e.to_string())
    };
    let (url, mut request) = match a.route {
        Some(r) => (load::join_url(&a.url, r.path()), r.request()),
        None => (a.url.clone(), RequestSpec::default()),
    };
    if let Some(m) = &a.method {
        request.method = m.clone();
    }
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("malformed header {h:?}: expected \"Name: value\""))?;
        request
            .headers
            .push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if !a.form.is_empty() {
        let mut fields = Vec::new();
        for f in &a.form {
            let (k, v) = f
                .split_once('=')
                .ok_or_else(|| format!("malformed form field {f:?}: expected k=v"))?;
            fields.push((k.to_owned(), v.to_owned()));
        }
        request.body = BodySpec::Form(fields);
    } else if let Some(j) = &a.json_body {
        serde_json::from_str::<serde_json::Value>(&strip_placeholders(j))
            .map_err(|e| format!("--json-body is not JSON: {e}"))?;
        request.body = BodySpec::Json(j.clone());
    } else if let Some(b) = &a.body {
        request.body = BodySpec::Raw(b.clone());
    }
    let run_time = a.run_time.as_deref().map(dur).transpose()?;
    let model = if let Some(rate) = a.rate {
        let run_time = run_time.ok_or("--rate needs --run-time")?;
        let ramp = a.ramp.as_deref().map(dur).transpose()?.unwrap_or(0.0);
        if a.wait.is_some() {
            return Err("--wait applies to the closed model only".into());
        }
        Model::Open {
            schedule: OpenSchedule::ramp(rate, ramp, run_time).map_err(|e| e.to_string())?,
            max_in_flight: a.max_in_flight,
        }
    } else {
        let schedule = if let Some(p) = a.profile {
            if run_time.is_some() {
                return Err("--profile sets its own run time; leave out --run-time".into());
            }
            match p {
                Profile::Study => ClosedSchedule::study(),
                Profile::Quick => ClosedSchedule::quick(),
            }
        } else if let Some(s) = &a.stages {
            if run_time.is_some() {
                return Err("--stages sets its own run time; leave out --run-time".into());
            }
            ClosedSchedule::new(parse_stages(s).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?
        } else if let Some(u) = a.users {
            if u <= 0 {
                return Err(format!("--users must be greater than 0, not {u}"));
            }
            let u = u32::try_from(u).map_err(|_| format!("--users {u} is too large"))?;
            let run_time = run_time.ok_or("--users needs --run-time")?;
            let rate = a.spawn_rate.unwrap_or(f64::INFINITY);
            if rate.is_infinite() {
                ClosedSchedule::new(vec![
                    load::Stage {
                        target: f64::from(u),
                        duration_s: 0.0,
                    },
                    load::Stage {
                        target: f64::from(u),
                        duration_s: run_time,
                    },
                ])
                .map_err(|e| e.to_string())?
            } else {
                ClosedSchedule::ramp(u, rate, run_time).map_err(|e| e.to_string())?
            }
        } else {
            return Err("say how much load: --profile study|quick, --users N --run-time T, --stages S, or --rate R --run-time T".into());
        };
        let wait = a
            .wait
            .as_deref()
            .map(Wait::parse)
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        Model::Closed { schedule, wait }
    };
    let timeout = a
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| e.to_string())?;
    let spec = LoadSpec {
        url,
        request,
        model,
        timeout,
        keep_alive: !a.no_keepalive,
        threads: a.threads,
    };
    load::validate(&spec).map_err(|e| e.to_string())?;
    Ok(spec)
}

/// JSON validation with placeholders replaced by plain letters (they may sit inside strings).
fn strip_placeholders(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{rand:") {
        out.push_str(&rest[..i]);
        match rest[i..].find('}') {
            Some(j) => {
                out.push('x');
                rest = &rest[i + j + 1..];
            }
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn run(args: Args) -> ExitCode {
    let spec = match spec_from_args(&args) {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    raise_nofile_limit();
    // The users run on the generator's own per-core threads; this runtime only runs the
    // schedule, the collector and the signal handlers.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("starting the runtime"), 1),
    };
    match rt.block_on(drive(&args, &spec)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<LoadError>() {
                Some(le) if le.is_usage() => EXIT_USAGE,
                _ => 1,
            };
            fail(&e, code)
        }
    }
}

/// Each user holds a socket: lift the soft descriptor limit to the hard one.
fn raise_nofile_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 && l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: as above; failure leaves the old limit, which is only a capacity limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) };
    }
}

async fn drive(args: &Args, spec: &LoadSpec) -> anyhow::Result<()> {
    if !args.no_check {
        let target = load::parse_url(&spec.url)?;
        let addr = load::resolve(&target).await?;
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot connect to {} ({addr}): timed out after 10 s",
                target.authority
            )
        })?
        .with_context(|| format!("cannot connect to {} ({addr})", target.authority))?;
    }
    let registry = crate::metrics::registry()?;
    let metrics = crate::metrics::LoadMetrics::new(&registry)?;
    let _metrics_server = match args.metrics_addr {
        Some(addr) => Some(
            crate::metrics::server::serve_metrics_at(
                crate::metrics::server::MetricsAt::Asked(addr),
                registry.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let cancel = CancellationToken::new();
    let mut stop = crate::signals::Stop::install()?;
    let c = cancel.clone();
    let signals = tokio::spawn(async move {
        stop.recv().await;
        c.cancel();
    });
    let tty = std::io::stderr().is_terminal();
    let mut observer = |p: &Progress| progress_line(p, tty);
    let report = load::run_with_metrics(
        spec,
        &mut observer,
        cancel,
        args.metrics_addr.map(|_| metrics),
    )
    .await;
    signals.abort();
    if tty {
        eprintln!();
    }
    let report = report?;
    if let Some(prefix) = &args.csv_prefix {
        let dir = prefix
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let name = prefix
            .file_name()
            .and_then(|n| n.to_str())
            .context("--csv-prefix must end in a file name")?;
        report
            .write_locust_csv(dir, name)
            .with_context(|| format!("writing the CSV files {}_*.csv", prefix.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        summary(&mut out, &report)?;
    }
    Ok(())
}

fn progress_line(p: &Progress, tty: bool) {
    let p50 = p
        .p50_ms_last_s
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.2} ms"));
    let line = format!(
        "{:>6.1}/{:.0}s  users {:>5}  req/s {:>8}  failures {:>7} ({}/s)  p50 {}",
        p.elapsed.as_secs_f64(),
        p.planned.as_secs_f64(),
        p.users,
        p.requests_last_s,
        p.failures,
        p.failures_last_s,
        p50
    );
    if tty {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}

fn summary(out: &mut impl std::io::Write, r: &LoadReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{} {} ({} model, {:.1} s of {:.1} s planned{})",
        r.method,
        r.url,
        r.model,
        r.actual_duration_s,
        r.planned_duration_s,
        if r.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "requests {}  successes {}  failures {}  max users {}",
        r.requests, r.successes, r.failures, r.max_users
    )?;
    writeln!(
        out,
        "total successes {}  max sRPS {:.2} (Locust's chart; best 5 s window {:.2})",
        r.total_successes, r.max_srps, r.max_srps_5s_window
    )?;
    let q = &r.latency_ms;
    writeln!(
        out,
        "latency ms  min {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
        q.min, q.p50, q.p95, q.p99, q.max, q.mean
    )?;
    let c = &r.connect_ms;
    writeln!(
        out,
        "connect ms  {} connections  p50 {:.3}  p99 {:.3}  max {:.3}",
        c.count, c.p50, c.p99, c.max
    )?;
    if r.model == "open" {
        writeln!(
            out,
            "late starts {}  start lag p99 {:.3} ms",
            r.late_starts, r.start_lag_ms.p99
        )?;
    }
    if !r.failures_by_kind.is_empty() {
        let f: Vec<String> = r
            .failures_by_kind
            .iter()
            .map(|f| format!("{} {}", f.kind, f.count))
            .collect();
        writeln!(out, "failures by kind: {}", f.join(", "))?;
    }
    if r.in_flight_at_end > 0 {
        writeln!(
            out,
            "in flight at the end (not counted): {}",
            r.in_flight_at_end
        )?;
    }
    Ok(())
}

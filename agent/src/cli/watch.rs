//! `awaitlab watch`: attach the probes to one network namespace, print a line a second, and
//! optionally write one NDJSON record per finished request. Ctrl-C (or SIGTERM, or the target
//! vanishing) drains what the kernel already produced, prints the summary and detaches.
//!
//! It must not lose records silently: everything not delivered shows in the `lost` figures.

use std::{
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    fail,
    metrics::{server, ProbeMetrics},
    probe::aggregate::{summary::Summary, Aggregator, CpuTotals, Quantiles, Record},
    probe::namespace::Target,
    probe::{session::Session, MapSizes, ProbeError, ProbeSpec},
    EXIT_NOPERM, EXIT_USAGE,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to watch: docker:NAME_OR_ID, pid:PID, PID, netns:NAME, or a namespace path
    /// (/proc/PID/ns/net, /run/netns/NAME).
    #[arg(long)]
    pub target: String,
    /// Server port whose accepted connections carry HTTP requests (repeat for several).
    #[arg(long = "http-port", default_values_t = [8000u16], value_parser = clap::value_parser!(u16).range(1..))]
    pub http_ports: Vec<u16>,
    /// Database port whose client connections are timed (repeat for several).
    #[arg(long = "db-port", default_values_t = [5432u16], value_parser = clap::value_parser!(u16).range(1..))]
    pub db_ports: Vec<u16>,
    /// Write one JSON record per finished request to stdout (NDJSON), then a summary record;
    /// the per-second lines go to stderr.
    #[arg(long)]
    pub json: bool,
    /// Seconds between lines.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_parser = super::parse_secs)]
    pub duration: Option<f64>,
    /// Do not copy request and response heads (no method, path or status).
    #[arg(long)]
    pub no_payload: bool,
    /// Have the programs write a record per request (implied by --json). Without it they
    /// keep histograms in kernel maps that the agent reads each interval (aggregation mode:
    /// the same figures, at less cost per request; quantiles within 3.125 %).
    #[arg(long)]
    pub records: bool,
    /// Connections the probes follow at once (default 32768); more are counted as
    /// conn_map_full and not measured.
    #[arg(long, default_value_t = MapSizes::default().connections)]
    pub max_connections: u32,
    /// Threads the probes follow at once (default 16384); more are counted as thread_map_full.
    #[arg(long, default_value_t = MapSizes::default().threads)]
    pub max_threads: u32,
    /// Aggregation mode: request histograms kept at once, one per method and path, process,
    /// status (default 1024); requests past them go to OTHER /other, counted as agg_map_full.
    #[arg(long, default_value_t = MapSizes::default().request_keys)]
    pub max_request_keys: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0 picks a
    /// free port, printed on stderr). Off by default; bind a loopback address unless a scraper
    /// elsewhere must reach it.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Measuring aid for `cargo xtask bench probes --floor`: the programs attach and run but
    /// only check each socket's namespace, so no request is measured. What is left is the cost
    /// of the hooks themselves.
    #[arg(long, hide = true)]
    pub probe_floor: bool,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.05..=3600.0).contains(&v) {
        return Err("interval must be between 0.05 and 3600 seconds".into());
    }
    Ok(v)
}

pub fn run(args: Args) -> ExitCode {
    use crate::privilege::{require, Need, PROBES};
    if let Err(e) = require("awaitlab watch", "eBPF probes", Need::Caps(PROBES)) {
        return fail(&anyhow::Error::new(e), EXIT_NOPERM);
    }
    let target = match Target::resolve(&args.target) {
        Ok(t) => t,
        Err(e) => {
            let code = if e.is_usage() { EXIT_USAGE } else { 1 };
            return fail(&anyhow::Error::new(e), code);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("starting the runtime"), 1),
    };
    match rt.block_on(watch(&args, &target)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<ProbeError>() {
                Some(ProbeError::NotPermitted(_)) => EXIT_NOPERM,
                Some(ProbeError::TooManyPorts { .. } | ProbeError::Sizes(_)) => EXIT_USAGE,
                _ => 1,
            };
            fail(&e, code)
        }
    }
}

async fn watch(args: &Args, target: &Target) -> anyhow::Result<()> {
    let spec = ProbeSpec {
        netns_inum: target.netns_inum,
        http_ports: dedup(&args.http_ports),
        db_ports: dedup(&args.db_ports),
        capture_payload: !args.no_payload,
        aggregate: !(args.json || args.records),
        floor: args.probe_floor,
        sizes: MapSizes {
            connections: args.max_connections,
            threads: args.max_threads,
            request_keys: args.max_request_keys,
        },
    };
    let mut stop = crate::signals::Stop::install()?;

    // One registry for this command, handed to the exporters and the server.
    let registry = crate::metrics::registry()?;
    let probe_metrics = ProbeMetrics::new(&registry)?;
    let _metrics_server = match args.metrics_addr {
        Some(addr) => {
            Some(server::serve_metrics_at(server::MetricsAt::Asked(addr), registry.clone()).await?)
        }
        None => None,
    };

    let mut session = Session::attach(&spec, &target.spec)?;
    // The interval lines below read windows; nothing else keeps them.
    session.agg.keep_windows();
    let status = session.probes().status();
    let hooks = |live: bool| -> Vec<&str> {
        status
            .iter()
            .filter(|s| s.live == live)
            .map(|s| s.hook.as_str())
            .collect()
    };
    let (live, skipped) = (hooks(true), hooks(false));
    let ids: Vec<String> = status
        .iter()
        .filter_map(|s| s.id)
        .map(|i| i.to_string())
        .collect();
    eprintln!(
        "awaitlab: attached to network namespace {} ({}); http ports {:?}, db ports {:?}; live: {}{}; program ids {}",
        target.netns_inum,
        target.spec,
        spec.http_ports,
        spec.db_ports,
        live.join(", "),
        if skipped.is_empty() { String::new() } else { format!("; skipped: {}", skipped.join(", ")) },
        ids.join(",")
    );

    if args.metrics_addr.is_some() {
        session.agg.add_observer(Box::new(
            probe_metrics.observer(&target.spec, spec.db_ports.first().copied()),
        ));
        probe_metrics.set_attached(&target.spec, session.probes().status());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // Request records as JSON lines on stdout with --json; a write error ends the watch.
    let json = args.json;
    let mut write_error: Option<std::io::Error> = None;
    let started = session.attached_at();
    let mut cpu_prev = session.attached_reading().cpu;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.interval));
    tick.tick().await;
    let deadline = args
        .duration
        .map(|d| started + Duration::from_secs_f64(d.max(0.0)));

    let stop_reason = loop {
        tokio::select! {
            // The programs wake us only when half a megabyte is waiting (a wakeup per record
            // would cost the server microseconds per request); the 20 ms bound collects the
            // rest promptly.
            _ = session.pump(Duration::from_millis(20), |r| emit(json, &mut out, &mut write_error, r)) => {
                if let Some(e) = write_error.take() {
                    return Err(anyhow::Error::new(e).context("writing a record"));
                }
            }
            _ = tick.tick() => {
                session.drain(|r| emit(json, &mut out, &mut write_error, r));
                out.flush().context("writing stdout")?;
                let (counters, cpu) = session.snapshot()?;
                let line = window_line(started.elapsed().as_secs_f64(), args.interval, &mut session.agg, &cpu, &cpu_prev, &counters);
                cpu_prev = cpu;
                if args.json { eprintln!("{line}") } else { writeln!(out, "{line}")?; out.flush()?; }
                if !target.alive() {
                    break format!("target {} vanished", target.spec);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break "duration reached".to_string();
                }
            }
            sig = stop.recv() => break sig.verb().to_string(),
        }
    };

    // The kernel may have finished records after the last wakeup: `summary` takes them all
    // before the probes are detached (dropping the session).
    session.drain(|r| emit(json, &mut out, &mut write_error, r));
    let summary = session.summary()?;
    drop(session);
    if let Some(e) = write_error {
        return Err(anyhow::Error::new(e).context("writing a record"));
    }
    if args.json {
        serde_json::to_writer(&mut out, &summary).context("writing the summary")?;
        writeln!(out)?;
    } else {
        print_summary(&mut out, &summary)?;
    }
    out.flush().context("writing stdout")?;
    eprintln!("awaitlab: detached ({stop_reason})");
    Ok(())
}

fn dedup(v: &[u16]) -> Vec<u16> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Writes a request record as a JSON line when `json`; keeps the first write error.
fn emit(json: bool, out: &mut impl Write, error: &mut Option<std::io::Error>, rec: &Record) {
    if let (true, Record::Request(r), None) = (json, rec, &*error) {
        let written = serde_json::to_writer(&mut *out, r)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        *error = written.err();
    }
}

fn window_line(
    elapsed: f64,
    interval: f64,
    agg: &mut Aggregator,
    cpu: &CpuTotals,
    cpu_prev: &CpuTotals,
    counters: &[u64; agent_common::COUNTERS as usize],
) -> String {
    use agent_common::Counter as C;
    let w = agg.take_window();
    let ms = |q: &Quantiles, f: fn(&Quantiles) -> f64| {
        if q.count > 0 {
            format!("{:.2}", f(q))
        } else {
            "-".into()
        }
    };
    let server = Quantiles::of(&w.server);
    let rtt = Quantiles::of(&w.db_rtt);
    let r = w.ratios(None);
    let lost = counters[C::RingbufFull as usize]
        + counters[C::ConnMapFull as usize]
        + counters[C::ThreadMapFull as usize]
        + agg.malformed;
    format!(
        "{:>6.1}s  req/s {:>8.1}  server p50 {:>7} p99 {:>7} ms  db rtt p50 {:>7} p99 {:>7} ms  rt/req {:>5}  off-cpu {:>5}  lost {}  unknown {}",
        elapsed,
        w.requests as f64 / interval,
        ms(&server, |q| q.p50_ms),
        ms(&server, |q| q.p99_ms),
        ms(&rtt, |q| q.p50_ms),
        ms(&rtt, |q| q.p99_ms),
        r.db_round_trips_per_request.map_or("-".into(), |x| format!("{x:.2}")),
        cpu.off_share_since(cpu_prev).map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
        lost,
        counters[C::UnknownSocket as usize],
    )
}

fn print_summary(out: &mut impl std::io::Write, s: &Summary) -> std::io::Result<()> {
    let q = |q: &Quantiles| {
        format!(
            "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms (n={})",
            q.p50_ms, q.p90_ms, q.p99_ms, q.max_ms, q.count
        )
    };
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
    writeln!(out, "summary of {} over {:.1} s", s.target, s.duration_s)?;
    writeln!(
        out,
        "  requests          {} ({:.1}/s), status {:?}",
        s.requests, s.requests_per_s, s.status
    )?;
    for p in &s.paths {
        writeln!(out, "    {:<7} {:<40} {}", p.method, p.path, p.count)?;
    }
    writeln!(out, "  server time       {}", q(&s.server_time))?;
    writeln!(
        out,
        "  db round trips    {}  {}",
        s.db.round_trips,
        q(&s.db.round_trip)
    )?;
    writeln!(
        out,
        "  db connects       {}  {}",
        s.db.connects,
        q(&s.db.connect)
    )?;
    writeln!(
        out,
        "  per request       round trips {}  db wait {} ms  db share of server time {}  attributed {}",
        opt(s.ratios.db_round_trips_per_request),
        opt(s.ratios.db_wait_ms_per_request),
        opt(s.ratios.db_wait_share_of_server_time),
        opt(s.ratios.attributed_share)
    )?;
    writeln!(
        out,
        "  cpu               on {:.3} s  off {:.3} s  off-cpu share {}  threads {}  cpu s per wall s {}",
        s.cpu.on_cpu_s,
        s.cpu.off_cpu_s,
        opt(s.cpu.off_cpu_share),
        s.cpu.threads_seen,
        opt(s.cpu.cpu_s_per_wall_s)
    )?;
    writeln!(
        out,
        "  serving threads   {}  on {:.3} s  off {:.3} s",
        s.cpu.serving_threads, s.cpu.serving_on_cpu_s, s.cpu.serving_off_cpu_s
    )?;
    writeln!(out, "  lost              {:?}", s.lost)?;
    Ok(())
}

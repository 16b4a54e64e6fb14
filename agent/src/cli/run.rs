//! `awaitlab run`: the study's matrix in one command, then the report. Flags override the
//! configuration file; the whole configuration is checked before anything starts.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    fail,
    metrics::server::{MetricsAt, RUN_METRICS_ADDR},
    study::experiment::{
        config::{parse_delay, BackendChoice, BackendKind, Order, ProfileName, RunConfig, Stack},
        run::{run as run_matrix, Stop},
    },
    EXIT_USAGE,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML configuration (see study.toml); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// System under test: processes in namespaces (no Docker) or Docker containers.
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Python stack of the Django server.
    #[arg(long, value_enum)]
    pub stack: Option<Stack>,
    /// Load profile: the study's 180 s, or the same shape in 30 s.
    #[arg(long, value_enum)]
    pub profile: Option<ProfileName>,
    /// Setups, comma-separated (sync, async-limited, async-unlimited, async-pooled).
    #[arg(long, value_delimiter = ',')]
    pub setups: Option<Vec<String>>,
    /// Routes, comma-separated (cpu, io_read, io_create).
    #[arg(long, value_delimiter = ',')]
    pub routes: Option<Vec<String>>,
    /// Added delays in milliseconds, comma-separated (e.g. 0,100,200).
    #[arg(long, value_delimiter = ',', value_parser = parse_delay)]
    pub delays: Option<Vec<u32>>,
    /// Repetitions of every cell (3 or more give confidence intervals).
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Delay mechanism.
    #[arg(long, value_enum)]
    pub delay_backend: Option<BackendChoice>,
    /// Parent directory of run directories.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Cell order: randomised blocks (each repetition runs every cell in a fresh random order)
    /// or the fixed setup-major order.
    #[arg(long, value_enum)]
    pub order: Option<Order>,
    /// Seed of the random order (default: a random one, printed and recorded in index.json).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of unmeasured warm-up on every cell's fresh server (0: none; default 5).
    #[arg(long, value_name = "SECONDS")]
    pub warmup: Option<f64>,
    /// Continue an interrupted run in this directory (its finished cells are kept; the order,
    /// seed and warm-up are the recorded ones).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Do not attach the eBPF probes (no explanation in the report).
    #[arg(long)]
    pub no_probes: bool,
    /// Serve Prometheus metrics (probes, load, delay, the current cell) at http://ADDR/metrics
    /// while the run lasts; port 0 picks a free one. [default: 127.0.0.1:9466, or a free port
    /// when that is taken]
    #[arg(long, conflicts_with = "no_metrics")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve no metrics.
    #[arg(long)]
    pub no_metrics: bool,
    /// Stop the run when PostgreSQL or the server dies during a cell (by default the cell is
    /// recorded as failed and the next one gets a new system).
    #[arg(long)]
    pub fail_fast: bool,
}

/// Where the run serves its metrics: asked, the default, or nowhere (`--no-metrics`).
fn metrics_at(args: &Args) -> Option<MetricsAt> {
    match (args.no_metrics, args.metrics_addr) {
        (true, _) => None,
        (false, Some(a)) => Some(MetricsAt::Asked(a)),
        (false, None) => Some(MetricsAt::Default(RUN_METRICS_ADDR)),
    }
}

fn configure(args: &Args) -> anyhow::Result<RunConfig> {
    let mut cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    if let Some(v) = args.backend {
        cfg.backend = v;
    }
    if let Some(v) = args.stack {
        cfg.stack = v;
    }
    if let Some(v) = args.profile {
        cfg.profile = v;
    }
    if let Some(v) = &args.setups {
        cfg.setups = v.clone();
    }
    if let Some(v) = &args.routes {
        cfg.routes = v.clone();
    }
    if let Some(v) = &args.delays {
        cfg.delays_ms = v.clone();
    }
    if let Some(v) = args.repeat {
        cfg.repeat = v;
    }
    if let Some(v) = args.delay_backend {
        cfg.delay_backend = v;
    }
    if let Some(v) = &args.results {
        cfg.results_dir = v.clone();
    }
    if args.no_probes {
        cfg.probes = false;
    }
    if let Some(v) = args.order {
        cfg.order = v;
    }
    if let Some(v) = args.seed {
        cfg.seed = Some(v);
    }
    if args.fail_fast {
        cfg.fail_fast = true;
    }
    if let Some(v) = args.warmup {
        cfg.warmup_s = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: Args) -> ExitCode {
    // Before any thread starts: the signal thread below takes SIGINT and SIGTERM for all.
    crate::signals::block();
    let cfg = match configure(&args) {
        Ok(c) => c,
        Err(e) => return fail(&e, EXIT_USAGE),
    };
    let why = "namespaces, processes of other users, delay rules, eBPF probes";
    if let Err(e) = crate::privilege::require("awaitlab run", why, crate::privilege::Need::Root) {
        return fail(&anyhow::Error::new(e), crate::EXIT_NOPERM);
    }
    if let Some(r) = &args.resume {
        if !r.join("index.json").is_file() {
            return fail(
                &anyhow::anyhow!(
                    "--resume {}: not a results directory (no index.json)",
                    r.display()
                ),
                EXIT_USAGE,
            );
        }
    }
    let stop = Stop::new();
    let watcher_stop = stop.clone();
    if let Err(e) = crate::signals::on_stop(move |_| {
        eprintln!("\nawaitlab: stopping: the cell in progress is dropped, the delay cleared, the system under test torn down");
        watcher_stop.request();
    }) {
        return fail(&anyhow::anyhow!("starting the signal thread: {e}"), 1);
    }
    let outcome = match run_matrix(&cfg, args.resume.as_deref(), &stop, metrics_at(&args)) {
        Ok(o) => o,
        Err(e) => return fail(&e, 1),
    };
    eprintln!(
        "awaitlab: {} cells run, {} already done, in {}",
        outcome.done,
        outcome.skipped,
        outcome.dir.display()
    );
    if outcome.load_s > 0.0 {
        // What the run cost beyond its load: servers started, warm-ups, drains, resets, writes.
        eprintln!(
            "awaitlab: load time {:.0} s, wall time {:.0} s, wall / load {:.2}",
            outcome.load_s,
            outcome.wall_s,
            outcome.wall_s / outcome.load_s
        );
        let parts: Vec<String> = outcome
            .phases
            .named()
            .iter()
            .map(|(name, secs)| format!("{name} {secs:.0} s"))
            .collect();
        eprintln!("awaitlab: wall time by phase: {}", parts.join(", "));
    }
    match crate::study::report::write(&outcome.dir) {
        Ok((md, html)) => println!("{}\n{}", md.display(), html.display()),
        Err(e) => return fail(&anyhow::Error::new(e).context("writing the report"), 1),
    }
    if outcome.interrupted {
        eprintln!(
            "awaitlab: interrupted; continue with --resume {}",
            outcome.dir.display()
        );
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}

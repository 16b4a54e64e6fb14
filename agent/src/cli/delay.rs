//! `awaitlab delay set|clear|show TARGET`: inject a network delay into a target's namespace,
//! remove it, or show what is installed.
//!
//! `set` holds the delay until Ctrl-C or SIGTERM (or `delay clear` from elsewhere), printing
//! requested vs achieved once a second, then removes everything it installed. It must not change
//! anything on bad input: every argument and the target are checked before the first change.

use std::{process::ExitCode, time::Duration};

use crate::{
    delay::{self, BackendChoice, DelayError, DelaySpec},
    fail,
    probe::namespace::Target,
    EXIT_NOPERM, EXIT_USAGE,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Add a delay to each round trip through the target's namespace (until Ctrl-C / SIGTERM):
    /// netem holds the packets it sends, nfqueue the packets it receives.
    Set(SetArgs),
    /// Remove every delay awaitlab installed in the target (stopping a running `delay set`).
    Clear(TargetArg),
    /// Show the delays awaitlab installed in the target and the RTT its connections see.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// docker:NAME_OR_ID, pid:PID, PID, netns:NAME, or a namespace path.
    pub target: String,
    /// Delay in milliseconds (0 to 60000, `MAX_DELAY_MS`; fractions allowed).
    #[arg(long, value_parser = parse_ms, allow_negative_numbers = true)]
    pub ms: f64,
    /// Jitter in milliseconds: each packet's delay is uniform in ms ± jitter (never reordered).
    #[arg(long = "jitter-ms", default_value_t = 0.0, value_parser = parse_ms, allow_negative_numbers = true)]
    pub jitter_ms: f64,
    /// Mechanism: netem if the kernel has it (auto), or force one.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Interface inside the target to delay (repeat for several; default: all but lo).
    #[arg(long = "dev")]
    pub devs: Vec<String>,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = super::parse_secs)]
    pub duration: Option<f64>,
    /// Print the per-second lines as JSON on stderr (the final summary is always one JSON line on
    /// stdout).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TargetArg {
    /// docker:NAME_OR_ID, pid:PID, PID, netns:NAME, or a namespace path.
    pub target: String,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// docker:NAME_OR_ID, pid:PID, PID, netns:NAME, or a namespace path.
    pub target: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s} ms: a delay cannot be negative"));
    }
    if v > f64::from(delay::MAX_DELAY_MS) {
        return Err(format!(
            "{s} ms is over the {} ms maximum",
            delay::MAX_DELAY_MS
        ));
    }
    Ok(v)
}

fn err_code(e: &DelayError) -> u8 {
    if e.is_usage() {
        EXIT_USAGE
    } else {
        1
    }
}

pub fn run(args: Args) -> ExitCode {
    let why = "network namespaces, iptables, tc, its state in /run";
    if let Err(e) = crate::privilege::require("awaitlab delay", why, crate::privilege::Need::Root) {
        return fail(&anyhow::Error::new(e), EXIT_NOPERM);
    }
    // Signals are taken synchronously by the main thread (signals::wait in `set`), and SIGHUP
    // too: a closed terminal must remove the delay.
    crate::signals::block();
    let result = match args.action {
        Action::Set(a) => set(a),
        Action::Clear(a) => clear(&a.target),
        Action::Show(a) => show(&a.target, a.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = err_code(&e);
            fail(&anyhow::Error::new(e), code)
        }
    }
}

fn resolve(spec: &str) -> Result<Target, DelayError> {
    Ok(Target::resolve(spec)?)
}

fn set(a: SetArgs) -> Result<ExitCode, DelayError> {
    let target = resolve(&a.target)?;
    let spec = DelaySpec {
        delay: Duration::from_secs_f64(a.ms / 1e3),
        jitter: Duration::from_secs_f64(a.jitter_ms / 1e3),
        devs: a.devs.clone(),
        // This process exists only to hold the delay: `delay clear` stops it.
        clear_stops_owner: true,
    };
    let guard = delay::set(&target, &spec, a.backend)?;
    eprintln!(
        "awaitlab: delay {} ms (jitter {} ms) set on {} [{}] with backend {} (marker {}); Ctrl-C removes it",
        a.ms,
        a.jitter_ms,
        target.spec,
        guard.devs().join(","),
        guard.backend(),
        guard.marker()
    );
    let deadline = a
        .duration
        .map(|d| std::time::Instant::now() + Duration::from_secs_f64(d));
    let mut last_seen = 0;
    loop {
        let step = match deadline {
            Some(d) => d
                .saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_secs(1)),
            None => Duration::from_secs(1),
        };
        if crate::signals::wait(Some(step)).is_some()
            || deadline.is_some_and(|d| std::time::Instant::now() >= d)
        {
            break;
        }
        if !target.alive() {
            eprintln!("awaitlab: target {} is gone", target.spec);
            break;
        }
        let now = guard.achieved();
        if a.json {
            eprintln!(
                "{}",
                serde_json::json!({"type": "interval", "achieved": now})
            );
        } else {
            let hold = now
                .hold
                .filter(|h| h.packets > 0)
                .map(|h| {
                    format!(
                        "hold p50 {:.3} p99 {:.3} ms",
                        h.p50_us / 1e3,
                        h.p99_us / 1e3
                    )
                })
                .unwrap_or_else(|| "hold -".into());
            let rtt = now
                .socket_rtt_now
                .median_ms
                .map(|m| format!("{m:.2} ms"))
                .unwrap_or_else(|| "-".into());
            eprintln!(
                "{:7.1}s  pkts/s {:8}  {hold}  bypassed {}  socket rtt {rtt} ({} conns)",
                now.seconds,
                now.packets_seen - last_seen,
                now.bypassed,
                now.socket_rtt_now.sockets
            );
        }
        last_seen = now.packets_seen;
    }
    let fin = guard.remove();
    println!(
        "{}",
        serde_json::json!({"type": "summary", "achieved": fin})
    );
    eprintln!("awaitlab: delay removed from {}", target.spec);
    Ok(ExitCode::SUCCESS)
}

fn clear(spec: &str) -> Result<ExitCode, DelayError> {
    let target = resolve(spec)?;
    let removed = delay::clear(&target)?;
    if removed.is_empty() {
        eprintln!("awaitlab: no delay by awaitlab on {}", target.spec);
    }
    for r in removed {
        eprintln!("awaitlab: removed {r}");
    }
    Ok(ExitCode::SUCCESS)
}

fn show(spec: &str, json: bool) -> Result<ExitCode, DelayError> {
    let target = resolve(spec)?;
    let i = delay::show(&target)?;
    if json {
        println!("{}", serde_json::to_string(&i).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    if i.rules.is_empty() && i.qdiscs.is_empty() {
        println!("{}: no delay by awaitlab", i.target);
    }
    for r in &i.rules {
        println!(
            "{}: nfqueue {} on {} queue {} packets {} owner pid {}{}",
            i.target,
            r.marker,
            r.dev,
            r.queue,
            r.packets.map_or("-".into(), |p| p.to_string()),
            r.owner_pid,
            if r.owner_running {
                ""
            } else {
                " (not running)"
            }
        );
    }
    for q in &i.qdiscs {
        println!("{}: netem on {}: {}", i.target, q.dev, q.spec);
    }
    println!(
        "{}: socket rtt median {} over {} connections",
        i.target,
        i.socket_rtt
            .median_ms
            .map_or("-".into(), |m| format!("{m:.2} ms")),
        i.socket_rtt.sockets
    );
    Ok(ExitCode::SUCCESS)
}

//! `cargo xtask bench probes`: what the agent's probes cost a busy web server.
//!
//! nginx serves a constant response inside a private namespace; wrk loads it from the root
//! namespace, alternately without the agent, with the agent in per-request mode (`watch
//! --records`: a ring-buffer record per request) and in aggregation mode (`watch`: histograms in
//! kernel maps), and the rounds are compared by median throughput, the agent's CPU time and the
//! kernel time of its eBPF programs. Traffic goes
//! only to `netns::NS_ADDR`, inside the namespace this command creates. Every process, the
//! namespace and the sysctl are undone by guards, also on error, panic or Ctrl-C; this module
//! must not leave any of them behind, and must not fail a run for missing the throughput target
//! (it reports, CI decides).

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::bpfstats;
use super::netns::{self, BenchNetns};
use super::util::{
    bpf_maps_bytes, catch_interrupts, check_interrupted, http_get_status, median, proc_status_kib,
    tail, temp_path_directives, NGINX,
};
use super::wrk::{self, WrkResult};
use crate::cmd::{self, secs, ChildGuard};

#[derive(Args)]
pub struct ProbesArgs {
    /// Rounds; each runs wrk once without and once with the agent.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Seconds of load per wrk run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// Debugging aid: skip the with-probes half (tests the harness without an agent).
    #[arg(long, hide = true)]
    no_agent: bool,
    /// Debugging aid: run this binary as the agent instead of building target/release/awaitlab
    /// (e.g. a stand-in script to test the harness's with-probes half).
    #[arg(long, hide = true, conflicts_with = "no_agent")]
    agent_bin: Option<PathBuf>,
}

const HTTP_PORT: u16 = 8080;
/// Long enough for the agent to load and attach all programs on a slow CI host.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent flushes results on SIGINT; give it time before SIGKILL.
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// The ratios with/without the issue sets as the goals, per mode.
const TARGET_RATIO_RECORDS: f64 = 0.97;
const TARGET_RATIO_AGGREGATE: f64 = 0.99;

/// How the agent runs: a record per request, or histograms in maps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Records,
    Aggregate,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Records, Mode::Aggregate];
    fn name(self) -> &'static str {
        match self {
            Mode::Records => "records",
            Mode::Aggregate => "aggregate",
        }
    }
    fn target(self) -> f64 {
        match self {
            Mode::Records => TARGET_RATIO_RECORDS,
            Mode::Aggregate => TARGET_RATIO_AGGREGATE,
        }
    }
    fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::Records => &["--records"],
            Mode::Aggregate => &[],
        }
    }
}
/// Steal above which a round is flagged as noisy.
const NOISY_STEAL: f64 = 0.02;
/// The agent's resident memory the issue sets as the goal, MiB.
const TARGET_RSS_MIB: f64 = 40.0;

/// One wrk run with the agent attached, and what the agent cost during it.
struct WithProbes {
    wrk: WrkResult,
    /// Agent utime+stime during the wrk run only (startup and program loading excluded).
    agent_cpu_s: f64,
    /// Agent utime+stime from start to just before SIGINT.
    agent_cpu_total_s: f64,
    bpf: bpfstats::Delta,
    clean_exit: bool,
    /// The agent's resident memory at the end of the load (VmRSS), and its peak so far
    /// (VmHWM, which includes parsing the kernel's BTF at start), MiB.
    agent_rss_mib: f64,
    agent_rss_peak_mib: f64,
    /// Kernel memory of the agent's BPF maps (memlock of its map descriptors), MiB.
    maps_mib: f64,
}

impl WithProbes {
    fn cpu_s_per_100k(&self) -> f64 {
        per(self.agent_cpu_s * 100_000.0, self.wrk.requests)
    }
    fn bpf_ns_per_req(&self) -> f64 {
        per(self.bpf.run_time_ns as f64, self.wrk.requests)
    }
    fn bpf_runs_per_req(&self) -> f64 {
        per(self.bpf.run_cnt as f64, self.wrk.requests)
    }
}

fn per(x: f64, requests: u64) -> f64 {
    if requests == 0 {
        f64::NAN
    } else {
        x / requests as f64
    }
}

struct Round {
    without: WrkResult,
    /// One run per mode (`Mode::ALL` order), empty with --no-agent.
    with: Vec<(Mode, WithProbes)>,
}

pub fn run(args: &ProbesArgs) -> Result<()> {
    cmd::become_root(
        "the probes benchmark creates a network namespace and loads eBPF, and needs root",
    )?;
    for tool in [NGINX, "wrk", "bpftool", "ip"] {
        ensure!(
            cmd::succeeds(Command::new("sh").args(["-c", "command -v \"$1\"", "sh", tool])),
            "{tool} not found; run `cargo xtask setup`"
        );
    }
    let agent = if args.no_agent {
        None
    } else if let Some(bin) = &args.agent_bin {
        Some(bin.clone())
    } else {
        // Release, like users run it: a debug agent would overstate its own cost.
        cmd::run(cmd::cargo().args(["build", "--release", "-p", "agent"]))
            .context("building the agent")?;
        let path = cmd::target_dir().join("release/awaitlab");
        ensure!(
            path.is_file(),
            "{} is missing after the build",
            path.display()
        );
        Some(path)
    };

    let out_dir = cmd::target_dir().join("bench/probes");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    catch_interrupts();
    let tmp = TempDir::create()?;
    let ns = BenchNetns::create().context("creating the benchmark namespace")?;
    let _nginx = start_nginx(&ns, tmp.path())?;
    let url = format!("http://{}:{HTTP_PORT}/", netns::NS_ADDR);

    // Warm caches and connection paths so that round 1's "without" run is not penalised.
    eprintln!("warm-up");
    wrk::run(&url, args.duration.min(2))?;
    check_interrupted()?;

    let mut rounds = Vec::new();
    for round in 1..=args.runs {
        eprintln!("\nround {round}/{}: without probes", args.runs);
        let without = wrk::run(&url, args.duration)?;
        check_interrupted()?;
        let mut with = Vec::new();
        if let Some(agent) = &agent {
            for mode in Mode::ALL {
                eprintln!("round {round}/{}: with probes ({})", args.runs, mode.name());
                let w = with_probes(agent, &ns, &url, args.duration, &out_dir, round, mode)?;
                with.push((mode, w));
                check_interrupted()?;
            }
        }
        print_round(round, &without, &with);
        rounds.push(Round { without, with });
    }

    let mut profiles = Vec::new();
    if let Some(agent) = &agent {
        for mode in Mode::ALL {
            eprintln!(
                "\nprofile run ({}): with probes and kernel BPF statistics enabled",
                mode.name()
            );
            let p = with_probes(agent, &ns, &url, args.duration, &out_dir, 0, mode)?;
            print_profile(mode, &p);
            profiles.push((mode, p));
        }
    }
    print_summary(&rounds, &profiles);
    let json_path = out_dir.join("summary.json");
    write_json(&json_path, args, &rounds, &profiles)?;
    println!("\nmachine-readable summary: {}", json_path.display());
    if agent.is_some() {
        println!(
            "agent logs: {}/agent-round-*.{{stdout,stderr}}",
            out_dir.display()
        );
    }

    let unclean = rounds
        .iter()
        .flat_map(|r| &r.with)
        .filter(|(_, w)| !w.clean_exit)
        .count();
    ensure!(
        unclean == 0,
        "the agent did not exit cleanly on SIGINT in {unclean} round(s); see its logs"
    );
    Ok(())
}

/// Removes the nginx runtime directory when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("awlbench-{}", std::process::id()));
        // A stale directory from an earlier process with the same pid holds nothing we need.
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

fn nginx_config(tmp: &Path, nginx_v: &str) -> String {
    let t = tmp.display();
    let temp_paths = temp_path_directives(tmp, nginx_v);
    // One worker process in the foreground: a single pid to own, signal and account for.
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {t}/nginx.pid;
error_log {t}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp_paths}    server {{
        listen {HTTP_PORT};
        location / {{ default_type text/plain; return 200 \"ok\\n\"; }}
    }}
}}
"
    )
}

fn start_nginx(ns: &BenchNetns, tmp: &Path) -> Result<ChildGuard> {
    // `nginx -V` prints its configure flags to stderr.
    let v = Command::new(NGINX)
        .arg("-V")
        .output()
        .context("running nginx -V")?;
    let conf = tmp.join("nginx.conf");
    fs::write(
        &conf,
        nginx_config(tmp, &String::from_utf8_lossy(&v.stderr)),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let conf_s = conf.to_string_lossy().into_owned();
    let prefix = format!("{}/", tmp.display());
    let error_log = tmp.join("error.log").to_string_lossy().into_owned();
    let mut nginx = ChildGuard::spawn(
        "nginx",
        // -e: the compiled-in error log (/var/log/nginx) would be opened before the config is read.
        ns.exec(NGINX)
            .args(["-p", &prefix, "-e", &error_log, "-c", &conf_s]),
        libc::SIGTERM,
        Duration::from_secs(5),
    )?;

    let addr = SocketAddr::new(netns::NS_ADDR.parse().context("NS_ADDR")?, HTTP_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check_interrupted()?;
        if let Some(status) = nginx.try_wait()? {
            bail!(
                "nginx exited ({status}) before serving; its error log:\n{}",
                tail(&tmp.join("error.log"))
            );
        }
        match http_get_status(addr) {
            Ok(200) => break,
            Ok(code) => bail!("nginx answered {code} instead of 200"),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!(
                    "nginx not ready at {addr} after 10 s; log:\n{}",
                    tail(&tmp.join("error.log"))
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("nginx ready at {addr} in namespace {}", ns.name());
    Ok(nginx)
}

fn with_probes(
    agent: &Path,
    ns: &BenchNetns,
    url: &str,
    duration: u32,
    out_dir: &Path,
    round: u32,
    mode: Mode,
) -> Result<WithProbes> {
    // Round 0 is the profile run.
    let stats = round == 0;
    // bpf_stats adds two clock reads to every program run: it is on only for the separate
    // profile run, never while throughput is compared.
    let _stats = if stats {
        Some(bpfstats::StatsEnabled::enable()?)
    } else {
        None
    };
    let stdout_path = out_dir.join(format!("agent-round-{round}-{}.stdout", mode.name()));
    let stderr_path = out_dir.join(format!("agent-round-{round}-{}.stderr", mode.name()));
    let stdout = File::create(&stdout_path)
        .with_context(|| format!("creating {}", stdout_path.display()))?;
    let stderr = File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    let mut child = ChildGuard::spawn(
        "awaitlab agent",
        Command::new(agent)
            .arg("watch")
            .arg("--target")
            .arg(ns.path())
            .args(["--http-port", &HTTP_PORT.to_string()])
            .args(mode.flags())
            // Extra agent flags for experiments (e.g. --no-payload), split on whitespace.
            .args(
                std::env::var("AWL_BENCH_AGENT_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .stdout(stdout)
            .stderr(stderr),
        libc::SIGINT,
        AGENT_GRACE,
    )?;

    let started = Instant::now();
    loop {
        check_interrupted()?;
        if has_attached_line(&stderr_path) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the agent exited ({status}) before attaching; stderr:\n{}",
                tail(&stderr_path)
            );
        }
        if started.elapsed() > ATTACH_TIMEOUT {
            bail!(
                "the agent did not print \"attached\" within {}; stderr:\n{}",
                secs(ATTACH_TIMEOUT),
                tail(&stderr_path)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("agent attached after {}", secs(started.elapsed()));

    let pid = child.pid();
    let cpu0 = cpu_seconds(pid)?;
    let bpf0 = bpfstats::snapshot()?;
    let wrk = wrk::run(url, duration)?;
    // Both read before SIGINT: shutdown work is not part of the steady-state cost.
    let bpf1 = bpfstats::snapshot()?;
    let cpu1 = cpu_seconds(pid)?;
    let agent_rss_mib = proc_status_kib(pid, "VmRSS")? as f64 / 1024.0;
    let agent_rss_peak_mib = proc_status_kib(pid, "VmHWM")? as f64 / 1024.0;
    let maps_mib = bpf_maps_bytes(pid) as f64 / (1024.0 * 1024.0);
    let bpf = bpfstats::delta(&bpf0, &bpf1);
    if stats && bpf.programs == 0 {
        eprintln!("warning: no loaded BPF program is named awl_*; kernel-side cost reads as 0");
    }

    let (status, killed) = child.stop()?;
    let clean_exit = status.success() && !killed;
    if !clean_exit {
        eprintln!(
            "warning: the agent exited with {status}{}",
            if killed { " after SIGKILL" } else { "" }
        );
    }
    Ok(WithProbes {
        wrk,
        agent_cpu_s: cpu1 - cpu0,
        agent_cpu_total_s: cpu1,
        bpf,
        clean_exit,
        agent_rss_mib,
        agent_rss_peak_mib,
        maps_mib,
    })
}

/// The agent logs one line containing "attached" once all its probes are live. Lines like
/// "... not attached" or "... failed to be attached" do not count.
fn has_attached_line(stderr_path: &Path) -> bool {
    let Ok(text) = fs::read_to_string(stderr_path) else {
        return false;
    };
    text.lines().any(|l| {
        let words: Vec<&str> = l
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        words.iter().enumerate().any(|(i, w)| {
            *w == "attached"
                && !matches!(
                    i.checked_sub(1).map(|j| words[j]),
                    Some("not" | "be" | "been" | "never")
                )
        })
    })
}

/// utime + stime of all the process's threads, from `/proc/PID/stat` (fields 14 and 15).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces and parentheses; fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so field N is at index N - 3.
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {n} of {path}"))
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(total as f64 / hz as f64)
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}us"))
}

fn print_round(round: u32, without: &WrkResult, with: &[(Mode, WithProbes)]) {
    println!("\nround {round}");
    println!(
        "  {:<10} {:>10} {:>11} {:>9} {:>9} {:>6} {:>11} {:>14}",
        "probes", "requests", "req/s", "p50", "p99", "steal", "agent CPU", "CPU s/100k req"
    );
    let row = |label: &str, w: &WrkResult, rest: String| {
        println!(
            "  {:<10} {:>10} {:>11.0} {:>9} {:>9} {:>6} {rest}",
            label,
            w.requests,
            w.requests_per_sec,
            fmt_us(w.p50_us),
            fmt_us(w.p99_us),
            w.steal_share
                .map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0))
        );
        if w.non_2xx > 0 || w.socket_errors.is_some() {
            println!(
                "             warning: {} non-2xx responses, socket errors: {}",
                w.non_2xx,
                w.socket_errors.as_deref().unwrap_or("none")
            );
        }
    };
    row("off", without, String::new());
    for (mode, p) in with {
        row(
            mode.name(),
            &p.wrk,
            format!(
                "{:>10.3}s {:>14.4}   ratio {:.3}",
                p.agent_cpu_s,
                p.cpu_s_per_100k(),
                p.wrk.requests_per_sec / without.requests_per_sec
            ),
        );
    }
}

/// Medians over the rounds of one mode.
struct ModeSummary {
    mode: Mode,
    rps: f64,
    ratio: f64,
    cpu_s_per_100k: f64,
    /// Largest RSS of the agent at the end of a round's load, its largest peak, and its maps'
    /// memory, MiB.
    rss_mib: f64,
    rss_peak_mib: f64,
    maps_mib: f64,
}

fn summarize(rounds: &[Round]) -> (f64, Vec<ModeSummary>) {
    let rps_without = median(rounds.iter().map(|r| r.without.requests_per_sec).collect());
    let modes = Mode::ALL
        .iter()
        .filter_map(|&mode| {
            let with: Vec<&WithProbes> = rounds
                .iter()
                .flat_map(|r| &r.with)
                .filter(|(m, _)| *m == mode)
                .map(|(_, w)| w)
                .collect();
            if with.is_empty() {
                return None;
            }
            let max = |f: fn(&WithProbes) -> f64| with.iter().map(|w| f(w)).fold(0.0, f64::max);
            // The ratio of each round (its own without-run), then the median: rounds drift.
            let ratio = median(
                rounds
                    .iter()
                    .flat_map(|r| {
                        r.with
                            .iter()
                            .filter(|(m, _)| *m == mode)
                            .map(|(_, w)| w.wrk.requests_per_sec / r.without.requests_per_sec)
                    })
                    .collect(),
            );
            Some(ModeSummary {
                mode,
                rps: median(with.iter().map(|w| w.wrk.requests_per_sec).collect()),
                ratio,
                cpu_s_per_100k: median(with.iter().map(|w| w.cpu_s_per_100k()).collect()),
                rss_mib: max(|w| w.agent_rss_mib),
                rss_peak_mib: max(|w| w.agent_rss_peak_mib),
                maps_mib: max(|w| w.maps_mib),
            })
        })
        .collect();
    (rps_without, modes)
}

fn print_profile(mode: Mode, p: &WithProbes) {
    println!(
        "\nkernel-side cost, {} mode (profile run, bpf_stats on; not part of the ratio)",
        mode.name()
    );
    let reqs = p.wrk.requests.max(1) as f64;
    println!(
        "  all programs     {:>7.0} ns/req  {:>6.2} runs/req   at {:.0} req/s",
        p.bpf_ns_per_req(),
        p.bpf_runs_per_req(),
        p.wrk.requests_per_sec
    );
    for (name, ns, cnt) in &p.bpf.per_program {
        println!(
            "  {name:<16} {:>7.0} ns/req  {:>6.2} runs/req  {:>5.0} ns/run",
            *ns as f64 / reqs,
            *cnt as f64 / reqs,
            *ns as f64 / (*cnt).max(1) as f64
        );
    }
}

fn print_summary(rounds: &[Round], profiles: &[(Mode, WithProbes)]) {
    let (rps_without, modes) = summarize(rounds);
    println!("\nsummary over {} round(s) (medians)", rounds.len());
    let noisy = rounds
        .iter()
        .filter(|r| {
            std::iter::once(&r.without)
                .chain(r.with.iter().map(|(_, w)| &w.wrk))
                .any(|w| w.steal_share.is_some_and(|s| s > NOISY_STEAL))
        })
        .count();
    if noisy > 0 {
        println!(
            "  warning: {noisy} round(s) ran while the hypervisor took over {:.0} % of the CPUs (steal); their ratios measure the neighbours too",
            NOISY_STEAL * 100.0
        );
    }
    println!("  throughput without probes      {rps_without:>12.0} req/s");
    if modes.is_empty() {
        println!("  (--no-agent: with-probes half skipped)");
        return;
    }
    for s in &modes {
        let target = s.mode.target();
        println!("  {} mode", s.mode.name());
        println!("    throughput with probes       {:>12.0} req/s", s.rps);
        println!(
            "    ratio with/without           {:>12.3}   ({} target >= {target})",
            s.ratio,
            if s.ratio >= target { "meets" } else { "BELOW" }
        );
        println!(
            "    agent CPU per 100k requests  {:>12.4} s   (user+system, during load)",
            s.cpu_s_per_100k
        );
        if let Some((_, p)) = profiles.iter().find(|(m, _)| *m == s.mode) {
            println!(
                "    BPF kernel time per request  {:>12.0} ns",
                p.bpf_ns_per_req()
            );
        }
        println!(
            "    agent RSS under load         {:>12.1} MiB ({} target <= {TARGET_RSS_MIB} MiB at {:.0} req/s)",
            s.rss_mib,
            if s.rss_mib <= TARGET_RSS_MIB { "meets" } else { "ABOVE" },
            s.rps
        );
        println!(
            "    agent peak RSS (start incl.) {:>12.1} MiB",
            s.rss_peak_mib
        );
        println!("    BPF maps (kernel memory)     {:>12.1} MiB", s.maps_mib);
    }
}

fn wrk_json(w: &WrkResult) -> serde_json::Value {
    json!({
        "requests": w.requests,
        "requests_per_sec": w.requests_per_sec,
        "p50_us": w.p50_us,
        "p99_us": w.p99_us,
        "non_2xx": w.non_2xx,
        "socket_errors": w.socket_errors,
        "steal_share": w.steal_share,
    })
}

fn with_json(w: &WithProbes) -> serde_json::Value {
    json!({
        "wrk": wrk_json(&w.wrk),
        "agent_cpu_seconds": w.agent_cpu_s,
        "agent_cpu_seconds_total": w.agent_cpu_total_s,
        "agent_cpu_seconds_per_100k_requests": w.cpu_s_per_100k(),
        "bpf_programs": w.bpf.programs,
        "bpf_run_time_ns": w.bpf.run_time_ns,
        "bpf_run_cnt": w.bpf.run_cnt,
        "bpf_ns_per_request": w.bpf_ns_per_req(),
        "agent_clean_exit": w.clean_exit,
        "agent_rss_mib": w.agent_rss_mib,
        "agent_rss_peak_mib": w.agent_rss_peak_mib,
        "bpf_maps_mib": w.maps_mib,
    })
}

/// Stable schema (bump `version` on any incompatible change), built from the same data as the
/// tables. NaN (no requests) becomes null.
fn write_json(
    path: &Path,
    args: &ProbesArgs,
    rounds: &[Round],
    profiles: &[(Mode, WithProbes)],
) -> Result<()> {
    let (rps_without, modes) = summarize(rounds);
    let by_mode = |with: &[(Mode, WithProbes)]| -> serde_json::Map<String, serde_json::Value> {
        with.iter()
            .map(|(m, w)| (m.name().to_string(), with_json(w)))
            .collect()
    };
    let rounds_json: Vec<_> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "round": i + 1,
                "without_probes": wrk_json(&r.without),
                "with_probes": by_mode(&r.with),
            })
        })
        .collect();
    let summary: serde_json::Map<String, serde_json::Value> = modes
        .iter()
        .map(|s| {
            let profile = profiles.iter().find(|(m, _)| *m == s.mode);
            (
                s.mode.name().to_string(),
                json!({
                    "target_ratio": s.mode.target(),
                    "requests_per_sec_with_probes": s.rps,
                    "ratio": s.ratio,
                    "agent_cpu_seconds_per_100k_requests": s.cpu_s_per_100k,
                    "bpf_ns_per_request": profile.map(|(_, p)| p.bpf_ns_per_req()),
                    "agent_rss_mib": s.rss_mib,
                    "agent_rss_peak_mib": s.rss_peak_mib,
                    "bpf_maps_mib": s.maps_mib,
                }),
            )
        })
        .collect();
    let doc = json!({
        "version": 2,
        "bench": "probes",
        "duration_seconds": args.duration,
        "wrk": {"threads": 1, "connections": 50},
        "rounds": rounds_json,
        "profiles": by_mode(profiles),
        "summary": {
            "requests_per_sec_without_probes": rps_without,
            "modes": summary,
        },
    });
    let text = serde_json::to_string_pretty(&doc).context("serializing the summary")?;
    fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_line_detection() {
        let dir = std::env::temp_dir().join(format!("xtask-attached-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("stderr");
        fs::write(
            &f,
            "INFO loading\nWARN probe sched_switch not attached: EPERM\n",
        )
        .expect("write");
        assert!(!has_attached_line(&f));
        fs::write(
            &f,
            "INFO loading\n2024-01-01T00:00:00Z  INFO awaitlab: attached 5 probes\n",
        )
        .expect("write");
        assert!(has_attached_line(&f));
        fs::write(&f, "attached\n").expect("write");
        assert!(has_attached_line(&f));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn nginx_config_skips_directives_of_missing_modules() {
        let c = nginx_config(
            Path::new("/tmp/x"),
            "configure arguments: --without-http_uwsgi_module",
        );
        assert!(c.contains("client_body_temp_path /tmp/x/client_body_temp_path;"));
        assert!(c.contains("fastcgi_temp_path"));
        assert!(!c.contains("uwsgi_temp_path"));
        assert!(c.contains("return 200 \"ok\\n\";"));
    }
}

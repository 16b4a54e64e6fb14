//! `cargo xtask bench probes`: what the agent's probes cost a busy web server.
//!
//! nginx serves a constant response inside a private namespace; one wrk run loads it from the
//! root namespace for the whole benchmark, while the agent is started and stopped around it:
//! short windows without the agent alternate with windows with it, in per-request mode (`watch
//! --records`: a ring-buffer record per request) and in aggregation mode (`watch`: histograms
//! in kernel maps), and with `--floor` also with programs that only check the namespace (the
//! hooks' own cost, below which no program can go). nginx's own request counter
//! (`stub_status`) gives each window's throughput.
//! Each window with the agent is compared with the mean of the windows without it on either side,
//! so that the host's drift over seconds cancels, and the ratio is the median over those pairs,
//! with a distribution-free 95 % confidence interval. Separate profile runs measure the kernel
//! time of the eBPF programs (`bpf_stats`). Traffic goes only to `netns::NS_ADDR`, inside the
//! namespace this command creates. Every process, the namespace and the sysctl are undone by
//! guards, also on error, panic or Ctrl-C; this module must not leave any of them behind, and
//! must not fail a run for missing the throughput target (it reports, CI decides).

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
    bpf_maps_bytes, catch_interrupts, check_interrupted, http_client, http_get, http_get_status,
    median, proc_status_kib, tail, temp_path_directives, Estimate, NGINX,
};
use super::wrk::{self, WrkResult};
use crate::cmd::{self, secs, ChildGuard};

#[derive(Args)]
pub struct ProbesArgs {
    /// Cycles; each has one window with the agent per mode, each between two windows without it.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Seconds of each window, and of each profile run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// Also measure the design's floor, as a third window per cycle: the agent with programs
    /// that only check each socket's namespace (`watch --probe-floor`), i.e. the cost of the
    /// hooks themselves, which no program they run can go below.
    #[arg(long, conflicts_with = "no_agent")]
    floor: bool,
    /// Debugging aid: skip the with-probes windows (tests the harness without an agent).
    #[arg(long, hide = true)]
    no_agent: bool,
    /// Debugging aid: run this binary as the agent instead of building target/release/awaitlab
    /// (e.g. a stand-in script to test the harness's with-probes half).
    #[arg(long, hide = true, conflicts_with = "no_agent")]
    agent_bin: Option<PathBuf>,
}

const HTTP_PORT: u16 = 8080;
/// nginx's `stub_status` page: its request counter is what the windows are measured by.
const STATUS_PATH: &str = "/awl_bench_status";
/// Long enough for the agent to load and attach all programs on a slow CI host.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent flushes results on SIGINT; give it time before SIGKILL.
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// Left out of every window: the agent's first work after attaching (its first map reads, the
/// memory it returns after parsing the kernel's BTF), and its teardown after SIGINT.
const SETTLE: Duration = Duration::from_millis(300);
/// Load before the first window: nginx's and wrk's caches and connections warm up.
const WARM_UP: Duration = Duration::from_secs(2);
/// The ratios with/without the issue sets as the goals, per mode.
const TARGET_RATIO_RECORDS: f64 = 0.97;
const TARGET_RATIO_AGGREGATE: f64 = 0.99;

/// How the agent runs: a record per request, histograms in maps, or (`--floor`) programs that
/// stop at the namespace check.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Records,
    Aggregate,
    Floor,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Records, Mode::Aggregate];
    const WITH_FLOOR: [Mode; 3] = [Mode::Records, Mode::Aggregate, Mode::Floor];
    fn name(self) -> &'static str {
        match self {
            Mode::Records => "records",
            Mode::Aggregate => "aggregate",
            Mode::Floor => "floor",
        }
    }
    /// The floor has none: it is what the targets are compared with.
    fn target(self) -> Option<f64> {
        match self {
            Mode::Records => Some(TARGET_RATIO_RECORDS),
            Mode::Aggregate => Some(TARGET_RATIO_AGGREGATE),
            Mode::Floor => None,
        }
    }
    fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::Records => &["--records"],
            Mode::Aggregate => &[],
            Mode::Floor => &["--probe-floor"],
        }
    }
}
/// Steal above which a window is flagged as noisy, and its pair left out of the ratio.
const NOISY_STEAL: f64 = 0.02;
/// The agent's resident memory the issue sets as the goal, MiB.
const TARGET_RSS_MIB: f64 = 40.0;

/// What the agent cost during one window.
struct AgentCost {
    /// utime + stime during the window only (start, loading and teardown excluded).
    cpu_s: f64,
    /// Resident memory at the window's end (VmRSS), and its peak so far (VmHWM, which includes
    /// parsing the kernel's BTF at start), MiB.
    rss_mib: f64,
    rss_peak_mib: f64,
    /// Kernel memory of the agent's BPF maps (memlock of its map descriptors), MiB.
    maps_mib: f64,
    clean_exit: bool,
}

/// A stretch of the one continuous load, with the agent in one mode or without it (`None`).
struct Window {
    mode: Option<Mode>,
    requests: u64,
    seconds: f64,
    steal_share: Option<f64>,
    agent: Option<AgentCost>,
}

impl Window {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn noisy(&self) -> bool {
        self.steal_share.is_some_and(|s| s > NOISY_STEAL)
    }
}

/// A window with the agent, compared with the mean of the windows without it on either side.
struct Pair<'a> {
    with: &'a Window,
    cost: &'a AgentCost,
    ratio: f64,
    /// One of the three windows ran with steal above `NOISY_STEAL`.
    noisy: bool,
}

/// Throughput of `w[1]` over the mean of `w[0]` and `w[2]`.
fn pair_ratio(w: &[Window]) -> f64 {
    w[1].rps() / ((w[0].rps() + w[2].rps()) / 2.0)
}

fn pairs(windows: &[Window], mode: Mode) -> Vec<Pair<'_>> {
    windows
        .windows(3)
        .filter(|w| w[1].mode == Some(mode) && w[0].mode.is_none() && w[2].mode.is_none())
        .filter_map(|w| {
            Some(Pair {
                with: &w[1],
                cost: w[1].agent.as_ref()?,
                ratio: pair_ratio(w),
                noisy: w.iter().any(Window::noisy),
            })
        })
        .collect()
}

/// nginx's count of the requests it has read (its `stub_status` page).
struct RequestCounter {
    client: reqwest::blocking::Client,
    addr: SocketAddr,
}

impl RequestCounter {
    fn new(addr: SocketAddr) -> Result<Self> {
        Ok(Self {
            client: http_client()?,
            addr,
        })
    }

    /// The count and when it was read. The reading's own request is in the count.
    fn read(&self) -> Result<(u64, Instant)> {
        let (status, body) = http_get(&self.client, self.addr, STATUS_PATH)?;
        let at = Instant::now();
        ensure!(status == 200, "nginx answered {status} for {STATUS_PATH}");
        Ok((parse_stub_status(&body)?, at))
    }

    /// Requests served during `duration` from now, the seconds between the two readings, and
    /// the steal share meanwhile.
    fn measure(&self, duration: Duration) -> Result<(u64, f64, Option<f64>)> {
        let ticks = wrk::cpu_ticks();
        let (n0, t0) = self.read()?;
        std::thread::sleep(duration);
        check_interrupted()?;
        let (n1, t1) = self.read()?;
        // The second reading counted itself.
        let requests = n1.saturating_sub(n0 + 1);
        let steal = wrk::steal_share(ticks, wrk::cpu_ticks());
        Ok((requests, (t1 - t0).as_secs_f64(), steal))
    }
}

/// The third figure of the third line of nginx's `stub_status` page ("Active connections: 2",
/// "server accepts handled requests", " 4 4 9", ...): the requests read so far.
fn parse_stub_status(body: &str) -> Result<u64> {
    body.lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no request count in nginx's stub_status page:\n{body}"))
}

/// A profile run: wrk alone with the agent attached and `bpf_stats` on.
struct Profile {
    wrk: WrkResult,
    bpf: bpfstats::Delta,
}

impl Profile {
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
    let modes: &[Mode] = match (&agent, args.floor) {
        (None, _) => &[],
        (Some(_), false) => &Mode::ALL,
        (Some(_), true) => &Mode::WITH_FLOOR,
    };

    let out_dir = cmd::target_dir().join("bench/probes");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    catch_interrupts();
    let tmp = TempDir::create()?;
    let ns = BenchNetns::create().context("creating the benchmark namespace")?;
    let _nginx = start_nginx(&ns, tmp.path())?;
    let addr = SocketAddr::new(netns::NS_ADDR.parse().context("NS_ADDR")?, HTTP_PORT);
    let url = format!("http://{addr}/");
    let counter = RequestCounter::new(addr)?;

    // One wrk for all windows, given more time than they can take; stopped after the last.
    let window = Duration::from_secs(args.duration.into());
    let per_cycle = modes.len().max(1) as u32 * 2;
    let wrk_secs = (WARM_UP.as_secs() as u32)
        + (1 + args.runs * per_cycle) * (args.duration + 2)
        + ATTACH_TIMEOUT.as_secs() as u32;
    let wrk_report = out_dir.join("wrk.txt");
    let mut load = ChildGuard::spawn(
        "wrk",
        wrk::command(&url, wrk_secs).stdout(
            File::create(&wrk_report)
                .with_context(|| format!("creating {}", wrk_report.display()))?,
        ),
        libc::SIGINT,
        Duration::from_secs(5),
    )?;
    eprintln!("warm-up");
    std::thread::sleep(WARM_UP);
    check_interrupted()?;

    println!(
        "\n{:<7} {:<10} {:>9} {:>11} {:>11} {:>7} {:>6} {:>10}",
        "cycle", "probes", "req/s", "off before", "off after", "ratio", "steal", "agent CPU"
    );
    let mut windows = vec![off_window(&counter, window, &mut load)?];
    for cycle in 1..=args.runs {
        let Some(agent) = agent.as_deref() else {
            windows.push(off_window(&counter, window, &mut load)?);
            println!(
                "{cycle:<7} {:<10} {:>9.0}",
                "off",
                windows[windows.len() - 1].rps()
            );
            continue;
        };
        for &mode in modes {
            let log = out_dir.join(format!("agent-{}-{cycle}", mode.name()));
            windows.push(agent_window(agent, &ns, &counter, mode, window, &log)?);
            windows.push(off_window(&counter, window, &mut load)?);
            let w = &windows[windows.len() - 3..];
            print_pair(cycle, mode, w);
        }
    }
    let (status, _) = load.stop()?;
    let report = fs::read_to_string(&wrk_report).unwrap_or_default();
    match wrk::parse(&report) {
        Ok(r) if r.non_2xx > 0 || r.socket_errors.is_some() => eprintln!(
            "warning: wrk saw {} non-2xx responses, socket errors: {}",
            r.non_2xx,
            r.socket_errors.as_deref().unwrap_or("none")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: wrk ({status}) left no report: {e:#}"),
    }

    let mut profiles = Vec::new();
    if let Some(agent) = &agent {
        for &mode in modes {
            eprintln!(
                "\nprofile run ({}): with probes and kernel BPF statistics enabled",
                mode.name()
            );
            let log = out_dir.join(format!("agent-profile-{}", mode.name()));
            let p = profile(agent, &ns, &url, args.duration, &log, mode)?;
            print_profile(mode, &p);
            profiles.push((mode, p));
        }
    }
    let (rps_without, summaries) = summarize(&windows, modes);
    print_summary(windows.len(), rps_without, &summaries, &profiles);
    let json_path = out_dir.join("summary.json");
    write_json(
        &json_path,
        args,
        &windows,
        rps_without,
        &summaries,
        &profiles,
    )?;
    println!("\nmachine-readable summary: {}", json_path.display());
    if agent.is_some() {
        println!(
            "agent logs: {}/agent-*.{{stdout,stderr}}",
            out_dir.display()
        );
    }

    let unclean = windows
        .iter()
        .filter_map(|w| w.agent.as_ref())
        .filter(|a| !a.clean_exit)
        .count();
    ensure!(
        unclean == 0,
        "the agent did not exit cleanly on SIGINT in {unclean} window(s); see its logs"
    );
    Ok(())
}

/// A window without the agent. Fails when the load has stopped.
fn off_window(counter: &RequestCounter, window: Duration, load: &mut ChildGuard) -> Result<Window> {
    let (requests, seconds, steal_share) = counter.measure(window)?;
    if let Some(status) = load.try_wait()? {
        bail!("wrk exited ({status}) before the last window");
    }
    Ok(Window {
        mode: None,
        requests,
        seconds,
        steal_share,
        agent: None,
    })
}

/// A window with the agent in `mode`: started, attached and settled before it, stopped after.
fn agent_window(
    agent: &Path,
    ns: &BenchNetns,
    counter: &RequestCounter,
    mode: Mode,
    window: Duration,
    log: &Path,
) -> Result<Window> {
    let mut child = start_agent(agent, ns, mode, log)?;
    std::thread::sleep(SETTLE);
    let pid = child.pid();
    let cpu0 = cpu_seconds(pid)?;
    let (requests, seconds, steal_share) = counter.measure(window)?;
    let cpu1 = cpu_seconds(pid)?;
    let rss_mib = proc_status_kib(pid, "VmRSS")? as f64 / 1024.0;
    let rss_peak_mib = proc_status_kib(pid, "VmHWM")? as f64 / 1024.0;
    let maps_mib = bpf_maps_bytes(pid) as f64 / (1024.0 * 1024.0);
    let clean_exit = stop_agent(&mut child)?;
    std::thread::sleep(SETTLE);
    Ok(Window {
        mode: Some(mode),
        requests,
        seconds,
        steal_share,
        agent: Some(AgentCost {
            cpu_s: cpu1 - cpu0,
            rss_mib,
            rss_peak_mib,
            maps_mib,
            clean_exit,
        }),
    })
}

/// A profile run: its own wrk run with the agent attached and `bpf_stats` on. The statistics
/// add two clock reads to every program run, so they are never on while throughput is compared.
fn profile(
    agent: &Path,
    ns: &BenchNetns,
    url: &str,
    duration: u32,
    log: &Path,
    mode: Mode,
) -> Result<Profile> {
    let _stats = bpfstats::StatsEnabled::enable()?;
    let mut child = start_agent(agent, ns, mode, log)?;
    let bpf0 = bpfstats::snapshot()?;
    let wrk = wrk::run(url, duration)?;
    let bpf1 = bpfstats::snapshot()?;
    stop_agent(&mut child)?;
    let bpf = bpfstats::delta(&bpf0, &bpf1);
    if bpf.programs == 0 {
        eprintln!("warning: no loaded BPF program is named awl_*; kernel-side cost reads as 0");
    }
    Ok(Profile { wrk, bpf })
}

/// Starts `awaitlab watch` in `mode` on the namespace, its output in `log`.stdout/.stderr, and
/// returns once it says its probes are attached.
fn start_agent(agent: &Path, ns: &BenchNetns, mode: Mode, log: &Path) -> Result<ChildGuard> {
    let stdout_path = log.with_extension("stdout");
    let stderr_path = log.with_extension("stderr");
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
            return Ok(child);
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT, and whether the agent exited cleanly (warned about when it did not).
fn stop_agent(child: &mut ChildGuard) -> Result<bool> {
    let (status, killed) = child.stop()?;
    let clean = status.success() && !killed;
    if !clean {
        eprintln!(
            "warning: the agent exited with {status}{}",
            if killed { " after SIGKILL" } else { "" }
        );
    }
    Ok(clean)
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
        location = {STATUS_PATH} {{ stub_status; }}
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

fn fmt_steal(s: Option<f64>) -> String {
    s.map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0))
}

/// One row: the window with the agent (`w[1]`) between the two without it.
fn print_pair(cycle: u32, mode: Mode, w: &[Window]) {
    let cpu = w[1].agent.as_ref().map_or(f64::NAN, |a| a.cpu_s);
    let steal = w
        .iter()
        .filter_map(|w| w.steal_share)
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
    println!(
        "{cycle:<7} {:<10} {:>9.0} {:>11.0} {:>11.0} {:>7.3} {:>6} {:>9.2}s",
        mode.name(),
        w[1].rps(),
        w[0].rps(),
        w[2].rps(),
        pair_ratio(w),
        fmt_steal(steal),
        cpu
    );
}

/// The figures of one mode over its pairs (those without noisy steal).
struct ModeSummary {
    mode: Mode,
    pairs: usize,
    left_out: usize,
    rps: f64,
    ratio: Estimate,
    /// Over all its windows: the agent's CPU seconds per 100k requests served.
    cpu_s_per_100k: f64,
    /// Largest RSS of the agent at a window's end, its largest peak, and its maps' memory, MiB.
    rss_mib: f64,
    rss_peak_mib: f64,
    maps_mib: f64,
}

fn summarize(windows: &[Window], modes: &[Mode]) -> (f64, Vec<ModeSummary>) {
    let rps_without = median(
        windows
            .iter()
            .filter(|w| w.mode.is_none())
            .map(Window::rps)
            .collect(),
    );
    let modes = modes
        .iter()
        .filter_map(|&mode| {
            let all = pairs(windows, mode);
            let left_out = all.iter().filter(|p| p.noisy).count();
            // Noisy pairs measure the neighbours too; all of them, if none is quiet.
            let kept: Vec<&Pair> = if left_out < all.len() {
                all.iter().filter(|p| !p.noisy).collect()
            } else {
                all.iter().collect()
            };
            if kept.is_empty() {
                return None;
            }
            let max = |f: fn(&AgentCost) -> f64| all.iter().map(|p| f(p.cost)).fold(0.0, f64::max);
            let cpu: f64 = all.iter().map(|p| p.cost.cpu_s).sum();
            let requests: u64 = all.iter().map(|p| p.with.requests).sum();
            Some(ModeSummary {
                mode,
                pairs: kept.len(),
                left_out: all.len() - kept.len(),
                rps: median(kept.iter().map(|p| p.with.rps()).collect()),
                ratio: Estimate::of(kept.iter().map(|p| p.ratio).collect()),
                cpu_s_per_100k: per(cpu * 100_000.0, requests),
                rss_mib: max(|a| a.rss_mib),
                rss_peak_mib: max(|a| a.rss_peak_mib),
                maps_mib: max(|a| a.maps_mib),
            })
        })
        .collect();
    (rps_without, modes)
}

fn print_profile(mode: Mode, p: &Profile) {
    println!(
        "\nkernel-side cost, {} mode (profile run, bpf_stats on; not part of the ratio)",
        mode.name()
    );
    let reqs = p.wrk.requests.max(1) as f64;
    println!(
        "  all programs     {:>7.0} ns/req  {:>6.2} runs/req   at {:.0} req/s, p50 {}, p99 {}",
        p.bpf_ns_per_req(),
        p.bpf_runs_per_req(),
        p.wrk.requests_per_sec,
        fmt_us(p.wrk.p50_us),
        fmt_us(p.wrk.p99_us),
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

fn fmt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}us"))
}

fn print_summary(
    windows: usize,
    rps_without: f64,
    summaries: &[ModeSummary],
    profiles: &[(Mode, Profile)],
) {
    println!("\nsummary over {windows} window(s) of load (medians)");
    println!("  throughput without probes      {rps_without:>12.0} req/s");
    if summaries.is_empty() {
        println!("  (--no-agent: with-probes windows skipped)");
        return;
    }
    for s in summaries {
        println!("  {} mode", s.mode.name());
        if s.left_out > 0 {
            println!(
                "    warning: {} pair(s) left out: steal above {:.0} % in one of their windows",
                s.left_out,
                NOISY_STEAL * 100.0
            );
        }
        println!("    throughput with probes       {:>12.0} req/s", s.rps);
        println!(
            "    ratio with/without           {:>12.3}   over {} pairs{}",
            s.ratio.median,
            s.pairs,
            s.ratio.ci_text(3)
        );
        let verdict = s.mode.target().map_or_else(
            || "the floor: programs that only check the namespace".to_owned(),
            |t| s.ratio.verdict(t),
        );
        println!("                                              ({verdict})");
        println!(
            "    agent CPU per 100k requests  {:>12.4} s   (user+system, in its windows)",
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

fn window_json(w: &Window) -> serde_json::Value {
    let a = w.agent.as_ref();
    json!({
        "probes": w.mode.map_or("off", Mode::name),
        "requests": w.requests,
        "seconds": w.seconds,
        "requests_per_sec": w.rps(),
        "steal_share": w.steal_share,
        "agent_cpu_seconds": a.map(|a| a.cpu_s),
        "agent_rss_mib": a.map(|a| a.rss_mib),
        "agent_rss_peak_mib": a.map(|a| a.rss_peak_mib),
        "bpf_maps_mib": a.map(|a| a.maps_mib),
        "agent_clean_exit": a.map(|a| a.clean_exit),
    })
}

fn profile_json(p: &Profile) -> serde_json::Value {
    let w = &p.wrk;
    json!({
        "wrk": {
            "requests": w.requests,
            "requests_per_sec": w.requests_per_sec,
            "p50_us": w.p50_us,
            "p99_us": w.p99_us,
            "non_2xx": w.non_2xx,
            "socket_errors": w.socket_errors,
            "steal_share": w.steal_share,
        },
        "bpf_programs": p.bpf.programs,
        "bpf_run_time_ns": p.bpf.run_time_ns,
        "bpf_run_cnt": p.bpf.run_cnt,
        "bpf_ns_per_request": p.bpf_ns_per_req(),
    })
}

/// Stable schema (bump `version` on any incompatible change), built from the same data as the
/// tables. NaN (no requests) becomes null.
fn write_json(
    path: &Path,
    args: &ProbesArgs,
    windows: &[Window],
    rps_without: f64,
    summaries: &[ModeSummary],
    profiles: &[(Mode, Profile)],
) -> Result<()> {
    let summary: serde_json::Map<String, serde_json::Value> = summaries
        .iter()
        .map(|s| {
            let profile = profiles.iter().find(|(m, _)| *m == s.mode);
            (
                s.mode.name().to_string(),
                json!({
                    "target_ratio": s.mode.target(),
                    "pairs": s.pairs,
                    "pairs_left_out": s.left_out,
                    "requests_per_sec_with_probes": s.rps,
                    "ratio": s.ratio.median,
                    "ratio_ci95": s.ratio.ci_json(),
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
        "version": 3,
        "bench": "probes",
        "cycles": args.runs,
        "window_seconds": args.duration,
        "wrk": {"threads": 1, "connections": 50},
        "windows": windows.iter().map(window_json).collect::<Vec<_>>(),
        "profiles": profiles
            .iter()
            .map(|(m, p)| (m.name().to_string(), profile_json(p)))
            .collect::<serde_json::Map<_, _>>(),
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

    /// The page of nginx 1.22 (Debian bookworm), as served.
    #[test]
    fn stub_status_request_count() {
        let page = "Active connections: 51 \nserver accepts handled requests\n 53 53 1207431 \nReading: 0 Writing: 1 Waiting: 50 \n";
        assert_eq!(parse_stub_status(page).unwrap(), 1_207_431);
        assert!(parse_stub_status("<html>404</html>").is_err());
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
        assert!(c.contains("location = /awl_bench_status { stub_status; }"));
    }
}

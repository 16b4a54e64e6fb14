//! `cargo xtask bench load`: how fast `awaitlab load` drives a server compared with wrk, oha and
//! Locust (FastHttpUser, one process), all measured in the same run against the same loopback
//! nginx (one worker, a small static file, keep-alive) with the same number of connections; and
//! `awaitlab load`'s peak memory with 10,000 users.
//!
//! Rounds alternate the tools (in a rotating order) so that noise from a shared host spreads
//! over all of them. Each configuration's medians are printed; a ratio is the median of the
//! rounds' own ratios, with a sign-test 95 % confidence interval. Traffic goes only to
//! 127.0.0.1, to the nginx this command starts on a port the kernel picked. nginx, every tool
//! process and the temporary directory are removed by guards, also on error or Ctrl-C. This
//! module reports and never fails a run for missing a target ratio.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::util::{
    catch_interrupts, check_interrupted, http_get_status, median, tail, temp_path_directives,
    Estimate, NGINX,
};
use crate::cmd::{self, ChildGuard};
use crate::setup;

#[derive(Args)]
pub struct LoadArgs {
    /// Rounds; each runs every tool once. A ratio is the median of the rounds' own ratios,
    /// and 6 rounds or more give it a 95 % confidence interval (8: the lowest to the highest).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Seconds of load per tool run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    duration: u32,
    /// Connections (users) for every tool.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Users for the memory measurement.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    memory_users: u32,
    /// Leave Locust out (e.g. on a host without Python).
    #[arg(long)]
    no_locust: bool,
}

/// Targets: awaitlab's default / the best wrk configuration, in requests per second and in
/// requests per CPU-second of the generator.
const WRK_TARGET: f64 = 1.0;

/// Targets: awaitlab's default / peer, requests per second.
const TARGETS: [(Tool, f64); 2] = [(Tool::Oha, 1.0), (Tool::Locust, 10.0)];

/// The static file: small, as the issue asks, so that the server's work per request is minimal.
const BODY: &str = "awaitlab load benchmark: a small static file served by nginx.\n";

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    // The kernel picks a free ephemeral port; nginx binds it a moment later.
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn nginx_config(dir: &Path, port: u16, nginx_v: &str) -> String {
    let t = dir.display();
    let temp_paths = temp_path_directives(dir, nginx_v);
    // One worker: the load generator gets the other core of a 2-core host. Enough descriptors
    // and a deep accept queue for the 10,000-user memory run.
    format!(
        "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 30000;
pid {t}/nginx.pid;
error_log {t}/error.log;
events {{ worker_connections 25000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
{temp_paths}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {t}/www;
        location / {{ }}
    }}
}}
"
    )
}

fn start_nginx(dir: &Path) -> Result<(ChildGuard, SocketAddr)> {
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), BODY)?;
    let v = Command::new(NGINX)
        .arg("-V")
        .output()
        .context("running nginx -V")?;
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        nginx_config(dir, port, &String::from_utf8_lossy(&v.stderr)),
    )?;
    let prefix = format!("{}/", dir.display());
    let error_log = dir.join("error.log");
    let mut nginx = ChildGuard::spawn(
        "nginx",
        Command::new(NGINX)
            .args(["-p", &prefix, "-e"])
            .arg(&error_log)
            .arg("-c")
            .arg(&conf),
        libc::SIGTERM,
        Duration::from_secs(5),
    )?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check_interrupted()?;
        if let Some(status) = nginx.try_wait()? {
            bail!(
                "nginx exited ({status}) before serving:\n{}",
                tail(&error_log)
            );
        }
        match http_get_status(addr) {
            Ok(200) => break,
            Ok(code) => bail!("nginx answered {code} instead of 200"),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("nginx not ready at {addr}:\n{}", tail(&error_log)))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("nginx ready at {addr}");
    Ok((nginx, addr))
}

/// What `run_tool` read of a finished tool.
struct Ran {
    stdout: String,
    /// Peak resident memory, KiB (wait4's rusage).
    maxrss_kib: u64,
    /// User + system CPU time of the tool and its reaped children, seconds (wait4's rusage).
    cpu_s: f64,
}

/// Runs a tool to completion under a guard (so Ctrl-C or an error still stops it).
fn run_tool(name: &str, cmd: &mut Command, limit: Duration) -> Result<Ran> {
    let dir = std::env::temp_dir().join(format!("awl-loadbench-{}-{name}", std::process::id()));
    let out_path = dir.with_extension("out");
    let err_path = dir.with_extension("err");
    cmd.stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .stdin(Stdio::null());
    let line = cmd::display(cmd);
    eprintln!("$ {line}");
    let child = cmd.spawn().with_context(|| format!("starting `{line}`"))?;
    let pid = child.id() as libc::pid_t;
    // Owned by the guard from here on; wait4 reaps it below, after which the guard's kill finds
    // nothing (ESRCH is not an error).
    let mut guard = KillOnDrop(Some(child));
    let t0 = Instant::now();
    let (status, maxrss_kib, cpu_s) = loop {
        let mut st: libc::c_int = 0;
        // SAFETY: zeroed rusage is a valid value for the out parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our own child, not yet reaped; pointers are to locals.
        let r = unsafe { libc::wait4(pid, &mut st, libc::WNOHANG, &mut ru) };
        if r == pid {
            if let Some(c) = guard.0.take() {
                std::mem::forget(c);
            }
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            break (
                std::process::ExitStatus::from_raw(st),
                ru.ru_maxrss as u64,
                secs(ru.ru_utime) + secs(ru.ru_stime),
            );
        }
        ensure!(r == 0, "wait4 {name}: {}", std::io::Error::last_os_error());
        if check_interrupted().is_err() || t0.elapsed() > limit {
            drop(guard);
            bail!("{name} interrupted or did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    ensure!(
        status.success(),
        "`{line}` failed ({status}): {}",
        err.trim()
    );
    Ok(Ran {
        stdout: out,
        maxrss_kib,
        cpu_s,
    })
}

struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn number_after(text: &str, label: &str) -> Result<f64> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .with_context(|| format!("no {label:?} line in:\n{text}"))?;
    let v = line[label.len()..].split_whitespace().next().unwrap_or("");
    v.parse::<f64>()
        .with_context(|| format!("number in {line:?}"))
}

struct Tools {
    awaitlab: PathBuf,
    oha: PathBuf,
    locust: Option<PathBuf>,
    locustfile: PathBuf,
    csv_dir: PathBuf,
}

/// One configuration of one tool.
#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Wrk(usize),
    Oha,
    Locust,
    /// `--threads N`, or the default (None).
    Awaitlab(Option<usize>),
}

impl Tool {
    fn name(self) -> String {
        match self {
            Tool::Wrk(n) => format!("wrk -t{n}"),
            Tool::Oha => "oha".into(),
            Tool::Locust => "locust".into(),
            Tool::Awaitlab(Some(n)) => format!("awaitlab --threads {n}"),
            Tool::Awaitlab(None) => "awaitlab (default)".into(),
        }
    }
}

/// One run of one tool: its rate and its CPU cost.
#[derive(Clone, Copy)]
struct Sample {
    /// Requests per second of the run.
    rps: f64,
    /// Requests per CPU-second the tool itself spent (user + system).
    per_cpu_s: f64,
    /// The threads awaitlab says it ran (its report's `threads`); None for the other tools.
    threads: Option<u64>,
}

fn measure(tool: Tool, t: &Tools, url: &str, a: &LoadArgs) -> Result<Sample> {
    let d = a.duration;
    let c = a.connections.to_string();
    let limit = Duration::from_secs(u64::from(d) + 60);
    let mut reported_threads = None;
    let (rps, ran) = match tool {
        Tool::Wrk(threads) => {
            let ran = run_tool(
                "wrk",
                Command::new("wrk").args([
                    format!("-t{threads}"),
                    format!("-c{c}"),
                    format!("-d{d}s"),
                    url.to_owned(),
                ]),
                limit,
            )?;
            (number_after(&ran.stdout, "Requests/sec:")?, ran)
        }
        Tool::Oha => {
            let ran = run_tool(
                "oha",
                Command::new(&t.oha).args(["--no-tui", "-c", &c, "-z", &format!("{d}s"), url]),
                limit,
            )?;
            (number_after(&ran.stdout, "Requests/sec:")?, ran)
        }
        Tool::Locust => {
            let bin = t.locust.as_ref().context("locust disabled")?;
            let prefix = t.csv_dir.join("locust");
            let ran = run_tool(
                "locust",
                Command::new(bin)
                    .args(["-f"])
                    .arg(&t.locustfile)
                    .args([
                        "--headless",
                        "--only-summary",
                        "--loglevel",
                        "WARNING",
                        "-u",
                        &c,
                        "-r",
                        &c,
                        "-t",
                        &format!("{d}s"),
                        "--host",
                        url.trim_end_matches("/index.html"),
                        "--csv",
                    ])
                    .arg(&prefix),
                limit,
            )?;
            let stats = fs::read_to_string(t.csv_dir.join("locust_stats.csv"))
                .context("reading Locust's stats CSV")?;
            let agg = stats
                .lines()
                .find(|l| l.contains(",Aggregated,"))
                .context("no Aggregated row in Locust's CSV")?;
            let rps = agg
                .split(',')
                .nth(9)
                .context("no Requests/s column")?
                .parse::<f64>()
                .context("Locust's Requests/s")?;
            (rps, ran)
        }
        Tool::Awaitlab(threads) => {
            let mut cmd = Command::new(&t.awaitlab);
            cmd.args([
                "load",
                url,
                "--users",
                &c,
                "--run-time",
                &format!("{d}s"),
                "--json",
            ]);
            if let Some(n) = threads {
                cmd.args(["--threads", &n.to_string()]);
            }
            let ran = run_tool("awaitlab", &mut cmd, limit)?;
            let v: serde_json::Value =
                serde_json::from_str(ran.stdout.trim()).context("awaitlab's JSON report")?;
            let req = v["requests"].as_f64().context("requests")?;
            let fails = v["failures"].as_u64().unwrap_or(0);
            ensure!(fails == 0, "awaitlab saw {fails} failures against nginx");
            let secs = v["actual_duration_s"]
                .as_f64()
                .context("actual_duration_s")?;
            reported_threads = v["threads"].as_u64();
            (req / secs, ran)
        }
    };
    Ok(Sample {
        rps,
        // The run's requests (its rate over the asked duration) per CPU-second it spent, start
        // and exit included.
        per_cpu_s: rps * f64::from(d) / ran.cpu_s.max(1e-9),
        threads: reported_threads,
    })
}

pub fn run(a: &LoadArgs) -> Result<()> {
    for tool in [NGINX, "wrk"] {
        ensure!(
            cmd::succeeds(Command::new("sh").args(["-c", "command -v \"$1\"", "sh", tool])),
            "{tool} not found; run `cargo xtask setup`"
        );
    }
    let oha = setup::oha_bin();
    ensure!(
        cmd::succeeds(Command::new(&oha).arg("--version")),
        "oha not found at {}; run `cargo xtask setup`",
        oha.display()
    );
    let locust = if a.no_locust {
        None
    } else {
        let l = setup::locust_bin()?;
        ensure!(
            cmd::succeeds(Command::new(&l).arg("--version")),
            "locust not found at {}; run `cargo xtask setup`",
            l.display()
        );
        Some(l)
    };
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "agent"]))
        .context("building awaitlab")?;
    let awaitlab = cmd::target_dir().join("release/awaitlab");
    ensure!(
        awaitlab.is_file(),
        "{} is missing after the build",
        awaitlab.display()
    );

    catch_interrupts();
    let dir = Dir(std::env::temp_dir().join(format!("awl-loadbench-{}", std::process::id())));
    if dir.0.exists() {
        fs::remove_dir_all(&dir.0)?;
    }
    fs::create_dir_all(&dir.0)?;
    let locustfile = dir.0.join("locustfile.py");
    fs::write(
        &locustfile,
        "from locust import FastHttpUser, task\n\n\nclass Get(FastHttpUser):\n    @task\n    def index(self):\n        self.client.get(\"/index.html\")\n",
    )?;
    let (_nginx, addr) = start_nginx(&dir.0)?;
    let url = format!("http://{addr}/index.html");
    let tools = Tools {
        awaitlab,
        oha,
        locust,
        locustfile,
        csv_dir: dir.0.clone(),
    };

    // wrk and awaitlab at every thread count up to the cores (what is best depends on how many
    // cores the server leaves), and awaitlab's default; each compared with the best wrk.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sweep = 1..=cores.min(a.connections as usize);
    let mut tools_run: Vec<Tool> = sweep.clone().map(Tool::Wrk).collect();
    tools_run.push(Tool::Oha);
    if tools.locust.is_some() {
        tools_run.push(Tool::Locust);
    }
    tools_run.extend(sweep.map(|n| Tool::Awaitlab(Some(n))));
    tools_run.push(Tool::Awaitlab(None));
    // Warm-up: page cache, nginx's open-file cache, the tools' binaries.
    measure(Tool::Wrk(1), &tools, &url, &LoadArgs { duration: 1, ..*a })?;
    let mut results: Vec<(Tool, Vec<Sample>)> =
        tools_run.iter().map(|n| (*n, Vec::new())).collect();
    for round in 0..a.runs {
        for k in 0..tools_run.len() {
            check_interrupted()?;
            let i = (k + round as usize) % tools_run.len();
            let s = measure(tools_run[i], &tools, &url, a)?;
            eprintln!(
                "round {}: {:<20} {:>10.0} req/s {:>10.0} req/CPU-s",
                round + 1,
                tools_run[i].name(),
                s.rps,
                s.per_cpu_s
            );
            results[i].1.push(s);
        }
    }

    // Peak memory with many users: they start at 5,000 a second (all at once would overflow
    // the accept queue, and SYN retries would keep some from connecting during the run), then
    // hold until the end.
    check_interrupted()?;
    let mem_secs = 8;
    let ran = run_tool(
        "awaitlab-memory",
        Command::new(&tools.awaitlab).args([
            "load",
            &url,
            "--users",
            &a.memory_users.to_string(),
            "--spawn-rate",
            "5000",
            "--run-time",
            &format!("{mem_secs}s"),
            "--json",
        ]),
        Duration::from_secs(120),
    )?;
    let mem: serde_json::Value =
        serde_json::from_str(ran.stdout.trim()).context("awaitlab's JSON report (memory run)")?;

    // Medians of each configuration's runs.
    let med: Vec<(Tool, f64, f64)> = results
        .iter()
        .map(|(t, v)| {
            (
                *t,
                median(v.iter().map(|s| s.rps).collect()),
                median(v.iter().map(|s| s.per_cpu_s).collect()),
            )
        })
        .collect();
    println!(
        "\nload generators against one nginx worker on 127.0.0.1, {} connections, {} x {} s, medians:",
        a.connections, a.runs, a.duration
    );
    println!("  {:<20} {:>10} {:>12}", "tool", "req/s", "req/CPU-s");
    for (t, rps, eff) in &med {
        println!("  {:<20} {rps:>10.0} {eff:>12.0}", t.name());
    }
    let best = |pick: &dyn Fn(&Tool) -> bool, by: &dyn Fn(&(Tool, f64, f64)) -> f64| {
        med.iter()
            .filter(|m| pick(&m.0))
            .max_by(|x, y| by(x).total_cmp(&by(y)))
            .copied()
    };
    let is_wrk = |t: &Tool| matches!(t, Tool::Wrk(_));
    let is_default = |t: &Tool| *t == Tool::Awaitlab(None);
    let rate = |m: &(Tool, f64, f64)| m.1;
    let eff = |m: &(Tool, f64, f64)| m.2;
    let ours = best(&is_default, &rate).context("awaitlab's default run")?;
    let default_threads = results
        .iter()
        .find(|(t, _)| is_default(t))
        .and_then(|(_, v)| v.first()?.threads);
    if let Some(n) = default_threads {
        println!("  awaitlab's default here: {n} thread(s) on {cores} cores");
    }
    // Each ratio is the median of the rounds' own: the tools of a round ran minutes apart at
    // most, while this host's throughput drifts by 10 % and more over a run.
    let samples = |t: Tool| {
        results
            .iter()
            .find(|(x, _)| *x == t)
            .map_or(&[][..], |(_, v)| v.as_slice())
    };
    let per_round = |peer: Tool, by: fn(&Sample) -> f64| -> Vec<f64> {
        samples(ours.0)
            .iter()
            .zip(samples(peer))
            .map(|(o, p)| by(o) / by(p))
            .collect()
    };
    let mut ratios = serde_json::Map::new();
    let mut ratio = |key: String, v: Vec<f64>, target: f64, what: String| {
        let e = Estimate::of(v);
        println!(
            "  {what:<48} {:>6.2}{}  ({})",
            e.median,
            e.ci_text(2),
            e.verdict(target)
        );
        ratios.insert(
            key,
            json!({ "ratio": e.median, "ci95": e.ci_json(), "target": target, "met": e.median >= target }),
        );
    };
    let rps_of: fn(&Sample) -> f64 = |s| s.rps;
    let eff_of: fn(&Sample) -> f64 = |s| s.per_cpu_s;
    if let (Some(w), Some(we)) = (best(&is_wrk, &rate), best(&is_wrk, &eff)) {
        ratio(
            "best_wrk_rate".into(),
            per_round(w.0, rps_of),
            WRK_TARGET,
            format!("awaitlab (default) / best wrk ({}), req/s", w.0.name()),
        );
        ratio(
            "best_wrk_per_cpu_s".into(),
            per_round(we.0, eff_of),
            WRK_TARGET,
            format!("awaitlab (default) / best wrk ({}), req/CPU-s", we.0.name()),
        );
    }
    for (peer, target) in TARGETS {
        if samples(peer).is_empty() {
            continue;
        }
        ratio(
            peer.name(),
            per_round(peer, rps_of),
            target,
            format!("awaitlab (default) / {}, req/s", peer.name()),
        );
    }
    println!(
        "  peak memory of awaitlab load with {} users: {:.1} MiB ({} requests, {} failures, {} connections in {} s)",
        a.memory_users,
        ran.maxrss_kib as f64 / 1024.0,
        mem["requests"],
        mem["failures"],
        mem["connect_ms"]["count"],
        mem_secs
    );
    let out_dir = cmd::target_dir().join("bench/load");
    fs::create_dir_all(&out_dir)?;
    let summary = json!({
        "version": 3,
        "connections": a.connections,
        "runs": a.runs,
        "duration_s": a.duration,
        "default_threads": default_threads,
        "tools": med.iter().map(|(t, r, e)| (t.name(), json!({"requests_per_s": r, "requests_per_cpu_s": e}))).collect::<serde_json::Map<_, _>>(),
        "ratios": ratios,
        "memory": { "users": a.memory_users, "peak_rss_mib": ran.maxrss_kib as f64 / 1024.0, "requests": mem["requests"], "failures": mem["failures"] },
    });
    let path = out_dir.join("summary.json");
    fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    println!("  written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rates() {
        assert_eq!(
            number_after("x\nRequests/sec:  60689.12\n", "Requests/sec:").unwrap(),
            60689.12
        );
        // oha's summary line: a tab between label and number.
        assert_eq!(
            number_after("Summary:\n  Requests/sec:\t12345.6789\n", "Requests/sec:").unwrap(),
            12345.6789
        );
        assert!(number_after("nothing", "Requests/sec:").is_err());
    }
}

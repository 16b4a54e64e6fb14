//! `cargo xtask bench soak [--minutes N]`: the daemon follows a container that is restarted
//! every 30 s while `awaitlab load` keeps it busy, for N minutes (default 20). Every minute it
//! prints the daemon's resident memory (the lowest and highest of the minute, sampled every half
//! second), its number of series on /metrics and the requests the probes counted; at the end,
//! the growth per hour of the lowest RSS after the first two minutes (target: under 1 MB per
//! hour) and the range of the series count (target: bounded, no growth).
//!
//! The container (busybox httpd on the local base image, a fixed loopback port so that restarts
//! keep it), the daemon and the load are removed by guards, also on error or Ctrl-C.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::util::{catch_interrupts, check_interrupted, proc_status_kib};
use crate::cmd::{self, ChildGuard};

#[derive(Args)]
pub struct SoakArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 20)]
    minutes: u64,
    /// Seconds between restarts of the container.
    #[arg(long, default_value_t = 30)]
    restart_every: u64,
}

/// A container or image removed on drop.
struct Docker(&'static str, String);

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(match self.0 {
                "image" => vec!["image", "rm", "-f", &self.1],
                _ => vec!["rm", "-f", &self.1],
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn metrics_text(addr: SocketAddr) -> Result<String> {
    use std::io::Write as _;
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string()))
}

pub fn run(args: &SoakArgs) -> Result<()> {
    cmd::become_root("the soak benchmark loads eBPF probes and runs containers, and needs root")?;
    catch_interrupts();
    if args.minutes < 3 {
        bail!("--minutes must be at least 3 (the first two are warm-up)");
    }
    crate::images::base_image()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "agent"]))
        .context("building the agent")?;
    let agent = cmd::target_dir().join("release/awaitlab");
    let tag = std::process::id();
    let dir = Dir(std::env::temp_dir().join(format!("awaitlab-soak-{tag}")));
    std::fs::create_dir_all(&dir.0)?;

    // busybox httpd on the base image: no registry, no network during the build.
    std::fs::copy("/bin/busybox", dir.0.join("busybox"))
        .context("/bin/busybox (busybox-static; cargo xtask setup installs it)")?;
    std::fs::write(
        dir.0.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY busybox /bin/busybox\nRUN mkdir -p /www && echo ok > /www/index.html\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8000\", \"-h\", \"/www\"]\n",
    )?;
    let image = Docker("image", format!("awaitlab-soak-{tag}:bench"));
    cmd::output(
        Command::new("docker")
            .args(["build", "-q", "--build-arg"])
            .arg(format!("BASE={}", crate::images::BASE_IMAGE))
            .args(["-t", &image.1])
            .arg(&dir.0),
    )?;
    let port = free_port()?;
    let container = Docker("container", format!("awaitlab-soak-{tag}"));
    cmd::output(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &container.1,
        "-p",
        &format!("127.0.0.1:{port}:8000"),
        &image.1,
    ]))?;

    let config = dir.0.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_addr = \"127.0.0.1:0\"\ninterval_s = 1.0\nseries_grace_s = 60.0\n[[watch]]\ncontainer = \"{}\"\nhttp_ports = [8000]\n",
            container.1
        ),
    )?;
    let log = dir.0.join("daemon.log");
    let mut daemon = ChildGuard::spawn(
        "the daemon",
        Command::new(&agent)
            .args(["daemon", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?),
        libc::SIGTERM,
        Duration::from_secs(30),
    )?;
    let t0 = Instant::now();
    let metrics: SocketAddr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(a) = text
            .split("metrics on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
        {
            break a;
        }
        if daemon.try_wait()?.is_some() || t0.elapsed() > Duration::from_secs(30) {
            bail!("the daemon did not start: {text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let run_s = args.minutes * 60;
    let _load = ChildGuard::spawn(
        "the load",
        Command::new(&agent)
            .arg("load")
            .arg(format!("http://127.0.0.1:{port}/index.html"))
            .args([
                "--users",
                "4",
                "--run-time",
                &format!("{run_s}s"),
                "--no-check",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        libc::SIGINT,
        Duration::from_secs(10),
    )?;

    println!("\nminute   daemon RSS min / max   series   requests counted   restarts");
    let start = Instant::now();
    let mut samples: Vec<(f64, u64, usize)> = Vec::new();
    // RSS every half second: the lowest of a minute is what the daemon keeps (a leak raises it);
    // the highest includes the transient memory of re-attaching after a restart.
    let (mut rss_min, mut rss_max) = (u64::MAX, 0u64);
    let (mut restarts, mut next_restart, mut next_sample) = (0u32, 0u64, 60u64);
    while start.elapsed().as_secs() < run_s {
        check_interrupted()?;
        let t = start.elapsed().as_secs();
        if t >= next_restart + args.restart_every {
            next_restart = t;
            cmd::output(Command::new("docker").args(["restart", "-t", "1", &container.1]))?;
            restarts += 1;
        }
        let rss = proc_status_kib(daemon.pid(), "VmRSS")?;
        (rss_min, rss_max) = (rss_min.min(rss), rss_max.max(rss));
        if t >= next_sample {
            next_sample += 60;
            let text = metrics_text(metrics)?;
            let series = text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            let counted: f64 = text
                .lines()
                .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            println!(
                "{:>6}   {:>7.1} / {:>7.1} MiB   {series:>6}   {counted:>16}   {restarts:>8}",
                t / 60,
                rss_min as f64 / 1024.0,
                rss_max as f64 / 1024.0,
            );
            samples.push((t as f64 / 3600.0, rss_min, series));
            (rss_min, rss_max) = (u64::MAX, 0);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.stop()?;

    // Growth after warm-up: the least-squares slope of each minute's lowest RSS from minute 2 on.
    let after: Vec<&(f64, u64, usize)> = samples.iter().filter(|s| s.0 >= 2.0 / 60.0).collect();
    if after.len() >= 2 {
        let n = after.len() as f64;
        let mx = after.iter().map(|s| s.0).sum::<f64>() / n;
        let my = after.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let sxy: f64 = after.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
        let sxx: f64 = after.iter().map(|s| (s.0 - mx).powi(2)).sum();
        let kib_per_h = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let (lo, hi) = after
            .iter()
            .fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.2), hi.max(s.2)));
        println!(
            "\nRSS growth after warm-up: {:+.2} MB/h ({}; target under 1 MB/h); series {lo}-{hi} ({})",
            kib_per_h / 1024.0,
            if kib_per_h / 1024.0 < 1.0 { "met" } else { "NOT met" },
            if hi <= lo + lo / 10 { "bounded" } else { "growing" }
        );
    }
    Ok(())
}

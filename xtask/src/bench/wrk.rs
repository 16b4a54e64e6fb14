//! Runs the `wrk` load generator and parses its text report.
//!
//! The parser reads wrk 4.x's fixed report lines ("N requests in", "Requests/sec:", the
//! `--latency` distribution). It must not guess: a report without the request count or rate is
//! an error, not a zero. The caller chooses the URL; this module never picks a target itself.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Responses other than 2xx/3xx; a correct benchmark server sends none.
    pub non_2xx: u64,
    /// wrk's "Socket errors:" line, when present.
    pub socket_errors: Option<String>,
    /// Share of the host's CPU time the hypervisor gave to others during the run (steal, from
    /// /proc/stat); above a few percent the run's throughput says more about the neighbours
    /// than about us. None where the kernel does not report it.
    pub steal_share: Option<f64>,
}

/// (steal ticks, all ticks) summed over the CPUs, from the first line of /proc/stat.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

/// The share of CPU time stolen between two `cpu_ticks` readings.
pub fn steal_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    match (before, after) {
        (Some((s0, a0)), Some((s1, a1))) if a1 > a0 => Some((s1 - s0) as f64 / (a1 - a0) as f64),
        _ => None,
    }
}

/// One thread and 50 connections: enough to keep a one-worker nginx busy on a 2-core host while
/// leaving a core for the agent, so that the agent's cost shows up as lost throughput.
pub fn command(url: &str, duration_secs: u32) -> Command {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        "-c50",
        &format!("-d{duration_secs}s"),
        "--latency",
        url,
    ]);
    cmd
}

/// One wrk run of [`command`], with its report parsed and the steal during it.
pub fn run(url: &str, duration_secs: u32) -> Result<WrkResult> {
    let mut cmd = command(url, duration_secs);
    let line = cmd::display(&cmd);
    eprintln!("$ {line}");
    let before = cpu_ticks();
    let out = cmd::output(&mut cmd)?;
    let mut r = parse(&out).with_context(|| format!("parsing the report of `{line}`:\n{out}"))?;
    r.steal_share = steal_share(before, cpu_ticks());
    Ok(r)
}

pub fn parse(report: &str) -> Result<WrkResult> {
    let mut requests = None;
    let mut rps = None;
    let mut p50_us = None;
    let mut p99_us = None;
    let mut non_2xx = 0;
    let mut socket_errors = None;
    for line in report.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(
                n.trim()
                    .parse::<u64>()
                    .with_context(|| format!("request count in {line:?}"))?,
            );
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(
                v.trim()
                    .parse::<f64>()
                    .with_context(|| format!("rate in {line:?}"))?,
            );
        } else if let Some(v) = line.strip_prefix("50%") {
            p50_us = Some(duration_us(v.trim())?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99_us = Some(duration_us(v.trim())?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = v
                .trim()
                .parse()
                .with_context(|| format!("count in {line:?}"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            socket_errors = Some(v.trim().to_owned());
        }
    }
    let (Some(requests), Some(requests_per_sec)) = (requests, rps) else {
        bail!("no \"N requests in\" or \"Requests/sec:\" line");
    };
    Ok(WrkResult {
        steal_share: None,
        requests,
        requests_per_sec,
        p50_us,
        p99_us,
        non_2xx,
        socket_errors,
    })
}

/// wrk prints latencies as a number with one of its units: us, ms, s, m, h.
fn duration_us(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("no unit in {s:?}"))?;
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("number in {s:?}"))?;
    let scale = match unit.trim() {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        other => bail!("unknown unit {other:?} in {s:?}"),
    };
    Ok(num * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Report layout of wrk 4.1.0 (Debian bookworm) with --latency.
    const REPORT: &str = "\
Running 3s test @ http://10.231.0.2:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.35us  210.14us   9.87ms   91.02%
    Req/Sec    61.02k     2.10k   64.33k    80.00%
  Latency Distribution
     50%  780.00us
     75%  850.00us
     90%  0.98ms
     99%    1.52ms
  182093 requests in 3.00s, 27.01MB read
Requests/sec:  60689.12
Transfer/sec:      9.00MB
";

    #[test]
    fn parses_a_clean_report() {
        let r = parse(REPORT).expect("parse");
        assert_eq!(r.requests, 182_093);
        assert!((r.requests_per_sec - 60_689.12).abs() < 1e-6);
        assert_eq!(r.p50_us, Some(780.0));
        assert_eq!(r.p99_us, Some(1520.0));
        assert_eq!(r.non_2xx, 0);
        assert_eq!(r.socket_errors, None);
    }

    #[test]
    fn reports_errors() {
        let text = REPORT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\nRequests/sec",
        );
        let r = parse(&text).expect("parse");
        assert_eq!(r.non_2xx, 7);
        assert_eq!(
            r.socket_errors.as_deref(),
            Some("connect 0, read 3, write 0, timeout 1")
        );
    }

    #[test]
    fn a_truncated_report_is_an_error() {
        assert!(parse("Running 3s test @ http://10.231.0.2:8080/\n").is_err());
    }

    #[test]
    fn latency_units() {
        assert_eq!(duration_us("12.5us").ok(), Some(12.5));
        assert_eq!(duration_us("2.00s").ok(), Some(2e6));
        assert!(duration_us("3parsecs").is_err());
    }
}

//! Locust-compatible CSV files, so that tooling written for Locust reads our runs:
//! `PREFIX_stats.csv`, `PREFIX_stats_history.csv` and `PREFIX_failures.csv`, with the column
//! names of Locust 2.x (`locust/stats.py`, `StatsCSV` and `StatsCSVFileWriter`).
//!
//! Differences, on purpose: times are milliseconds with up to three decimals (Locust rounds
//! them to whole or two-digit milliseconds); the history's percentiles are those of each second
//! (what Locust writes with `--csv-full-history`), not of the whole run so far. As in Locust,
//! "Requests/s" and "Failures/s" in the history are its `current_rps` and
//! `current_fail_per_sec` (10-second averages that lag 2 s), each taken at the end of the
//! row's second. Everything is read from `LoadReport`; nothing is recomputed here.

use std::path::{Path, PathBuf};

use super::report::{LoadReport, Percentiles};

const PCT_COLUMNS: [&str; 11] = [
    "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%",
];

/// One CSV field (RFC 4180 quoting when needed, as Python's csv module does).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn row<S: AsRef<str>>(out: &mut String, cells: &[S]) {
    let line: Vec<String> = cells.iter().map(|c| field(c.as_ref())).collect();
    out.push_str(&line.join(","));
    out.push_str("\r\n");
}

fn num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_owned()
    }
}

fn pcts(q: &Percentiles) -> Vec<String> {
    if q.count == 0 {
        return vec!["N/A".into(); 11];
    }
    q.locust().iter().map(|v| num(*v)).collect()
}

/// The error text of a failure kind, in the words Locust's users know from its reports.
fn error_text(kind: &str, r: &LoadReport) -> String {
    match kind {
        "refused" => "ConnectionRefusedError(111, 'Connection refused')".into(),
        "reset" => "ConnectionResetError(104, 'Connection reset by peer')".into(),
        "closed_without_response" => {
            "RemoteDisconnected('Remote end closed connection without response')".into()
        }
        "timeout" => "Timeout('request timed out')".into(),
        "connect" => "ConnectError('could not connect')".into(),
        "protocol" => "ProtocolError('invalid HTTP response')".into(),
        k => match k.strip_prefix("http_") {
            Some(code) => format!("HTTPError('{code} for url: {}')", r.name),
            None => k.to_owned(),
        },
    }
}

pub(crate) fn stats_csv(r: &LoadReport) -> String {
    let mut out = String::new();
    let header: Vec<&str> = [
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Median Response Time",
        "Average Response Time",
        "Min Response Time",
        "Max Response Time",
        "Average Content Size",
        "Requests/s",
        "Failures/s",
    ]
    .into_iter()
    .chain(PCT_COLUMNS)
    .collect();
    row(&mut out, &header);
    let dur = r.actual_duration_s.max(1e-9);
    let avg_size = if r.requests > 0 {
        r.bytes_received as f64 / r.requests as f64
    } else {
        0.0
    };
    for (ty, name) in [(r.method.as_str(), r.name.as_str()), ("", "Aggregated")] {
        let q = &r.latency_ms;
        let mut cells = vec![
            ty.to_owned(),
            name.to_owned(),
            r.requests.to_string(),
            r.failures.to_string(),
            num(q.p50),
            num(q.mean),
            num(q.min),
            num(q.max),
            num(avg_size),
            num(r.requests as f64 / dur),
            num(r.failures as f64 / dur),
        ];
        cells.extend(pcts(q));
        row(&mut out, &cells);
    }
    out
}

pub(crate) fn stats_history_csv(r: &LoadReport) -> String {
    let mut out = String::new();
    let header: Vec<&str> = [
        "Timestamp",
        "User Count",
        "Type",
        "Name",
        "Requests/s",
        "Failures/s",
    ]
    .into_iter()
    .chain(PCT_COLUMNS)
    .chain([
        "Total Request Count",
        "Total Failure Count",
        "Total Median Response Time",
        "Total Average Response Time",
        "Total Min Response Time",
        "Total Max Response Time",
        "Total Average Content Size",
    ])
    .collect();
    row(&mut out, &header);
    let start_s = r.started_unix_ms / 1000;
    for p in &r.series {
        let mut cells = vec![
            (start_s + u64::from(p.second) + 1).to_string(),
            p.users.to_string(),
            String::new(),
            "Aggregated".into(),
            format!("{:.6}", p.current_rps),
            format!("{:.6}", p.current_fail_per_sec),
        ];
        cells.extend(pcts(&p.latency_ms));
        let t = &p.total_latency_ms;
        let avg_size = if p.total_requests > 0 {
            p.total_bytes as f64 / p.total_requests as f64
        } else {
            0.0
        };
        cells.extend([
            p.total_requests.to_string(),
            p.total_failures.to_string(),
            num(t.p50),
            num(t.mean),
            num(t.min),
            num(t.max),
            num(avg_size),
        ]);
        row(&mut out, &cells);
    }
    out
}

pub(crate) fn failures_csv(r: &LoadReport) -> String {
    let mut out = String::new();
    row(&mut out, &["Method", "Name", "Error", "Occurrences"]);
    for f in &r.failures_by_kind {
        row(
            &mut out,
            &[
                r.method.clone(),
                r.name.clone(),
                error_text(&f.kind, r),
                f.count.to_string(),
            ],
        );
    }
    out
}

/// Writes the three files as `DIR/PREFIX_stats.csv` etc. Each is written to a temporary name
/// and renamed, so that a reader never sees half a file. Returns the paths written.
pub fn write(r: &LoadReport, dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (suffix, text) in [
        ("stats", stats_csv(r)),
        ("stats_history", stats_history_csv(r)),
        ("failures", failures_csv(r)),
    ] {
        let path = dir.join(format!("{prefix}_{suffix}.csv"));
        crate::files::write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::{FailureCount, SeriesPoint};

    fn report() -> LoadReport {
        let q = Percentiles {
            count: 3,
            min: 1.0,
            mean: 2.0,
            p50: 2.0,
            max: 3.5,
            ..Percentiles::default()
        };
        LoadReport {
            version: 1,
            url: "http://127.0.0.1:1/posts/io_read/".into(),
            method: "GET".into(),
            name: "/posts/io_read/".into(),
            model: "closed".into(),
            stages: vec![],
            started_unix_ms: 1_700_000_000_500,
            planned_duration_s: 2.0,
            actual_duration_s: 2.0,
            stopped_early: false,
            requests: 3,
            successes: 2,
            failures: 1,
            total_successes: 2,
            max_srps: 1.0,
            max_srps_5s_window: 0.4,
            failures_by_kind: vec![FailureCount {
                kind: "http_500".into(),
                count: 1,
            }],
            status_counts: Default::default(),
            bytes_received: 30,
            latency_ms: q.clone(),
            success_latency_ms: q.clone(),
            connect_ms: Percentiles::default(),
            late_starts: 0,
            start_lag_ms: Percentiles::default(),
            in_flight_at_end: 0,
            max_users: 1,
            threads: 1,
            series: vec![
                SeriesPoint {
                    second: 0,
                    users: 1,
                    requests: 0,
                    ..SeriesPoint::default()
                },
                SeriesPoint {
                    second: 1,
                    users: 1,
                    requests: 3,
                    successes: 2,
                    failures: 1,
                    latency_ms: q.clone(),
                    total_requests: 3,
                    total_failures: 1,
                    total_latency_ms: q,
                    total_bytes: 30,
                    // Locust's smoothed rates, not the second's counts (3 and 1).
                    current_rps: 2.5,
                    current_fail_per_sec: 0.5,
                    ..SeriesPoint::default()
                },
            ],
        }
    }

    #[test]
    fn locust_columns_and_rows() {
        let r = report();
        let stats = stats_csv(&r);
        let mut lines = stats.lines();
        assert_eq!(
            lines.next().unwrap(),
            "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
        );
        assert!(lines
            .next()
            .unwrap()
            .starts_with("GET,/posts/io_read/,3,1,2,2,1,3.5,10,1.5,0.5,2,"));
        assert!(lines.next().unwrap().starts_with(",Aggregated,3,1,"));

        let hist = stats_history_csv(&r);
        let mut lines = hist.lines();
        assert_eq!(
            lines.next().unwrap(),
            "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,Total Min Response Time,Total Max Response Time,Total Average Content Size"
        );
        let first = lines.next().unwrap();
        assert!(
            first.starts_with("1700000001,1,,Aggregated,0.000000,0.000000,N/A,"),
            "{first}"
        );
        assert!(lines
            .next()
            .unwrap()
            .starts_with("1700000002,1,,Aggregated,2.500000,0.500000,2,"));

        let f = failures_csv(&r);
        assert_eq!(f.lines().next().unwrap(), "Method,Name,Error,Occurrences");
        assert_eq!(
            f.lines().nth(1).unwrap(),
            "GET,/posts/io_read/,HTTPError('500 for url: /posts/io_read/'),1"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(1.2344), "1.234");
    }
}

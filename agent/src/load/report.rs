//! The versioned summary of one load run (`LoadReport`), built from the recorder's totals and
//! the per-second series. It is the one source for every output: the JSON summary, the Locust
//! CSV files and the experiment runner's results. It must not recompute what `metrics` and
//! `record` define.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::record::{ErrorKind, Second, Totals};
use super::schedule::Stage;

/// Bumped whenever a field changes meaning or disappears. 2: `max_srps` is Locust's chart
/// figure (the fixed-window one is `max_srps_5s_window`), and series seconds are unix seconds.
pub const REPORT_VERSION: u32 = 2;

/// Locust's reported percentiles (its `PERCENTILES_TO_REPORT`), as fractions.
pub(crate) const LOCUST_PERCENTILES: [f64; 11] = [
    0.50, 0.66, 0.75, 0.80, 0.90, 0.95, 0.98, 0.99, 0.999, 0.9999, 1.0,
];

/// Latency figures in milliseconds, with the percentiles Locust reports (from HDR histograms,
/// <= 0.1 % relative error); `probe::aggregate::Quantiles` is the probes' shorter set.
/// All zero when `count` is 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p66: f64,
    pub p75: f64,
    pub p80: f64,
    pub p90: f64,
    pub p95: f64,
    pub p98: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Percentiles {
    /// `sum_ns`, when known, gives the exact mean (the histogram's is within 0.1 %).
    pub fn of(h: &Histogram<u64>, sum_ns: Option<u128>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        // In LOCUST_PERCENTILES order; its last (1.0) is the maximum.
        let [p50, p66, p75, p80, p90, p95, p98, p99, p999, p9999, _] =
            LOCUST_PERCENTILES.map(|p| ms(h.value_at_quantile(p)));
        Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: match sum_ns {
                Some(s) => s as f64 / h.len() as f64 / 1e6,
                None => h.mean() / 1e6,
            },
            p50,
            p66,
            p75,
            p80,
            p90,
            p95,
            p98,
            p99,
            p999,
            p9999,
            max: ms(h.max()),
        }
    }

    /// The values in `LOCUST_PERCENTILES` order.
    pub fn locust(&self) -> [f64; 11] {
        [
            self.p50, self.p66, self.p75, self.p80, self.p90, self.p95, self.p98, self.p99,
            self.p999, self.p9999, self.max,
        ]
    }
}

/// One second of the run: what completed in [second, second + 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Whole wall-clock seconds since the one the run started in: this point is unix second
    /// `started_unix_ms / 1000 + second`, as Locust counts, so the first point is partial.
    pub second: u32,
    /// Users running at the end of the second (closed model), requests in flight (open model).
    pub users: u32,
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub bytes: u64,
    /// Latency of this second's requests (all of them, like Locust), milliseconds.
    pub latency_ms: Percentiles,
    /// Running totals at the end of this second.
    pub total_requests: u64,
    pub total_failures: u64,
    pub total_latency_ms: Percentiles,
    pub total_bytes: u64,
    /// When the first request of this second completed, milliseconds into it (none if none).
    #[serde(default)]
    pub first_done_ms: Option<f64>,
    /// Locust's `current_rps` and `current_fail_per_sec` at the end of this second (what its
    /// stats history CSV writes each second; `chart::current_rates`).
    #[serde(default)]
    pub current_rps: f64,
    #[serde(default)]
    pub current_fail_per_sec: f64,
}

impl SeriesPoint {
    /// The counts Locust's figures are computed from.
    pub(crate) fn tally(&self) -> super::chart::Tally {
        super::chart::Tally {
            requests: self.requests,
            failures: self.failures,
            first_done_ns: self.first_done_ms.map_or(0, |ms| (ms * 1e6).round() as u32),
        }
    }
}

/// Count of one failure kind: `http_NNN` for an HTTP status >= 400, otherwise an `ErrorKind`
/// name (`refused`, `reset`, `closed_without_response`, `timeout`, `connect`, `protocol`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureCount {
    pub kind: String,
    pub count: u64,
}

/// The summary of one run. Readers should accept fields they do not know (newer minor
/// additions); `version` changes when a field changes meaning or disappears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub version: u32,
    pub url: String,
    pub method: String,
    /// The request path (Locust's "Name").
    pub name: String,
    /// "closed" or "open".
    pub model: String,
    /// Users (closed) or requests/s (open) per stage.
    pub stages: Vec<Stage>,
    /// Unix time of the start, milliseconds.
    pub started_unix_ms: u64,
    pub planned_duration_s: f64,
    pub actual_duration_s: f64,
    /// Cancelled before the planned end.
    pub stopped_early: bool,
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    /// The study's Total successes (requests - failures).
    pub total_successes: u64,
    /// The study's Max sRPS: the largest point of Locust 2.13's report chart of
    /// (requests/s - failures/s) (`chart::max_srps`).
    pub max_srps: f64,
    /// The best fixed 5-second window of (requests - failures) / 5 (not the study's figure).
    #[serde(default)]
    pub max_srps_5s_window: f64,
    pub failures_by_kind: Vec<FailureCount>,
    /// Responses by HTTP status (successes and failures).
    pub status_counts: BTreeMap<String, u64>,
    pub bytes_received: u64,
    /// Every completed request, from its start (its due time in the open model) to its last
    /// response byte or its failure; includes connect time when it opened a connection.
    pub latency_ms: Percentiles,
    /// Successful requests only.
    pub success_latency_ms: Percentiles,
    /// TCP connect time of each connection opened; `count` is the number of connections.
    pub connect_ms: Percentiles,
    /// Open model: requests that could not start at their due time (no connection free).
    pub late_starts: u64,
    /// Open model: start minus due time.
    pub start_lag_ms: Percentiles,
    /// Requests still in flight when the run ended (not counted above).
    pub in_flight_at_end: u64,
    /// Most users (closed model), or workers started, each with its connection (open model).
    pub max_users: u32,
    /// The generator's threads (`LoadSpec::threads`).
    #[serde(default)]
    pub threads: usize,
    pub series: Vec<SeriesPoint>,
}

/// Failure counts in a stable order: HTTP statuses ascending, then error kinds.
pub fn failures_by_kind(t: &Totals) -> Vec<FailureCount> {
    let mut v: Vec<FailureCount> = t
        .statuses
        .iter()
        .filter(|(s, n)| **s >= 400 && **n > 0)
        .map(|(s, n)| FailureCount {
            kind: format!("http_{s}"),
            count: *n,
        })
        .collect();
    for k in ErrorKind::ALL {
        let n = t.error_count(k);
        if n > 0 {
            v.push(FailureCount {
                kind: k.name().to_owned(),
                count: n,
            });
        }
    }
    v
}

/// Running state that turns collected seconds into series points.
#[derive(Default)]
pub(crate) struct SeriesBuilder {
    pub points: Vec<SeriesPoint>,
    cumulative: Second,
}

impl SeriesBuilder {
    /// Locust's chart value (requests/s - failures/s, `chart::current_rates`) at `t` seconds
    /// after the start of second 0, from the seconds pushed so far. Reads only the last 16
    /// (Locust averages over at most 12 seconds that end 2 before the last completion).
    pub fn current_successes_per_s(&self, t: f64) -> f64 {
        let from = self.points.len().saturating_sub(16);
        let tallies: Vec<super::chart::Tally> =
            self.points[from..].iter().map(SeriesPoint::tally).collect();
        let (rps, fail) = super::chart::current_rates(&tallies, t - from as f64);
        rps - fail
    }

    /// Adds second `sec` (seconds must come in order; a late one is merged into its point).
    pub fn push(&mut self, sec: u64, s: &Second, users: u32) {
        self.cumulative.merge(s);
        let cum = &self.cumulative;
        let sec32 = u32::try_from(sec).unwrap_or(u32::MAX);
        // Fill seconds in which nothing completed, so that the series has one point a second.
        while self.points.last().map_or(0, |p| p.second + 1) < sec32 {
            let next = self.points.last().map_or(0, |p| p.second + 1);
            let prev = self.points.last().cloned().unwrap_or_default();
            self.points.push(SeriesPoint {
                second: next,
                users: prev.users,
                total_requests: prev.total_requests,
                total_failures: prev.total_failures,
                total_latency_ms: prev.total_latency_ms.clone(),
                total_bytes: prev.total_bytes,
                ..SeriesPoint::default()
            });
        }
        let point = SeriesPoint {
            second: sec32,
            users,
            requests: s.requests,
            successes: s.requests - s.failures,
            failures: s.failures,
            bytes: s.bytes,
            latency_ms: Percentiles::of(&s.latency, Some(s.latency_sum_ns)),
            total_requests: cum.requests,
            total_failures: cum.failures,
            total_latency_ms: Percentiles::of(&cum.latency, Some(cum.latency_sum_ns)),
            total_bytes: cum.bytes,
            first_done_ms: (s.requests > 0).then(|| f64::from(s.first_done_ns) / 1e6),
            ..SeriesPoint::default()
        };
        match self.points.iter_mut().find(|p| p.second == sec32) {
            // A shard that stalled past the collector: keep its counts (the quantiles of that
            // second stay as first computed).
            Some(p) => {
                p.requests += s.requests;
                p.successes += s.requests - s.failures;
                p.failures += s.failures;
                p.bytes += s.bytes;
                if s.requests > 0 {
                    let first = f64::from(s.first_done_ns) / 1e6;
                    p.first_done_ms = Some(p.first_done_ms.map_or(first, |f| f.min(first)));
                }
            }
            None => self.points.push(point),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::chart;

    /// The live chart value reads only the last 16 seconds: it must equal Locust's formula over
    /// the whole run (`chart::current_rates`) at every second of a 40 s run with bursts, gaps
    /// and failures.
    #[test]
    fn the_live_chart_value_is_locusts_over_the_whole_run() {
        let mut b = SeriesBuilder::default();
        for sec in 0..40u64 {
            let mut s = Second::default();
            if sec % 7 != 3 {
                s.requests = (sec * 13) % 29 + u64::from(sec % 5 == 0) * 40;
                s.failures = s.requests / 6;
                s.first_done_ns = ((sec * 97) % 1000) as u32 * 1_000_000;
            }
            b.push(sec, &s, 10);
            let t = sec as f64 + 1.0;
            let all: Vec<chart::Tally> = b.points.iter().map(SeriesPoint::tally).collect();
            let (rps, fail) = chart::current_rates(&all, t);
            let live = b.current_successes_per_s(t);
            assert!(
                (live - (rps - fail)).abs() < 1e-9,
                "second {sec}: {live} vs {}",
                rps - fail
            );
        }
    }
}

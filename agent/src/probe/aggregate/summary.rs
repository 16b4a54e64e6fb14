//! The whole-attach summary: one versioned, serialisable value built from the aggregator, the
//! kernel counters and the CPU totals. `watch` prints it; results files will store it.

use agent_common::{Counter, COUNTERS};
use serde::{Deserialize, Serialize};

use super::{Quantiles, Ratios, Reading, Stats};
use crate::probe::ProbeStatus;

/// Bump when a field changes meaning or disappears (adding fields keeps the version).
pub(crate) const SUMMARY_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    pub target: String,
    pub netns_inum: u32,
    pub duration_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    pub status: std::collections::BTreeMap<String, u64>,
    pub paths: Vec<PathCount>,
    /// Requests by the process that served them (pid): which server served the interval.
    #[serde(default)]
    pub requests_by_pid: std::collections::BTreeMap<u32, u64>,
    pub server_time: Quantiles,
    pub db: DbSummary,
    pub ratios: Ratios,
    /// Requests still in the server at the end: read, not answered. Where the kernel could not
    /// pin round trips to requests (`ratios.attributed_share` below 1), the per-request
    /// figures count their work too.
    #[serde(default)]
    pub requests_in_server_at_end: Option<u64>,
    pub http_conns_opened: u64,
    pub http_conns_closed: u64,
    pub cpu: CpuSummary,
    pub lost: Lost,
    pub probes: Vec<ProbeStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PathCount {
    pub method: String,
    pub path: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbSummary {
    pub round_trips: u64,
    pub round_trip: Quantiles,
    pub connects: u64,
    pub connect: Quantiles,
    pub connect_failures: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
}

/// CPU time of the target's threads over the interval. The whole-target figures include threads
/// that exited meanwhile; the per-thread ones cover the threads alive at its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuSummary {
    pub on_cpu_s: f64,
    pub off_cpu_s: f64,
    /// Off-CPU share of all thread time: idle pool threads dilute it, so it says little about
    /// the threads that did the work (see the serving_* fields).
    pub off_cpu_share: Option<f64>,
    pub threads_seen: u64,
    /// Threads alive at the end that read at least one request in the interval.
    #[serde(default)]
    pub serving_threads: u64,
    /// On-CPU and off-CPU seconds of those threads over the interval.
    #[serde(default)]
    pub serving_on_cpu_s: f64,
    #[serde(default)]
    pub serving_off_cpu_s: f64,
    /// On-CPU seconds of all the target's threads per second of the interval: how many CPUs the
    /// server kept busy on average.
    #[serde(default)]
    pub cpu_s_per_wall_s: Option<f64>,
    /// Every thread alive at the end, by thread id (the kernel's, as in /proc/TID).
    #[serde(default)]
    pub threads: Vec<ThreadCpuSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreadCpuSummary {
    pub tid: u32,
    pub on_cpu_s: f64,
    pub off_cpu_s: f64,
    /// It read at least one request in the interval.
    pub serving: bool,
}

impl CpuSummary {
    /// The interval between two readings; `serving`: thread ids that read requests.
    fn between(
        start: &Reading,
        end: &Reading,
        serving: &std::collections::BTreeSet<u32>,
        wall_s: f64,
    ) -> CpuSummary {
        let on = end.cpu.on_ns.saturating_sub(start.cpu.on_ns);
        let off = end.cpu.off_ns.saturating_sub(start.cpu.off_ns);
        let threads: Vec<ThreadCpuSummary> = end
            .threads
            .iter()
            .map(|(&tid, &(on, off))| {
                // A thread first seen in the interval started its clocks in it.
                let (on0, off0) = start.threads.get(&tid).copied().unwrap_or((0, 0));
                ThreadCpuSummary {
                    tid,
                    on_cpu_s: on.saturating_sub(on0) as f64 / 1e9,
                    off_cpu_s: off.saturating_sub(off0) as f64 / 1e9,
                    serving: serving.contains(&tid),
                }
            })
            .collect();
        let serving_threads: Vec<&ThreadCpuSummary> =
            threads.iter().filter(|t| t.serving).collect();
        CpuSummary {
            on_cpu_s: on as f64 / 1e9,
            off_cpu_s: off as f64 / 1e9,
            off_cpu_share: end.cpu.off_share_since(&start.cpu),
            threads_seen: end.cpu.threads,
            serving_threads: serving_threads.len() as u64,
            serving_on_cpu_s: serving_threads.iter().map(|t| t.on_cpu_s).sum(),
            serving_off_cpu_s: serving_threads.iter().map(|t| t.off_cpu_s).sum(),
            cpu_s_per_wall_s: (wall_s > 0.0).then(|| on as f64 / 1e9 / wall_s),
            threads,
        }
    }
}

/// Everything that was not measured, by cause. All zero in a clean run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Lost {
    pub ringbuf_full: u64,
    pub conn_map_full: u64,
    pub thread_map_full: u64,
    /// Traffic on connections whose request we did not see start (opened before attach).
    pub unknown_socket: u64,
    pub payload_read_failed: u64,
    /// Records the agent could not decode.
    pub malformed: u64,
    /// Requests the kernel finished minus requests received.
    pub requests_not_received: u64,
    pub round_trips_not_received: u64,
    /// Aggregation mode: requests counted under `OTHER /other` because the histogram map was
    /// full (measured, but not by their own path).
    #[serde(default)]
    pub agg_map_full: u64,
}

pub struct SummaryInput<'a> {
    pub target: &'a str,
    pub netns_inum: u32,
    pub duration_s: f64,
    pub stats: &'a Stats,
    pub labels: &'a super::http::LabelSet,
    /// Counters over the interval (end minus start).
    pub counters: &'a [u64; COUNTERS as usize],
    pub start: &'a Reading,
    pub end: &'a Reading,
    pub malformed: u64,
    pub probes: &'a [ProbeStatus],
}

impl Summary {
    pub fn build(i: SummaryInput<'_>) -> Summary {
        let c = |x: Counter| i.counters[x as usize];
        let s = i.stats;
        Summary {
            kind: "summary".into(),
            version: SUMMARY_VERSION,
            target: i.target.to_string(),
            netns_inum: i.netns_inum,
            duration_s: i.duration_s,
            requests: s.requests,
            requests_per_s: if i.duration_s > 0.0 {
                s.requests as f64 / i.duration_s
            } else {
                0.0
            },
            status: s
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            paths: s
                .by_label
                .iter()
                .map(|(&l, &count)| {
                    let (m, p) = i.labels.get(l);
                    PathCount {
                        method: m.to_string(),
                        path: p.to_string(),
                        count,
                    }
                })
                .collect(),
            requests_by_pid: s.by_pid.clone(),
            server_time: Quantiles::of(&s.server),
            db: DbSummary {
                round_trips: s.db_round_trips,
                round_trip: Quantiles::of(&s.db_rtt),
                connects: s.db_connects,
                connect: Quantiles::of(&s.db_connect),
                connect_failures: c(Counter::DbConnectFailed),
                conns_opened: c(Counter::DbConnsOpened),
                conns_closed: c(Counter::DbConnsClosed),
            },
            ratios: s.ratios(Some(i.end.in_server_ns.wrapping_sub(i.start.in_server_ns))),
            requests_in_server_at_end: Some(i.end.in_server),
            http_conns_opened: c(Counter::HttpConnsOpened),
            http_conns_closed: c(Counter::HttpConnsClosed),
            cpu: CpuSummary::between(i.start, i.end, &s.serving_tids, i.duration_s),
            lost: Lost {
                ringbuf_full: c(Counter::RingbufFull),
                conn_map_full: c(Counter::ConnMapFull),
                thread_map_full: c(Counter::ThreadMapFull),
                unknown_socket: c(Counter::UnknownSocket),
                payload_read_failed: c(Counter::PayloadReadFailed),
                malformed: i.malformed,
                requests_not_received: c(Counter::Requests).saturating_sub(s.requests),
                round_trips_not_received: c(Counter::DbRoundTrips).saturating_sub(s.db_round_trips),
                agg_map_full: c(Counter::AggMapFull),
            },
            probes: i.probes.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::aggregate::CpuTotals;

    fn reading(at_s: u64, threads: &[(u32, u64, u64)], exited_on: u64) -> Reading {
        let on: u64 = threads.iter().map(|t| t.1).sum::<u64>() + exited_on;
        let off: u64 = threads.iter().map(|t| t.2).sum();
        Reading {
            at_ns: at_s * 1_000_000_000,
            cpu: CpuTotals {
                on_ns: on,
                off_ns: off,
                threads: threads.len() as u64,
            },
            threads: threads
                .iter()
                .map(|&(tid, on, off)| (tid, (on, off)))
                .collect(),
            in_server_ns: 0,
            in_server: 0,
        }
    }

    /// The serving threads' figures come from those threads only; the whole-target ones from
    /// every thread, exited ones included; a thread first seen in the interval counts from 0.
    #[test]
    fn serving_threads_and_cpu_per_wall_second() {
        const S: u64 = 1_000_000_000;
        // tid 10 serves (event loop), 11 and 12 are idle pool threads, 13 appears later.
        let start = reading(100, &[(10, S, 2 * S), (11, 0, 3 * S), (12, 0, 3 * S)], 0);
        let end = reading(
            110,
            &[
                (10, 7 * S, 6 * S),
                (11, 0, 13 * S),
                (12, S / 2, 12 * S + S / 2),
                (13, S, S),
            ],
            S,
        );
        let serving = [10u32].into_iter().collect();
        let c = CpuSummary::between(&start, &end, &serving, 10.0);
        assert_eq!(c.serving_threads, 1);
        assert!(
            (c.serving_on_cpu_s - 6.0).abs() < 1e-9 && (c.serving_off_cpu_s - 4.0).abs() < 1e-9,
            "{c:?}"
        );
        // 6 + 0 + 0.5 + 1 (new thread) + 1 (exited) = 8.5 s on CPU over 10 s.
        assert!((c.on_cpu_s - 8.5).abs() < 1e-9, "{c:?}");
        assert!((c.cpu_s_per_wall_s.unwrap() - 0.85).abs() < 1e-9);
        assert_eq!(c.threads.len(), 4);
        assert_eq!(
            c.threads[3],
            ThreadCpuSummary {
                tid: 13,
                on_cpu_s: 1.0,
                off_cpu_s: 1.0,
                serving: false
            }
        );
        // The old share is diluted by the idle threads; the serving thread was busy 60 %.
        assert!(c.off_cpu_share.unwrap() > 0.7);
        assert_eq!(
            CpuSummary::between(&start, &end, &serving, 0.0).cpu_s_per_wall_s,
            None
        );
    }
}

//! The whole-attach summary: one versioned, serialisable value built from the aggregator, the
//! kernel counters and the CPU totals. `watch` prints it; results files will store it.

use agent_common::{Counter, COUNTERS};
use serde::{Deserialize, Serialize};

use super::{CpuTotals, Quantiles, Ratios, Stats};
use crate::probes::ProbeStatus;

/// Bump when a field changes meaning or disappears (adding fields keeps the version).
pub const SUMMARY_VERSION: u32 = 1;

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
    pub http_conns_opened: u64,
    pub http_conns_closed: u64,
    pub cpu: CpuSummary,
    pub lost: Lost,
    pub probes: Vec<ProbeStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuSummary {
    pub on_cpu_s: f64,
    pub off_cpu_s: f64,
    pub off_cpu_share: Option<f64>,
    pub threads_seen: u64,
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
}

pub struct SummaryInput<'a> {
    pub target: &'a str,
    pub netns_inum: u32,
    pub duration_s: f64,
    pub stats: &'a Stats,
    pub labels: &'a super::http::LabelSet,
    pub counters: &'a [u64; COUNTERS as usize],
    pub cpu_start: CpuTotals,
    pub cpu_end: CpuTotals,
    pub malformed: u64,
    pub probes: &'a [ProbeStatus],
}

impl Summary {
    pub fn build(i: SummaryInput<'_>) -> Summary {
        let c = |x: Counter| i.counters[x as usize];
        let s = i.stats;
        let on = i.cpu_end.on_ns.saturating_sub(i.cpu_start.on_ns);
        let off = i.cpu_end.off_ns.saturating_sub(i.cpu_start.off_ns);
        Summary {
            kind: "summary".into(),
            version: SUMMARY_VERSION,
            target: i.target.to_string(),
            netns_inum: i.netns_inum,
            duration_s: i.duration_s,
            requests: s.requests,
            requests_per_s: if i.duration_s > 0.0 { s.requests as f64 / i.duration_s } else { 0.0 },
            status: s.by_status.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            paths: s
                .by_label
                .iter()
                .map(|(&l, &count)| {
                    let (m, p) = i.labels.get(l);
                    PathCount { method: m.to_string(), path: p.to_string(), count }
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
            ratios: s.ratios(),
            http_conns_opened: c(Counter::HttpConnsOpened),
            http_conns_closed: c(Counter::HttpConnsClosed),
            cpu: CpuSummary {
                on_cpu_s: on as f64 / 1e9,
                off_cpu_s: off as f64 / 1e9,
                off_cpu_share: i.cpu_end.off_share_since(&i.cpu_start),
                threads_seen: i.cpu_end.threads,
            },
            lost: Lost {
                ringbuf_full: c(Counter::RingbufFull),
                conn_map_full: c(Counter::ConnMapFull),
                thread_map_full: c(Counter::ThreadMapFull),
                unknown_socket: c(Counter::UnknownSocket),
                payload_read_failed: c(Counter::PayloadReadFailed),
                malformed: i.malformed,
                requests_not_received: c(Counter::Requests).saturating_sub(s.requests),
                round_trips_not_received: c(Counter::DbRoundTrips).saturating_sub(s.db_round_trips),
            },
            probes: i.probes.to_vec(),
        }
    }
}

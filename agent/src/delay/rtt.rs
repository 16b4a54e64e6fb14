//! The round-trip times the target's own TCP connections see (kernel `tcp_info` via `ss`),
//! sampled before and while a delay holds.

use super::*;

/// Smoothed RTTs of the established TCP connections of a namespace (loopback peers excluded).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RttSample {
    pub sockets: usize,
    pub median_ms: Option<f64>,
}

/// Parses `ss -H -tin state established`: each connection is an address line followed by an
/// indented info line holding `rtt:SRTT/RTTVAR` in milliseconds.
pub(crate) fn parse_ss_rtts(out: &str) -> Vec<f64> {
    let mut rtts = Vec::new();
    let mut remote_is_loopback = false;
    for line in out.lines() {
        if !line.starts_with([' ', '\t']) {
            let peer = line.split_whitespace().last().unwrap_or("");
            remote_is_loopback = peer.starts_with("127.")
                || peer.starts_with("[::1]")
                || peer.starts_with("[::ffff:127.");
            continue;
        }
        if remote_is_loopback {
            continue;
        }
        if let Some(v) = line.split_whitespace().find_map(|w| w.strip_prefix("rtt:")) {
            if let Some(ms) = v.split('/').next().and_then(|x| x.parse().ok()) {
                rtts.push(ms);
            }
        }
    }
    rtts
}

pub(super) fn rtt_sample(ns: &File) -> RttSample {
    let args: Vec<String> = ["-H", "-tin", "state", "established"]
        .map(String::from)
        .to_vec();
    let mut rtts = run_in_ns(ns, "ss", &args)
        .map(|o| parse_ss_rtts(&o))
        .unwrap_or_default();
    rtts.sort_by(f64::total_cmp);
    RttSample {
        sockets: rtts.len(),
        median_ms: rtts.get(rtts.len() / 2).copied(),
    }
}

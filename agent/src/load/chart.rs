//! The study's figures, computed exactly as the study read them, from one place:
//!
//! - **Max sRPS** (`max_srps`): the largest point of Locust 2.13's report chart of
//!   (requests/s - failures/s). Locust adds a chart point every 5 s after its start
//!   (`stats_history`, `HISTORY_STATS_INTERVAL_SEC`); each point is `current_rps -
//!   current_fail_per_sec` (locust/stats.py, `StatsEntry`): the mean of the per-second counts
//!   over the unix seconds `[int(t_last) - 12, int(t_last) - 2)`, clipped at the start, where
//!   `t_last` is when the last request so far completed. So a point lags 2-12 s behind, averages
//!   10 s, and stays where it was while nothing completes;
//! - **Max sRPS over 5 s windows** (`max_srps_5s_window`): the best fixed 5-second window of
//!   (requests - failures) / 5. Not the study's figure (it reads higher on bursty routes), kept
//!   because it counts every completion and does not lag;
//! - **Total successes**: requests - failures over the run.
//!
//! Both rates take the run's whole wall-clock (unix) seconds, as Locust keys its counts by
//! `int(time.time())` of each completion: index 0 is the unix second in which the run started
//! (so it is partial), and times are seconds after the start of that second.
//!
//! This module must not read clocks or histograms: it takes per-second counts only.

/// Locust's `HISTORY_STATS_INTERVAL_SEC`: a chart point every 5 s.
pub(crate) const CHART_INTERVAL_S: f64 = 5.0;

/// Length of one window of `max_srps_5s_window`, in seconds.
pub(crate) const WINDOW_S: usize = 5;

/// What completed in one whole unix second of the run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tally {
    pub requests: u64,
    pub failures: u64,
    /// When the first of them completed, nanoseconds into the second (meaningless when
    /// `requests` is 0). It decides whether a chart point taken inside this second already
    /// saw a completion in it, which moves Locust's whole averaging window by a second.
    pub first_done_ns: u32,
}

/// Locust's `(current_rps, current_fail_per_sec)` at time `t` (seconds after the start of
/// second 0), for a run that started inside second 0 (`int(start_time)` is second 0).
pub fn current_rates(secs: &[Tally], t: f64) -> (f64, f64) {
    if secs.is_empty() || t.is_nan() || t < 0.0 {
        return (0.0, 0.0);
    }
    let now = t.floor() as usize;
    let into = ((t - t.floor()) * 1e9) as u32;
    // int(t_last): the latest second with a completion at or before t.
    let last = (0..=now.min(secs.len() - 1))
        .rev()
        .find(|&i| secs[i].requests > 0 && (i < now || secs[i].first_done_ns <= into));
    let Some(last) = last else {
        // Nothing completed yet: Locust's last_request_timestamp is None, the rates 0.
        return (0.0, 0.0);
    };
    // range(max(int(t_last) - 12, int(start_time)), int(t_last) - 2), averaged over its length
    // (locust's `avg` divides by max(len, 1)).
    let lo = last.saturating_sub(12);
    let hi = last.saturating_sub(2);
    if hi <= lo {
        return (0.0, 0.0);
    }
    let n = (hi - lo) as f64;
    let window = &secs[lo..hi];
    let req: u64 = window.iter().map(|s| s.requests).sum();
    let fail: u64 = window.iter().map(|s| s.failures).sum();
    (req as f64 / n, fail as f64 / n)
}

/// The report chart's points of (requests/s - failures/s): one every `CHART_INTERVAL_S` after
/// the start (`start_s` into second 0), before the end (`duration_s` later).
pub fn chart(secs: &[Tally], start_s: f64, duration_s: f64) -> Vec<f64> {
    let mut points = Vec::new();
    let mut k = 1.0;
    // As Locust 2.13.0's headless runs here: `-t 15s` gives points at 5 and 10 s only. Its
    // sampler wakes 5 s after each sample ends, so it drifts late, and the run-time timer, set
    // at the start too, quits first. Its point at 0 s is taken just before the start resets the
    // statistics (`clear_all`, which empties the history), and is lost.
    while k * CHART_INTERVAL_S < duration_s - 1e-9 {
        let (rps, fps) = current_rates(secs, start_s + k * CHART_INTERVAL_S);
        points.push(rps - fps);
        k += 1.0;
    }
    points
}

/// Max sRPS: the largest point of Locust's report chart (0 for a run of 5 s or less, which has
/// no point).
pub fn max_srps(chart_points: &[f64]) -> f64 {
    chart_points.iter().copied().fold(0.0, f64::max)
}

/// The best fixed 5-second window of (requests - failures) / 5 over per-second
/// `(requests, failures)` counts, windows counted from second 0. Only whole windows count; a
/// run shorter than one window uses what it has, divided by its own length (`run_s`).
pub fn max_srps_5s_window(per_second: &[(u64, u64)], run_s: f64) -> f64 {
    let whole = per_second.len() / WINDOW_S;
    let successes =
        |w: &[(u64, u64)]| w.iter().map(|(r, f)| r.saturating_sub(*f)).sum::<u64>() as f64;
    if whole == 0 || run_s < WINDOW_S as f64 {
        if run_s <= 0.0 {
            return 0.0;
        }
        return successes(per_second) / run_s;
    }
    per_second
        .chunks_exact(WINDOW_S)
        .take(whole)
        .map(|w| successes(w) / WINDOW_S as f64)
        .fold(0.0, f64::max)
}

/// Total successes: requests - failures.
pub fn total_successes(requests: u64, failures: u64) -> u64 {
    requests.saturating_sub(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(requests: u64, failures: u64, first_done_ms: u32) -> Tally {
        Tally {
            requests,
            failures,
            first_done_ns: first_done_ms * 1_000_000,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn chart_of_a_steady_run() {
        // Started 0.5 s into second 0; 20 responses a second, 2 of them failures, each second's
        // first at 50 ms; seconds 0 and 30 are half seconds (10 and 1). 30 s: points at 5.5,
        // 10.5, ..., 25.5 (none at the end), each with int(t_last) = its own second.
        let mut s = vec![tally(20, 2, 50); 31];
        s[0] = tally(10, 1, 550);
        s[30] = tally(10, 1, 50);
        let c = chart(&s, 0.5, 30.0);
        assert_eq!(c.len(), 5);
        // 5.5: t_last in 5, seconds [0, 3) clipped at the start: (10 + 20 + 20) / 3 requests/s
        // and (1 + 2 + 2) / 3 failures/s: 45 / 3 = 15.
        assert!(close(c[0], 15.0), "{c:?}");
        // 10.5: seconds [0, 8): (10 + 7 x 20 - 1 - 7 x 2) / 8 = 135 / 8.
        assert!(close(c[1], 135.0 / 8.0), "{c:?}");
        // 15.5 and later: ten whole seconds [l - 12, l - 2) of 18 successes.
        for p in &c[2..] {
            assert!(close(*p, 18.0), "{c:?}");
        }
        assert!(close(max_srps(&chart(&s, 0.5, 30.0)), 18.0));
        // The fixed windows agree on a steady run: [5, 10) ... hold 5 x 18 / 5.
        let per: Vec<(u64, u64)> = s.iter().map(|t| (t.requests, t.failures)).collect();
        assert!(close(max_srps_5s_window(&per, 30.0), 18.0));
    }

    #[test]
    fn chart_of_a_bursty_run() {
        // A slow route: 30 responses at 6.2 s, 30 at 8.2 s, then none until 10 at 20.5 s.
        // Started at 0.0, 31 s: points at 5, 10, ..., 30.
        let mut s = vec![Tally::default(); 31];
        s[6] = tally(30, 0, 200);
        s[8] = tally(30, 0, 200);
        s[20] = tally(10, 0, 500);
        let c = chart(&s, 0.0, 31.0);
        // 5: nothing yet. 10 and 15: t_last = 8.2, seconds [0, 6) hold nothing: 0 (Locust's
        // point stays put while nothing completes). 20: the burst of second 20 comes at 20.5,
        // after the point, so t_last is still 8.2: 0. 25 and 30: t_last = 20.5, seconds
        // [8, 18): 30 / 10 = 3.
        assert_eq!(c, vec![0.0, 0.0, 0.0, 0.0, 3.0, 3.0]);
        assert_eq!(max_srps(&chart(&s, 0.0, 31.0)), 3.0);
        // Ending at 30 s exactly leaves the last point out.
        assert_eq!(chart(&s, 0.0, 30.0).len(), 5);
        // The best fixed window, [5, 10), holds both bursts: 60 / 5 = 12, four times the chart.
        let per: Vec<(u64, u64)> = s.iter().map(|t| (t.requests, t.failures)).collect();
        assert_eq!(max_srps_5s_window(&per, 30.0), 12.0);
    }

    #[test]
    fn current_rates_follow_locusts_slice() {
        let s = vec![tally(4, 1, 0); 20];
        // int(t_last) = 2: range(0, 0) is empty, Locust's avg of nothing is 0.
        assert_eq!(current_rates(&s, 2.3), (0.0, 0.0));
        // int(t_last) = 3: one second.
        assert_eq!(current_rates(&s, 3.0), (4.0, 1.0));
        // Before anything, and for an empty run.
        assert_eq!(current_rates(&[Tally::default(); 3], 2.5), (0.0, 0.0));
        assert_eq!(current_rates(&[], 2.5), (0.0, 0.0));
        // Past the last recorded second: t_last stays in the last second with a completion.
        assert_eq!(current_rates(&s, 40.0), (4.0, 1.0));
        // A run of 5 s or less has no chart point.
        assert_eq!(max_srps(&chart(&s[..4], 0.0, 4.9)), 0.0);
        assert_eq!(chart(&s, 0.0, 5.0), Vec::<f64>::new());
    }

    #[test]
    fn fixed_window_steady_rate() {
        // 10 s at 20 req/s, 2 of them failing each second: 18 sRPS in both windows.
        let s = vec![(20, 2); 10];
        assert_eq!(max_srps_5s_window(&s, 10.0), 18.0);
        assert_eq!(total_successes(200, 20), 180);
    }

    #[test]
    fn fixed_window_counts_every_burst() {
        // 25 responses land together every 5th second, none in between: one burst per window.
        let mut s = vec![(0u64, 0u64); 20];
        for i in (4..20).step_by(5) {
            s[i] = (25, 0);
        }
        assert_eq!(max_srps_5s_window(&s, 20.0), 5.0);
        // Two bursts in one window (seconds 5 and 9) and none in the next: 50 / 5 = 10.
        let mut s = vec![(0u64, 0u64); 15];
        s[5] = (30, 0);
        s[9] = (20, 0);
        assert_eq!(max_srps_5s_window(&s, 15.0), 10.0);
    }

    #[test]
    fn fixed_window_subtracts_failures_per_window() {
        // Window 1: 100 requests, 90 failures -> 2; window 2: 40 requests, 0 failures -> 8.
        let s = vec![
            (20, 18),
            (20, 18),
            (20, 18),
            (20, 18),
            (20, 18),
            (8, 0),
            (8, 0),
            (8, 0),
            (8, 0),
            (8, 0),
        ];
        assert_eq!(max_srps_5s_window(&s, 10.0), 8.0);
        let req: u64 = s.iter().map(|x| x.0).sum();
        let fail: u64 = s.iter().map(|x| x.1).sum();
        assert_eq!(total_successes(req, fail), 50);
    }

    #[test]
    fn fixed_window_leaves_out_a_trailing_partial_window() {
        // 11 s: the 11th second (a burst of 100) is not a whole window.
        let mut s = vec![(5u64, 0u64); 11];
        s[10] = (100, 0);
        assert_eq!(max_srps_5s_window(&s, 11.0), 5.0);
    }

    #[test]
    fn fixed_window_of_a_short_run_uses_its_own_length() {
        assert_eq!(max_srps_5s_window(&[(6, 0), (6, 0)], 2.0), 6.0);
        assert_eq!(max_srps_5s_window(&[], 0.0), 0.0);
    }
}

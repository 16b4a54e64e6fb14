//! The study's two figures, computed exactly as `STUDY.md` defines them, from one place:
//!
//! - **Max sRPS**: the largest value over the run of (requests per second - failures per
//!   second), in 5-second samples;
//! - **Total successes**: requests - failures over the run.
//!
//! A sample is a whole 5-second window of the run, counted from its start: [0, 5), [5, 10), ...
//! Requests are counted when they complete. Unlike Locust's "current RPS" (a rate over the last
//! few seconds that reads 0 whenever no response arrived recently), a window counts every
//! completion inside it, so bursty completions are neither lost nor inflated.
//!
//! This module must not read clocks or histograms: it takes per-second counts only.

/// Length of one sample, in seconds.
pub const SAMPLE_S: usize = 5;

/// Max sRPS over per-second `(requests, failures)` counts (index = second of the run).
/// Only whole windows count; a run shorter than one window uses what it has, divided by its
/// own length (`run_s`), so that a short test run still gets a figure.
pub fn max_srps(per_second: &[(u64, u64)], run_s: f64) -> f64 {
    let whole = per_second.len() / SAMPLE_S;
    let successes =
        |w: &[(u64, u64)]| w.iter().map(|(r, f)| r.saturating_sub(*f)).sum::<u64>() as f64;
    if whole == 0 || run_s < SAMPLE_S as f64 {
        if run_s <= 0.0 {
            return 0.0;
        }
        return successes(per_second) / run_s;
    }
    per_second
        .chunks_exact(SAMPLE_S)
        .take(whole)
        .map(|w| successes(w) / SAMPLE_S as f64)
        .fold(0.0, f64::max)
}

/// Total successes: requests - failures.
pub fn total_successes(requests: u64, failures: u64) -> u64 {
    requests.saturating_sub(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate() {
        // 10 s at 20 req/s, 2 of them failing each second: 18 sRPS in both windows.
        let s = vec![(20, 2); 10];
        assert_eq!(max_srps(&s, 10.0), 18.0);
        assert_eq!(total_successes(200, 20), 180);
    }

    #[test]
    fn bursty_completions_are_all_counted() {
        // A slow route: 25 responses land together every 5th second, none in between. Locust's
        // "current RPS" (responses over the last seconds) would read 0 most of the time; the
        // study's 5 s sample holds exactly one burst: 25 / 5 = 5 sRPS.
        let mut s = vec![(0u64, 0u64); 20];
        for i in (4..20).step_by(5) {
            s[i] = (25, 0);
        }
        assert_eq!(max_srps(&s, 20.0), 5.0);
        // Two bursts in one window (seconds 5 and 9) and none in the next: 50 / 5 = 10.
        let mut s = vec![(0u64, 0u64); 15];
        s[5] = (30, 0);
        s[9] = (20, 0);
        assert_eq!(max_srps(&s, 15.0), 10.0);
    }

    #[test]
    fn failures_are_subtracted_per_window() {
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
        assert_eq!(max_srps(&s, 10.0), 8.0);
        let req: u64 = s.iter().map(|x| x.0).sum();
        let fail: u64 = s.iter().map(|x| x.1).sum();
        assert_eq!(total_successes(req, fail), 50);
    }

    #[test]
    fn trailing_partial_window_is_left_out() {
        // 11 s: the 11th second (a burst of 100) is not a whole sample.
        let mut s = vec![(5u64, 0u64); 11];
        s[10] = (100, 0);
        assert_eq!(max_srps(&s, 11.0), 5.0);
    }

    #[test]
    fn short_run_uses_its_own_length() {
        assert_eq!(max_srps(&[(6, 0), (6, 0)], 2.0), 6.0);
        assert_eq!(max_srps(&[], 0.0), 0.0);
    }
}

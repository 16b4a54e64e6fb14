//! The one bucket layout of every latency histogram (server time, database round trips and
//! connects, the load generator's client latency).
//!
//! Prometheus estimates a quantile from a classic histogram by finding the bucket `(a, b]` that
//! holds the quantile's rank and interpolating linearly inside it, so its estimate and the true
//! quantile lie in the same bucket and differ by at most `b - a`. The relative error is
//! therefore at most `b / a - 1`, whatever the distribution (a single point, as when every
//! round trip takes the injected 100 ms, is the worst case). The layout bounds that ratio:
//!
//! | range          | ratio of neighbouring bounds | error of `histogram_quantile` |
//! |----------------|------------------------------|-------------------------------|
//! | 0.1 ms - 300 ms| 10^(1/117) = 1.0199          | under 2 %                     |
//! | 300 ms - 10 s  | 10^(1/48) = 1.0491           | under 5 %                     |
//! | 10 s - 300 s   | 1.5 - 2                      | coarse: a queued request's tail|
//!
//! plus 10, 25 and 50 µs below. The price is about 500 buckets per series; the probe families
//! keep their label sets few (one per target, and per method, route and status code for the
//! server's time; see `docs/metrics-and-daemon.md`).
//!
//! Bounds are powers of 10^(1/117) and 10^(1/48), so every decade is a bound (`le="0.1"` is
//! 100 ms), rounded to 5 significant digits so that `le` labels read as numbers a person can
//! type (`le="0.10199"`); the rounding moves a bound by at most 0.005 %, which the unit tests
//! include.

use std::sync::OnceLock;

/// The fine part covers this range (seconds): the study's delays and round trips all fall in it.
const FINE_FROM: f64 = 0.0001;
const FINE_TO: f64 = 0.3;
/// Bounds per decade in the fine part: neighbours differ by 10^(1/117) = 1.01988.
const FINE_PER_DECADE: i32 = 117;
/// The middle part ends here (seconds).
const MID_TO: f64 = 10.0;
/// Bounds per decade in the middle part: neighbours differ by 10^(1/48) = 1.04914.
const MID_PER_DECADE: i32 = 48;
/// Bounds below the fine part and above the middle part (seconds).
const BELOW: &[f64] = &[0.00001, 0.000025, 0.00005];
const ABOVE: &[f64] = &[15.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// `x` rounded to 5 significant digits.
fn round5(x: f64) -> f64 {
    let e = x.log10().floor() as i32 - 4;
    let scale = 10f64.powi(-e);
    (x * scale).round() / scale
}

/// The bounds 10^(j / per_decade), rounded, from the last one below `from` (so that a value of
/// exactly `from` has a fine bucket) to the first one at or above `to`.
fn decade_steps(per_decade: i32, from: f64, to: f64) -> Vec<f64> {
    let index = |x: f64| (x.log10() * f64::from(per_decade)).floor() as i32;
    let (lo, hi) = (index(from) - 1, index(to) + 1);
    let at = |j: i32| 10f64.powf(f64::from(j) / f64::from(per_decade));
    // Up to the first bound at or above `to` (the one whose predecessor is below it).
    (lo..=hi)
        .filter(|&j| at(j - 1) < to * (1.0 - 1e-9))
        .map(|j| round5(at(j)))
        .collect()
}

/// The upper bounds (seconds), ascending, without `+Inf` (the client library adds it).
pub(crate) fn latency() -> &'static [f64] {
    static B: OnceLock<Vec<f64>> = OnceLock::new();
    B.get_or_init(|| {
        let mut b = BELOW.to_vec();
        b.extend(decade_steps(FINE_PER_DECADE, FINE_FROM, FINE_TO));
        let last = *b.last().expect("the fine part has bounds");
        b.extend(
            decade_steps(MID_PER_DECADE, last, MID_TO)
                .into_iter()
                .filter(|&x| x > last),
        );
        b.extend_from_slice(ABOVE);
        b
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest relative error of `histogram_quantile` in the fine part (0.1 - 300 ms), as
    /// docs/metrics-and-daemon.md states it.
    const FINE_ERROR: f64 = 0.02;
    /// The same up to 10 s.
    const MID_ERROR: f64 = 0.05;

    /// Prometheus's `histogram_quantile` on one series' cumulative buckets (promql/quantile.go,
    /// `bucketQuantile`): the bucket holding rank q x count, linear inside it, 0 as the lower
    /// bound of the first bucket. The reference the layout's error is checked against.
    fn histogram_quantile(q: f64, bounds: &[f64], values: &[f64]) -> f64 {
        let mut cumulative = vec![0u64; bounds.len()];
        for v in values {
            let i = bounds.partition_point(|b| b < v);
            for c in &mut cumulative[i..] {
                *c += 1;
            }
        }
        let rank = q * values.len() as f64;
        let i = cumulative.partition_point(|&c| (c as f64) < rank);
        let (lower, below) = if i == 0 {
            (0.0, 0)
        } else {
            (bounds[i - 1], cumulative[i - 1])
        };
        let inside = (cumulative[i] - below) as f64;
        lower + (bounds[i] - lower) * (rank - below as f64) / inside
    }

    #[test]
    fn ascending_and_bounded_ratios() {
        let b = latency();
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert!(b.len() < 500, "{} buckets", b.len());
        // No bound between 10 s and the coarse tail's 15 s.
        assert!(!b.iter().any(|&x| x > 10.0 && x < 15.0), "{b:?}");
        for w in b.windows(2) {
            let r = w[1] / w[0];
            if w[1] >= FINE_FROM && w[0] <= FINE_TO {
                assert!(r - 1.0 <= FINE_ERROR, "{w:?}: {r}");
            } else if w[0] >= FINE_TO && w[0] < MID_TO {
                assert!(r - 1.0 <= MID_ERROR, "{w:?}: {r}");
            }
        }
        // Decades are bounds (le="0.1" reads as 100 ms), and the parts reach past their ends.
        for edge in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 300.0] {
            assert!(b.contains(&edge), "{edge}");
        }
        assert!(b
            .iter()
            .any(|&x| x < FINE_FROM && x * (1.0 + FINE_ERROR) >= FINE_FROM));
        assert!(b
            .iter()
            .any(|&x| (FINE_TO..=FINE_TO * (1.0 + FINE_ERROR)).contains(&x)));
    }

    /// Point masses (every observation the same value: the worst case for interpolation) across
    /// the whole range, just above and below bounds and at the study's delays plus a little.
    #[test]
    fn point_masses_come_back_within_the_stated_error() {
        let b = latency();
        let mut values: Vec<f64> = vec![0.1000_1, 0.1003, 0.2001, 0.2004, 0.0001, 0.3, 10.0];
        for w in b.windows(2) {
            values.extend([w[0] * 1.000_01, (w[0] + w[1]) / 2.0, w[1]]);
        }
        for v in values
            .into_iter()
            .filter(|v| (FINE_FROM..=MID_TO).contains(v))
        {
            let allowed = if v <= FINE_TO { FINE_ERROR } else { MID_ERROR };
            for q in [0.5, 0.9, 0.99] {
                let est = histogram_quantile(q, b, &[v; 10]);
                let err = (est - v).abs() / v;
                assert!(err <= allowed, "q {q} of {v}: {est} ({err:.4})");
            }
        }
    }

    /// A spread distribution (round trips of 100 ms plus 0-3 ms of jitter, and a bimodal mix of
    /// 100 and 200 ms): the estimate of each quantile against the exact sample quantile.
    #[test]
    fn spread_samples_come_back_within_the_stated_error() {
        let b = latency();
        let jitter: Vec<f64> = (0..1000)
            .map(|i| 0.1 + 0.003 * f64::from(i) / 1000.0)
            .collect();
        let mixed: Vec<f64> = (0..1000)
            .map(|i| if i % 3 == 0 { 0.2002 } else { 0.1004 })
            .collect();
        for sample in [jitter, mixed] {
            let mut sorted = sample.clone();
            sorted.sort_by(f64::total_cmp);
            for q in [0.5, 0.9, 0.99] {
                let exact = sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
                let est = histogram_quantile(q, b, &sample);
                let err = (est - exact).abs() / exact;
                assert!(err <= FINE_ERROR, "q {q}: {est} vs {exact} ({err:.4})");
            }
        }
    }
}

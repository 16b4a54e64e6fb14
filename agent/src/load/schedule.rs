//! Load schedules: how many closed-loop users should be running at time t, or when the i-th
//! request of an open model is due. Includes the study's profile and its time-scaled `quick`
//! variant, and the parsers for `--stages` and durations.
//!
//! Pure arithmetic on seconds since the start of the run: no clocks, no I/O, so that every
//! figure here is unit-tested exactly.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One segment of a piecewise-linear schedule: move linearly from the previous segment's
/// target (0 for the first) to `target` over `duration_s`, then continue with the next.
/// A segment with the same target as the previous one holds it; a zero duration jumps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub target: f64,
    pub duration_s: f64,
}

/// Closed model: the number of users over time (each user sends its next request as soon as
/// the previous one ends, plus its wait time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosedSchedule {
    pub stages: Vec<Stage>,
}

/// Open model: the request rate (requests/s) over time; arrivals are evenly spaced along it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSchedule {
    pub stages: Vec<Stage>,
}

/// Why a schedule or duration could not be parsed or built. Always a usage error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("malformed stage {0:?}: expected TARGET@DURATION, e.g. 500@100s")]
    Stage(String),
    #[error("malformed duration {0:?}: expected e.g. 90, 90s, 1m30s, 500ms or 1h, at most a week")]
    Duration(String),
    #[error("{0}")]
    Invalid(String),
}

/// The longest run (and so the longest duration) the generator takes: a week. Longer is a typo
/// (`1e300`), and would overflow the clock's arithmetic.
pub(crate) const MAX_RUN_S: f64 = 7.0 * 86_400.0;

/// Total length of a list of stages, in seconds.
fn total(stages: &[Stage]) -> f64 {
    stages.iter().map(|s| s.duration_s).sum()
}

/// The linear value of the schedule at `t` (before any rounding).
fn value_at(stages: &[Stage], t: f64) -> f64 {
    let mut from = 0.0;
    let mut start = 0.0;
    for s in stages {
        let end = start + s.duration_s;
        if t < end {
            if t < start {
                return from;
            }
            let frac = (t - start) / s.duration_s;
            return from + (s.target - from) * frac;
        }
        from = s.target;
        start = end;
    }
    from
}

fn check(stages: &[Stage], what: &str) -> Result<(), ScheduleError> {
    if stages.is_empty() {
        return Err(ScheduleError::Invalid(format!(
            "the {what} schedule has no stage"
        )));
    }
    for s in stages {
        if !s.target.is_finite() || s.target < 0.0 {
            return Err(ScheduleError::Invalid(format!(
                "{what} must be a number >= 0, not {}",
                s.target
            )));
        }
        if !s.duration_s.is_finite() || s.duration_s < 0.0 {
            return Err(ScheduleError::Invalid(format!(
                "stage durations must be >= 0, not {}",
                s.duration_s
            )));
        }
    }
    if total(stages) <= 0.0 {
        return Err(ScheduleError::Invalid(
            "the run must last longer than 0 s".into(),
        ));
    }
    if total(stages) > MAX_RUN_S {
        return Err(ScheduleError::Invalid(format!(
            "the run must last at most {MAX_RUN_S} s (a week), not {} s",
            total(stages)
        )));
    }
    if stages.iter().all(|s| s.target <= 0.0) {
        return Err(ScheduleError::Invalid(format!(
            "{what} must be greater than 0 in at least one stage"
        )));
    }
    Ok(())
}

impl ClosedSchedule {
    /// Validated stages (users must be whole numbers, and some stage must have users).
    pub fn new(stages: Vec<Stage>) -> Result<Self, ScheduleError> {
        check(&stages, "users")?;
        if let Some(s) = stages.iter().find(|s| s.target.fract() != 0.0) {
            return Err(ScheduleError::Invalid(format!(
                "users must be a whole number, not {}",
                s.target
            )));
        }
        Ok(Self { stages })
    }

    /// The study: 0 -> 500 users at 5 users/s (100 s), then 500 users for 80 s.
    pub fn study() -> Self {
        Self::ramp(500, 5.0, 180.0).expect("static profile is valid")
    }

    /// The study's shape squeezed into 30 s: 0 -> 500 at 30 users/s (16.7 s), hold to 30 s.
    pub(crate) fn quick() -> Self {
        Self::ramp(500, 30.0, 30.0).expect("static profile is valid")
    }

    /// Locust's `--users N --spawn-rate R --run-time T`: ramp from 0 to `users` at `rate`
    /// users/s, then hold until `run_time_s` (the ramp is cut short if the run ends first).
    pub fn ramp(users: u32, spawn_rate: f64, run_time_s: f64) -> Result<Self, ScheduleError> {
        if users == 0 {
            return Err(ScheduleError::Invalid(
                "users must be greater than 0".into(),
            ));
        }
        if !(spawn_rate.is_finite() && spawn_rate > 0.0) {
            return Err(ScheduleError::Invalid(format!(
                "spawn rate must be greater than 0, not {spawn_rate}"
            )));
        }
        if !(run_time_s.is_finite() && run_time_s > 0.0) {
            return Err(ScheduleError::Invalid(format!(
                "run time must be greater than 0, not {run_time_s}"
            )));
        }
        let ramp = f64::from(users) / spawn_rate;
        let stages = if ramp >= run_time_s {
            // The run ends during the ramp: one partial ramp at the same slope.
            vec![Stage {
                target: spawn_rate * run_time_s,
                duration_s: run_time_s,
            }]
        } else {
            vec![
                Stage {
                    target: f64::from(users),
                    duration_s: ramp,
                },
                Stage {
                    target: f64::from(users),
                    duration_s: run_time_s - ramp,
                },
            ]
        };
        // The partial-ramp target may be fractional; users are counted with floor() anyway.
        check(&stages, "users")?;
        Ok(Self { stages })
    }

    /// Planned length of the run.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(total(&self.stages))
    }

    /// The highest user count the schedule reaches.
    pub fn max_users(&self) -> u32 {
        self.stages
            .iter()
            .map(|s| s.target.floor() as u32)
            .max()
            .unwrap_or(0)
    }

    /// Users that should be running `t` seconds after the start. Ramps add users one at a
    /// time: the k-th user starts when the line reaches k (0 users at t = 0, 5 at t = 1 s at
    /// 5 users/s). Locust's own spawner starts its first user at once, 1/rate earlier.
    pub fn users_at(&self, t: f64) -> u32 {
        let v = value_at(&self.stages, t);
        // A hair of tolerance so that a user due exactly at t (in binary floating point,
        // e.g. 0.2 * 5) counts at t.
        let rising = self.rising_at(t);
        let n = if rising {
            (v + 1e-9).floor()
        } else {
            (v - 1e-9).ceil()
        };
        n.max(0.0) as u32
    }

    fn rising_at(&self, t: f64) -> bool {
        let mut from = 0.0;
        let mut start = 0.0;
        for s in &self.stages {
            let end = start + s.duration_s;
            if t < end {
                return s.target >= from;
            }
            from = s.target;
            start = end;
        }
        true
    }

    /// The next time after `t` at which `users_at` changes, if any (so that the runner can sleep
    /// until exactly then instead of polling).
    pub(crate) fn next_change_after(&self, t: f64) -> Option<f64> {
        let now = self.users_at(t);
        let mut from = 0.0f64;
        let mut start = 0.0f64;
        for s in &self.stages {
            let end = start + s.duration_s;
            if end > t && s.target != from {
                let lo = t.max(start);
                // Jump stages (zero duration) change at their start.
                if s.duration_s == 0.0 {
                    if start > t {
                        return Some(start);
                    }
                } else {
                    let slope = (s.target - from) / s.duration_s;
                    let cur = f64::from(self.users_at(lo)).max(0.0);
                    let next = if slope > 0.0 { cur + 1.0 } else { cur - 1.0 };
                    let at = start + (next - from) / slope;
                    if at > t && at <= end + 1e-9 {
                        return Some(at.max(lo));
                    }
                }
            } else if end > t && s.target == from && start > t && self.users_at(start) != now {
                return Some(start);
            }
            from = s.target;
            start = end;
        }
        None
    }
}

impl OpenSchedule {
    pub fn new(stages: Vec<Stage>) -> Result<Self, ScheduleError> {
        check(&stages, "rate")?;
        Ok(Self { stages })
    }

    /// `--rate R [--ramp T] --run-time D`: from 0 to R over T, then R until D.
    pub fn ramp(rate: f64, ramp_s: f64, run_time_s: f64) -> Result<Self, ScheduleError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ScheduleError::Invalid(format!(
                "rate must be greater than 0, not {rate}"
            )));
        }
        if !(run_time_s.is_finite() && run_time_s > 0.0) {
            return Err(ScheduleError::Invalid(format!(
                "run time must be greater than 0, not {run_time_s}"
            )));
        }
        if !(ramp_s.is_finite() && ramp_s >= 0.0 && ramp_s <= run_time_s) {
            return Err(ScheduleError::Invalid(format!(
                "the ramp must last 0 s to the run time, not {ramp_s} s"
            )));
        }
        let mut stages = vec![Stage {
            target: rate,
            duration_s: ramp_s,
        }];
        if run_time_s > ramp_s {
            stages.push(Stage {
                target: rate,
                duration_s: run_time_s - ramp_s,
            });
        }
        Self::new(stages)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(total(&self.stages))
    }

    /// Expected number of requests over the whole run (the area under the rate).
    #[cfg(test)]
    pub(crate) fn planned_requests(&self) -> f64 {
        let mut from = 0.0;
        let mut n = 0.0;
        for s in &self.stages {
            n += (from + s.target) / 2.0 * s.duration_s;
            from = s.target;
        }
        n
    }

    /// When request `i` (0-based) is due, in seconds from the start: the time at which the area
    /// under the rate reaches `i`. `None` once the run has no room for it.
    pub fn arrival(&self, i: u64) -> Option<f64> {
        let n = i as f64;
        let mut from = 0.0f64;
        let mut start = 0.0f64;
        let mut area = 0.0f64;
        for s in &self.stages {
            let d = s.duration_s;
            let seg = (from + s.target) / 2.0 * d;
            if n < area + seg || (n == area && from > 0.0) {
                let m = n - area;
                // m = from*x + (target-from)/(2d) * x^2, solved for x in [0, d].
                let k = if d > 0.0 {
                    (s.target - from) / (2.0 * d)
                } else {
                    0.0
                };
                let x = if k.abs() < 1e-12 {
                    if from > 0.0 {
                        m / from
                    } else {
                        0.0
                    }
                } else {
                    let disc = (from * from + 4.0 * k * m).max(0.0);
                    (-from + disc.sqrt()) / (2.0 * k)
                };
                return Some(start + x.clamp(0.0, d));
            }
            area += seg;
            from = s.target;
            start += d;
        }
        None
    }
}

/// Parses `500@100s,500@80s` (Locust-style stages: reach TARGET over DURATION, then the next).
pub(crate) fn parse_stages(text: &str) -> Result<Vec<Stage>, ScheduleError> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (target, dur) = part
            .split_once('@')
            .ok_or_else(|| ScheduleError::Stage(part.to_owned()))?;
        let target: f64 = target
            .trim()
            .parse()
            .map_err(|_| ScheduleError::Stage(part.to_owned()))?;
        if !target.is_finite() || target < 0.0 {
            return Err(ScheduleError::Stage(part.to_owned()));
        }
        let duration_s = parse_duration(dur.trim())
            .map_err(|_| ScheduleError::Stage(part.to_owned()))?
            .as_secs_f64();
        out.push(Stage { target, duration_s });
    }
    Ok(out)
}

/// Parses `90`, `90s`, `1m30s`, `1h`, `500ms`, `1.5s` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    let bad = || ScheduleError::Duration(text.to_owned());
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = t.parse::<f64>() {
        return if v.is_finite() && (0.0..=MAX_RUN_S).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(bad())
        };
    }
    let mut secs = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let v: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        secs += v * scale;
        rest = &rest[unit_end..];
    }
    if !(secs.is_finite() && secs <= MAX_RUN_S) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn study_profile_users_over_time() {
        let s = ClosedSchedule::study();
        assert_eq!(s.duration(), Duration::from_secs(180));
        assert_eq!(s.users_at(0.0), 0);
        assert_eq!(s.users_at(0.2), 1);
        assert_eq!(s.users_at(50.0), 250);
        assert_eq!(s.users_at(99.9), 499);
        assert_eq!(s.users_at(100.0), 500);
        assert_eq!(s.users_at(150.0), 500);
        assert_eq!(s.users_at(179.99), 500);
        assert_eq!(s.max_users(), 500);
    }

    #[test]
    fn quick_profile_is_the_study_time_scaled() {
        let q = ClosedSchedule::quick();
        assert_eq!(q.duration(), Duration::from_secs(30));
        assert_eq!(q.users_at(10.0), 300);
        assert_eq!(q.users_at(500.0 / 30.0), 500);
        assert_eq!(q.users_at(29.0), 500);
    }

    #[test]
    fn stages_parse_like_the_issue() {
        let st = parse_stages("500@100s,500@80s").unwrap();
        assert_eq!(ClosedSchedule::new(st).unwrap(), ClosedSchedule::study());
        let st = parse_stages("10@0s, 10@1m, 0@10s").unwrap();
        let s = ClosedSchedule::new(st).unwrap();
        assert_eq!(s.users_at(0.0), 10);
        assert_eq!(s.users_at(65.0), 5);
        assert_eq!(s.users_at(69.99), 1);
        assert!(parse_stages("500").is_err());
        assert!(parse_stages("500@").is_err());
        assert!(parse_stages("x@10s").is_err());
        assert!(parse_stages("-5@10s").is_err());
        assert!(parse_stages("5@10parsecs").is_err());
        assert!(ClosedSchedule::new(parse_stages("0@10s").unwrap()).is_err());
        assert!(ClosedSchedule::new(parse_stages("5@0s").unwrap()).is_err());
        assert!(ClosedSchedule::new(parse_stages("2.5@10s").unwrap()).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "10x", "-1", "1m30", "inf", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn zero_or_negative_is_refused() {
        assert!(ClosedSchedule::ramp(0, 5.0, 10.0).is_err());
        assert!(ClosedSchedule::ramp(5, 0.0, 10.0).is_err());
        assert!(ClosedSchedule::ramp(5, -1.0, 10.0).is_err());
        assert!(ClosedSchedule::ramp(5, 1.0, 0.0).is_err());
        assert!(OpenSchedule::ramp(0.0, 0.0, 10.0).is_err());
        assert!(OpenSchedule::ramp(-3.0, 0.0, 10.0).is_err());
        assert!(OpenSchedule::ramp(3.0, 11.0, 10.0).is_err());
    }

    #[test]
    fn ramp_cut_short_by_the_run_time() {
        let s = ClosedSchedule::ramp(500, 5.0, 10.0).unwrap();
        assert_eq!(s.users_at(9.99), 49);
        assert_eq!(s.duration(), Duration::from_secs(10));
    }

    #[test]
    fn next_change_follows_each_new_user() {
        let s = ClosedSchedule::study();
        let mut t = 0.0;
        let mut changes = 0;
        while let Some(n) = s.next_change_after(t) {
            assert!(n > t);
            assert_eq!(s.users_at(n), s.users_at(t) + 1, "at {n}");
            t = n;
            changes += 1;
        }
        assert_eq!(changes, 500);
        assert!((t - 100.0).abs() < 1e-6);
    }

    #[test]
    fn open_constant_rate_arrivals() {
        let s = OpenSchedule::ramp(100.0, 0.0, 10.0).unwrap();
        assert_eq!(s.arrival(0), Some(0.0));
        assert!((s.arrival(1).unwrap() - 0.01).abs() < 1e-12);
        assert!((s.arrival(999).unwrap() - 9.99).abs() < 1e-9);
        assert_eq!(s.arrival(1000), None);
        assert_eq!(s.planned_requests(), 1000.0);
    }

    #[test]
    fn open_ramp_arrivals() {
        // 0 -> 100/s over 10 s: N(t) = 5 t^2, so request 500 is due at t = 10 s and 125 at 5 s.
        let s = OpenSchedule::ramp(100.0, 10.0, 20.0).unwrap();
        assert!((s.arrival(125).unwrap() - 5.0).abs() < 1e-9);
        assert!((s.arrival(500).unwrap() - 10.0).abs() < 1e-9);
        assert!((s.arrival(600).unwrap() - 11.0).abs() < 1e-9);
        assert_eq!(s.planned_requests(), 1500.0);
        assert_eq!(s.arrival(1500), None);
    }

    /// Regression: a finite but enormous duration (`1e300`, `1e23h`) panicked converting to a
    /// `Duration`; now it is refused like any malformed one.
    #[test]
    fn enormous_durations_are_errors() {
        for d in ["1e300", "99999999999999999999999h", "604801", "168h1s"] {
            assert!(parse_duration(d).is_err(), "{d}");
        }
        assert_eq!(
            parse_duration("168h").unwrap(),
            Duration::from_secs(604_800)
        );
        for s in ["1@1e300", "5@99999999999999999999999h"] {
            assert!(parse_stages(s).is_err(), "{s}");
        }
        let e = ClosedSchedule::ramp(10, 1.0, 1e300).unwrap_err();
        assert!(e.to_string().contains("at most 604800 s"), "{e}");
        assert!(OpenSchedule::ramp(1.0, 0.0, 1e300).is_err());
        let long = vec![
            Stage {
                target: 1.0,
                duration_s: MAX_RUN_S,
            },
            Stage {
                target: 1.0,
                duration_s: 1.0,
            },
        ];
        assert!(ClosedSchedule::new(long).is_err());
    }

    proptest! {
        /// Hostile `--stages` and durations: an error or a schedule whose length converts,
        /// never a panic.
        #[test]
        fn hostile_stages_and_durations_never_panic(s in "[0-9.e@,smh -]{0,28}") {
            let _ = parse_duration(&s);
            if let Ok(stages) = parse_stages(&s) {
                if let Ok(c) = ClosedSchedule::new(stages.clone()) {
                    prop_assert!(c.duration().as_secs_f64() <= MAX_RUN_S);
                }
                if let Ok(o) = OpenSchedule::new(stages) {
                    prop_assert!(o.duration().as_secs_f64() <= MAX_RUN_S);
                }
            }
        }

        #[test]
        fn arrivals_increase_and_match_the_area(rate in 0.5f64..5000.0, ramp in 0.0f64..20.0, extra in 0.1f64..20.0) {
            let s = OpenSchedule::ramp(rate, ramp, ramp + extra).unwrap();
            let planned = s.planned_requests();
            let mut last = -1.0;
            let step = ((planned / 200.0) as u64).max(1);
            let mut i = 0u64;
            while let Some(t) = s.arrival(i) {
                prop_assert!(t >= last);
                prop_assert!(t <= ramp + extra + 1e-9);
                last = t;
                i += step;
            }
            prop_assert!((i as f64) >= planned - step as f64 - 1.0);
        }

        #[test]
        fn users_never_exceed_the_stage_targets(a in 1u32..2000, b in 0u32..2000, da in 0.0f64..100.0, db in 0.1f64..100.0, t in 0.0f64..200.0) {
            let s = ClosedSchedule::new(vec![
                Stage { target: f64::from(a), duration_s: da },
                Stage { target: f64::from(b), duration_s: db },
            ]).unwrap();
            prop_assert!(s.users_at(t) <= a.max(b));
        }
    }
}

//! One module per subcommand; each holds its clap `Args` and a `run` returning the exit status.
pub mod daemon;
pub mod delay;
pub mod load;
pub mod report;
pub mod run;
pub mod sut;
pub mod watch;

/// A `--duration SECONDS` flag: a positive, finite number of seconds, at most a week (the load
/// generator's `MAX_RUN_S`; more is a typo and would overflow the clock's arithmetic).
pub(crate) fn parse_secs(s: &str) -> Result<f64, String> {
    use crate::load::schedule::MAX_RUN_S;
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_RUN_S => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most {MAX_RUN_S} (a week)"
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_positive_finite_and_at_most_a_week() {
        assert_eq!(super::parse_secs("2.5"), Ok(2.5));
        for bad in ["0", "-1", "nan", "inf", "1e300", "604801", "x"] {
            assert!(super::parse_secs(bad).is_err(), "{bad}");
        }
    }
}

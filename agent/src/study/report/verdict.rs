//! The report's verdict on the study's hypothesis, and its secondary, directionless test.
//!
//! The hypothesis has a direction: under added latency, async Django keeps its throughput on the
//! I/O routes better than sync does, beyond what happens on the cpu route. The verdict is one
//! contrast fixed before any data are seen ([`coefficients`]), tested one-sided at 5 %. The
//! setup x route x latency F test only says that the three factors interact somehow: it is just
//! as significant when Sync wins, or when only Async Limited and Async Unlimited differ, so it is
//! printed as a secondary line and never decides the verdict. Async Pooled is not one of the
//! study's setups and enters neither test.
//!
//! A repetition runs every cell once, so it is a block: the contrast uses only repetitions in
//! which all its cells finished (its coefficients sum to zero, so a repetition's shift of all its
//! cells cancels), and the F test has the repetition as an additive factor.
//!
//! Pure arithmetic on the cells it is handed; it never reads files.

use std::collections::{BTreeMap, BTreeSet};

use super::{published::STUDY_SETUPS, setup_name, stats};
use crate::study::results::CellResult;

/// The verdict's one-sided level.
const ALPHA: f64 = 0.05;
/// The contrast's levels: a cell's coefficient is the product of its setup's, route's and delay's.
const SETUP: [(&str, f64); 2] = [("async-unlimited", 1.0), ("sync", -1.0)];
const DELAY: [(u32, f64); 2] = [(200, 1.0), (0, -1.0)];
/// The I/O routes share +1 (+1/R each, for the R of them the run has); cpu has -1.
const IO_ROUTES: [&str; 2] = ["io_read", "io_create"];
const CPU: &str = "cpu";

/// What both tests analyse. Successes span orders of magnitude across cells (and noise is
/// multiplicative), so the tests work on the log scale, where a difference of differences is a
/// ratio of ratios once exponentiated; the + 1 keeps a cell with no success finite.
fn y(c: &CellResult) -> f64 {
    (c.load.total_successes as f64 + 1.0).ln()
}

/// The contrast's coefficient for each (setup, route, delay ms) cell. With both I/O routes:
///
/// | cell | c | cell | c |
/// |---|---|---|---|
/// | Async Unlimited io_read 200 ms | +1/2 | Sync io_read 200 ms | -1/2 |
/// | Async Unlimited io_read 0 ms | -1/2 | Sync io_read 0 ms | +1/2 |
/// | Async Unlimited io_create 200 ms | +1/2 | Sync io_create 200 ms | -1/2 |
/// | Async Unlimited io_create 0 ms | -1/2 | Sync io_create 0 ms | +1/2 |
/// | Async Unlimited cpu 200 ms | -1 | Sync cpu 200 ms | +1 |
/// | Async Unlimited cpu 0 ms | +1 | Sync cpu 0 ms | -1 |
///
/// With one I/O route its four cells get +-1. The coefficients sum to zero.
pub(crate) fn coefficients(
    io_routes: &[&'static str],
) -> Vec<((&'static str, &'static str, u32), f64)> {
    let routes = io_routes
        .iter()
        .map(|r| (*r, 1.0 / io_routes.len() as f64))
        .chain([(CPU, -1.0)]);
    let mut out = Vec::new();
    for (route, cr) in routes {
        for (delay, cd) in DELAY {
            for (setup, cs) in SETUP {
                out.push(((setup, route, delay), cs * cr * cd));
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conclusion {
    /// The ratio of ratios is above 1, significant one-sided at 5 %.
    Supported,
    /// It is below 1, significant one-sided at 5 %: the opposite of the hypothesis.
    Contradicted,
    NotShown,
}

#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub outcome: Conclusion,
    /// On ln(successes + 1): exp of the estimate and of its interval is the ratio of ratios.
    pub contrast: stats::Contrast,
    pub io_routes: Vec<&'static str>,
    /// Repetitions in which every cell of the contrast finished (the ones used), and the others.
    pub blocks: Vec<u32>,
    pub left_out: Vec<u32>,
}

/// The study's hypothesis tested on these cells, or why it cannot be.
pub(crate) fn hypothesis(cells: &[CellResult]) -> Result<Verdict, String> {
    let has = |f: &dyn Fn(&CellResult) -> bool| cells.iter().any(f);
    let io_routes: Vec<&'static str> = IO_ROUTES
        .into_iter()
        .filter(|r| has(&|c| c.key.route == *r))
        .collect();
    if io_routes.is_empty() {
        return Err("the run has no I/O route (io_read, io_create) to compare with cpu".into());
    }
    if !has(&|c| c.key.route == CPU) {
        return Err("the run has no cpu route to compare the I/O routes with".into());
    }
    for (s, _) in SETUP {
        if !has(&|c| c.key.setup == s) {
            return Err(format!("the run has no {} cells", setup_name(s)));
        }
    }
    for (d, _) in DELAY {
        if !has(&|c| c.key.delay_ms == d) {
            return Err(format!("no cell ran at {d} ms (the contrast is fixed at 0 vs 200 ms, whatever delays the run has)"));
        }
    }
    let coefs = coefficients(&io_routes);
    let mut by_cell: Vec<(f64, BTreeMap<u32, f64>)> = Vec::new();
    let mut missing = Vec::new();
    for &((s, r, d), c) in &coefs {
        let reps: BTreeMap<u32, f64> = cells
            .iter()
            .filter(|x| x.key.setup == s && x.key.route == r && x.key.delay_ms == d)
            .map(|x| (x.key.rep, y(x)))
            .collect();
        if reps.is_empty() {
            missing.push(format!("{} {r} {d} ms", setup_name(s)));
        }
        by_cell.push((c, reps));
    }
    if !missing.is_empty() {
        return Err(format!("no cell finished for {}", missing.join(", ")));
    }
    let (blocks, left_out) = complete_blocks(by_cell.iter().map(|(_, m)| m));
    if blocks.len() < 2 {
        return Err(format!(
            "it needs the variation between repetitions, so at least two repetitions in which all its {} cells finished; the run has {}",
            coefs.len(),
            blocks.len()
        ));
    }
    let values: Vec<(f64, Vec<f64>)> = by_cell
        .iter()
        .map(|(c, m)| (*c, blocks.iter().map(|r| m[r]).collect()))
        .collect();
    let refs: Vec<(f64, &[f64])> = values.iter().map(|(c, v)| (*c, v.as_slice())).collect();
    let contrast = stats::contrast(&refs)?;
    let outcome = if contrast.p_greater < ALPHA {
        Conclusion::Supported
    } else if contrast.p_less < ALPHA {
        Conclusion::Contradicted
    } else {
        Conclusion::NotShown
    };
    Ok(Verdict {
        outcome,
        contrast,
        io_routes,
        blocks,
        left_out,
    })
}

/// Repetitions present in every cell, and the others present in some.
fn complete_blocks<'a>(
    cells: impl Iterator<Item = &'a BTreeMap<u32, f64>> + Clone,
) -> (Vec<u32>, Vec<u32>) {
    let all: BTreeSet<u32> = cells.clone().flat_map(|m| m.keys().copied()).collect();
    all.into_iter()
        .partition(|r| cells.clone().all(|m| m.contains_key(r)))
}

/// A ratio with three significant figures.
fn fmt_ratio(x: f64) -> String {
    if !(1e-4..1e6).contains(&x) {
        return format!("{x:.2e}");
    }
    let decimals = (2.0 - x.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{x:.decimals$}")
}

fn reps_list(r: &[u32]) -> String {
    r.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// The report's verdict line.
pub(super) fn verdict_line(cells: &[CellResult]) -> String {
    let what = "(Async Unlimited / Sync successes at 200 ms ÷ the same at 0 ms) on the I/O routes ÷ the same on cpu";
    let v = match hypothesis(cells) {
        Ok(v) => v,
        Err(why) => {
            return format!("Verdict: cannot be computed: {why}. The verdict is one pre-specified one-sided test of the ratio of ratios {what}.")
        }
    };
    let k = v.contrast;
    let (word, p, side, meaning) = match v.outcome {
        Conclusion::Supported => (
            "supported",
            k.p_greater,
            "above",
            "relative to cpu, Async Unlimited kept its throughput under 200 ms of added delay on the I/O routes better than Sync",
        ),
        Conclusion::Contradicted => (
            "contradicted",
            k.p_less,
            "below",
            "relative to cpu, Sync kept its throughput under 200 ms of added delay on the I/O routes better than Async Unlimited: the opposite of the hypothesis",
        ),
        Conclusion::NotShown => ("not shown", k.p_greater, "above", "the data do not show the hypothesised direction at the 5 % level (1 is no difference)"),
    };
    let io = if v.io_routes.len() == 1 {
        v.io_routes[0].to_string()
    } else {
        format!("{}, geometric mean", v.io_routes.join(" and "))
    };
    let mut line = format!(
        "Verdict: the study's hypothesis is {word}. Ratio of ratios {what} ({io}): {} (95 % CI {} to {}; t = {:.2} on {:.1} df, Welch; one-sided {} for a ratio {side} 1): {meaning}. On ln(successes + 1), repetitions {}",
        fmt_ratio(k.estimate.exp()),
        fmt_ratio(k.ci95.0.exp()),
        fmt_ratio(k.ci95.1.exp()),
        k.t,
        k.df,
        stats::fmt_p(p),
        reps_list(&v.blocks),
    );
    if !v.left_out.is_empty() {
        line.push_str(&format!(
            " (repetition {} left out: not all of the contrast's cells finished in it)",
            reps_list(&v.left_out)
        ));
    }
    line.push('.');
    line
}

/// The secondary, directionless test: the setup x route x added latency interaction over the
/// study's setups, the repetition as a block.
pub(super) fn omnibus_line(
    cells: &[CellResult],
    setups: &[&str],
    routes: &[&str],
    delays: &BTreeSet<u32>,
) -> String {
    let setups: Vec<&str> = setups
        .iter()
        .copied()
        .filter(|s| STUDY_SETUPS.contains(s))
        .collect();
    let delays: Vec<u32> = delays.iter().copied().collect();
    let mut by: BTreeMap<(usize, usize, usize), BTreeMap<u32, f64>> = BTreeMap::new();
    for c in cells {
        let (Some(a), Some(b), Some(k)) = (
            setups.iter().position(|s| *s == c.key.setup),
            routes.iter().position(|r| *r == c.key.route),
            delays.iter().position(|d| *d == c.key.delay_ms),
        ) else {
            continue;
        };
        by.entry((a, b, k)).or_default().insert(c.key.rep, y(c));
    }
    let names: Vec<&str> = setups.iter().map(|s| setup_name(s)).collect();
    let title = format!("Secondary, without direction: the setup × route × added latency interaction ({}) on ln(successes + 1), the repetition as a block", names.join(", "));
    let (blocks, left_out) = complete_blocks(by.values());
    let expected = setups.len() * routes.len() * delays.len();
    let result = if by.len() < expected {
        Err(format!(
            "{} of its {expected} cells have no result",
            expected - by.len()
        ))
    } else if blocks.len() < 2 {
        Err(format!(
            "it needs at least two repetitions in which every cell finished; the run has {}",
            blocks.len()
        ))
    } else {
        let data: BTreeMap<_, Vec<f64>> = by
            .into_iter()
            .map(|(k, m)| (k, blocks.iter().map(|r| m[r]).collect()))
            .collect();
        stats::three_way_interaction(&data)
    };
    match result {
        Err(why) => format!("{title}: not computed: {why}."),
        Ok(i) => {
            let mut line = format!(
                "{title}: F({:.0}, {:.0}) = {:.2}, {}",
                i.df_effect,
                i.df_error,
                i.f,
                stats::fmt_p(i.p)
            );
            if !left_out.is_empty() {
                line.push_str(&format!(
                    " (repetition {} left out: not every cell finished in it)",
                    reps_list(&left_out)
                ));
            }
            line.push_str(". It says only that the factors interact somehow (it is as significant when Sync wins, or when only Async Limited and Async Unlimited differ); the verdict above is the test of the hypothesis.");
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use statrs::distribution::{ContinuousCDF, StudentsT};

    use super::*;
    use crate::{
        study::report::{published::published, Report},
        study::results::{
            tests::{cell, empty_results_dir},
            ResultsDir,
        },
    };

    /// Removes the results directory also when the test fails.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Clone, Copy)]
    enum Pattern {
        /// The study's published successes: async keeps throughput on I/O with delay, sync collapses.
        Study,
        /// Sync and Async Unlimited swapped: sync keeps throughput on I/O with delay, async collapses.
        Reversed,
        /// Sync and Async Unlimited alike; only Async Limited collapses on I/O with delay.
        LimitedOnly,
        /// Every setup alike (routes and delays still differ, and interact).
        NoEffect,
    }

    const SETUPS_ALL: [&str; 4] = ["sync", "async-limited", "async-unlimited", "async-pooled"];
    const ROUTES: [&str; 3] = ["cpu", "io_read", "io_create"];
    const DELAYS: [u32; 3] = [0, 100, 200];

    fn base(p: Pattern, setup: &str, route: &str, delay: u32) -> f64 {
        let study = |s: &str| {
            published(route, delay, s)
                .expect("the study published every cell")
                .0 as f64
        };
        if setup == "async-pooled" {
            // Not a study setup: a pattern that would move both tests if it entered them.
            return if route == "cpu" {
                5.0
            } else {
                50_000.0 * (1 + delay) as f64
            };
        }
        match p {
            Pattern::Study => study(setup),
            Pattern::Reversed => study(match setup {
                "sync" => "async-unlimited",
                "async-unlimited" => "sync",
                s => s,
            }),
            Pattern::LimitedOnly if setup == "async-limited" && route != "cpu" && delay > 0 => 40.0,
            Pattern::LimitedOnly | Pattern::NoEffect => study("async-unlimited"),
        }
    }

    /// Run-to-run noise as measured on 2 cores (+-20-40 %): +-25 % per cell and repetition,
    /// deterministic, times a factor for the whole repetition (the host slower in one of them).
    fn noise(setup: usize, route: usize, delay: usize, rep: u32) -> f64 {
        let k = (setup * 9 + route * 3 + delay) as f64 + 36.0 * rep as f64;
        [1.0, 0.85, 1.1][rep as usize - 1] * (1.0 + 0.25 * (k * 12.9898).sin())
    }

    /// 4 setups x 3 routes x 3 delays x 3 repetitions, written as a run writes them.
    fn results(
        name: &str,
        p: Pattern,
        with_pooled: bool,
    ) -> (TempDir, ResultsDir, Vec<CellResult>) {
        let root = std::env::temp_dir().join(format!("awl-verdict-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let guard = TempDir(root.clone());
        let dir = empty_results_dir(&root);
        let mut cells = Vec::new();
        for rep in 1..=3 {
            for (a, s) in SETUPS_ALL
                .iter()
                .enumerate()
                .filter(|(_, s)| with_pooled || **s != "async-pooled")
            {
                for (b, r) in ROUTES.iter().enumerate() {
                    for (k, d) in DELAYS.iter().enumerate() {
                        let ok = (base(p, s, r, *d) * noise(a, b, k, rep)).round() as u64;
                        let c = cell(s, r, *d, rep, ok);
                        dir.write_cell(&c).unwrap();
                        cells.push(c);
                    }
                }
            }
        }
        (guard, dir, cells)
    }

    /// The statistics lines of `Report::build`, after checking that they and the written report.md
    /// (the `awaitlab report RUN_DIR` path) both give the verdict `word`.
    fn says(
        name: &str,
        p: Pattern,
        with_pooled: bool,
        word: &str,
    ) -> (Vec<String>, Vec<CellResult>) {
        let (g, dir, cells) = results(name, p, with_pooled);
        let built = Report::build(&dir).unwrap().statistics;
        let (md, _) = crate::study::report::write(&g.0).unwrap();
        let md = std::fs::read_to_string(md).unwrap();
        let expected = format!("Verdict: the study's hypothesis is {word}.");
        assert!(built.iter().any(|l| l.starts_with(&expected)), "{built:#?}");
        assert!(md.contains(&format!("- {expected}")), "{md}");
        (built, cells)
    }

    #[test]
    fn the_coefficients_are_the_pre_specified_contrast() {
        let c = coefficients(&["io_read", "io_create"]);
        let expected = [
            (("async-unlimited", "io_read", 200), 0.5),
            (("sync", "io_read", 200), -0.5),
            (("async-unlimited", "io_read", 0), -0.5),
            (("sync", "io_read", 0), 0.5),
            (("async-unlimited", "io_create", 200), 0.5),
            (("sync", "io_create", 200), -0.5),
            (("async-unlimited", "io_create", 0), -0.5),
            (("sync", "io_create", 0), 0.5),
            (("async-unlimited", "cpu", 200), -1.0),
            (("sync", "cpu", 200), 1.0),
            (("async-unlimited", "cpu", 0), 1.0),
            (("sync", "cpu", 0), -1.0),
        ];
        assert_eq!(c, expected);
        assert_eq!(c.iter().map(|x| x.1).sum::<f64>(), 0.0);
        let one = coefficients(&["io_read"]);
        assert_eq!(one.len(), 8);
        assert_eq!(one[0], (("async-unlimited", "io_read", 200), 1.0));
        assert_eq!(one.iter().map(|x| x.1).sum::<f64>(), 0.0);
    }

    #[test]
    fn the_studys_pattern_is_supported_and_its_estimate_matches_a_reference() {
        let (built, cells) = says("study", Pattern::Study, true, "supported");
        let s = built.join("\n");
        // 3 setups x 3 routes x 3 delays, 3 repetitions as blocks: F(8, (27 - 1) x (3 - 1) = 52).
        assert!(s.contains("F(8, 52)"), "{s}");

        // Reference: the contrast written out by hand over the cells' own values.
        let coef = [
            ("async-unlimited", "io_read", 200, 0.5),
            ("sync", "io_read", 200, -0.5),
            ("async-unlimited", "io_read", 0, -0.5),
            ("sync", "io_read", 0, 0.5),
            ("async-unlimited", "io_create", 200, 0.5),
            ("sync", "io_create", 200, -0.5),
            ("async-unlimited", "io_create", 0, -0.5),
            ("sync", "io_create", 0, 0.5),
            ("async-unlimited", "cpu", 200, -1.0),
            ("sync", "cpu", 200, 1.0),
            ("async-unlimited", "cpu", 0, 1.0),
            ("sync", "cpu", 0, -1.0),
        ];
        let (mut est, mut var, mut den) = (0.0, 0.0, 0.0);
        for (s, r, d, c) in coef {
            let ys: Vec<f64> = cells
                .iter()
                .filter(|x| x.key.setup == s && x.key.route == r && x.key.delay_ms == d)
                .map(|x| (x.load.total_successes as f64 + 1.0).ln())
                .collect();
            assert_eq!(ys.len(), 3);
            let m = ys.iter().sum::<f64>() / 3.0;
            let s2 = ys.iter().map(|y| (y - m).powi(2)).sum::<f64>() / 2.0;
            est += c * m;
            var += c * c * s2 / 3.0;
            den += (c * c * s2 / 3.0).powi(2) / 2.0;
        }
        let df = var * var / den;
        let q = StudentsT::new(0.0, 1.0, df).unwrap().inverse_cdf(0.975);
        let v = hypothesis(&cells).unwrap();
        let k = v.contrast;
        assert_eq!(v.outcome, Conclusion::Supported);
        assert!(
            (k.estimate - est).abs() < 1e-9 && (k.df - df).abs() < 1e-9,
            "{k:?} vs {est} on {df} df"
        );
        assert!(
            (k.ci95.0 - (est - q * var.sqrt())).abs() < 1e-9
                && (k.ci95.1 - (est + q * var.sqrt())).abs() < 1e-9,
            "{k:?}"
        );
        // The printed ratio of ratios is exp of that estimate.
        assert!(
            s.contains(&format!(
                "({}, geometric mean): {} (95 % CI {} to {};",
                "io_read and io_create",
                fmt_ratio(est.exp()),
                fmt_ratio((est - q * var.sqrt()).exp()),
                fmt_ratio((est + q * var.sqrt()).exp())
            )),
            "{s}"
        );

        // Async Pooled entered neither test: without its cells both lines are the same.
        let (without, _) = says("study-no-pooled", Pattern::Study, false, "supported");
        assert_eq!(built[1..], without[1..]);
    }

    #[test]
    fn the_reversed_pattern_is_contradicted() {
        let (built, _) = says("reversed", Pattern::Reversed, true, "contradicted");
        let s = built.join("\n");
        // Regression: the directionless F test alone called this "supported".
        assert!(s.contains("F(8, 52)") && !s.contains("is supported"), "{s}");
    }

    #[test]
    fn only_limited_vs_unlimited_differing_is_not_shown() {
        let (built, cells) = says("limited", Pattern::LimitedOnly, true, "not shown");
        // Regression: the interaction F test is significant here, and used to be the verdict.
        let omnibus = built.iter().find(|l| l.starts_with("Secondary")).unwrap();
        assert!(
            omnibus.contains("F(8, 52)") && omnibus.contains("p < 1e-12"),
            "{omnibus}"
        );
        assert_eq!(hypothesis(&cells).unwrap().outcome, Conclusion::NotShown);
    }

    #[test]
    fn no_effect_is_not_shown() {
        let (built, _) = says("none", Pattern::NoEffect, true, "not shown");
        // Routes and delays interact here, the setups do not: the secondary test finds nothing.
        let omnibus = built.iter().find(|l| l.starts_with("Secondary")).unwrap();
        let p: f64 = omnibus
            .split("p = ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .unwrap()
            .trim_end_matches('.')
            .parse()
            .unwrap();
        assert!(omnibus.contains("F(8, 52)") && p > 0.05, "{omnibus}");
    }

    #[test]
    fn a_missing_cell_or_delay_is_named_not_replaced() {
        let (_g, _dir, cells) = results("missing", Pattern::Study, false);
        // No 200 ms at all: the contrast is not moved to the highest delay present.
        let no200: Vec<CellResult> = cells
            .iter()
            .filter(|c| c.key.delay_ms != 200)
            .cloned()
            .collect();
        let why = hypothesis(&no200).unwrap_err();
        assert!(why.contains("no cell ran at 200 ms"), "{why}");
        assert!(
            verdict_line(&no200).starts_with("Verdict: cannot be computed: no cell ran at 200 ms")
        );
        // One needed cell missing in every repetition.
        let gap: Vec<CellResult> = cells
            .iter()
            .filter(|c| {
                !(c.key.setup == "sync" && c.key.route == "io_create" && c.key.delay_ms == 0)
            })
            .cloned()
            .collect();
        assert_eq!(
            hypothesis(&gap).unwrap_err(),
            "no cell finished for Sync io_create 0 ms"
        );
        // Missing in one repetition only: that repetition is left out, the others still decide.
        let one: Vec<CellResult> = cells
            .iter()
            .filter(|c| {
                !(c.key.setup == "sync"
                    && c.key.route == "cpu"
                    && c.key.delay_ms == 0
                    && c.key.rep == 2)
            })
            .cloned()
            .collect();
        let v = hypothesis(&one).unwrap();
        assert_eq!(
            (v.blocks.clone(), v.left_out.clone()),
            (vec![1, 3], vec![2])
        );
        assert!(
            verdict_line(&one).contains("(repetition 2 left out"),
            "{}",
            verdict_line(&one)
        );
        // One repetition: no variance, no verdict.
        let single: Vec<CellResult> = cells.iter().filter(|c| c.key.rep == 1).cloned().collect();
        assert!(hypothesis(&single)
            .unwrap_err()
            .contains("at least two repetitions"));
    }

    #[test]
    fn ratios_print_three_significant_figures() {
        assert_eq!(fmt_ratio(76.349), "76.3");
        assert_eq!(fmt_ratio(4321.4), "4321");
        assert_eq!(fmt_ratio(1.0), "1.00");
        assert_eq!(fmt_ratio(0.013249), "0.0132");
        assert_eq!(fmt_ratio(2e-7), "2.00e-7");
    }
}

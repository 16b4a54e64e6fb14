//! The statistics of the report: means with 95 % confidence intervals over repetitions, a linear
//! contrast of cell means with per-cell variances (Welch-Satterthwaite), which the verdict on the
//! study's hypothesis uses, and the balanced three-way ANOVA with the repetition as a block (the
//! report's secondary, directionless test).
//!
//! Pure arithmetic on numbers the report hands in; it never reads files.

use std::collections::BTreeMap;

use statrs::distribution::{ContinuousCDF, FisherSnedecor, StudentsT};

/// Mean and, with two or more values, the half-width of the 95 % confidence interval
/// (Student's t).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub half_width: Option<f64>,
}

pub(crate) fn mean_ci(values: &[f64]) -> Option<MeanCi> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Some(MeanCi {
            n,
            mean,
            half_width: None,
        });
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .ok()?
        .inverse_cdf(0.975);
    Some(MeanCi {
        n,
        mean,
        half_width: Some(t * (var / n as f64).sqrt()),
    })
}

/// The one way the report prints a p-value. Tails come from the survival function, so tiny values
/// are real, but below 1e-12 the t and F approximations behind them mean nothing more.
pub(crate) fn fmt_p(p: f64) -> String {
    if p < 1e-12 {
        "p < 1e-12".into()
    } else if p < 1e-3 {
        format!("p = {p:.1e}")
    } else {
        format!("p = {p:.3}")
    }
}

/// A linear contrast `sum c_i * mean_i` of independent cell means, each cell with its own variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Contrast {
    pub estimate: f64,
    /// sqrt(sum c_i^2 s_i^2 / n_i).
    pub se: f64,
    /// Welch-Satterthwaite degrees of freedom.
    pub df: f64,
    pub t: f64,
    /// Two-sided 95 % confidence interval of the estimate.
    pub ci95: (f64, f64),
    /// One-sided p-value of "the contrast is greater than 0", and of "less than 0".
    pub p_greater: f64,
    pub p_less: f64,
}

/// The contrast of `(coefficient, values)` cells: estimate from the cell means, standard error
/// from the per-cell sample variances, Welch-Satterthwaite df
/// `(sum v_i)^2 / sum (v_i^2 / (n_i - 1))` with `v_i = c_i^2 s_i^2 / n_i`.
pub(crate) fn contrast(cells: &[(f64, &[f64])]) -> Result<Contrast, String> {
    let mut estimate = 0.0;
    let (mut var, mut df_den) = (0.0, 0.0);
    for (c, values) in cells {
        let n = values.len();
        if n < 2 {
            return Err("a cell has fewer than two repetitions".into());
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let s2 = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let v = c * c * s2 / n as f64;
        estimate += c * mean;
        var += v;
        df_den += v * v / (n - 1) as f64;
    }
    if var.is_nan() || var <= 0.0 {
        return Err("no variation between repetitions".into());
    }
    let se = var.sqrt();
    let df = var * var / df_den;
    let dist = StudentsT::new(0.0, 1.0, df).map_err(|e| e.to_string())?;
    let q = dist.inverse_cdf(0.975);
    let t = estimate / se;
    Ok(Contrast {
        estimate,
        se,
        df,
        t,
        ci95: (estimate - q * se, estimate + q * se),
        p_greater: dist.sf(t),
        p_less: dist.sf(-t),
    })
}

/// Result of the F test of the three-way interaction term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Interaction {
    pub f: f64,
    pub df_effect: f64,
    pub df_error: f64,
    pub p: f64,
}

/// Balanced three-way ANOVA with an additive block factor on `data[(a, b, c)][r]` = the value of
/// cell (a, b, c) in block r (every cell has every block, in the same order); returns the test of
/// the A x B x C interaction, or why it cannot be computed. The block (a repetition, which runs
/// every cell once) takes its variation out of the error term: error df = (abc - 1)(blocks - 1).
#[allow(clippy::needless_range_loop)] // the (a, b, c) indices are the design's own notation
pub(crate) fn three_way_interaction(
    data: &BTreeMap<(usize, usize, usize), Vec<f64>>,
) -> Result<Interaction, String> {
    let la = data.keys().map(|k| k.0).max().map_or(0, |m| m + 1);
    let lb = data.keys().map(|k| k.1).max().map_or(0, |m| m + 1);
    let lc = data.keys().map(|k| k.2).max().map_or(0, |m| m + 1);
    if la < 2 || lb < 2 || lc < 2 {
        return Err("needs at least two levels of each factor".into());
    }
    let n = data.values().next().map_or(0, Vec::len);
    if n < 2 {
        return Err("needs at least two repetitions per cell".into());
    }
    let mut cell = vec![vec![vec![0.0; lc]; lb]; la];
    for a in 0..la {
        for b in 0..lb {
            for c in 0..lc {
                let v = data
                    .get(&(a, b, c))
                    .ok_or("unbalanced: a cell is missing")?;
                if v.len() != n {
                    return Err("unbalanced: cells have different numbers of repetitions".into());
                }
                cell[a][b][c] = v.iter().sum::<f64>() / n as f64;
            }
        }
    }
    let mean = |f: &dyn Fn(usize, usize, usize) -> bool| {
        let (mut s, mut k) = (0.0, 0.0);
        for a in 0..la {
            for b in 0..lb {
                for c in 0..lc {
                    if f(a, b, c) {
                        s += cell[a][b][c];
                        k += 1.0;
                    }
                }
            }
        }
        s / k
    };
    let g = mean(&|_, _, _| true);
    let ma: Vec<f64> = (0..la).map(|i| mean(&|a, _, _| a == i)).collect();
    let mb: Vec<f64> = (0..lb).map(|j| mean(&|_, b, _| b == j)).collect();
    let mc: Vec<f64> = (0..lc).map(|k| mean(&|_, _, c| c == k)).collect();
    let mut mab = vec![vec![0.0; lb]; la];
    let mut mac = vec![vec![0.0; lc]; la];
    let mut mbc = vec![vec![0.0; lc]; lb];
    for a in 0..la {
        for b in 0..lb {
            mab[a][b] = cell[a][b].iter().sum::<f64>() / lc as f64;
        }
        for c in 0..lc {
            mac[a][c] = (0..lb).map(|b| cell[a][b][c]).sum::<f64>() / lb as f64;
        }
    }
    for b in 0..lb {
        for c in 0..lc {
            mbc[b][c] = (0..la).map(|a| cell[a][b][c]).sum::<f64>() / la as f64;
        }
    }
    let block: Vec<f64> = (0..n)
        .map(|r| data.values().map(|v| v[r]).sum::<f64>() / data.len() as f64)
        .collect();
    let mut ss_abc = 0.0;
    let mut ss_e = 0.0;
    for a in 0..la {
        for b in 0..lb {
            for c in 0..lc {
                let e =
                    cell[a][b][c] - mab[a][b] - mac[a][c] - mbc[b][c] + ma[a] + mb[b] + mc[c] - g;
                ss_abc += n as f64 * e * e;
                for (r, y) in data[&(a, b, c)].iter().enumerate() {
                    // Residual of the additive cell + block model.
                    ss_e += (y - cell[a][b][c] - block[r] + g).powi(2);
                }
            }
        }
    }
    let df_effect = ((la - 1) * (lb - 1) * (lc - 1)) as f64;
    let df_error = ((la * lb * lc - 1) * (n - 1)) as f64;
    // Relative to the total variation: rounding leaves ~1e-30 where the residuals are exactly zero.
    let ss_total: f64 = data.values().flatten().map(|y| (y - g).powi(2)).sum();
    if ss_e <= 1e-24 * ss_total.max(f64::MIN_POSITIVE) {
        return Err("no variation between repetitions beyond the repetitions' own shifts".into());
    }
    let f = (ss_abc / df_effect) / (ss_e / df_error);
    let dist = FisherSnedecor::new(df_effect, df_error).map_err(|e| e.to_string())?;
    Ok(Interaction {
        f,
        df_effect,
        df_error,
        p: dist.sf(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_interval_of_a_known_sample() {
        // mean 5, sd 2.138 (values 2,4,4,4,5,5,7,9), t(0.975, 7) = 2.3646: half-width 1.7875.
        let m = mean_ci(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(m.mean, 5.0);
        assert!((m.half_width.unwrap() - 1.7875).abs() < 1e-3, "{m:?}");
        assert_eq!(mean_ci(&[3.0]).unwrap().half_width, None);
        assert!(mean_ci(&[]).is_none());
    }

    #[test]
    fn p_values_print_one_way() {
        assert_eq!(fmt_p(0.04321), "p = 0.043");
        assert_eq!(fmt_p(3.2e-5), "p = 3.2e-5");
        assert_eq!(fmt_p(1e-13), "p < 1e-12");
        assert_eq!(fmt_p(0.0), "p < 1e-12", "never p = 0.0000");
    }

    #[test]
    fn a_contrast_matches_the_hand_computation() {
        // Four cells of three values, each with mean m and sample variance 1:
        // A = 1,2,3 (2); B = 2,3,4 (3); C = 4,5,6 (5); D = 9,10,11 (10).
        // (D - C) - (B - A) = 5 - 1 = 4; SE^2 = 4 x 1/3 = 4/3, SE = 1.154701;
        // Welch df = (4/3)^2 / (4 x (1/3)^2 / 2) = 8; t(0.975, 8) = 2.306004 (tables):
        // CI 4 +- 2.662752 = (1.337248, 6.662752). t = 3.4641 lies between t(0.995, 8) = 3.3554
        // and t(0.9975, 8) = 3.8325, so the one-sided p is between 0.0025 and 0.005.
        let (a, b, c, d) = (
            [1.0, 2.0, 3.0],
            [2.0, 3.0, 4.0],
            [4.0, 5.0, 6.0],
            [9.0, 10.0, 11.0],
        );
        let k = contrast(&[(1.0, &a), (-1.0, &b), (-1.0, &c), (1.0, &d)]).unwrap();
        assert!((k.estimate - 4.0).abs() < 1e-12, "{k:?}");
        assert!((k.se - 1.154701).abs() < 1e-6, "{k:?}");
        assert!((k.df - 8.0).abs() < 1e-9, "{k:?}");
        assert!(
            (k.ci95.0 - 1.337248).abs() < 1e-5 && (k.ci95.1 - 6.662752).abs() < 1e-5,
            "{k:?}"
        );
        assert!(k.p_greater > 0.0025 && k.p_greater < 0.005, "{k:?}");
        assert!((k.p_greater + k.p_less - 1.0).abs() < 1e-12, "{k:?}");
        // Unequal variances: A (s^2 = 1) against E = 4,6,8 (s^2 = 4), n = 3 each:
        // SE^2 = 1/3 + 4/3 = 5/3; df = (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50/17.
        let e = [4.0, 6.0, 8.0];
        let k = contrast(&[(-1.0, &a), (1.0, &e)]).unwrap();
        assert!((k.df - 50.0 / 17.0).abs() < 1e-9, "{k:?}");
        assert!((k.se * k.se - 5.0 / 3.0).abs() < 1e-12, "{k:?}");
        assert!(
            contrast(&[(1.0, &[1.0]), (-1.0, &a)]).is_err(),
            "one repetition has no variance"
        );
        assert!(
            contrast(&[(1.0, &[1.0, 1.0]), (-1.0, &[2.0, 2.0])]).is_err(),
            "no variation"
        );
    }

    /// A deterministic jitter in [-0.2, 0.2] that is not a block effect (it varies within blocks).
    fn jitter(a: usize, b: usize, c: usize, r: usize) -> f64 {
        ((a * 7 + b * 3 + c * 5 + r * 11) as f64 * 12.9898).sin() * 0.2
    }

    fn design(
        interaction: f64,
        block_shift: [f64; 3],
    ) -> BTreeMap<(usize, usize, usize), Vec<f64>> {
        // Additive effects plus an interaction only in cell (1,1,2), a shift per block, jitter.
        let mut d = BTreeMap::new();
        for a in 0..2 {
            for b in 0..2 {
                for c in 0..3 {
                    let base = a as f64
                        + 2.0 * b as f64
                        + 0.5 * c as f64
                        + if (a, b, c) == (1, 1, 2) {
                            interaction
                        } else {
                            0.0
                        };
                    d.insert(
                        (a, b, c),
                        (0..3)
                            .map(|r| base + block_shift[r] + jitter(a, b, c, r))
                            .collect(),
                    );
                }
            }
        }
        d
    }

    #[test]
    fn a_pure_interaction_is_found_and_additive_effects_are_not() {
        let with = three_way_interaction(&design(3.0, [0.0; 3])).unwrap();
        assert!(with.p < 1e-6, "{with:?}");
        // 12 cells, 3 blocks: error df (12 - 1) x (3 - 1) = 22.
        assert_eq!((with.df_effect, with.df_error), (2.0, 22.0));
        let without = three_way_interaction(&design(0.0, [0.0; 3])).unwrap();
        assert!(without.p > 0.05, "{without:?}");
    }

    #[test]
    fn the_block_takes_its_variation_out_of_the_error() {
        // Shifting whole blocks changes nothing: the block factor absorbs the shift exactly. A
        // model without blocks would see the shifts as error and lose the interaction.
        let plain = three_way_interaction(&design(1.0, [0.0; 3])).unwrap();
        let shifted = three_way_interaction(&design(1.0, [0.0, 5.0, -3.0])).unwrap();
        assert!(
            (plain.f - shifted.f).abs() < 1e-6 * plain.f,
            "{plain:?} {shifted:?}"
        );
        assert!((plain.p - shifted.p).abs() < 1e-9, "{plain:?} {shifted:?}");
        // A pure block effect with no other variation is no evidence of anything.
        let flat: BTreeMap<_, _> = design(1.0, [0.0; 3])
            .into_keys()
            .map(|k| (k, vec![1.0, 2.0, 4.0]))
            .collect();
        assert!(three_way_interaction(&flat).is_err());
    }

    #[test]
    fn the_f_of_a_two_level_design_matches_its_contrast() {
        // In a 2 x 2 x 2 design the interaction is the single contrast c = (2a-1)(2b-1)(2c-1):
        // SS_ABC = n (sum c ybar)^2 / 8. The blocked error is the within-cell sum of squares minus
        // the blocks' own: SS_E = sum (y - ybar_cell)^2 - 8 sum_r (ybar_r - ybar)^2, on
        // (8 - 1)(n - 1) df. Computed here that way, independently of the marginal-means code.
        let n = 4;
        let mut d = BTreeMap::new();
        for a in 0..2 {
            for b in 0..2 {
                for c in 0..2 {
                    let base = 1.0 + a as f64 - b as f64
                        + 0.3 * c as f64
                        + if (a, b, c) == (1, 1, 1) { 0.8 } else { 0.0 };
                    d.insert(
                        (a, b, c),
                        (0..n)
                            .map(|r| base + 0.4 * r as f64 + jitter(a, b, c, r))
                            .collect::<Vec<f64>>(),
                    );
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let sign = |(a, b, c): (usize, usize, usize)| {
            ((2 * a as i32 - 1) * (2 * b as i32 - 1) * (2 * c as i32 - 1)) as f64
        };
        let l: f64 = d.iter().map(|(k, v)| sign(*k) * mean(v)).sum();
        let ss_abc = n as f64 * l * l / 8.0;
        let within: f64 = d
            .values()
            .map(|v| v.iter().map(|y| (y - mean(v)).powi(2)).sum::<f64>())
            .sum();
        let grand = mean(&d.values().flatten().copied().collect::<Vec<_>>());
        let blocks: f64 = (0..n)
            .map(|r| (mean(&d.values().map(|v| v[r]).collect::<Vec<_>>()) - grand).powi(2))
            .sum::<f64>()
            * 8.0;
        let f = ss_abc / ((within - blocks) / (7 * (n - 1)) as f64);
        let i = three_way_interaction(&d).unwrap();
        assert_eq!((i.df_effect, i.df_error), (1.0, 21.0));
        assert!((i.f - f).abs() < 1e-9 * f, "{i:?} vs F = {f}");
    }

    #[test]
    fn unbalanced_or_unreplicated_designs_are_refused() {
        let mut d = design(1.0, [0.0; 3]);
        d.get_mut(&(0, 0, 0)).unwrap().pop();
        assert!(three_way_interaction(&d)
            .unwrap_err()
            .contains("unbalanced"));
        let single: BTreeMap<_, _> = design(1.0, [0.0; 3])
            .into_iter()
            .map(|(k, v)| (k, vec![v[0]]))
            .collect();
        assert!(three_way_interaction(&single).is_err());
    }
}

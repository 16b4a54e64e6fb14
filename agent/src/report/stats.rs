//! The statistics of the report: means with 95 % confidence intervals over repetitions, and the
//! balanced three-way ANOVA that tests the study's hypothesis (setup x route x added latency).
//!
//! Pure arithmetic on numbers the report hands in; it never reads files.

use std::collections::BTreeMap;

use statrs::distribution::{ContinuousCDF, FisherSnedecor, StudentsT};

/// Mean and, with two or more values, the half-width of the 95 % confidence interval
/// (Student's t).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub half_width: Option<f64>,
}

pub fn mean_ci(values: &[f64]) -> Option<MeanCi> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Some(MeanCi { n, mean, half_width: None });
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?.inverse_cdf(0.975);
    Some(MeanCi { n, mean, half_width: Some(t * (var / n as f64).sqrt()) })
}

/// Result of the F test of the three-way interaction term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub f: f64,
    pub df_effect: f64,
    pub df_error: f64,
    pub p: f64,
}

/// Balanced three-way ANOVA on `data[(a, b, c)] = replicate values`; returns the test of the
/// A x B x C interaction, or why it cannot be computed.
#[allow(clippy::needless_range_loop)] // the (a, b, c) indices are the design's own notation
pub fn three_way_interaction(data: &BTreeMap<(usize, usize, usize), Vec<f64>>) -> Result<Interaction, String> {
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
                let v = data.get(&(a, b, c)).ok_or("unbalanced: a cell is missing")?;
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
    let mut ss_abc = 0.0;
    let mut ss_e = 0.0;
    for a in 0..la {
        for b in 0..lb {
            for c in 0..lc {
                let e = cell[a][b][c] - mab[a][b] - mac[a][c] - mbc[b][c] + ma[a] + mb[b] + mc[c] - g;
                ss_abc += n as f64 * e * e;
                for y in &data[&(a, b, c)] {
                    ss_e += (y - cell[a][b][c]).powi(2);
                }
            }
        }
    }
    let df_effect = ((la - 1) * (lb - 1) * (lc - 1)) as f64;
    let df_error = (la * lb * lc * (n - 1)) as f64;
    if ss_e <= 0.0 {
        return Err("no variation between repetitions".into());
    }
    let f = (ss_abc / df_effect) / (ss_e / df_error);
    let dist = FisherSnedecor::new(df_effect, df_error).map_err(|e| e.to_string())?;
    Ok(Interaction { f, df_effect, df_error, p: 1.0 - dist.cdf(f) })
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

    fn design(interaction: f64) -> BTreeMap<(usize, usize, usize), Vec<f64>> {
        // Additive effects plus an interaction only in cell (1,1,1); noise +-0.1 by replicate.
        let mut d = BTreeMap::new();
        for a in 0..2 {
            for b in 0..2 {
                for c in 0..3 {
                    let base = a as f64 + 2.0 * b as f64 + 0.5 * c as f64 + if (a, b, c) == (1, 1, 2) { interaction } else { 0.0 };
                    d.insert((a, b, c), vec![base - 0.1, base, base + 0.1]);
                }
            }
        }
        d
    }

    #[test]
    fn a_pure_interaction_is_found_and_additive_effects_are_not() {
        let with = three_way_interaction(&design(3.0)).unwrap();
        assert!(with.p < 1e-6, "{with:?}");
        assert_eq!((with.df_effect, with.df_error), (2.0, 24.0));
        let without = three_way_interaction(&design(0.0)).unwrap();
        assert!(without.f.abs() < 1e-9 && without.p > 0.99, "{without:?}");
    }

    #[test]
    fn unbalanced_or_unreplicated_designs_are_refused() {
        let mut d = design(1.0);
        d.get_mut(&(0, 0, 0)).unwrap().pop();
        assert!(three_way_interaction(&d).unwrap_err().contains("unbalanced"));
        let single: BTreeMap<_, _> = design(1.0).into_iter().map(|(k, v)| (k, vec![v[0]])).collect();
        assert!(three_way_interaction(&single).is_err());
    }
}

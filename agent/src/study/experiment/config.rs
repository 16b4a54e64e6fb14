//! The experiment's configuration: which setups, routes, added delays and repetitions, on which
//! back end and with which load profile, and the design that orders the cells (randomised blocks,
//! their seed, the warm-up). Read from a TOML file (`study.toml` describes the study), then
//! overridden by command-line flags, then checked as a whole before anything starts.
//!
//! It must reject what it does not understand (unknown keys, unknown setups or routes, negative or
//! absurd delays) with one clear line, never guess.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::{
    delay::BackendChoice,
    study::sut::{BackendKind, Stack},
};
use crate::{
    load::template::{Rng, Route},
    study::results::CellKey,
    study::sut::Setup,
};

/// Setups the system under test knows (`sut::Setup`).
pub(crate) fn known_setups() -> Vec<&'static str> {
    Setup::ALL.iter().map(|s| s.name()).collect()
}

/// The study's routes (`load::template::Route`).
pub(crate) fn known_routes() -> Vec<&'static str> {
    Route::ALL.iter().map(|r| r.name()).collect()
}
/// Largest added delay accepted: the delay back ends' own limit.
pub use crate::delay::MAX_DELAY_MS;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: String },
    #[error("unknown setup {0:?} (known: {known})", known = known_setups().join(", "))]
    UnknownSetup(String),
    #[error("unknown route {0:?} (known: {known})", known = known_routes().join(", "))]
    UnknownRoute(String),
    #[error("added delay {0} ms is over the limit of {MAX_DELAY_MS} ms")]
    DelayTooLarge(u32),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("repeat must be at least 1")]
    NoRepeat,
    #[error("setup async-pooled needs the current stack (the study stack has no connection pool)")]
    PooledNeedsCurrent,
    #[error("warmup_s must be between 0 and {MAX_WARMUP_S} seconds, not {0}")]
    BadWarmup(f64),
}

/// Longest warm-up accepted: a warm-up is a few seconds, not a second run.
pub(crate) const MAX_WARMUP_S: f64 = 600.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// The study's 180 s: 0 -> 500 users at 5 users/s, then 80 s at 500.
    Study,
    /// The same shape in 30 s (0 -> 500 at 30 users/s, then hold).
    Quick,
    /// A smoke test: 0 -> 100 users at 20 users/s, then hold; 15 s.
    Smoke,
}

/// In which order the cells run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Randomised blocks: each repetition runs every cell of the matrix once, in its own random
    /// order drawn from the seed, so that no setup, route or delay always runs early, late, or
    /// after the same neighbour.
    Random,
    /// Setup-major, then route, delay, and repetitions back to back (the order of earlier
    /// versions); confounds the cell with its place in the run.
    Fixed,
}

/// Default warm-up: enough for a fresh server's first requests (imports, URL resolver, first
/// database connections) on every route, including a few 0.8 s cpu requests, and short beside
/// a 30 s cell.
pub const WARMUP_S: f64 = 5.0;

/// Everything a run needs. `Default` is the study's matrix on the back end that needs no Docker,
/// with the quick profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub backend: BackendKind,
    pub stack: Stack,
    pub profile: ProfileName,
    pub setups: Vec<String>,
    pub routes: Vec<String>,
    pub delays_ms: Vec<u32>,
    pub repeat: u32,
    pub delay_backend: BackendChoice,
    /// Parent directory of the run directories.
    pub results_dir: PathBuf,
    /// Attach the eBPF probes to the server (the explanation needs them).
    pub probes: bool,
    /// How long to wait, before a cell and after its warm-up, for the server to go idle and the
    /// database connections to close; after that the sessions left are terminated and the cell's
    /// notes say so.
    pub drain_timeout_s: u64,
    /// Cell order: randomised blocks (default) or the fixed order.
    pub order: Order,
    /// Seed of the random order; None draws one, which the run records in its index.json.
    pub seed: Option<u64>,
    /// Seconds of unmeasured load on the cell's route, with no added delay, between the fresh
    /// server's start and the cell (0: none).
    pub warmup_s: f64,
    /// Stop the run when the system under test dies during a cell (the cell is recorded as
    /// failed either way); by default the next cell gets a new system and the run goes on.
    pub fail_fast: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            backend: BackendKind::Netns,
            stack: Stack::Current,
            profile: ProfileName::Quick,
            setups: vec![
                "sync".into(),
                "async-limited".into(),
                "async-unlimited".into(),
            ],
            routes: known_routes().into_iter().map(String::from).collect(),
            delays_ms: vec![0, 100, 200],
            repeat: 1,
            delay_backend: BackendChoice::Auto,
            results_dir: PathBuf::from("results"),
            probes: true,
            drain_timeout_s: 10,
            order: Order::Random,
            seed: None,
            warmup_s: WARMUP_S,
            fail_fast: false,
        }
    }
}

impl RunConfig {
    pub(crate) fn from_file(path: &Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                error,
            },
            other => other,
        })
    }

    pub(crate) fn from_toml(text: &str) -> Result<RunConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            // toml's message spans several lines (a source excerpt): keep the first.
            error: e.message().lines().next().unwrap_or("invalid").to_string(),
        })
    }

    /// Checks the whole configuration; call after flags were applied.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.setups.is_empty() {
            return Err(ConfigError::Empty("setups"));
        }
        if self.routes.is_empty() {
            return Err(ConfigError::Empty("routes"));
        }
        if self.delays_ms.is_empty() {
            return Err(ConfigError::Empty("delays_ms"));
        }
        if self.repeat == 0 {
            return Err(ConfigError::NoRepeat);
        }
        for s in &self.setups {
            if !known_setups().contains(&s.as_str()) {
                return Err(ConfigError::UnknownSetup(s.clone()));
            }
            if s == "async-pooled" && self.stack == Stack::Study {
                return Err(ConfigError::PooledNeedsCurrent);
            }
        }
        for r in &self.routes {
            if !known_routes().contains(&r.as_str()) {
                return Err(ConfigError::UnknownRoute(r.clone()));
            }
        }
        if let Some(&d) = self.delays_ms.iter().find(|&&d| d > MAX_DELAY_MS) {
            return Err(ConfigError::DelayTooLarge(d));
        }
        if !(self.warmup_s.is_finite() && (0.0..=MAX_WARMUP_S).contains(&self.warmup_s)) {
            return Err(ConfigError::BadWarmup(self.warmup_s));
        }
        Ok(())
    }

    /// The cells in execution order. Fixed: `cells()`. Random: one block per repetition, each
    /// a Fisher-Yates shuffle of the matrix (setup x route x delay) drawn from one SplitMix64
    /// stream seeded with `seed`, block 1 first; so a seed names one plan on every machine.
    pub fn plan(&self, seed: u64) -> Vec<CellKey> {
        if self.order == Order::Fixed {
            return self.cells();
        }
        let mut rng = Rng::new(seed);
        let mut out = Vec::new();
        for rep in 1..=self.repeat {
            let mut block: Vec<CellKey> = self
                .cells()
                .into_iter()
                .filter(|c| c.rep == 1)
                .map(|c| CellKey { rep, ..c })
                .collect();
            for i in (1..block.len()).rev() {
                // j uniform in 0..=i by multiply-shift; its bias (under (i + 1) / 2^64) is nil here.
                let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
                block.swap(i, j);
            }
            out.extend(block);
        }
        out
    }

    /// The cells in the fixed order: setup-major, then route, delay and repetition.
    pub fn cells(&self) -> Vec<CellKey> {
        let mut out = Vec::new();
        for setup in &self.setups {
            for route in &self.routes {
                for &delay_ms in &self.delays_ms {
                    for rep in 1..=self.repeat {
                        out.push(CellKey {
                            setup: setup.clone(),
                            route: route.clone(),
                            delay_ms,
                            rep,
                        });
                    }
                }
            }
        }
        out
    }
}

/// A seed for a run that was given none: from the kernel's random source, below 2^53 so that
/// JSON readers that hold numbers as doubles read the recorded seed exactly.
pub(crate) fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let x = if n == b.len() as isize {
        u64::from_le_bytes(b)
    } else {
        // No getrandom (a very old kernel): the clock is random enough to pick an order.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    x & ((1 << 53) - 1)
}

/// Parses one delay in milliseconds; negatives, non-numbers and delays over the limit are errors.
pub(crate) fn parse_delay(s: &str) -> Result<u32, String> {
    let x = s.trim();
    let v = x.parse::<u32>().map_err(|_| {
        if x.starts_with('-') {
            format!("delay {x:?} is negative")
        } else {
            format!("delay {x:?} is not a whole number of milliseconds")
        }
    })?;
    if v > MAX_DELAY_MS {
        return Err(format!(
            "delay {v} ms is over the limit of {MAX_DELAY_MS} ms"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::proptest;

    proptest! {
        /// Hostile study.toml text: an error, never a panic; what parses validates without one.
        #[test]
        fn hostile_config_text_is_an_error_not_a_panic(s in "[a-z_=\\[\\]\"0-9.,:{} \n-]{0,120}") {
            if let Ok(c) = RunConfig::from_toml(&s) {
                let _ = c.validate();
            }
            let mutated = format!("{}\n{s}", include_str!("../../../../study.toml"));
            if let Ok(c) = RunConfig::from_toml(&mutated) {
                let _ = c.validate();
            }
        }
    }

    #[test]
    fn the_checked_in_study_config_parses_and_is_the_study() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../study.toml");
        let c = RunConfig::from_file(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.setups, ["sync", "async-limited", "async-unlimited"]);
        assert_eq!(c.routes, ["cpu", "io_read", "io_create"]);
        assert_eq!(c.delays_ms, [0, 100, 200]);
        assert_eq!(c.profile, ProfileName::Study);
        assert_eq!(c.cells().len(), 27);
        assert_eq!(
            (c.order, c.seed, c.warmup_s),
            (Order::Random, None, WARMUP_S)
        );
    }

    #[test]
    fn bad_configs_are_one_line_errors() {
        let e = RunConfig::from_toml("setups = [\"sync\"]\ncolour = \"blue\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field") && e.contains("colour") && !e.contains('\n'),
            "{e}"
        );
        let e = RunConfig::from_toml("delays_ms = [0, -100]")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        let c = RunConfig {
            setups: vec!["turbo".into()],
            ..RunConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::UnknownSetup(_))));
        let c = RunConfig {
            routes: vec!["io_delete".into()],
            ..RunConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::UnknownRoute(_))));
        let c = RunConfig {
            delays_ms: vec![70_000],
            ..RunConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::DelayTooLarge(_))));
        let c = RunConfig {
            setups: vec!["async-pooled".into()],
            stack: Stack::Study,
            ..RunConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::PooledNeedsCurrent)));
        assert_eq!(parse_delay(" 100").unwrap(), 100);
        assert!(parse_delay("-5").unwrap_err().contains("negative"));
        assert!(parse_delay("fast").is_err());
        assert!(parse_delay("60001").is_err());
    }

    #[test]
    fn cells_are_setup_major() {
        let c = RunConfig {
            routes: vec!["io_read".into()],
            delays_ms: vec![0, 100],
            repeat: 2,
            ..RunConfig::default()
        };
        let cells = c.cells();
        assert_eq!(cells.len(), 3 * 2 * 2);
        assert_eq!(cells[0].stem(), "sync__io_read__0ms__r1");
        assert_eq!(cells[1].stem(), "sync__io_read__0ms__r2");
        assert_eq!(cells[4].setup, "async-limited");
    }

    #[test]
    fn fixed_order_is_the_setup_major_order() {
        let c = RunConfig {
            order: Order::Fixed,
            repeat: 2,
            ..RunConfig::default()
        };
        // Whatever the seed: the fixed order ignores it.
        assert_eq!(c.plan(1), c.cells());
        assert_eq!(c.plan(2), c.cells());
        assert_eq!(c.plan(1)[0].stem(), "sync__cpu__0ms__r1");
        assert_eq!(c.plan(1)[1].stem(), "sync__cpu__0ms__r2");
    }

    #[test]
    fn random_plans_are_blocks_of_the_whole_matrix_named_by_their_seed() {
        let c = RunConfig {
            repeat: 3,
            ..RunConfig::default()
        };
        assert_eq!(c.order, Order::Random, "randomised blocks are the default");
        let matrix: std::collections::BTreeSet<(String, String, u32)> = c
            .cells()
            .into_iter()
            .map(|k| (k.setup, k.route, k.delay_ms))
            .collect();
        assert_eq!(matrix.len(), 27);
        let a = c.plan(42);
        assert_eq!(a, c.plan(42), "the same seed plans the same order");
        assert_ne!(a, c.plan(43), "another seed plans another order");
        assert_eq!(a.len(), 3 * 27);
        for (b, block) in a.chunks(27).enumerate() {
            // Block b is repetition b + 1 and holds every cell of the matrix exactly once.
            assert!(block.iter().all(|k| k.rep == b as u32 + 1), "block {b}");
            let cells: std::collections::BTreeSet<_> = block
                .iter()
                .map(|k| (k.setup.clone(), k.route.clone(), k.delay_ms))
                .collect();
            assert_eq!(cells, matrix, "block {b}");
        }
        // Each block has its own order: 27! orders, so equal neighbours mean a reused stream.
        assert_ne!(
            a[..27]
                .iter()
                .map(CellKey::stem)
                .map(|s| s.replace("__r1", ""))
                .collect::<Vec<_>>(),
            a[27..54]
                .iter()
                .map(CellKey::stem)
                .map(|s| s.replace("__r2", ""))
                .collect::<Vec<_>>()
        );
        // Not the fixed order (1 chance in 27! of a false alarm).
        assert_ne!(
            a[..27],
            c.cells()
                .into_iter()
                .filter(|k| k.rep == 1)
                .collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn the_shuffle_is_unbiased_over_many_seeds() {
        // Over 6000 seeds each of the 6 orders of a 3-cell matrix should come up ~1000 times
        // (4 sigma of a binomial(6000, 1/6) is 4 x 28.9 = 116). The textbook bug, j drawn from
        // the whole block at every step, makes 9 equally likely paths to 6 orders: some come up
        // 2/9 of the time (~1333), others 1/9 (~667).
        let c = RunConfig {
            setups: vec!["sync".into()],
            routes: vec!["cpu".into()],
            ..RunConfig::default()
        };
        let mut seen = std::collections::BTreeMap::new();
        for seed in 0..6000 {
            *seen
                .entry(c.plan(seed).iter().map(|k| k.delay_ms).collect::<Vec<_>>())
                .or_insert(0u32) += 1;
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(
            seen.values().all(|&n| (884..=1116).contains(&n)),
            "{seen:?}"
        );
    }

    #[test]
    fn the_generator_is_splitmix64() {
        // Vigna's splitmix64.c from state 0 (Rng::new xors its seed with the increment).
        let mut r = Rng::new(0x9E37_79B9_7F4A_7C15);
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F,
                0xF88B_B8A8_724C_81EC
            ]
        );
    }

    #[test]
    fn random_seeds_fit_in_a_double_and_warmups_are_checked() {
        assert!((0..100).map(|_| random_seed()).all(|s| s < 1 << 53));
        assert!(
            (0..100)
                .map(|_| random_seed())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 90
        );
        for bad in [-1.0, f64::NAN, 601.0] {
            let c = RunConfig {
                warmup_s: bad,
                ..RunConfig::default()
            };
            assert!(
                matches!(c.validate(), Err(ConfigError::BadWarmup(_))),
                "{bad}"
            );
        }
        let c = RunConfig::from_toml("order = \"fixed\"\nseed = 7\nwarmup_s = 0\n").unwrap();
        assert_eq!((c.order, c.seed, c.warmup_s), (Order::Fixed, Some(7), 0.0));
    }
}

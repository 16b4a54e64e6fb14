//! The experiment's configuration: which setups, routes, added delays and repetitions, on which
//! back end and with which load profile. Read from a TOML file (`study.toml` describes the
//! study), then overridden by command-line flags, then checked as a whole before anything starts.
//!
//! It must reject what it does not understand (unknown keys, unknown setups or routes, negative or
//! absurd delays) with one clear line, never guess.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::results::CellKey;

/// Setups the system under test knows.
pub const KNOWN_SETUPS: &[&str] = &["sync", "async-limited", "async-unlimited", "async-pooled"];
/// The study's routes.
pub const KNOWN_ROUTES: &[&str] = &["cpu", "io_read", "io_create"];
/// Largest added delay accepted (the delay line refuses more than 60 s too).
pub const MAX_DELAY_MS: u32 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: String },
    #[error("unknown setup {0:?} (known: {known})", known = KNOWN_SETUPS.join(", "))]
    UnknownSetup(String),
    #[error("unknown route {0:?} (known: {known})", known = KNOWN_ROUTES.join(", "))]
    UnknownRoute(String),
    #[error("added delay {0} ms is over the limit of {MAX_DELAY_MS} ms")]
    DelayTooLarge(u32),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("repeat must be at least 1")]
    NoRepeat,
    #[error("setup async-pooled needs the current stack (the study stack has no connection pool)")]
    PooledNeedsCurrent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// PostgreSQL and Django as processes in network namespaces (no Docker needed).
    Netns,
    /// Docker containers built by `cargo xtask images`.
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// The study's versions (Django 4.1.3, psycopg2 2.9.5, gunicorn 20.1.0, uvicorn 0.20.0).
    Study,
    /// Django 5.2 LTS, psycopg 3, current gunicorn and uvicorn.
    Current,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DelayBackend {
    Auto,
    Netem,
    Nfqueue,
}

/// Everything a run needs. `Default` is the study's matrix on the back end that needs no Docker,
/// with the quick profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub backend: Backend,
    pub stack: Stack,
    pub profile: ProfileName,
    pub setups: Vec<String>,
    pub routes: Vec<String>,
    pub delays_ms: Vec<u32>,
    pub repeat: u32,
    pub delay_backend: DelayBackend,
    /// Parent directory of the run directories.
    pub results_dir: PathBuf,
    /// Attach the eBPF probes to the server (the explanation needs them).
    pub probes: bool,
    /// How long to wait, between cells, for the server to go idle and the database connections
    /// to close; after that the server is restarted (a closed-loop run leaves requests queued).
    pub drain_timeout_s: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            backend: Backend::Netns,
            stack: Stack::Current,
            profile: ProfileName::Quick,
            setups: vec!["sync".into(), "async-limited".into(), "async-unlimited".into()],
            routes: KNOWN_ROUTES.iter().map(|s| s.to_string()).collect(),
            delays_ms: vec![0, 100, 200],
            repeat: 1,
            delay_backend: DelayBackend::Auto,
            results_dir: PathBuf::from("results"),
            probes: true,
            drain_timeout_s: 10,
        }
    }
}

impl RunConfig {
    pub fn from_file(path: &Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), error })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { error, .. } => ConfigError::Parse { path: path.display().to_string(), error },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<RunConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            // toml's message spans several lines (a source excerpt): keep the first.
            error: e.message().lines().next().unwrap_or("invalid").to_string(),
        })
    }

    /// Checks the whole configuration; call after flags were applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
            if !KNOWN_SETUPS.contains(&s.as_str()) {
                return Err(ConfigError::UnknownSetup(s.clone()));
            }
            if s == "async-pooled" && self.stack == Stack::Study {
                return Err(ConfigError::PooledNeedsCurrent);
            }
        }
        for r in &self.routes {
            if !KNOWN_ROUTES.contains(&r.as_str()) {
                return Err(ConfigError::UnknownRoute(r.clone()));
            }
        }
        if let Some(&d) = self.delays_ms.iter().find(|&&d| d > MAX_DELAY_MS) {
            return Err(ConfigError::DelayTooLarge(d));
        }
        Ok(())
    }

    /// The cells in execution order: setup-major (one system-under-test start per setup), then
    /// route, delay and repetition.
    pub fn cells(&self) -> Vec<CellKey> {
        let mut out = Vec::new();
        for setup in &self.setups {
            for route in &self.routes {
                for &delay_ms in &self.delays_ms {
                    for rep in 1..=self.repeat {
                        out.push(CellKey { setup: setup.clone(), route: route.clone(), delay_ms, rep });
                    }
                }
            }
        }
        out
    }
}

/// Parses one delay in milliseconds; negatives, non-numbers and delays over the limit are errors.
pub fn parse_delay(s: &str) -> Result<u32, String> {
    let x = s.trim();
    let v = x.parse::<u32>().map_err(|_| {
        if x.starts_with('-') {
            format!("delay {x:?} is negative")
        } else {
            format!("delay {x:?} is not a whole number of milliseconds")
        }
    })?;
    if v > MAX_DELAY_MS {
        return Err(format!("delay {v} ms is over the limit of {MAX_DELAY_MS} ms"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn bad_configs_are_one_line_errors() {
        let e = RunConfig::from_toml("setups = [\"sync\"]\ncolour = \"blue\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("colour") && !e.contains('\n'), "{e}");
        let e = RunConfig::from_toml("delays_ms = [0, -100]").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        let c = RunConfig { setups: vec!["turbo".into()], ..RunConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::UnknownSetup(_))));
        let c = RunConfig { routes: vec!["io_delete".into()], ..RunConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::UnknownRoute(_))));
        let c = RunConfig { delays_ms: vec![70_000], ..RunConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::DelayTooLarge(_))));
        let c = RunConfig { setups: vec!["async-pooled".into()], stack: Stack::Study, ..RunConfig::default() };
        assert!(matches!(c.validate(), Err(ConfigError::PooledNeedsCurrent)));
        assert_eq!(parse_delay(" 100").unwrap(), 100);
        assert!(parse_delay("-5").unwrap_err().contains("negative"));
        assert!(parse_delay("fast").is_err());
        assert!(parse_delay("60001").is_err());
    }

    #[test]
    fn cells_are_setup_major() {
        let c = RunConfig { routes: vec!["io_read".into()], delays_ms: vec![0, 100], repeat: 2, ..RunConfig::default() };
        let cells = c.cells();
        assert_eq!(cells.len(), 3 * 2 * 2);
        assert_eq!(cells[0].stem(), "sync__io_read__0ms__r1");
        assert_eq!(cells[1].stem(), "sync__io_read__0ms__r2");
        assert_eq!(cells[4].setup, "async-limited");
    }
}

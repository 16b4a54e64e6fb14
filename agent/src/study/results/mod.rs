//! The results of a run on disk: one directory per run, one versioned JSON file per finished
//! cell (written atomically: temp file, fsync, rename), the Locust-compatible CSVs beside it, and
//! an index. A crash loses at most the cell in progress; `--resume` skips every cell whose file
//! exists and parses.
//!
//! The report reads only these files, so it can run on a results folder from another machine.
//! Nothing here talks to the system under test or the kernel.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::probe::aggregate::{summary::Summary, Quantiles};

/// Bump when a field changes meaning or disappears. 2: `load.max_srps` is Locust's chart figure
/// (it was the best fixed 5 s window, now `load.max_srps_5s_window`).
pub(crate) const RESULTS_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: not a results file of version {RESULTS_VERSION}: {error}")]
    Parse { path: String, error: String },
    #[error("{0} is not a results directory (no index.json)")]
    NotResults(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ResultsError + '_ {
    move |error| ResultsError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// One cell of the matrix: a setup, a route, an added delay, a repetition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellKey {
    pub setup: String,
    pub route: String,
    pub delay_ms: u32,
    /// 1-based repetition.
    pub rep: u32,
}

impl CellKey {
    /// File name stem, stable and sortable: `sync__io_read__100ms__r1`.
    pub fn stem(&self) -> String {
        format!(
            "{}__{}__{}ms__r{}",
            self.setup, self.route, self.delay_ms, self.rep
        )
    }
}

/// The injected delay of a cell: asked for, and measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DelayOutcome {
    pub requested_ms: f64,
    pub achieved_ms: Option<f64>,
    /// "none", "netem" or "nfqueue".
    pub backend: String,
}

/// One second of the load run (the study's supplementary charts are drawn from these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Second {
    pub t_s: f64,
    pub users: u64,
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// What the load generator saw in a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LoadOutcome {
    pub planned_s: f64,
    pub actual_s: f64,
    pub requests: u64,
    pub failures: u64,
    /// The study's "Total successes": requests - failures.
    pub total_successes: u64,
    /// The study's "Max sRPS": the largest point of Locust 2.13's report chart of
    /// (requests/s - failures/s) (`load::chart::max_srps`).
    pub max_srps: f64,
    /// The best fixed 5-second window of (requests - failures) / 5 (not the study's figure;
    /// absent from cells recorded before it existed).
    #[serde(default)]
    pub max_srps_5s_window: f64,
    /// Failure counts by kind ("http_500", "reset", "refused", "closed", "timeout", ...).
    pub failures_by_kind: BTreeMap<String, u64>,
    pub latency: Quantiles,
    pub series: Vec<Second>,
    /// Requests cut off by the end of the load (not counted above; the server may still have
    /// served them).
    #[serde(default)]
    pub in_flight_at_end: u64,
}

/// The unmeasured warm-up before a cell: its fresh server's first requests, on the cell's route
/// with no added delay. Counted in no figure of the cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Warmup {
    pub planned_s: f64,
    pub users: u32,
    /// Requests the warm-up completed, and those of them that failed.
    pub requests: u64,
    pub failures: u64,
    /// Requests cut off by the warm-up's end (the server may still have served them).
    pub in_flight_at_end: u64,
    /// Posts the reset after the warm-up deleted: the rows the warm-up added (io_create).
    pub posts_removed: u64,
}

/// One finished cell, as stored in `cells/<stem>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CellResult {
    pub version: u32,
    pub key: CellKey,
    /// Unix time the load started.
    pub started_unix_s: f64,
    /// The fresh server's processes that served the cell (gunicorn's master first, then its
    /// workers); empty in runs from before a server was started for every cell.
    #[serde(default)]
    pub server_pids: Vec<u32>,
    /// The warm-up before the cell; None when there was none.
    #[serde(default)]
    pub warmup: Option<Warmup>,
    /// System-under-test back end ("netns", "docker") and stack ("study", "current").
    pub backend: String,
    pub stack: String,
    pub profile: String,
    pub delay: DelayOutcome,
    pub load: LoadOutcome,
    /// The eBPF view of the server during the load (None when probes were off).
    pub probes: Option<Summary>,
    /// Connections PostgreSQL refused the server during the cell for want of a slot ("too many
    /// clients", "remaining connection slots are reserved"), counted in its log (refusals of the
    /// database host's own clients, the health check and the agent's psql, left out); None when
    /// not measured.
    #[serde(default)]
    pub db_refusals: Option<u64>,
    /// What the system under test ran with, measured after its last start (None: not recorded).
    #[serde(default)]
    pub system: Option<crate::study::sut::SystemRecord>,
    /// Anything worth knowing when reading the numbers (drain timeouts, restarts, ...).
    pub notes: Vec<String>,
    /// Why the cell's numbers do not count: the system under test died during it. The report
    /// lists such cells and leaves them out of its tables and statistics; `--resume` runs them
    /// again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// `index.json`: what the run was, and which cells it has.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Index {
    pub version: u32,
    pub created_unix_s: f64,
    /// The effective configuration of the run, as given (for the report's header), with the
    /// design: `order`, the `seed` the random order was drawn from (also when none was given),
    /// and `warmup_s`.
    pub config: serde_json::Value,
    /// Cells in the order the run executes them (with a random order, block `rep` after block
    /// `rep - 1`).
    pub planned: Vec<CellKey>,
}

/// A results directory.
#[derive(Debug, Clone)]
pub(crate) struct ResultsDir {
    pub root: PathBuf,
}

impl ResultsDir {
    /// Creates `root` (and `cells/`) and writes the index, unless it exists (resume).
    pub fn create(root: &Path, index: &Index) -> Result<ResultsDir, ResultsError> {
        fs::create_dir_all(root.join("cells")).map_err(io(root))?;
        let dir = ResultsDir {
            root: root.to_path_buf(),
        };
        let path = dir.root.join("index.json");
        if !path.exists() {
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(index).expect("index serialises"),
            )?;
        }
        Ok(dir)
    }

    pub fn open(root: &Path) -> Result<ResultsDir, ResultsError> {
        if !root.join("index.json").is_file() {
            return Err(ResultsError::NotResults(root.display().to_string()));
        }
        Ok(ResultsDir {
            root: root.to_path_buf(),
        })
    }

    pub fn index(&self) -> Result<Index, ResultsError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| ResultsError::Parse {
            path: path.display().to_string(),
            error: e.to_string(),
        })
    }

    pub(crate) fn cell_path(&self, key: &CellKey) -> PathBuf {
        self.root.join("cells").join(format!("{}.json", key.stem()))
    }

    /// Whether a cell finished: its file exists and parses.
    /// Whether the cell has a record that counts (a failed cell is run again on `--resume`).
    pub(crate) fn is_done(&self, key: &CellKey) -> bool {
        self.read_cell(key).is_ok_and(|c| c.failed.is_none())
    }

    pub(crate) fn write_cell(&self, cell: &CellResult) -> Result<PathBuf, ResultsError> {
        let path = self.cell_path(&cell.key);
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(cell).expect("cell serialises"),
        )?;
        Ok(path)
    }

    pub(crate) fn read_cell(&self, key: &CellKey) -> Result<CellResult, ResultsError> {
        read_cell_file(&self.cell_path(key))
    }

    /// Every finished cell, sorted by key.
    pub fn cells(&self) -> Result<Vec<CellResult>, ResultsError> {
        let dir = self.root.join("cells");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_cell_file(&path)?);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn read_cell_file(path: &Path) -> Result<CellResult, ResultsError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let cell: CellResult = serde_json::from_slice(&bytes).map_err(|e| ResultsError::Parse {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    if cell.version != RESULTS_VERSION {
        return Err(ResultsError::Parse {
            path: path.display().to_string(),
            error: format!("version {}", cell.version),
        });
    }
    Ok(cell)
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ResultsError> {
    crate::files::write_atomic(path, bytes).map_err(io(path))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A results directory at `root` with an empty index, as a run starts one.
    pub(crate) fn empty_results_dir(root: &Path) -> ResultsDir {
        let index = Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config: serde_json::json!({}),
            planned: vec![],
        };
        ResultsDir::create(root, &index).unwrap()
    }

    pub(crate) fn quantiles(p50: f64) -> Quantiles {
        Quantiles {
            count: 10,
            p50_ms: p50,
            p90_ms: p50 * 1.5,
            p99_ms: p50 * 2.0,
            max_ms: p50 * 3.0,
            mean_ms: p50,
        }
    }

    pub fn cell(setup: &str, route: &str, delay_ms: u32, rep: u32, successes: u64) -> CellResult {
        CellResult {
            version: RESULTS_VERSION,
            key: CellKey {
                setup: setup.into(),
                route: route.into(),
                delay_ms,
                rep,
            },
            started_unix_s: 0.0,
            server_pids: vec![],
            warmup: None,
            backend: "netns".into(),
            stack: "current".into(),
            profile: "quick".into(),
            delay: DelayOutcome {
                requested_ms: delay_ms as f64,
                achieved_ms: Some(delay_ms as f64 + 0.1),
                backend: "nfqueue".into(),
            },
            load: LoadOutcome {
                planned_s: 30.0,
                actual_s: 30.0,
                requests: successes + 2,
                failures: 2,
                total_successes: successes,
                max_srps: successes as f64 / 20.0,
                max_srps_5s_window: successes as f64 / 20.0,
                failures_by_kind: [("http_500".to_string(), 2u64)].into_iter().collect(),
                latency: quantiles(10.0),
                series: (0..30)
                    .map(|t| Second {
                        t_s: t as f64 + 1.0,
                        users: (t * 17).min(500),
                        requests: successes / 30,
                        successes: successes / 30,
                        failures: 0,
                        p50_ms: Some(10.0),
                        p95_ms: Some(20.0),
                    })
                    .collect(),
                in_flight_at_end: 0,
            },
            probes: None,
            db_refusals: None,
            system: None,
            notes: vec![],
            failed: None,
        }
    }

    #[test]
    fn cells_round_trip_and_resume_sees_them() {
        let root = std::env::temp_dir().join(format!("awl-results-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = empty_results_dir(&root);
        let c = cell("sync", "io_read", 100, 1, 120);
        assert!(!dir.is_done(&c.key));
        dir.write_cell(&c).unwrap();
        assert!(dir.is_done(&c.key));
        let back = dir.read_cell(&c.key).unwrap();
        assert_eq!(back.load, c.load);
        assert_eq!(dir.cells().unwrap().len(), 1);
        // A half-written file (a crash before the rename) is not a finished cell.
        fs::write(
            dir.cell_path(&CellKey {
                rep: 2,
                ..c.key.clone()
            }),
            b"{\"version\":1,",
        )
        .unwrap();
        assert!(!dir.is_done(&CellKey {
            rep: 2,
            ..c.key.clone()
        }));
        // No temp files are left by atomic writes.
        let leftovers = fs::read_dir(root.join("cells"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .to_string_lossy()
                    .contains(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
        assert!(matches!(
            ResultsDir::open(&root.join("nope")),
            Err(ResultsError::NotResults(_))
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}

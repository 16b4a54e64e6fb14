//! `report.md` and `report.html` from a results directory: the study's tables in its layout, our
//! numbers beside its published ones, the eBPF explanation of every cell, generated findings,
//! statistics over repetitions, and SVG figures.
//!
//! It reads only the results files (so it runs on a folder from another machine) and builds one
//! model that both outputs render; it never recomputes what the run measured.

mod findings;
mod html;
mod markdown;
pub mod published;
pub mod stats;
pub mod svg;
pub mod system;
mod verdict;

use findings::*;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use crate::{
    load::template::Route,
    probe::aggregate::summary::Summary,
    study::results::{CellResult, ResultsDir, ResultsError},
    study::sut::Setup,
};

/// Setups in the study's column order: (name, title).
pub fn setups() -> impl Iterator<Item = (&'static str, &'static str)> {
    Setup::ALL.into_iter().map(|s| (s.name(), s.title()))
}

fn setup_name(s: &str) -> &str {
    setups().find(|(k, _)| *k == s).map_or(s, |(_, n)| n)
}

/// The study's caption of a route's table ("Table 2: io_read"), in its table order.
fn route_caption(route: &str) -> String {
    match Route::ALL.iter().position(|r| r.name() == route) {
        Some(i) => format!("Table {}: {route}", i + 1),
        None => route.to_string(),
    }
}

/// A table both renderers draw.
#[derive(Debug, Clone)]
pub struct Table {
    pub caption: String,
    pub head: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// The whole report, built once.
pub(crate) struct Report {
    pub header: Vec<String>,
    pub study_tables: Vec<Table>,
    pub beside: Vec<Table>,
    pub explain: Vec<Table>,
    pub findings: Vec<(String, Vec<String>)>,
    /// The study's open questions, each answered from the cells or told what is missing.
    pub questions: Vec<(String, Vec<String>)>,
    pub statistics: Vec<String>,
    cells: Vec<CellResult>,
}

/// The cells of one (setup, route, delay), over repetitions.
struct Group<'a> {
    cells: Vec<&'a CellResult>,
}

impl Group<'_> {
    fn values(&self, f: impl Fn(&CellResult) -> Option<f64>) -> Vec<f64> {
        self.cells
            .iter()
            .filter_map(|c| f(c))
            .filter(|v| v.is_finite())
            .collect()
    }
    fn mean(&self, f: impl Fn(&CellResult) -> Option<f64>) -> Option<f64> {
        stats::mean_ci(&self.values(f)).map(|m| m.mean)
    }
    fn fmt(&self, f: impl Fn(&CellResult) -> Option<f64>, decimals: usize) -> String {
        match stats::mean_ci(&self.values(f)) {
            None => "-".into(),
            Some(m) if m.n >= 3 => format!(
                "{:.*} ± {:.*}",
                decimals,
                m.mean,
                decimals,
                m.half_width.unwrap_or(0.0)
            ),
            Some(m) => format!("{:.*}", decimals, m.mean),
        }
    }
}

fn successes(c: &CellResult) -> Option<f64> {
    Some(c.load.total_successes as f64)
}
fn max_srps(c: &CellResult) -> Option<f64> {
    Some(c.load.max_srps)
}

impl Report {
    pub fn build(dir: &ResultsDir) -> Result<Report, ResultsError> {
        let index = dir.index()?;
        // A cell during which the system under test died is listed, not counted.
        let (failed, cells): (Vec<CellResult>, Vec<CellResult>) =
            dir.cells()?.into_iter().partition(|c| c.failed.is_some());
        let mut header = vec![format!(
            "{} of {} planned cells finished.",
            cells.len(),
            index.planned.len()
        )];
        header.extend(failed.iter().map(|c| {
            format!(
                "Cell {} failed: {}; it is left out of the tables and statistics (`--resume` runs it again).",
                c.key.stem(),
                c.failed.as_deref().unwrap_or("")
            )
        }));
        let backends: BTreeSet<String> = cells
            .iter()
            .map(|c| {
                format!(
                    "{} back end, {} stack, {} profile",
                    c.backend, c.stack, c.profile
                )
            })
            .collect();
        header.extend(
            backends
                .into_iter()
                .map(|b| format!("System under test: {b}.")),
        );
        header.extend(system::header_lines(&cells));
        let delays: BTreeSet<u32> = cells.iter().map(|c| c.key.delay_ms).collect();
        let achieved: Vec<String> = delays
            .iter()
            .map(|&d| {
                let v: Vec<f64> = cells
                    .iter()
                    .filter(|c| c.key.delay_ms == d)
                    .filter_map(|c| c.delay.achieved_ms)
                    .collect();
                let backend: BTreeSet<&str> = cells
                    .iter()
                    .filter(|c| c.key.delay_ms == d)
                    .map(|c| c.delay.backend.as_str())
                    .collect();
                match stats::mean_ci(&v) {
                    Some(m) => format!(
                        "{d} ms requested: {:.2} ms achieved ({})",
                        m.mean,
                        backend.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                    None => format!("{d} ms requested: not measured"),
                }
            })
            .collect();
        header.push(format!("Added delay: {}.", achieved.join("; ")));

        let mut groups: BTreeMap<(String, String, u32), Group> = BTreeMap::new();
        for c in &cells {
            groups
                .entry((c.key.setup.clone(), c.key.route.clone(), c.key.delay_ms))
                .or_insert_with(|| Group { cells: vec![] })
                .cells
                .push(c);
        }
        let setups: Vec<&str> = setups()
            .map(|s| s.0)
            .filter(|s| cells.iter().any(|c| c.key.setup == *s))
            .collect();
        // The study's routes in its order, then any other in the order met.
        let mut routes: Vec<&str> = Route::ALL
            .iter()
            .map(|r| r.name())
            .filter(|r| cells.iter().any(|c| c.key.route == *r))
            .collect();
        for c in &cells {
            if !routes.contains(&c.key.route.as_str()) {
                routes.push(c.key.route.as_str());
            }
        }
        let g = |s: &str, r: &str, d: u32| groups.get(&(s.to_string(), r.to_string(), d));

        let mut study_tables = Vec::new();
        let mut beside = Vec::new();
        let mut explain = Vec::new();
        let mut findings = Vec::new();
        for &route in &routes {
            let caption = route_caption(route);
            let mut head = vec!["added latency".to_string()];
            head.extend(setups.iter().map(|s| setup_name(s).to_string()));
            let rows = delays
                .iter()
                .map(|&d| {
                    let mut row = vec![format!("{d} ms")];
                    for &s in &setups {
                        row.push(g(s, route, d).map_or("-".into(), |g| {
                            format!("{} / {}", g.fmt(successes, 0), g.fmt(max_srps, 1))
                        }));
                    }
                    row
                })
                .collect();
            study_tables.push(Table {
                caption: format!("{caption} (total successes / max sRPS)"),
                head,
                rows,
            });

            let mut head = vec![
                "added latency".to_string(),
                "setup".into(),
                "successes (ours)".into(),
                "successes (study)".into(),
                "max sRPS (ours)".into(),
                "max sRPS (study)".into(),
                "successes vs Sync (ours)".into(),
                "successes vs Sync (study)".into(),
            ];
            head.truncate(8);
            // A quick run's totals and peaks are not the study's 180 s ones; its ratios are.
            let not_comparable =
                published::not_comparable(cells.iter().filter(|c| c.key.route == route));
            let study_abs =
                |p: Option<(u64, f64)>, f: fn((u64, f64)) -> String| match (p, &not_comparable) {
                    (None, _) => "-".to_string(),
                    (Some(_), Some(why)) => why.clone(),
                    (Some(p), None) => f(p),
                };
            let mut rows = Vec::new();
            for &d in &delays {
                let sync_ours = g("sync", route, d).and_then(|g| g.mean(successes));
                let sync_pub = published::published(route, d, "sync").map(|p| p.0 as f64);
                for &s in &setups {
                    let Some(gr) = g(s, route, d) else { continue };
                    let ours = gr.mean(successes);
                    let pubd = published::published(route, d, s);
                    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                        (Some(a), Some(b)) if b > 0.0 && s != "sync" => format!("{:.2}x", a / b),
                        _ => "-".into(),
                    };
                    rows.push(vec![
                        format!("{d} ms"),
                        setup_name(s).into(),
                        gr.fmt(successes, 0),
                        study_abs(pubd, |p| p.0.to_string()),
                        gr.fmt(max_srps, 1),
                        study_abs(pubd, |p| format!("{:.1}", p.1)),
                        ratio(ours, sync_ours),
                        ratio(pubd.map(|p| p.0 as f64), sync_pub),
                    ]);
                }
            }
            let caption = match &not_comparable {
                None => format!("{route}: ours beside the study's published numbers (ratios: async / sync successes)"),
                Some(why) => format!("{route}: ours beside the study's published numbers (ratios: async / sync successes; absolute numbers {why}: only the ratios compare)"),
            };
            beside.push(Table {
                caption,
                head,
                rows,
            });

            let head = [
                "setup",
                "added latency",
                "server time p50 (ms)",
                "db round trips / request",
                "db connects / request",
                "db round trip p50 / p99 (ms)",
                "db connect p50 (ms)",
                "db wait share of server time",
                "serving threads: on-CPU share",
                "server CPU s / wall s",
                "queueing: client p50 - server p50 (ms)",
                "failures by kind",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut rows = Vec::new();
            for &s in &setups {
                for &d in &delays {
                    let Some(gr) = g(s, route, d) else { continue };
                    let p = |f: fn(&crate::probe::aggregate::summary::Summary) -> Option<f64>| {
                        move |c: &CellResult| c.probes.as_ref().and_then(f)
                    };
                    let kinds = kinds_text(gr);
                    rows.push(vec![
                        setup_name(s).into(),
                        format!("{d} ms"),
                        gr.fmt(
                            p(|x| (x.server_time.count > 0).then_some(x.server_time.p50_ms)),
                            1,
                        ),
                        gr.fmt(p(|x| x.ratios.db_round_trips_per_request), 2),
                        gr.fmt(probe(connects_per_request), 2),
                        format!(
                            "{} / {}",
                            gr.fmt(
                                p(|x| (x.db.round_trip.count > 0)
                                    .then_some(x.db.round_trip.p50_ms)),
                                1
                            ),
                            gr.fmt(
                                p(|x| (x.db.round_trip.count > 0)
                                    .then_some(x.db.round_trip.p99_ms)),
                                1
                            )
                        ),
                        gr.fmt(
                            p(|x| (x.db.connect.count > 0).then_some(x.db.connect.p50_ms)),
                            1,
                        ),
                        gr.fmt(p(|x| x.ratios.db_wait_share_of_server_time), 2),
                        gr.fmt(p(serving_on_share), 2),
                        gr.fmt(p(|x| x.cpu.cpu_s_per_wall_s), 2),
                        gr.fmt(
                            |c| {
                                c.probes
                                    .as_ref()
                                    .filter(|x| x.server_time.count > 0)
                                    .map(|x| c.load.latency.p50_ms - x.server_time.p50_ms)
                            },
                            1,
                        ),
                        kinds,
                    ]);
                }
            }
            explain.push(Table {
                caption: format!("{route}: why (the eBPF view, means over repetitions)"),
                head,
                rows,
            });
            findings.push((
                route.to_string(),
                route_findings(route, &setups, &delays, &g),
            ));
        }

        let questions = open_questions(&delays, &g);
        let statistics = statistics(&cells, &setups, &routes, &delays);
        Ok(Report {
            header,
            study_tables,
            beside,
            explain,
            findings,
            questions,
            statistics,
            cells,
        })
    }
}

/// Writes `report.md` and `report.html` into the results directory; returns their paths.
pub fn write(root: &Path) -> Result<(PathBuf, PathBuf), ResultsError> {
    let dir = ResultsDir::open(root)?;
    let report = Report::build(&dir)?;
    let md = root.join("report.md");
    let html = root.join("report.html");
    crate::study::results::write_atomic(&md, report.markdown().as_bytes())?;
    crate::study::results::write_atomic(&html, report.html().as_bytes())?;
    Ok((md, html))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::results::tests::{cell, empty_results_dir};

    fn results(reps: u32) -> (PathBuf, ResultsDir) {
        let root = std::env::temp_dir().join(format!("awl-report-{}-{reps}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = empty_results_dir(&root);
        for rep in 1..=reps {
            for (setup, k) in [("sync", 1u64), ("async-unlimited", 20)] {
                for route in ["cpu", "io_read"] {
                    for delay in [0, 100] {
                        // An interaction by construction: async's advantage only on io with delay.
                        let boost = if route == "io_read" && delay == 100 {
                            k
                        } else {
                            1
                        };
                        dir.write_cell(&cell(
                            setup,
                            route,
                            delay,
                            rep,
                            100 * boost + rep as u64 * 3,
                        ))
                        .unwrap();
                    }
                }
            }
        }
        (root, dir)
    }

    #[test]
    fn tables_in_the_study_layout_with_published_numbers_beside() {
        let (root, dir) = results(1);
        let r = Report::build(&dir).unwrap();
        assert_eq!(r.study_tables.len(), 2);
        let t = &r.study_tables[1];
        assert!(t.caption.starts_with("Table 2: io_read"));
        assert_eq!(t.head, vec!["added latency", "Sync", "Async Unlimited"]);
        assert_eq!(t.rows[1], vec!["100 ms", "103 / 5.2", "2003 / 100.2"]);
        let b = &r.beside[1];
        let row = b
            .rows
            .iter()
            .find(|r| r[0] == "100 ms" && r[1] == "Async Unlimited")
            .unwrap();
        // Quick cells (30 s): the study's absolute numbers are labelled, its ratio still shown.
        assert_eq!(row[3], "not comparable (30 s vs 180 s)");
        assert_eq!(row[5], "not comparable (30 s vs 180 s)");
        assert_eq!(row[6], "19.45x");
        assert_eq!(row[7], "26.57x", "the study's 5313 / 200");
        assert!(
            b.caption.contains("only the ratios compare"),
            "{}",
            b.caption
        );
        let md = r.markdown();
        assert!(md.contains("Table 1: cpu") && md.contains("Table 2: io_read"));
        // One repetition: the note says what is missing, and the verdict is not computed.
        assert!(md.contains("With fewer than three repetitions"), "{md}");
        assert!(md.contains(": not computed: "), "{md}");
        let html = r.html();
        assert_eq!(
            html.matches("<svg").count(),
            2 + 1 + 8 * 3,
            "across-cell and per-cell figures"
        );
        assert!(
            !html.contains("http://")
                || html.matches("http://").count()
                    == html.matches("http://www.w3.org/2000/svg").count(),
            "no external resources"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn cells_of_the_studys_profile_sit_beside_its_published_numbers() {
        let root =
            std::env::temp_dir().join(format!("awl-report-{}-study-profile", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = empty_results_dir(&root);
        for setup in ["sync", "async-unlimited"] {
            let mut c = cell(setup, "io_read", 100, 1, 1000);
            c.profile = "study".into();
            c.load.planned_s = 180.0;
            dir.write_cell(&c).unwrap();
        }
        let r = Report::build(&dir).unwrap();
        let row = r.beside[0]
            .rows
            .iter()
            .find(|r| r[1] == "Async Unlimited")
            .unwrap()
            .clone();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            (row[3].as_str(), row[5].as_str()),
            ("5313", "36.0"),
            "{row:?}"
        );
        assert!(
            !r.beside[0].caption.contains("not comparable"),
            "{}",
            r.beside[0].caption
        );
    }

    #[test]
    fn with_three_repetitions_the_interaction_is_tested() {
        let (root, dir) = results(3);
        let r = Report::build(&dir).unwrap();
        let s = r.statistics.join("\n");
        // 2 setups x 2 routes x 2 delays, 3 repetitions as blocks: F(1, (8 - 1) x (3 - 1) = 14).
        assert!(
            s.contains("F(1, 14)") && s.contains("the repetition as a block"),
            "{s}"
        );
        // Regression: a significant F test without direction was printed as "supported". This run
        // has no 200 ms cell, which the pre-specified contrast needs (verdict.rs tests the rest).
        assert!(
            s.contains("Verdict: cannot be computed: no cell ran at 200 ms"),
            "{s}"
        );
        assert!(!s.contains("supported"), "{s}");
        assert!(r.study_tables[1].rows[1][1].contains('±'));
        std::fs::remove_dir_all(root).unwrap();
    }

    /// A probe summary with the given means: `requests` over 30 s, server time, round trips and
    /// connects per request, database wait per request, and CPU.
    fn summary(
        requests: u64,
        server_ms: f64,
        rt: f64,
        connects: f64,
        wait_ms: f64,
        serving: (u64, f64, f64),
        on_cpu_s: f64,
    ) -> Summary {
        use crate::probe::aggregate::{summary::*, Quantiles, Ratios};
        let q = |n: u64, ms: f64| Quantiles {
            count: n,
            p50_ms: ms,
            p90_ms: ms,
            p99_ms: ms,
            max_ms: ms,
            mean_ms: ms,
        };
        Summary {
            kind: "summary".into(),
            version: SUMMARY_VERSION,
            target: "t".into(),
            netns_inum: 1,
            duration_s: 30.0,
            requests,
            requests_per_s: requests as f64 / 30.0,
            status: BTreeMap::new(),
            paths: vec![],
            requests_by_pid: BTreeMap::new(),
            server_time: q(requests, server_ms),
            db: DbSummary {
                round_trips: (rt * requests as f64) as u64,
                round_trip: q(1, 100.0),
                connects: (connects * requests as f64) as u64,
                connect: q(1, 100.0),
                connect_failures: 0,
                conns_opened: 0,
                conns_closed: 0,
            },
            ratios: Ratios {
                db_round_trips_per_request: Some(rt),
                db_wait_ms_per_request: Some(wait_ms),
                db_connects_per_request: Some(connects),
                // The connect quantiles above: 100 ms each.
                db_connect_ms_per_request: Some(connects * 100.0),
                db_wait_share_of_server_time: Some(wait_ms / server_ms),
                attributed_share: None,
            },
            requests_in_server_at_end: None,
            http_conns_opened: 0,
            http_conns_closed: 0,
            cpu: CpuSummary {
                on_cpu_s,
                off_cpu_s: 100.0,
                off_cpu_share: Some(0.99),
                threads_seen: 12,
                serving_threads: serving.0,
                serving_on_cpu_s: serving.1,
                serving_off_cpu_s: serving.2,
                cpu_s_per_wall_s: Some(on_cpu_s / 30.0),
                threads: vec![],
            },
            lost: Lost::default(),
            probes: vec![],
        }
    }

    fn findings_of(cells: Vec<CellResult>) -> (Vec<String>, Vec<(String, Vec<String>)>) {
        let root = std::env::temp_dir().join(format!(
            "awl-report-findings-{}-{}",
            std::process::id(),
            cells.len()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let dir = empty_results_dir(&root);
        for c in &cells {
            dir.write_cell(c).unwrap();
        }
        let r = Report::build(&dir).unwrap();
        std::fs::remove_dir_all(root).unwrap();
        (
            r.findings.into_iter().flat_map(|(_, l)| l).collect(),
            r.questions,
        )
    }

    /// `s` with the share of round trips the kernel pinned to requests and the requests still
    /// in the server at the end.
    fn pinned(mut s: Summary, share: f64, inside: u64) -> Summary {
        s.ratios.attributed_share = Some(share);
        s.requests_in_server_at_end = Some(inside);
        s
    }

    fn with(mut c: CellResult, probes: Summary, refusals: Option<u64>) -> CellResult {
        c.probes = Some(probes);
        c.db_refusals = refusals;
        c
    }

    /// A cell during which the system under test died is named in the header with the reason,
    /// and its numbers (999 successes here) appear nowhere else.
    #[test]
    fn failed_cells_are_listed_and_left_out() {
        let root = std::env::temp_dir().join(format!("awl-report-failed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = empty_results_dir(&root);
        let mut dead = cell("sync", "io_read", 100, 1, 999);
        dead.failed = Some("PostgreSQL (pid 7) died during the cell".into());
        dir.write_cell(&cell("sync", "io_read", 0, 1, 50)).unwrap();
        dir.write_cell(&dead).unwrap();
        assert!(!dir.is_done(&dead.key), "--resume runs a failed cell again");
        let r = Report::build(&dir).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(
            r.header.iter().any(|l| l
                == "Cell sync__io_read__100ms__r1 failed: PostgreSQL (pid 7) died during the cell; it is left out of the tables and statistics (`--resume` runs it again)."),
            "{:?}",
            r.header
        );
        let md = r.markdown();
        assert!(!md.contains("999"), "{md}");
    }

    /// Regression: "bound by round trips" was printed for any round trip and any delay, and the
    /// connection-limit sentence for any HTTP 500 of Async Limited, without evidence.
    #[test]
    fn findings_appear_only_with_their_evidence() {
        // 410 ms of round trips + 1 connect of 100 ms = 510 ms waited per request (measured):
        // bound when the mean server time is 600 ms (510 >= 300), not when it is 2000 ms
        // (510 < 1000).
        // Sync pinned every round trip; Async Limited's io_read none, with 120 requests still
        // in the server at the end.
        let cells = vec![
            with(
                cell("sync", "io_read", 100, 1, 50),
                pinned(
                    summary(50, 600.0, 4.0, 1.0, 410.0, (1, 3.0, 27.0), 3.5),
                    1.0,
                    1,
                ),
                None,
            ),
            with(
                cell("sync", "io_create", 100, 1, 50),
                summary(50, 2000.0, 4.0, 1.0, 410.0, (1, 3.0, 27.0), 3.5),
                None,
            ),
            with(
                cell("async-limited", "io_read", 100, 1, 900),
                pinned(
                    summary(900, 900.0, 4.0, 1.0, 450.0, (1, 12.0, 18.0), 15.0),
                    0.0,
                    120,
                ),
                Some(37),
            ),
            with(
                cell("async-limited", "io_create", 100, 1, 900),
                summary(900, 900.0, 4.0, 1.0, 450.0, (1, 12.0, 18.0), 15.0),
                None,
            ),
        ];
        let (f, _) = findings_of(cells);
        let all = f.join("\n");
        let bound: Vec<&String> = f
            .iter()
            .filter(|l| l.contains("bound by round trips"))
            .collect();
        assert_eq!(bound.len(), 1, "{all}");
        assert!(
            bound[0].starts_with("Sync io_read at 100 ms")
                && bound[0].contains("waited 510 ms on them of the 600 ms"),
            "{all}"
        );
        assert!(
            f.iter()
                .any(|l| l.starts_with("Sync io_create at 100 ms: mean server time 2000 ms")),
            "{all}"
        );
        // The per-request caveat only where round trips went unpinned with requests inside.
        let upper: Vec<&String> = f.iter().filter(|l| l.contains("upper bounds")).collect();
        assert_eq!(upper.len(), 1, "{all}");
        assert!(
            upper[0].starts_with("Async Limited io_read:")
                && upper[0].ends_with("120 at 100 ms (against 900 finished)."),
            "{all}"
        );
        // The connection limit only where PostgreSQL's log counted refusals, with the count.
        let limit: Vec<&String> = f
            .iter()
            .filter(|l| l.contains("connection limit"))
            .collect();
        assert_eq!(limit.len(), 1, "{all}");
        assert!(
            limit[0].starts_with("Async Limited at 100 ms")
                && limit[0].contains("refused 37 connections"),
            "{all}"
        );
        assert!(
            f.iter()
                .filter(|l| l.starts_with("Async Limited at"))
                .all(|l| l.contains("most failures were http_500 (2)")),
            "{all}"
        );
        // CPU: the serving thread's share and the server's CPU per second, no diluted off-CPU share.
        assert!(!all.contains("off CPU"), "{all}");
        assert!(all.contains("the 1 thread(s) that read its requests were on CPU 40 % of the time; the server used 0.50 CPU seconds per second"), "{all}");
        // Zero refusals counted: said, and no connection-limit claim.
        let (f, _) = findings_of(vec![
            with(
                cell("sync", "io_read", 0, 1, 50),
                summary(50, 10.0, 4.0, 1.0, 4.0, (1, 1.0, 1.0), 1.0),
                None,
            ),
            with(
                cell("async-limited", "io_read", 0, 1, 60),
                summary(60, 10.0, 4.0, 1.0, 4.0, (1, 1.0, 1.0), 1.0),
                Some(0),
            ),
        ]);
        let all = f.join("\n");
        assert!(
            all.contains("PostgreSQL refused no connection") && !all.contains("connection limit"),
            "{all}"
        );
        assert!(
            !all.contains("bound by round trips"),
            "no delay, no claim: {all}"
        );
    }

    /// The open questions: a measured decomposition where the cells exist, and what is missing
    /// where they do not.
    #[test]
    fn open_questions_are_answered_from_the_cells_or_say_what_is_missing() {
        let (_, q) = findings_of(vec![with(
            cell("sync", "io_read", 0, 1, 50),
            summary(50, 10.0, 4.0, 1.0, 4.0, (1, 1.0, 1.0), 1.0),
            None,
        )]);
        assert_eq!(q.len(), 2);
        assert!(
            q[0].1[0].starts_with("Not answered: needs cpu cells"),
            "{q:?}"
        );
        assert!(
            q[1].1[0].starts_with("Not answered: needs Async Limited io_create"),
            "{q:?}"
        );

        let mut cells = Vec::new();
        for rep in 1..=3 {
            // cpu: no database connection in either setup, same successes up to noise.
            cells.push(with(
                cell("async-unlimited", "cpu", 0, rep, 90 + rep as u64),
                summary(90, 700.0, 0.0, 0.0, 0.0, (1, 27.0, 3.0), 27.0),
                Some(0),
            ));
            cells.push(with(
                cell("async-limited", "cpu", 0, rep, 91 + rep as u64),
                summary(90, 700.0, 0.0, 0.0, 0.0, (1, 27.0, 3.0), 27.0),
                Some(0),
            ));
        }
        // io_create: 1000 requests in 30 s; at 0 ms 10 ms in the server (4 wait, 1 connect, 3 CPU),
        // at 200 ms 2000 ms (1000 wait, 200 connect, 3 CPU).
        cells.push(with(
            cell("async-limited", "io_create", 0, 1, 5000),
            summary(1000, 10.0, 4.0, 0.01, 4.0, (1, 5.0, 25.0), 3.0),
            Some(0),
        ));
        cells.push(with(
            cell("async-limited", "io_create", 200, 1, 800),
            pinned(
                summary(1000, 2000.0, 5.0, 2.0, 1000.0, (1, 5.0, 25.0), 3.0),
                0.0,
                300,
            ),
            Some(0),
        ));
        let (_, q) = findings_of(cells);
        let cpu = q[0].1.join("\n");
        assert!(
            cpu.contains("opened no database connection in either setup"),
            "{cpu}"
        );
        assert!(cpu.contains("intervals overlap"), "{cpu}");
        let io = q[1].1.join("\n");
        // Connect time per request: connects/request x mean connect time (100 ms in `summary`).
        assert!(io.contains("At 200 ms: 800 successes; failures http_500: 2; PostgreSQL refusals 0; mean server time 2000 ms = database wait 1000 ms (5.0 round trips) + connecting 200 ms (2.0 connects) + server CPU 3 ms + waiting in the server 797 ms (database wait and connecting are upper bounds: they count the work of the 300 requests still in the server at the end too); server CPU"), "{io}");
        // Only where round trips went unpinned (the 0 ms cell says nothing of it).
        assert_eq!(io.matches("upper bounds").count(), 1, "{io}");
        assert!(io.contains("From 0 to 200 ms its successes went from 5000 to 800; its mean server time grew by 1990 ms: database wait +996 ms, connecting +199 ms, server CPU +0 ms, waiting in the server +795 ms."), "{io}");
    }
}

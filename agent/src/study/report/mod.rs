//! `report.md` and `report.html` from a results directory: the study's tables in its layout, our
//! numbers beside its published ones, the eBPF explanation of every cell, generated findings,
//! statistics over repetitions, and SVG figures.
//!
//! It reads only the results files (so it runs on a folder from another machine) and builds one
//! model that both outputs render; it never recomputes what the run measured.

pub mod published;
pub mod stats;
pub mod svg;
pub mod system;
mod verdict;

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
pub struct Report {
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
        let cells = dir.cells()?;
        let mut header = vec![format!(
            "{} of {} planned cells finished.",
            cells.len(),
            index.planned.len()
        )];
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
                        gr.fmt(probe(|x| per_request(x, x.db.connects as f64)), 2),
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

    pub fn markdown(&self) -> String {
        let mut s = String::from("# awaitlab report: sync vs async Django under added latency\n\n");
        for h in &self.header {
            let _ = writeln!(s, "- {h}");
        }
        s.push_str("\n## The study's tables\n\nCells: total successes / max sRPS (mean ± 95 % CI half-width with three or more repetitions).\n\n");
        for t in &self.study_tables {
            md_table(&mut s, t);
        }
        s.push_str("## Beside the published numbers\n\n");
        for t in &self.beside {
            md_table(&mut s, t);
        }
        s.push_str("## Why: what the probes saw\n\n");
        for t in &self.explain {
            md_table(&mut s, t);
        }
        md_lists(&mut s, "Findings", &self.findings);
        md_lists(&mut s, "The study's open questions", &self.questions);
        s.push_str("## Statistics\n\n");
        for l in &self.statistics {
            let _ = writeln!(s, "- {l}");
        }
        s
    }

    pub fn html(&self) -> String {
        let mut s = String::from(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>awaitlab report</title><style>\
             body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
             table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
             th{background:#f4f4f4}caption{text-align:left;font-weight:bold;padding:4px 0}\
             .figs{display:flex;flex-wrap:wrap;gap:8px}.cell{border-top:1px solid #ddd;margin-top:1em}</style></head><body>\
             <h1>awaitlab report: sync vs async Django under added latency</h1><ul>",
        );
        for h in &self.header {
            let _ = write!(s, "<li>{}</li>", esc(h));
        }
        s.push_str("</ul><h2>The study's tables</h2><p>Cells: total successes / max sRPS (mean ± 95 % CI half-width with three or more repetitions).</p>");
        for t in &self.study_tables {
            html_table(&mut s, t);
        }
        s.push_str("<h2>Beside the published numbers</h2>");
        for t in &self.beside {
            html_table(&mut s, t);
        }
        s.push_str("<h2>Why: what the probes saw</h2>");
        for t in &self.explain {
            html_table(&mut s, t);
        }
        html_lists(&mut s, "Findings", &self.findings);
        html_lists(&mut s, "The study's open questions", &self.questions);
        s.push_str("<h2>Statistics</h2><ul>");
        for l in &self.statistics {
            let _ = write!(s, "<li>{}</li>", esc(l));
        }
        s.push_str("</ul><h2>Across cells</h2><div class=\"figs\">");
        for f in self.across_figures() {
            s.push_str(&f);
        }
        s.push_str("</div><h2>Every cell</h2>");
        for c in &self.cells {
            let _ = write!(
                s,
                "<div class=\"cell\" id=\"{}\"><h3>{} · {} · {} ms · repetition {}</h3><div class=\"figs\">",
                esc(&c.key.stem()),
                esc(setup_name(&c.key.setup)),
                esc(&c.key.route),
                c.key.delay_ms,
                c.key.rep
            );
            for f in cell_figures(c) {
                s.push_str(&f);
            }
            s.push_str("</div></div>");
        }
        s.push_str("</body></html>\n");
        s
    }

    /// Successes vs added delay per setup (one chart per route), and database wait share vs
    /// throughput.
    fn across_figures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let routes: BTreeSet<&str> = self.cells.iter().map(|c| c.key.route.as_str()).collect();
        for route in routes {
            let mut series = Vec::new();
            for (s, name) in setups() {
                let mut by_delay: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
                for c in self
                    .cells
                    .iter()
                    .filter(|c| c.key.route == route && c.key.setup == *s)
                {
                    by_delay
                        .entry(c.key.delay_ms)
                        .or_default()
                        .push(c.load.total_successes as f64);
                }
                if !by_delay.is_empty() {
                    let points = by_delay
                        .iter()
                        .map(|(d, v)| (*d as f64, v.iter().sum::<f64>() / v.len() as f64))
                        .collect();
                    series.push(svg::Series {
                        name: name.to_string(),
                        points,
                    });
                }
            }
            let title = format!("{route}: successes vs added delay");
            out.push(
                svg::Chart {
                    title: &title,
                    x_label: "added delay (ms)",
                    y_label: "total successes",
                    series,
                    style: svg::Style::Lines,
                }
                .render(),
            );
        }
        let mut series = Vec::new();
        for (s, name) in setups() {
            let points: Vec<(f64, f64)> = self
                .cells
                .iter()
                .filter(|c| c.key.setup == *s)
                .filter_map(|c| {
                    c.probes
                        .as_ref()
                        .and_then(|p| p.ratios.db_wait_share_of_server_time)
                        .map(|w| (c.load.total_successes as f64 / c.load.actual_s.max(1e-9), w))
                })
                .collect();
            if !points.is_empty() {
                series.push(svg::Series {
                    name: name.to_string(),
                    points,
                });
            }
        }
        out.push(
            svg::Chart {
                title: "database wait share vs throughput",
                x_label: "successes per second",
                y_label: "db wait / server time",
                series,
                style: svg::Style::Points,
            }
            .render(),
        );
        out
    }
}

/// The study's supplementary figures for one cell: users, requests and failures per second,
/// p50 and p95 over time.
fn cell_figures(c: &CellResult) -> Vec<String> {
    let t = |f: fn(&crate::study::results::Second) -> Option<f64>| -> Vec<(f64, f64)> {
        c.load
            .series
            .iter()
            .filter_map(|s| f(s).map(|v| (s.t_s, v)))
            .collect()
    };
    vec![
        svg::Chart {
            title: "users",
            x_label: "time (s)",
            y_label: "users",
            series: vec![svg::Series {
                name: "users".into(),
                points: t(|s| Some(s.users as f64)),
            }],
            style: svg::Style::Lines,
        }
        .render(),
        svg::Chart {
            title: "requests and failures per second",
            x_label: "time (s)",
            y_label: "per second",
            series: vec![
                svg::Series {
                    name: "requests/s".into(),
                    points: t(|s| Some(s.requests as f64)),
                },
                svg::Series {
                    name: "failures/s".into(),
                    points: t(|s| Some(s.failures as f64)),
                },
            ],
            style: svg::Style::Lines,
        }
        .render(),
        svg::Chart {
            title: "response time",
            x_label: "time (s)",
            y_label: "ms",
            series: vec![
                svg::Series {
                    name: "p50".into(),
                    points: t(|s| s.p50_ms),
                },
                svg::Series {
                    name: "p95".into(),
                    points: t(|s| s.p95_ms),
                },
            ],
            style: svg::Style::Lines,
        }
        .render(),
    ]
}

/// Share of their time the threads that served requests were on CPU: on / (on + off), so at
/// most 1. Unlike the whole server's off-CPU share, idle pool threads do not dilute it.
fn serving_on_share(x: &Summary) -> Option<f64> {
    let all = x.cpu.serving_on_cpu_s + x.cpu.serving_off_cpu_s;
    (x.cpu.serving_threads > 0 && all > 0.0).then(|| x.cpu.serving_on_cpu_s / all)
}

/// PostgreSQL's refusals for want of a connection slot, summed over the cells that counted them
/// (None when no cell did).
fn refusals(g: &Group) -> Option<u64> {
    let v: Vec<u64> = g.cells.iter().filter_map(|c| c.db_refusals).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Failures by kind, summed over the group's cells.
fn failure_kinds(g: &Group) -> BTreeMap<String, u64> {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for c in &g.cells {
        for (k, v) in &c.load.failures_by_kind {
            *kinds.entry(k.clone()).or_default() += v;
        }
    }
    kinds
}

/// A probe figure of a cell, when the probes ran.
fn probe(f: impl Fn(&Summary) -> Option<f64>) -> impl Fn(&CellResult) -> Option<f64> {
    move |c: &CellResult| c.probes.as_ref().and_then(&f)
}

fn per_request(x: &Summary, v: f64) -> Option<f64> {
    (x.requests > 0).then(|| v / x.requests as f64)
}

/// Mean server time (ms) of the requests a cell's probes saw finish.
fn server_mean_ms(x: &Summary) -> Option<f64> {
    (x.server_time.count > 0).then_some(x.server_time.mean_ms)
}

/// Sentences a cell's numbers support, and only those: each claim is printed with the
/// measurement that makes it true (rules in docs/measurement.md).
fn route_findings<'a>(
    route: &str,
    setups: &[&str],
    delays: &BTreeSet<u32>,
    g: &dyn Fn(&str, &str, u32) -> Option<&'a Group<'a>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for &d in delays {
        let Some(sync) = g("sync", route, d) else {
            continue;
        };
        let rt = sync.mean(probe(|p| p.ratios.db_round_trips_per_request));
        let conn = sync.mean(probe(|p| per_request(p, p.db.connects as f64)));
        let server = sync.mean(probe(server_mean_ms));
        let wait = sync.mean(probe(|p| p.ratios.db_wait_ms_per_request));
        let srps = sync.mean(max_srps).unwrap_or(0.0);
        if let (Some(rt), Some(server)) = (rt, server) {
            let conn = conn.unwrap_or(0.0);
            // Every round trip and every connect pays the added delay once (the server's packets
            // to the database are delayed): that much of a request's time is the delay itself.
            let paid = (rt + conn) * d as f64;
            if d > 0 && paid >= 0.5 * server {
                out.push(format!(
                    "Sync {route} at {d} ms is bound by round trips: each request made {rt:.1} database round trips and {conn:.1} connects, so it paid about {paid:.0} ms of added delay of the {server:.0} ms it spent in the server (means; {} ms measured database wait per request); one worker serving one request at a time cannot exceed {:.1} req/s, and its max sRPS was {srps:.1}.",
                    wait.map_or("-".into(), |w| format!("{w:.0}")),
                    1000.0 / server.max(1e-9),
                ));
            } else {
                out.push(format!(
                    "Sync {route} at {d} ms: mean server time {server:.0} ms, {rt:.1} database round trips and {conn:.1} connects per request ({paid:.0} ms of added delay paid per request), max sRPS {srps:.1}."
                ));
            }
        }
        let sync_ok = sync.mean(successes).unwrap_or(0.0);
        for &s in setups.iter().filter(|s| **s != "sync") {
            let Some(a) = g(s, route, d) else { continue };
            let ok = a.mean(successes).unwrap_or(0.0);
            let mut line = if sync_ok > 0.0 {
                format!(
                    "{} at {d} ms served {:.1}x Sync's successes ({ok:.0} vs {sync_ok:.0})",
                    setup_name(s),
                    ok / sync_ok
                )
            } else {
                format!(
                    "{} at {d} ms served {ok:.0} successes (Sync: none)",
                    setup_name(s)
                )
            };
            let threads = a.mean(probe(|p| {
                (p.cpu.serving_threads > 0).then_some(p.cpu.serving_threads as f64)
            }));
            if let (Some(n), Some(share)) = (threads, a.mean(probe(serving_on_share))) {
                let _ = write!(
                    line,
                    "; the {n:.0} thread(s) that read its requests were on CPU {:.0} % of the time",
                    share * 100.0
                );
            }
            if let Some(cpu) = a.mean(probe(|p| p.cpu.cpu_s_per_wall_s)) {
                let _ = write!(line, "; the server used {cpu:.2} CPU seconds per second");
            }
            let kinds = failure_kinds(a);
            if let Some((k, v)) = kinds.iter().max_by_key(|(_, v)| **v) {
                let _ = write!(line, "; most failures were {k} ({v})");
            }
            match refusals(a) {
                Some(r) if r > 0 => {
                    let _ = write!(
                        line,
                        "; PostgreSQL refused {r} connections for want of a slot (its log), so its connection limit explains failures here: the async ORM opens one connection per request in flight"
                    );
                }
                Some(_) => line.push_str("; PostgreSQL refused no connection"),
                None => {}
            }
            line.push('.');
            out.push(line);
        }
    }
    if out.is_empty() {
        out.push("No cell of this route has both a Sync and another setup to compare.".into());
    }
    out
}

fn kinds_text(g: &Group) -> String {
    let kinds = failure_kinds(g);
    if kinds.is_empty() {
        "none".into()
    } else {
        kinds
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn refusals_text(g: &Group) -> String {
    refusals(g).map_or("not counted".into(), |r| r.to_string())
}

/// Mean of one cell's split of its mean server time (ms): database wait, connect time and the
/// server's on-CPU time per request; the rest is waiting in the server for a thread or the
/// event loop. Means, so that they add up (p50s do not).
struct Split {
    server: f64,
    wait: f64,
    connect: f64,
    cpu: f64,
}

impl Split {
    fn of(g: &Group) -> Option<Split> {
        Some(Split {
            server: g.mean(probe(server_mean_ms))?,
            wait: g.mean(probe(|p| p.ratios.db_wait_ms_per_request))?,
            connect: g.mean(probe(|p| {
                per_request(p, p.db.connects as f64 * p.db.connect.mean_ms)
            }))?,
            cpu: g.mean(probe(|p| per_request(p, p.cpu.on_cpu_s * 1000.0)))?,
        })
    }
    fn rest(&self) -> f64 {
        self.server - self.wait - self.connect - self.cpu
    }
}

/// The two questions the study left open, answered from the cells' measurements; a question
/// without the cells it needs says which.
fn open_questions<'a>(
    delays: &BTreeSet<u32>,
    g: &dyn Fn(&str, &str, u32) -> Option<&'a Group<'a>>,
) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();

    let mut lines = Vec::new();
    for &d in delays {
        let (Some(u), Some(l)) = (g("async-unlimited", "cpu", d), g("async-limited", "cpu", d))
        else {
            continue;
        };
        let (Some(uo), Some(lo)) = (
            stats::mean_ci(&u.values(successes)),
            stats::mean_ci(&l.values(successes)),
        ) else {
            continue;
        };
        let mut line = format!(
            "At {d} ms: Async Unlimited {} vs Async Limited {} successes; failures {} vs {}; PostgreSQL refusals {} vs {}",
            u.fmt(successes, 0),
            l.fmt(successes, 0),
            kinds_text(u),
            kinds_text(l),
            refusals_text(u),
            refusals_text(l)
        );
        let connects = |gr: &Group| gr.mean(probe(|p| per_request(p, p.db.connects as f64)));
        let (uc, lc) = (connects(u), connects(l));
        if let (Some(uc), Some(lc)) = (uc, lc) {
            let _ = write!(line, "; database connects per request {uc:.2} vs {lc:.2}");
        }
        let cpu = |gr: &Group| gr.fmt(probe(|p| p.cpu.cpu_s_per_wall_s), 2);
        let per_req = |gr: &Group| gr.fmt(probe(|p| per_request(p, p.cpu.on_cpu_s * 1000.0)), 0);
        if u.mean(probe(|p| p.cpu.cpu_s_per_wall_s)).is_some()
            && l.mean(probe(|p| p.cpu.cpu_s_per_wall_s)).is_some()
        {
            let _ = write!(
                line,
                "; server CPU s per wall s {} vs {}; server CPU ms per finished request {} vs {}",
                cpu(u),
                cpu(l),
                per_req(u),
                per_req(l)
            );
        }
        line.push('.');
        if uc.is_some_and(|c| c < 0.01) && lc.is_some_and(|c| c < 0.01) {
            line.push_str(" The route opened no database connection in either setup, so max_connections, the only difference between the two, cannot act on it.");
        }
        match (uo.half_width, lo.half_width) {
            (Some(hu), Some(hl)) if (uo.mean - lo.mean).abs() <= hu + hl => {
                line.push_str(" The 95 % intervals overlap: the gap is within run-to-run spread.")
            }
            (Some(_), Some(_)) => line.push_str(" The 95 % intervals do not overlap."),
            _ => line
                .push_str(" One repetition: run-to-run spread unknown (--repeat 3 measures it)."),
        }
        lines.push(line);
    }
    if lines.is_empty() {
        lines.push(
            "Not answered: needs cpu cells of both Async Limited and Async Unlimited.".into(),
        );
    }
    out.push((
        "Why did Async Unlimited beat Async Limited on the cpu route?".to_string(),
        lines,
    ));

    let mut lines = Vec::new();
    let mut splits: Vec<(u32, f64, Split)> = Vec::new();
    for &d in delays {
        let Some(l) = g("async-limited", "io_create", d) else {
            continue;
        };
        let mut line = format!(
            "At {d} ms: {} successes; failures {}; PostgreSQL refusals {}",
            l.fmt(successes, 0),
            kinds_text(l),
            refusals_text(l)
        );
        if let Some(sp) = Split::of(l) {
            let rt = l
                .mean(probe(|p| p.ratios.db_round_trips_per_request))
                .unwrap_or(0.0);
            let cn = l
                .mean(probe(|p| per_request(p, p.db.connects as f64)))
                .unwrap_or(0.0);
            let _ = write!(
                line,
                "; mean server time {:.0} ms = database wait {:.0} ms ({rt:.1} round trips) + connecting {:.0} ms ({cn:.1} connects) + server CPU {:.0} ms + waiting in the server {:.0} ms",
                sp.server,
                sp.wait,
                sp.connect,
                sp.cpu,
                sp.rest()
            );
            if let Some(c) = l.mean(probe(|p| p.cpu.cpu_s_per_wall_s)) {
                let _ = write!(line, "; server CPU s per wall s {c:.2}");
            }
            splits.push((d, l.mean(successes).unwrap_or(0.0), sp));
        }
        line.push('.');
        lines.push(line);
    }
    if let (Some(first), Some(last)) = (splits.first(), splits.last()) {
        if last.0 > first.0 {
            let (a, b) = (&first.2, &last.2);
            lines.push(format!(
                "From {} to {} ms its successes went from {:.0} to {:.0}; its mean server time grew by {:.0} ms: database wait {:+.0} ms, connecting {:+.0} ms, server CPU {:+.0} ms, waiting in the server {:+.0} ms.",
                first.0,
                last.0,
                first.1,
                last.1,
                b.server - a.server,
                b.wait - a.wait,
                b.connect - a.connect,
                b.cpu - a.cpu,
                b.rest() - a.rest()
            ));
        }
    }
    if lines.is_empty() {
        lines.push("Not answered: needs Async Limited io_create cells with the probes on.".into());
    } else if splits.len() < 2 {
        lines.push("The decomposition across latencies needs Async Limited io_create cells at two or more delays with the probes on.".into());
    }
    out.push(("Why did Async Limited's io_create degrade with latency while the database was not failing?".to_string(), lines));
    out
}

/// The verdict on the study's hypothesis (a pre-specified one-sided contrast) and the secondary
/// directionless interaction test; see `verdict`.
fn statistics(
    cells: &[CellResult],
    setups: &[&str],
    routes: &[&str],
    delays: &BTreeSet<u32>,
) -> Vec<String> {
    let reps = cells.iter().map(|c| c.key.rep).max().unwrap_or(0);
    let mut out = vec![format!("Repetitions per cell: up to {reps}.")];
    if reps < 3 {
        out.push("With fewer than three repetitions the tables show no confidence intervals and the tests below have little or no power (use --repeat 3 or more).".into());
    }
    out.push(verdict::verdict_line(cells));
    out.push(verdict::omnibus_line(cells, setups, routes, delays));
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn md_table(s: &mut String, t: &Table) {
    let _ = writeln!(s, "**{}**\n", t.caption);
    let _ = writeln!(s, "| {} |", t.head.join(" | "));
    let _ = writeln!(
        s,
        "|{}|",
        t.head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in &t.rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s.push('\n');
}

/// A section of headed lists (the findings per route, the answers per question).
fn md_lists(s: &mut String, title: &str, lists: &[(String, Vec<String>)]) {
    let _ = writeln!(s, "## {title}\n");
    for (head, lines) in lists {
        let _ = writeln!(s, "### {head}\n");
        for l in lines {
            let _ = writeln!(s, "- {l}");
        }
        s.push('\n');
    }
}

fn html_lists(s: &mut String, title: &str, lists: &[(String, Vec<String>)]) {
    let _ = write!(s, "<h2>{}</h2>", esc(title));
    for (head, lines) in lists {
        let _ = write!(s, "<h3>{}</h3><ul>", esc(head));
        for l in lines {
            let _ = write!(s, "<li>{}</li>", esc(l));
        }
        s.push_str("</ul>");
    }
}

fn html_table(s: &mut String, t: &Table) {
    let _ = write!(s, "<table><caption>{}</caption><tr>", esc(&t.caption));
    for h in &t.head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in &t.rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", esc(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
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
    use crate::study::results::{tests::cell, Index, RESULTS_VERSION};

    fn results(reps: u32) -> (PathBuf, ResultsDir) {
        let root = std::env::temp_dir().join(format!("awl-report-{}-{reps}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let index = Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config: serde_json::json!({}),
            planned: vec![],
        };
        let dir = ResultsDir::create(&root, &index).unwrap();
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
        let index = Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config: serde_json::json!({}),
            planned: vec![],
        };
        let dir = ResultsDir::create(&root, &index).unwrap();
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
                db_wait_share_of_server_time: Some(wait_ms / server_ms),
                attributed_share: None,
            },
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
        let index = Index {
            version: RESULTS_VERSION,
            created_unix_s: 0.0,
            config: serde_json::json!({}),
            planned: vec![],
        };
        let dir = ResultsDir::create(&root, &index).unwrap();
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

    fn with(mut c: CellResult, probes: Summary, refusals: Option<u64>) -> CellResult {
        c.probes = Some(probes);
        c.db_refusals = refusals;
        c
    }

    /// Regression: "bound by round trips" was printed for any round trip and any delay, and the
    /// connection-limit sentence for any HTTP 500 of Async Limited, without evidence.
    #[test]
    fn findings_appear_only_with_their_evidence() {
        // 4 round trips + 1 connect at 100 ms = 500 ms of delay paid per request: bound when the
        // mean server time is 600 ms (500 >= 300), not when it is 2000 ms (500 < 1000).
        let cells = vec![
            with(
                cell("sync", "io_read", 100, 1, 50),
                summary(50, 600.0, 4.0, 1.0, 410.0, (1, 3.0, 27.0), 3.5),
                None,
            ),
            with(
                cell("sync", "io_create", 100, 1, 50),
                summary(50, 2000.0, 4.0, 1.0, 410.0, (1, 3.0, 27.0), 3.5),
                None,
            ),
            with(
                cell("async-limited", "io_read", 100, 1, 900),
                summary(900, 900.0, 4.0, 1.0, 450.0, (1, 12.0, 18.0), 15.0),
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
                && bound[0].contains("paid about 500 ms"),
            "{all}"
        );
        assert!(
            f.iter()
                .any(|l| l.starts_with("Sync io_create at 100 ms: mean server time 2000 ms")),
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
                .filter(|l| l.starts_with("Async Limited"))
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
            summary(1000, 2000.0, 5.0, 2.0, 1000.0, (1, 5.0, 25.0), 3.0),
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
        assert!(io.contains("At 200 ms: 800 successes; failures http_500: 2; PostgreSQL refusals 0; mean server time 2000 ms = database wait 1000 ms (5.0 round trips) + connecting 200 ms (2.0 connects) + server CPU 3 ms + waiting in the server 797 ms"), "{io}");
        assert!(io.contains("From 0 to 200 ms its successes went from 5000 to 800; its mean server time grew by 1990 ms: database wait +996 ms, connecting +199 ms, server CPU +0 ms, waiting in the server +795 ms."), "{io}");
    }
}

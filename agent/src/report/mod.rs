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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use crate::results::{CellResult, ResultsDir, ResultsError};

/// Setups in the study's column order, with display names.
pub const SETUPS: &[(&str, &str)] = &[
    ("sync", "Sync"),
    ("async-limited", "Async Limited"),
    ("async-unlimited", "Async Unlimited"),
    ("async-pooled", "Async Pooled"),
];
/// Routes in the study's table order.
pub const ROUTES: &[(&str, &str)] = &[("cpu", "Table 1: cpu"), ("io_read", "Table 2: io_read"), ("io_create", "Table 3: io_create")];

fn setup_name(s: &str) -> &str {
    SETUPS.iter().find(|(k, _)| *k == s).map_or(s, |(_, n)| n)
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
    pub statistics: Vec<String>,
    cells: Vec<CellResult>,
}

/// The cells of one (setup, route, delay), over repetitions.
struct Group<'a> {
    cells: Vec<&'a CellResult>,
}

impl Group<'_> {
    fn values(&self, f: impl Fn(&CellResult) -> Option<f64>) -> Vec<f64> {
        self.cells.iter().filter_map(|c| f(c)).filter(|v| v.is_finite()).collect()
    }
    fn mean(&self, f: impl Fn(&CellResult) -> Option<f64>) -> Option<f64> {
        stats::mean_ci(&self.values(f)).map(|m| m.mean)
    }
    fn fmt(&self, f: impl Fn(&CellResult) -> Option<f64>, decimals: usize) -> String {
        match stats::mean_ci(&self.values(f)) {
            None => "-".into(),
            Some(m) if m.n >= 3 => format!("{:.*} ± {:.*}", decimals, m.mean, decimals, m.half_width.unwrap_or(0.0)),
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
        let backends: BTreeSet<String> = cells.iter().map(|c| format!("{} back end, {} stack, {} profile", c.backend, c.stack, c.profile)).collect();
        header.extend(backends.into_iter().map(|b| format!("System under test: {b}.")));
        header.extend(system::header_lines(&cells));
        let delays: BTreeSet<u32> = cells.iter().map(|c| c.key.delay_ms).collect();
        let achieved: Vec<String> = delays
            .iter()
            .map(|&d| {
                let v: Vec<f64> = cells.iter().filter(|c| c.key.delay_ms == d).filter_map(|c| c.delay.achieved_ms).collect();
                let backend: BTreeSet<&str> = cells.iter().filter(|c| c.key.delay_ms == d).map(|c| c.delay.backend.as_str()).collect();
                match stats::mean_ci(&v) {
                    Some(m) => format!("{d} ms requested: {:.2} ms achieved ({})", m.mean, backend.into_iter().collect::<Vec<_>>().join(", ")),
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
        let setups: Vec<&str> = SETUPS.iter().map(|s| s.0).filter(|s| cells.iter().any(|c| c.key.setup == *s)).collect();
        let mut routes: Vec<&str> = ROUTES.iter().map(|r| r.0).filter(|r| cells.iter().any(|c| c.key.route == *r)).collect();
        for c in &cells {
            if !routes.contains(&c.key.route.as_str()) && !ROUTES.iter().any(|r| r.0 == c.key.route) {
                routes.push(Box::leak(c.key.route.clone().into_boxed_str()));
            }
        }
        let g = |s: &str, r: &str, d: u32| groups.get(&(s.to_string(), r.to_string(), d));

        let mut study_tables = Vec::new();
        let mut beside = Vec::new();
        let mut explain = Vec::new();
        let mut findings = Vec::new();
        for &route in &routes {
            let caption = ROUTES.iter().find(|r| r.0 == route).map_or(route.to_string(), |r| r.1.to_string());
            let mut head = vec!["added latency".to_string()];
            head.extend(setups.iter().map(|s| setup_name(s).to_string()));
            let rows = delays
                .iter()
                .map(|&d| {
                    let mut row = vec![format!("{d} ms")];
                    for &s in &setups {
                        row.push(g(s, route, d).map_or("-".into(), |g| format!("{} / {}", g.fmt(successes, 0), g.fmt(max_srps, 1))));
                    }
                    row
                })
                .collect();
            study_tables.push(Table { caption: format!("{caption} (total successes / max sRPS)"), head, rows });

            let mut head = vec!["added latency".to_string(), "setup".into(), "successes (ours)".into(), "successes (study)".into(), "max sRPS (ours)".into(), "max sRPS (study)".into(), "successes vs Sync (ours)".into(), "successes vs Sync (study)".into()];
            head.truncate(8);
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
                        pubd.map_or("-".into(), |p| p.0.to_string()),
                        gr.fmt(max_srps, 1),
                        pubd.map_or("-".into(), |p| format!("{:.1}", p.1)),
                        ratio(ours, sync_ours),
                        ratio(pubd.map(|p| p.0 as f64), sync_pub),
                    ]);
                }
            }
            beside.push(Table { caption: format!("{route}: ours beside the study's published numbers (ratios: async / sync successes)"), head, rows });

            let head = [
                "setup", "added latency", "server time p50 (ms)", "db round trips / request", "db connects / request",
                "db round trip p50 / p99 (ms)", "db connect p50 (ms)", "db wait share of server time", "worker off-CPU share",
                "queueing: client p50 - server p50 (ms)", "failures by kind",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut rows = Vec::new();
            for &s in &setups {
                for &d in &delays {
                    let Some(gr) = g(s, route, d) else { continue };
                    let p = |f: fn(&crate::aggregate::summary::Summary) -> Option<f64>| move |c: &CellResult| c.probes.as_ref().and_then(f);
                    let per_req_connects = |x: &crate::aggregate::summary::Summary| (x.requests > 0).then(|| x.db.connects as f64 / x.requests as f64);
                    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
                    for c in &gr.cells {
                        for (k, v) in &c.load.failures_by_kind {
                            *kinds.entry(k.clone()).or_default() += v;
                        }
                    }
                    let kinds = if kinds.is_empty() { "none".to_string() } else { kinds.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ") };
                    rows.push(vec![
                        setup_name(s).into(),
                        format!("{d} ms"),
                        gr.fmt(p(|x| (x.server_time.count > 0).then_some(x.server_time.p50_ms)), 1),
                        gr.fmt(p(|x| x.ratios.db_round_trips_per_request), 2),
                        gr.fmt(p(per_req_connects), 2),
                        format!(
                            "{} / {}",
                            gr.fmt(p(|x| (x.db.round_trip.count > 0).then_some(x.db.round_trip.p50_ms)), 1),
                            gr.fmt(p(|x| (x.db.round_trip.count > 0).then_some(x.db.round_trip.p99_ms)), 1)
                        ),
                        gr.fmt(p(|x| (x.db.connect.count > 0).then_some(x.db.connect.p50_ms)), 1),
                        gr.fmt(p(|x| x.ratios.db_wait_share_of_server_time), 2),
                        gr.fmt(p(|x| x.cpu.off_cpu_share), 2),
                        gr.fmt(|c| c.probes.as_ref().filter(|x| x.server_time.count > 0).map(|x| c.load.latency.p50_ms - x.server_time.p50_ms), 1),
                        kinds,
                    ]);
                }
            }
            explain.push(Table { caption: format!("{route}: why (the eBPF view, means over repetitions)"), head, rows });
            findings.push((route.to_string(), route_findings(route, &setups, &delays, &g)));
        }

        let statistics = statistics(&cells, &setups, &routes, &delays);
        Ok(Report { header, study_tables, beside, explain, findings, statistics, cells })
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
        s.push_str("## Findings\n\n");
        for (route, lines) in &self.findings {
            let _ = writeln!(s, "### {route}\n");
            for l in lines {
                let _ = writeln!(s, "- {l}");
            }
            s.push('\n');
        }
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
        s.push_str("<h2>Findings</h2>");
        for (route, lines) in &self.findings {
            let _ = write!(s, "<h3>{}</h3><ul>", esc(route));
            for l in lines {
                let _ = write!(s, "<li>{}</li>", esc(l));
            }
            s.push_str("</ul>");
        }
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
            for (s, name) in SETUPS {
                let mut by_delay: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
                for c in self.cells.iter().filter(|c| c.key.route == route && c.key.setup == *s) {
                    by_delay.entry(c.key.delay_ms).or_default().push(c.load.total_successes as f64);
                }
                if !by_delay.is_empty() {
                    let points = by_delay.iter().map(|(d, v)| (*d as f64, v.iter().sum::<f64>() / v.len() as f64)).collect();
                    series.push(svg::Series { name: name.to_string(), points });
                }
            }
            let title = format!("{route}: successes vs added delay");
            out.push(svg::Chart { title: &title, x_label: "added delay (ms)", y_label: "total successes", series, style: svg::Style::Lines }.render());
        }
        let mut series = Vec::new();
        for (s, name) in SETUPS {
            let points: Vec<(f64, f64)> = self
                .cells
                .iter()
                .filter(|c| c.key.setup == *s)
                .filter_map(|c| c.probes.as_ref().and_then(|p| p.ratios.db_wait_share_of_server_time).map(|w| (c.load.total_successes as f64 / c.load.actual_s.max(1e-9), w)))
                .collect();
            if !points.is_empty() {
                series.push(svg::Series { name: name.to_string(), points });
            }
        }
        out.push(svg::Chart { title: "database wait share vs throughput", x_label: "successes per second", y_label: "db wait / server time", series, style: svg::Style::Points }.render());
        out
    }
}

/// The study's supplementary figures for one cell: users, requests and failures per second,
/// p50 and p95 over time.
fn cell_figures(c: &CellResult) -> Vec<String> {
    let t = |f: fn(&crate::results::Second) -> Option<f64>| -> Vec<(f64, f64)> { c.load.series.iter().filter_map(|s| f(s).map(|v| (s.t_s, v))).collect() };
    vec![
        svg::Chart { title: "users", x_label: "time (s)", y_label: "users", series: vec![svg::Series { name: "users".into(), points: t(|s| Some(s.users as f64)) }], style: svg::Style::Lines }.render(),
        svg::Chart {
            title: "requests and failures per second",
            x_label: "time (s)",
            y_label: "per second",
            series: vec![svg::Series { name: "requests/s".into(), points: t(|s| Some(s.requests as f64)) }, svg::Series { name: "failures/s".into(), points: t(|s| Some(s.failures as f64)) }],
            style: svg::Style::Lines,
        }
        .render(),
        svg::Chart {
            title: "response time",
            x_label: "time (s)",
            y_label: "ms",
            series: vec![svg::Series { name: "p50".into(), points: t(|s| s.p50_ms) }, svg::Series { name: "p95".into(), points: t(|s| s.p95_ms) }],
            style: svg::Style::Lines,
        }
        .render(),
    ]
}

fn route_findings<'a>(route: &str, setups: &[&str], delays: &BTreeSet<u32>, g: &dyn Fn(&str, &str, u32) -> Option<&'a Group<'a>>) -> Vec<String> {
    let mut out = Vec::new();
    for &d in delays {
        let Some(sync) = g("sync", route, d) else { continue };
        let rt = sync.mean(|c| c.probes.as_ref().and_then(|p| p.ratios.db_round_trips_per_request));
        let conn = sync.mean(|c| c.probes.as_ref().and_then(|p| (p.requests > 0).then(|| p.db.connects as f64 / p.requests as f64)));
        let server = sync.mean(|c| c.probes.as_ref().and_then(|p| (p.server_time.count > 0).then_some(p.server_time.p50_ms)));
        let wait = sync.mean(|c| c.probes.as_ref().and_then(|p| p.ratios.db_wait_ms_per_request));
        let srps = sync.mean(max_srps).unwrap_or(0.0);
        if let (Some(rt), Some(server)) = (rt, server) {
            if rt > 0.0 && d > 0 {
                let conn = conn.unwrap_or(0.0);
                out.push(format!(
                    "Sync {route} at {d} ms is bound by round trips: each request made {rt:.1} database round trips and {conn:.1} connects, so about {:.0} ms of the {server:.0} ms it took (p50) was the added delay paid on each ({} ms measured database wait per request); one worker serving one request at a time cannot exceed {:.1} req/s, and its max sRPS was {srps:.1}.",
                    (rt + conn) * d as f64,
                    wait.map_or("-".into(), |w| format!("{w:.0}")),
                    1000.0 / server.max(1e-9),
                ));
            } else {
                out.push(format!("Sync {route} at {d} ms: server time p50 {server:.0} ms, {rt:.1} database round trips per request, max sRPS {srps:.1}."));
            }
        }
        let sync_ok = sync.mean(successes).unwrap_or(0.0);
        for &s in setups.iter().filter(|s| **s != "sync") {
            let Some(a) = g(s, route, d) else { continue };
            let ok = a.mean(successes).unwrap_or(0.0);
            let off = a.mean(|c| c.probes.as_ref().and_then(|p| p.cpu.off_cpu_share));
            let mut line = if sync_ok > 0.0 {
                format!("{} at {d} ms served {:.1}x Sync's successes ({ok:.0} vs {sync_ok:.0})", setup_name(s), ok / sync_ok)
            } else {
                format!("{} at {d} ms served {ok:.0} successes (Sync: none)", setup_name(s))
            };
            if let Some(off) = off {
                let _ = write!(line, "; its threads were off CPU {:.0} % of the time", off * 100.0);
            }
            let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
            for c in &a.cells {
                for (k, v) in &c.load.failures_by_kind {
                    *kinds.entry(k.clone()).or_default() += v;
                }
            }
            if let Some((k, v)) = kinds.iter().max_by_key(|(_, v)| **v) {
                let _ = write!(line, "; most failures were {k} ({v})");
                if k == "http_500" && s == "async-limited" {
                    line.push_str(", which PostgreSQL's connection limit explains: the async ORM opens one connection per request in flight");
                }
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

fn statistics(cells: &[CellResult], setups: &[&str], routes: &[&str], delays: &BTreeSet<u32>) -> Vec<String> {
    let reps = cells.iter().map(|c| c.key.rep).max().unwrap_or(0);
    let mut out = vec![format!("Repetitions per cell: up to {reps}.")];
    if reps < 3 {
        out.push("With fewer than three repetitions no confidence intervals or interaction test are computed (use --repeat 3 or more).".into());
        return out;
    }
    let delays: Vec<u32> = delays.iter().copied().collect();
    let mut data: BTreeMap<(usize, usize, usize), Vec<f64>> = BTreeMap::new();
    for c in cells {
        let (Some(a), Some(b), Some(k)) = (
            setups.iter().position(|s| *s == c.key.setup),
            routes.iter().position(|r| *r == c.key.route),
            delays.iter().position(|d| *d == c.key.delay_ms),
        ) else {
            continue;
        };
        // Successes span orders of magnitude across cells: test on the log scale.
        data.entry((a, b, k)).or_default().push((c.load.total_successes as f64 + 1.0).ln());
    }
    match stats::three_way_interaction(&data) {
        Ok(i) => {
            let verdict = if i.p < 0.05 { "supported" } else { "not supported" };
            out.push(format!(
                "Three-way interaction setup x route x added latency on ln(successes + 1): F({:.0}, {:.0}) = {:.2}, p = {:.4}. The study's hypothesis is {verdict} at the 5 % level.",
                i.df_effect, i.df_error, i.f, i.p
            ));
        }
        Err(why) => out.push(format!("Three-way interaction not computed: {why}.")),
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn md_table(s: &mut String, t: &Table) {
    let _ = writeln!(s, "**{}**\n", t.caption);
    let _ = writeln!(s, "| {} |", t.head.join(" | "));
    let _ = writeln!(s, "|{}|", t.head.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in &t.rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s.push('\n');
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
    crate::results::write_atomic(&md, report.markdown().as_bytes())?;
    crate::results::write_atomic(&html, report.html().as_bytes())?;
    Ok((md, html))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{tests::cell, Index, RESULTS_VERSION};

    fn results(reps: u32) -> (PathBuf, ResultsDir) {
        let root = std::env::temp_dir().join(format!("awl-report-{}-{reps}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let index = Index { version: RESULTS_VERSION, created_unix_s: 0.0, config: serde_json::json!({}), planned: vec![] };
        let dir = ResultsDir::create(&root, &index).unwrap();
        for rep in 1..=reps {
            for (setup, k) in [("sync", 1u64), ("async-unlimited", 20)] {
                for route in ["cpu", "io_read"] {
                    for delay in [0, 100] {
                        // An interaction by construction: async's advantage only on io with delay.
                        let boost = if route == "io_read" && delay == 100 { k } else { 1 };
                        dir.write_cell(&cell(setup, route, delay, rep, 100 * boost + rep as u64 * 3)).unwrap();
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
        let row = b.rows.iter().find(|r| r[0] == "100 ms" && r[1] == "Async Unlimited").unwrap();
        assert_eq!(row[3], "5313", "the study's published successes");
        assert_eq!(row[6], "19.45x");
        let md = r.markdown();
        assert!(md.contains("Table 1: cpu") && md.contains("Table 2: io_read"));
        assert!(md.contains("not computed") || md.contains("fewer than three"));
        let html = r.html();
        assert_eq!(html.matches("<svg").count(), 2 + 1 + 8 * 3, "across-cell and per-cell figures");
        assert!(!html.contains("http://") || html.matches("http://").count() == html.matches("http://www.w3.org/2000/svg").count(), "no external resources");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn with_three_repetitions_the_interaction_is_tested() {
        let (root, dir) = results(3);
        let r = Report::build(&dir).unwrap();
        let s = r.statistics.join("\n");
        assert!(s.contains("F(1, 16)"), "{s}");
        assert!(s.contains("supported at the 5 % level") && !s.contains("not supported"), "{s}");
        assert!(r.study_tables[1].rows[1][1].contains('±'));
        std::fs::remove_dir_all(root).unwrap();
    }
}

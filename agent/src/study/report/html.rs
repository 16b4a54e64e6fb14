//! report.html: self-contained, with SVG figures.

use super::*;

impl Report {
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
pub(super) fn cell_figures(c: &CellResult) -> Vec<String> {
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

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn html_lists(s: &mut String, title: &str, lists: &[(String, Vec<String>)]) {
    let _ = write!(s, "<h2>{}</h2>", esc(title));
    for (head, lines) in lists {
        let _ = write!(s, "<h3>{}</h3><ul>", esc(head));
        for l in lines {
            let _ = write!(s, "<li>{}</li>", esc(l));
        }
        s.push_str("</ul>");
    }
}

pub(super) fn html_table(s: &mut String, t: &Table) {
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

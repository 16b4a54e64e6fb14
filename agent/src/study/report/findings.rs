//! What the report says in sentences: the findings per route, each printed only with the
//! measurement behind it, the answers to the study's open questions, and the statistics section.

use super::*;

/// Share of their time the threads that served requests were on CPU: on / (on + off), so at
/// most 1. Unlike the whole server's off-CPU share, idle pool threads do not dilute it.
pub(super) fn serving_on_share(x: &Summary) -> Option<f64> {
    let all = x.cpu.serving_on_cpu_s + x.cpu.serving_off_cpu_s;
    (x.cpu.serving_threads > 0 && all > 0.0).then(|| x.cpu.serving_on_cpu_s / all)
}

/// PostgreSQL's refusals for want of a connection slot, summed over the cells that counted them
/// (None when no cell did).
pub(super) fn refusals(g: &Group) -> Option<u64> {
    let v: Vec<u64> = g.cells.iter().filter_map(|c| c.db_refusals).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Failures by kind, summed over the group's cells.
pub(super) fn failure_kinds(g: &Group) -> BTreeMap<String, u64> {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for c in &g.cells {
        for (k, v) in &c.load.failures_by_kind {
            *kinds.entry(k.clone()).or_default() += v;
        }
    }
    kinds
}

/// A probe figure of a cell, when the probes ran.
pub(super) fn probe(f: impl Fn(&Summary) -> Option<f64>) -> impl Fn(&CellResult) -> Option<f64> {
    move |c: &CellResult| c.probes.as_ref().and_then(&f)
}

pub(super) fn per_request(x: &Summary, v: f64) -> Option<f64> {
    (x.requests > 0).then(|| v / x.requests as f64)
}

/// Database connects per finished request (results written before this figure existed:
/// connects over finished requests).
pub(super) fn connects_per_request(p: &Summary) -> Option<f64> {
    p.ratios
        .db_connects_per_request
        .or_else(|| per_request(p, p.db.connects as f64))
}

/// Milliseconds spent connecting per finished request (older results as above).
fn connect_ms_per_request(p: &Summary) -> Option<f64> {
    p.ratios
        .db_connect_ms_per_request
        .or_else(|| per_request(p, p.db.connects as f64 * p.db.connect.mean_ms))
}

/// Mean server time (ms) of the requests a cell's probes saw finish.
pub(super) fn server_mean_ms(x: &Summary) -> Option<f64> {
    (x.server_time.count > 0).then_some(x.server_time.mean_ms)
}

/// Sentences a cell's numbers support, and only those: each claim is printed with the
/// measurement that makes it true (rules in docs/measurement.md).
pub(super) fn route_findings<'a>(
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
        let conn = sync.mean(probe(connects_per_request));
        let server = sync.mean(probe(server_mean_ms));
        // What a request waited on the database, measured: its round trips' time plus its
        // connects' (each pays the added delay once; an estimate of rounds x delay overcounts
        // round trips the probes attribute to a request but that fall outside its server time).
        let waited = sync.mean(probe(|p| {
            Some(p.ratios.db_wait_ms_per_request? + connect_ms_per_request(p)?)
        }));
        let srps = sync.mean(max_srps).unwrap_or(0.0);
        if let (Some(rt), Some(server), Some(waited)) = (rt, server, waited) {
            let conn = conn.unwrap_or(0.0);
            if d > 0 && waited >= 0.5 * server {
                out.push(format!(
                    "Sync {route} at {d} ms is bound by round trips: each request made {rt:.1} database round trips and {conn:.1} connects, each paying the added {d} ms, and waited {waited:.0} ms on them of the {server:.0} ms it spent in the server (measured means); one worker serving one request at a time cannot exceed {:.1} req/s, and its max sRPS was {srps:.1}.",
                    1000.0 / server.max(1e-9),
                ));
            } else {
                out.push(format!(
                    "Sync {route} at {d} ms: mean server time {server:.0} ms, {rt:.1} database round trips and {conn:.1} connects per request ({waited:.0} ms waited on them), max sRPS {srps:.1}."
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
    for &s in setups {
        if let Some(line) = unpinned_caveat(s, route, delays, g) {
            out.push(line);
        }
    }
    out
}

/// The requests still in the server at the end of a cell (mean over repetitions) whose round
/// trips the kernel could not pin to requests, when there were any: the per-request database
/// figures of that cell count their work too.
fn unpinned_inside(gr: &Group) -> Option<f64> {
    gr.mean(probe(|p| p.ratios.attributed_share))
        .filter(|&a| a < 0.99)?;
    gr.mean(probe(|p| p.requests_in_server_at_end.map(|n| n as f64)))
        .filter(|&n| n >= 0.5)
}

/// Where the kernel could pin no round trip to its request (an event loop) and requests were
/// still in the server when a cell ended, the per-request database figures of that setup
/// count those requests' work too: says so, with their number.
fn unpinned_caveat<'a>(
    setup: &str,
    route: &str,
    delays: &BTreeSet<u32>,
    g: &dyn Fn(&str, &str, u32) -> Option<&'a Group<'a>>,
) -> Option<String> {
    let mut at = Vec::new();
    for &d in delays {
        let Some(gr) = g(setup, route, d) else {
            continue;
        };
        if let Some(n) = unpinned_inside(gr) {
            let f = gr.mean(probe(|p| Some(p.requests as f64))).unwrap_or(0.0);
            at.push(format!("{n:.0} at {d} ms (against {f:.0} finished)"));
        }
    }
    if at.is_empty() {
        return None;
    }
    Some(format!(
        "{} {route}: its database round trips, connects and wait per request are upper bounds. The kernel could not pin its round trips to requests (a thread serves several at once), so they count the work of the requests still in the server when each cell ended too: {}.",
        setup_name(setup),
        at.join(", ")
    ))
}

pub(super) fn kinds_text(g: &Group) -> String {
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

pub(super) fn refusals_text(g: &Group) -> String {
    refusals(g).map_or("not counted".into(), |r| r.to_string())
}

/// Mean of one cell's split of its mean server time (ms): database wait, connect time and the
/// server's on-CPU time per request; the rest is waiting in the server for a thread or the
/// event loop. Means, so that they add up (p50s do not).
pub(super) struct Split {
    pub(super) server: f64,
    pub(super) wait: f64,
    pub(super) connect: f64,
    pub(super) cpu: f64,
}

impl Split {
    pub(super) fn of(g: &Group) -> Option<Split> {
        Some(Split {
            server: g.mean(probe(server_mean_ms))?,
            wait: g.mean(probe(|p| p.ratios.db_wait_ms_per_request))?,
            connect: g.mean(probe(connect_ms_per_request))?,
            cpu: g.mean(probe(|p| per_request(p, p.cpu.on_cpu_s * 1000.0)))?,
        })
    }
    pub(super) fn rest(&self) -> f64 {
        self.server - self.wait - self.connect - self.cpu
    }
}

/// The two questions the study left open, answered from the cells' measurements; a question
/// without the cells it needs says which.
pub(super) fn open_questions<'a>(
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
        let connects = |gr: &Group| gr.mean(probe(connects_per_request));
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
            let cn = l.mean(probe(connects_per_request)).unwrap_or(0.0);
            let _ = write!(
                line,
                "; mean server time {:.0} ms = database wait {:.0} ms ({rt:.1} round trips) + connecting {:.0} ms ({cn:.1} connects) + server CPU {:.0} ms + waiting in the server {:.0} ms",
                sp.server,
                sp.wait,
                sp.connect,
                sp.cpu,
                sp.rest()
            );
            if let Some(n) = unpinned_inside(l) {
                let _ = write!(
                    line,
                    " (database wait and connecting are upper bounds: they count the work of the {n:.0} requests still in the server at the end too)"
                );
            }
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
pub(super) fn statistics(
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

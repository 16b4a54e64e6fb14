//! Metrics and dashboards: a real Prometheus (Debian's package) scrapes `awaitlab watch
//! --metrics-addr` during a short load against a test server in a namespace, and every query of
//! every Grafana dashboard panel, run through Prometheus's HTTP API, must return data; the
//! exposition must pass `promtool check metrics`; the dashboard JSON must follow the checks
//! below. Run as root (`cargo xtask test`).
//!
//! The load comes from the real generator, `awaitlab load --metrics-addr` (one run against the
//! server, one against a closed port for connect failures). The injected delay and the experiment
//! cell are exported together only by `awaitlab run`, which needs the whole system under test;
//! here a test driver sets them (none, and one cell) through `DelayMetrics` and
//! `ExperimentMetrics`, served on its own /metrics endpoint.

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use awaitlab::{
    load::record::{ErrorKind, Outcome},
    metrics::{server, DelayMetrics, ExperimentMetrics, LoadMetrics},
};
use common::{prom::*, *};

const DB_DELAY: Duration = Duration::from_millis(5);
const LOAD_FOR: Duration = Duration::from_secs(8);
const SCRAPE: Duration = Duration::from_millis(500);

fn sum_of(p: &Prometheus, expr: &str, t: f64) -> f64 {
    let r = p.query(expr, t).unwrap_or_else(|e| panic!("{expr}: {e}"));
    r.iter()
        .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The metric selectors of a PromQL expression (`name{...}` or a bare `name`), found by the
/// prefixes of the agent's families; label names (`http_route`, `db_system_name`) do not match.
fn metric_selectors(expr: &str) -> Vec<String> {
    const PREFIXES: [&str; 5] = [
        "awaitlab_",
        "http_server_",
        "http_client_",
        "db_client_",
        "process_",
    ];
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts =
            (i == 0 || !word(b[i - 1])) && PREFIXES.iter().any(|p| expr[i..].starts_with(p));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < b.len() && word(b[j]) {
            j += 1;
        }
        if b.get(j) == Some(&b'{') {
            j += expr[j..].find('}').map_or(expr.len() - j, |k| k + 1);
        }
        out.push(expr[i..j].to_string());
        i = j;
    }
    out
}

/// The test driver's registry, served on loopback: the delay and the cell, as `awaitlab run`
/// exports them.
struct Driver {
    delay: DelayMetrics,
    cell: ExperimentMetrics,
    addr: SocketAddr,
    _server: server::Server,
    _rt: tokio::runtime::Runtime,
}

impl Driver {
    fn start() -> Driver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let registry = prometheus::Registry::new();
        let delay = DelayMetrics::new(&registry).unwrap();
        let cell = ExperimentMetrics::new(&registry).unwrap();
        let server = rt
            .block_on(server::serve_metrics(
                "127.0.0.1:0".parse().unwrap(),
                registry,
            ))
            .unwrap();
        Driver {
            delay,
            cell,
            addr: server.addr,
            _server: server,
            _rt: rt,
        }
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_query_returns_data() {
    let srv_ns = Netns::new("ms");
    let db_ns = Netns::new("md");
    let link = Veth::new(Some(&srv_ns), &db_ns, "10.231.7");
    let client_link = Veth::new(None, &srv_ns, "10.232.7");
    let db_addr: SocketAddr = format!("{}:5432", link.right_ip).parse().unwrap();
    let srv_addr: SocketAddr = format!("{}:8000", client_link.right_ip).parse().unwrap();
    // Nothing listens here: connecting is refused, a real connect failure for the client.
    let refused_addr: SocketAddr = format!("{}:8001", client_link.right_ip).parse().unwrap();
    let db = FakeDb::start(Some(&db_ns), db_addr, DB_DELAY);
    let server = SyncServer::start(Some(&srv_ns), "0.0.0.0:8000".parse().unwrap(), db_addr);

    let agent = Agent::watch(&[
        "--target",
        &srv_ns.path(),
        "--http-port",
        "8000",
        "--db-port",
        "5432",
        "--interval",
        "0.25",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let agent_addr = agent.metrics_addr();
    let driver = Driver::start();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (load_addr, refused_load_addr) = (free_port(), free_port());
    let prom = Prometheus::start(
        &[agent_addr, driver.addr, load_addr, refused_load_addr],
        SCRAPE,
    );
    prom.wait_targets_up(2);
    driver.delay.clear("server", "none");
    driver.cell.set_cell("sync", "k2", 0, 1);

    // The load: 4 closed-loop users on /k2 for 8 s, then 0 users for 4 s so that Prometheus
    // scrapes the final counts before the generator exits; the same shape with one user against
    // a closed port gives real connect failures.
    let stages = "4@0s,4@8s,0@0s,0@4s";
    let load = |url: String, metrics: SocketAddr, stages: &str| {
        Command::new(agent_bin())
            .args([
                "load",
                &url,
                "--stages",
                stages,
                "--json",
                "--no-check",
                "--metrics-addr",
            ])
            .arg(metrics.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let load_start = now();
    let ok_run = load(format!("http://{srv_addr}/k2"), load_addr, stages);
    let refused_run = load(
        format!("http://{refused_addr}/"),
        refused_load_addr,
        "1@0s,1@8s,0@0s,0@4s",
    );
    let report = |c: std::process::Child| -> serde_json::Value {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "awaitlab load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (ok_report, refused_report) = (report(ok_run), report(refused_run));
    let load_end = load_start + LOAD_FOR.as_secs_f64();
    // Inside the quiet 4 s after the load: counts are final and the generators still served.
    let t = load_end + 2.5;
    let ok = ok_report["successes"].as_u64().unwrap();
    let refused = refused_report["failures"].as_u64().unwrap();
    assert_eq!(ok_report["failures"], 0, "{ok_report}");
    assert_eq!(refused_report["successes"], 0, "{refused_report}");
    assert_eq!(
        refused_report["failures_by_kind"][0]["kind"], "refused",
        "{refused_report}"
    );
    assert!(
        ok > 20 && refused > 0,
        "load too small: {ok} ok, {refused} refused"
    );
    // Counts against the other side's own counts, as Prometheus stored them.
    assert_eq!(server.requests.load(Ordering::Relaxed), ok);
    assert_eq!(
        sum_of(&prom, "sum(http_server_request_duration_seconds_count)", t),
        ok as f64,
        "server requests"
    );
    assert_eq!(
        sum_of(
            &prom,
            r#"sum(http_server_request_duration_seconds_count{http_request_method="GET",http_route="/k2",http_response_status_code="200"})"#,
            t
        ),
        ok as f64
    );
    assert_eq!(
        sum_of(&prom, "sum(db_client_operation_duration_seconds_count)", t),
        db.queries.load(Ordering::Relaxed) as f64
    );
    assert_eq!(
        sum_of(&prom, "sum(db_client_operation_duration_seconds_count)", t),
        2.0 * ok as f64,
        "2 round trips per /k2"
    );
    assert_eq!(
        sum_of(
            &prom,
            r#"sum(awaitlab_connections_opened_total{role="db"})"#,
            t
        ),
        ok as f64,
        "a db connection per request"
    );
    assert_eq!(
        sum_of(&prom, "sum(http_client_request_duration_seconds_count)", t),
        (ok + refused) as f64,
        "load requests"
    );
    assert_eq!(
        sum_of(
            &prom,
            r#"sum(awaitlab_load_failures_total{kind="refused"})"#,
            t
        ),
        refused as f64
    );
    // The database answers after DB_DELAY, so no round trip is faster: the round-trip histogram
    // has nothing in the buckets that end below 4.9 ms (the bucket holding 5.0x ms may start
    // just under 5 ms).
    let (_, text) = http_get(agent_addr, "/metrics");
    let below = text
        .lines()
        .filter(|l| l.starts_with("db_client_operation_duration_seconds_bucket{"))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .filter_map(|le| Some((le.parse::<f64>().ok()?, le)))
        .filter(|&(le, _)| le < 0.0049)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, le)| le.to_string())
        .unwrap_or_else(|| panic!("no bucket bound below 4.9 ms:\n{text}"));
    assert_eq!(
        sum_of(
            &prom,
            &format!("sum(db_client_operation_duration_seconds_bucket{{le=\"{below}\"}})"),
            t
        ),
        0.0
    );
    let lost = sum_of(
        &prom,
        r#"sum(awaitlab_lost_events_total{cause!="unknown_socket"})"#,
        t,
    );
    assert_eq!(lost, 0.0, "nothing lost");

    // Every query of every panel, annotation and variable returns data over the load.
    // `$__rate_interval` is 4 scrape intervals (Grafana's rule: at least 4x the scrape
    // interval), `$__range` covers the load.
    let missing = dashboards_without_data(&prom, load_end - 1.0, "2s", "10s");
    assert!(missing.is_empty(), "{}", missing.join("\n"));

    // The exposition as Prometheus reads it passes promtool's checks.
    for addr in [agent_addr, driver.addr] {
        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200);
        if let Err(e) = promtool_check(&text) {
            panic!("promtool check metrics on {addr}:\n{e}\n{text}");
        }
    }

    drop(prom);
    let out = agent.stop();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.assert_detached();
}

#[test]
fn dashboards_follow_the_rules() {
    let ds_yaml =
        std::fs::read_to_string(dashboards_dir().join("provisioning/datasources/awaitlab.yaml"))
            .unwrap();
    assert!(
        ds_yaml.contains("uid: awaitlab-prometheus"),
        "the provisioned datasource has the fixed uid"
    );
    for (file, d) in dashboards() {
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{file}: uid"
        );
        assert!(
            d["title"].as_str().is_some_and(|u| !u.is_empty()),
            "{file}: title"
        );
        let vars = d["templating"]["list"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: no templating"));
        let ds = vars
            .iter()
            .find(|v| v["type"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: no datasource variable"));
        assert_eq!(ds["name"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        assert_eq!(
            ds["current"]["value"], "awaitlab-prometheus",
            "{file}: defaults to the provisioned uid"
        );
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert_eq!(
                v["datasource"]["uid"], "${datasource}",
                "{file}: variable {}",
                v["name"]
            );
        }
        let mut ids = HashSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: panel {title:?} has no id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            if p["type"] == "row" {
                continue;
            }
            assert!(
                p["description"].as_str().is_some_and(|s| s.len() > 10),
                "{file}: panel {title:?} has no description"
            );
            assert!(
                p["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{file}: panel {title:?} has no unit"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: panel {title:?} datasource"
            );
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: panel {title:?} has no queries"));
            assert!(
                !targets.is_empty(),
                "{file}: panel {title:?} has no queries"
            );
            for t in targets {
                let e = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: panel {title:?}: query without expr"));
                if let Some(ds) = t.get("datasource") {
                    assert_eq!(
                        ds["uid"], "${datasource}",
                        "{file}: panel {title:?} query datasource"
                    );
                }
                for banned in [
                    "instance=\"",
                    "instance!",
                    "job=\"",
                    "job!",
                    "localhost",
                    "127.0.0.1",
                    ":9464",
                ] {
                    assert!(
                        !e.contains(banned),
                        "{file}: panel {title:?}: hard-coded {banned:?} in {e}"
                    );
                }
                // Two agents (two hosts, or a daemon and a run) must not merge: every metric
                // selector is scoped by the dashboard's job and instance variables.
                let selectors = metric_selectors(e);
                assert!(
                    !selectors.is_empty(),
                    "{file}: panel {title:?}: no metric in {e}"
                );
                for s in selectors {
                    assert!(
                        s.contains("{job=~\"$job\",instance=~\"$instance\""),
                        "{file}: panel {title:?}: {s} is not scoped by $job and $instance"
                    );
                }
                // Every variable used is one substitute() knows (it panics otherwise).
                let _ = substitute(e, "1m", "1h");
            }
        }
        // No hard-coded datasource anywhere: every "uid" under a datasource is the variable.
        let text = serde_json::to_string(&d).unwrap();
        let fixed = text
            .matches("\"datasource\":{\"type\":\"prometheus\",\"uid\":\"")
            .count();
        let var = text
            .matches("\"datasource\":{\"type\":\"prometheus\",\"uid\":\"${datasource}\"}")
            .count();
        assert_eq!(
            fixed, var,
            "{file}: a datasource reference that is not ${{datasource}}"
        );
    }
}

#[test]
fn prometheus_config_and_compose_file_are_valid() {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(dashboards_dir().join("prometheus.yml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // `config` validates against the Compose schema without pulling anything. Prefer v2, fall
    // back to the old docker-compose: the file must satisfy both.
    let compose = dashboards_dir().join("compose.yaml");
    let mut checked = 0;
    for cmd in [&["docker", "compose"][..], &["docker-compose"][..]] {
        let present = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            continue;
        }
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("-f")
            .arg(&compose)
            .args(["--profile", "monitoring", "config", "-q"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "neither `docker compose` nor docker-compose is installed"
    );
}

#[test]
fn the_driver_exposition_passes_promtool() {
    // Every family, including the generator's and the delay's, with samples in each.
    let d = Driver::start();
    d.delay.set(
        "server",
        Duration::from_millis(100),
        Some(Duration::from_micros(100_300)),
        "netem",
    );
    d.cell.set_cell("async-limited", "io_read", 100, 2);
    let (status, text) = http_get(d.addr, "/metrics");
    assert_eq!(status, 200);
    promtool_check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // The generator's families with a sample of every outcome kind.
    let registry = prometheus::Registry::new();
    let load = LoadMetrics::new(&registry).unwrap();
    load.set_users(3);
    for o in [
        Outcome::Status(200),
        Outcome::Status(503),
        Outcome::Error(ErrorKind::Reset),
        Outcome::Error(ErrorKind::Timeout),
    ] {
        load.observe_response(Duration::from_millis(12), o);
    }
    let text = String::from_utf8(awaitlab::metrics::encode(&registry)).unwrap();
    promtool_check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        text.contains("awaitlab_load_failures_total{kind=\"http_5xx\"} 1"),
        "{text}"
    );
    // The same kinds as the load report's, every one present from the start.
    for (kind, n) in [
        ("reset", 1),
        ("timeout", 1),
        ("refused", 0),
        ("http_4xx", 0),
    ] {
        assert!(
            text.contains(&format!(
                "awaitlab_load_failures_total{{kind=\"{kind}\"}} {n}\n"
            )),
            "{kind}: {text}"
        );
    }
}

#[test]
fn a_bad_or_busy_metrics_address_is_one_clear_error() {
    let out = agent_once(&["watch", "--target", "1", "--metrics-addr", "nonsense"]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("--metrics-addr"), "{}", out.stderr);
    // The server binds before the probes load: a busy port loads nothing.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let me = std::process::id().to_string();
    let out =
        assert_loads_nothing(|| agent_once(&["watch", "--target", &me, "--metrics-addr", &addr]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("metrics server on {addr}")),
        "{}",
        out.stderr
    );
}

/// The exact `q` quantile of `samples` (the ceil(q * n)-th smallest), in seconds.
fn exact_quantile(samples: &[Duration], q: f64) -> f64 {
    let mut s: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// Grafana's quantiles at the study's delays: two servers, each in its own namespace and watched
/// by its own agent, whose database answers after exactly 100 ms and 200 ms. Prometheus's
/// `histogram_quantile` over the agents' database round-trip and server-time histograms must
/// come within the layout's stated error (2 % from 0.1 to 300 ms, 5 % to 10 s;
/// docs/metrics-and-daemon.md) of
/// the exact quantiles of the same events (the agent's own summary, an HDR histogram to 0.1 %),
/// and those must be what the other side measured: the database's time from a query's arrival
/// to its answer, and the server's time from a request's first line to its response.
#[test]
fn prometheus_quantiles_are_within_two_percent_at_100_and_200_ms() {
    const STATED: f64 = 0.02;
    // Where the test's clocks and the probe's differ: the kernel sees a query leave the server
    // and the answer arrive, the fake database sees them after and before one veth hop and its
    // own read and write calls (tens of microseconds here); 0.3 ms is 0.3 % of 100 ms, and an
    // error of the old layout (25 % at 100.2 ms) is 80 times larger.
    const CLOCKS: f64 = 0.0003;
    struct Side {
        _ns: (Netns, Netns),
        _links: (Veth, Veth),
        db: FakeDb,
        server: SyncServer,
        agent: Agent,
        url: String,
        target: String,
    }
    let side = |delay_ms: u64, subnet: u8| {
        let srv_ns = Netns::new("qs");
        let db_ns = Netns::new("qd");
        let link = Veth::new(Some(&srv_ns), &db_ns, &format!("10.231.{subnet}"));
        let client_link = Veth::new(None, &srv_ns, &format!("10.232.{subnet}"));
        let db_addr: SocketAddr = format!("{}:5432", link.right_ip).parse().unwrap();
        let db = FakeDb::start(Some(&db_ns), db_addr, Duration::from_millis(delay_ms));
        let server = SyncServer::start(Some(&srv_ns), "0.0.0.0:8000".parse().unwrap(), db_addr);
        let target = srv_ns.path();
        let agent = Agent::watch(&[
            "--target",
            &target,
            "--http-port",
            "8000",
            "--db-port",
            "5432",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        let url = format!("http://{}:8000/k1", client_link.right_ip);
        Side {
            _ns: (srv_ns, db_ns),
            _links: (link, client_link),
            db,
            server,
            agent,
            url,
            target,
        }
    };
    let sides = [side(100, 8), side(200, 9)];
    let prom = Prometheus::start(
        &[sides[0].agent.metrics_addr(), sides[1].agent.metrics_addr()],
        SCRAPE,
    );
    prom.wait_targets_up(2);
    // 3 closed-loop users for 6 s on each: about 60 requests at 100 ms and 30 at 200 ms (the fake database answers one query at a time), then
    // a quiet 2 s so that Prometheus scrapes the final counts.
    let loads: Vec<_> = sides
        .iter()
        .map(|s| {
            Command::new(agent_bin())
                .args([
                    "load",
                    &s.url,
                    "--stages",
                    "3@0s,3@6s",
                    "--json",
                    "--no-check",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for l in loads {
        let out = l.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let t = now();
    // What Prometheus says, by side, family and quantile; then the agents' own figures.
    let families = [
        ("db_client_operation_duration_seconds", "db", "round_trip"),
        ("http_server_request_duration_seconds", "server_time", ""),
    ];
    let mut said = Vec::new();
    for s in &sides {
        for (family, _, _) in families {
            for q in [0.5, 0.99] {
                // The histogram's whole content: every event since the agent attached is the
                // load's, so no rate window enters.
                let expr = format!(
                    "histogram_quantile({q}, sum by (le) ({family}_bucket{{target=\"{}\"}}))",
                    s.target
                );
                said.push(sum_of(&prom, &expr, t));
            }
        }
    }
    drop(prom);
    let mut said = said.into_iter();
    for s in sides {
        let dwell = s.db.dwell.lock().unwrap().clone();
        let handled = s.server.handled.lock().unwrap().clone();
        assert!(
            dwell.len() > 20 && handled.len() > 20,
            "too few: {} {}",
            dwell.len(),
            handled.len()
        );
        let out = s.agent.stop();
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.assert_detached();
        let sum = out.summary();
        for (family, key, sub) in families {
            let own = if sub.is_empty() {
                &sum[key]
            } else {
                &sum[key][sub]
            };
            for (q, field) in [(0.5, "p50_ms"), (0.99, "p99_ms")] {
                let est = said.next().unwrap();
                let exact = own[field].as_f64().unwrap() / 1e3;
                let err = (est - exact).abs();
                eprintln!(
                    "{family} q{q} at {}: Prometheus {:.3} ms, the agent's exact {:.3} ms ({:+.2} %)",
                    s.url,
                    est * 1e3,
                    exact * 1e3,
                    (est - exact) / exact * 100.0
                );
                // The layout's stated error (2 % up to 300 ms, 5 % above: three users share the
                // fake database, so server times reach 3 x its delay), plus the HDR histogram's
                // own 0.1 %.
                let stated = if exact <= 0.3 { STATED } else { 0.05 };
                assert!(
                    err <= (stated + 0.001) * exact,
                    "{family} q{q} of {}: Prometheus says {:.3} ms, the events' quantile is {:.3} ms ({:.2} %)",
                    s.url,
                    est * 1e3,
                    exact * 1e3,
                    err / exact * 100.0
                );
            }
            // And the agent measured what the other side did: the medians agree to within
            // where the two clocks stand (CLOCKS) plus two thread wake-ups the other side does
            // not see (the database's after a query arrives, the server's after the answer
            // does) on a 2-core host running two agents, two loads and Prometheus: 1.3 ms was
            // seen at the median; 2 ms (2 % of the delay) bounds it. The precision claim is the
            // bucket check above; this one checks the quantity.
            let other = if key == "db" { &dwell } else { &handled };
            let (mine, theirs) = (
                own["p50_ms"].as_f64().unwrap() / 1e3,
                exact_quantile(other, 0.5),
            );
            assert!(
                (mine - theirs).abs() <= CLOCKS + 0.002,
                "{family} p50 of {}: the agent {:.3} ms, the other side {:.3} ms",
                s.url,
                mine * 1e3,
                theirs * 1e3
            );
        }
    }
}

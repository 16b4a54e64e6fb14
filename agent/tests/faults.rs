//! Faults and floods the agent must survive while keeping its promises: a burst that overruns
//! the ring buffer while the agent is stopped (the loss is counted, exactly, and exported), and
//! a server answering 10,000 distinct paths (the route labels stay at their cap and every
//! request is still counted), 10,000 connections against a connection map of 1,000 (the rest
//! counted), a full results disk, and the database or the server killed mid-cell. Run as root (`cargo xtask test`); each test removes what it made.

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use common::{prom::*, *};

/// A server in a namespace (no database work: `/x` answers at once) and a client link to it.
struct Served {
    _ns: (Netns, Netns),
    _links: (Veth, Veth),
    _db: FakeDb,
    server: SyncServer,
    addr: SocketAddr,
    target: String,
}

fn served(subnet: u8) -> Served {
    let srv_ns = Netns::new("fs");
    let db_ns = Netns::new("fd");
    let link = Veth::new(Some(&srv_ns), &db_ns, &format!("10.241.{subnet}"));
    let client_link = Veth::new(None, &srv_ns, &format!("10.242.{subnet}"));
    let db_addr: SocketAddr = format!("{}:5432", link.right_ip).parse().unwrap();
    let db = FakeDb::start(Some(&db_ns), db_addr, Duration::ZERO);
    let server = SyncServer::start(Some(&srv_ns), "0.0.0.0:8000".parse().unwrap(), db_addr);
    let addr = format!("{}:8000", client_link.right_ip).parse().unwrap();
    let target = srv_ns.path();
    Served {
        _ns: (srv_ns, db_ns),
        _links: (link, client_link),
        _db: db,
        server,
        addr,
        target,
    }
}

impl Served {
    /// Waits two of the agent's 0.5 s intervals (it reads the kernel's maps once each), reads
    /// its /metrics, stops it (exit 0), and checks that the server answered `requests`.
    fn metrics_then_stop(&self, agent: Agent, requests: usize) -> (String, Finished) {
        std::thread::sleep(Duration::from_millis(1200));
        let (_, text) = http_get(agent.metrics_addr(), "/metrics");
        let out = agent.stop();
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert_eq!(
            self.server.requests.load(Ordering::Relaxed),
            requests as u64
        );
        (text, out)
    }

    /// `start` (`Agent::watch` or `Agent::watch_aggregated`) on the server's namespace and port,
    /// with a 0.5 s interval, metrics on a free loopback port, and `extra` arguments.
    fn agent(&self, start: fn(&[&str]) -> Agent, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--target",
            &self.target,
            "--http-port",
            "8000",
            "--interval",
            "0.5",
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        start(&args)
    }
}

/// `n` keep-alive GETs of `path(i)` on each of `conns` connections at once, each answered 200.
fn burst(addr: SocketAddr, conns: usize, n: usize, path: impl Fn(usize) -> String + Sync) {
    std::thread::scope(|s| {
        for c in 0..conns {
            let path = &path;
            s.spawn(move || {
                let mut conn = TcpStream::connect(addr).unwrap();
                for i in 0..n {
                    assert_eq!(get(&mut conn, &path(c * n + i), false), 200);
                }
            });
        }
    });
}

/// The agent is stopped (SIGSTOP) while 60,000 requests are served: the 8 MiB ring buffer
/// holds about 40,000 records, so the rest cannot be written. After SIGCONT the agent goes on;
/// every request is either received or counted as lost to the full ring buffer, and the two
/// add up exactly to the server's own count. The loss is exported on /metrics.
#[test]
fn a_burst_that_overruns_the_ring_buffer_is_counted_exactly() {
    let s = served(1);
    let agent = s.agent(Agent::watch, &[]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    burst(s.addr, 4, 15_000, |_| "/x".to_string());
    // SAFETY: as above.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(2));
    let metrics = agent.metrics_addr();
    let (_, text) = http_get(metrics, "/metrics");
    let exported = lost_on_metrics(&text, "ringbuf_full").unwrap_or(0.0);
    let out = agent.stop();
    assert_eq!(out.code, Some(0), "the agent kept running: {}", out.stderr);
    let sum = out.summary();
    let served = s.server.requests.load(Ordering::Relaxed);
    let received = sum["requests"].as_u64().unwrap();
    let lost = sum["lost"]["ringbuf_full"].as_u64().unwrap();
    eprintln!("served {served}, received {received}, lost to the full ring buffer {lost}");
    assert_eq!(served, 60_000);
    assert!(lost > 0, "the burst did not overrun the ring buffer: {sum}");
    assert_eq!(received + lost, served, "{sum}");
    assert_eq!(exported, lost as f64, "the loss on /metrics");
    out.assert_detached();
}

/// Raises this process's open-file limit to its hard limit (the 10,000 client sockets below).
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to a local rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}

/// 10,000 connections open at once to a server in a namespace, against probes whose connection
/// map holds 1,000 (`--max-connections`): the agent counts every connection opened (10,000, as
/// the client made), follows the first 1,000, counts each of the other 9,000 as conn_map_full
/// (in its summary and on /metrics), and keeps running.
#[test]
fn ten_thousand_connections_fill_the_connection_map_to_its_cap_counted() {
    const CONNS: usize = 10_000;
    const CAP: u64 = 1_000;
    assert!(
        raise_nofile() > CONNS as u64 + 1_000,
        "open-file limit too low"
    );
    let ns = Netns::new("fc");
    let link = Veth::new(None, &ns, "10.243.1");
    // Nothing accepts: every connection completes its handshake in the kernel and waits in
    // the listen queue, established. The namespace's own somaxconn lets the queue hold them.
    assert!(ns
        .exec("sysctl", &["-qw", "net.core.somaxconn=20000"])
        .status()
        .unwrap()
        .success());
    let listener = in_netns(&ns, || {
        let l = std::net::TcpListener::bind("0.0.0.0:8000").unwrap();
        // SAFETY: listen on a socket we own, to raise its backlog.
        assert_eq!(
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 20_000) },
            0
        );
        l
    })
    .join()
    .unwrap();
    let addr: SocketAddr = format!("{}:8000", link.right_ip).parse().unwrap();
    let agent = Agent::watch(&[
        "--target",
        &ns.path(),
        "--http-port",
        "8000",
        "--interval",
        "0.5",
        "--max-connections",
        &CAP.to_string(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let held: Vec<TcpStream> = (0..CONNS)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, text) = http_get(agent.metrics_addr(), "/metrics");
    let exported = lost_on_metrics(&text, "conn_map_full").unwrap_or(0.0);
    let out = agent.stop();
    drop(held);
    drop(listener);
    assert_eq!(out.code, Some(0), "the agent kept running: {}", out.stderr);
    let sum = out.summary();
    assert_eq!(sum["http_conns_opened"], CONNS as u64, "{sum}");
    // The map is preallocated with exactly CAP entries (BPF_MAP_TYPE_HASH): the first CAP
    // connections took them and stayed open, so each later one found the map full.
    assert_eq!(sum["lost"]["conn_map_full"], CONNS as u64 - CAP, "{sum}");
    assert_eq!(
        exported,
        (CONNS as u64 - CAP) as f64,
        "conn_map_full on /metrics"
    );
    out.assert_detached();
}

/// 10,000 distinct paths: the route labels stay at their cap (64 routes and "other", in the
/// summary and on /metrics), and every request is counted under one of them.
#[test]
fn ten_thousand_distinct_paths_keep_the_labels_at_their_cap() {
    let s = served(2);
    let agent = s.agent(Agent::watch, &[]);
    // Letters only: numeric segments would be normalised into one route.
    let name = |mut i: usize| {
        let mut p = String::from("/r");
        loop {
            p.push((b'a' + (i % 26) as u8) as char);
            i /= 26;
            if i == 0 {
                break p;
            }
        }
    };
    burst(s.addr, 4, 2_500, name);
    std::thread::sleep(Duration::from_millis(700));
    let metrics = agent.metrics_addr();
    let (_, text) = http_get(metrics, "/metrics");
    let routes: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
        .filter_map(|l| l.split("http_route=\"").nth(1)?.split('"').next())
        .collect();
    let out = agent.stop();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let sum = out.summary();
    let served = s.server.requests.load(Ordering::Relaxed);
    assert_eq!(served, 10_000);
    let paths = sum["paths"].as_array().unwrap();
    let counted: u64 = paths.iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert!(paths.len() <= 65, "{} paths in the summary", paths.len());
    assert!(routes.len() <= 65, "{} routes on /metrics", routes.len());
    assert!(routes.contains("/other"), "{routes:?}");
    assert_eq!(counted, served, "every request under some path");
    assert_eq!(sum["requests"].as_u64().unwrap(), served);
    out.assert_detached();
}

/// A path of letters only (numeric segments would share a key): `/k` and two letters from `i`.
fn key_path(i: usize) -> String {
    let letter = |n: usize| (b'a' + n as u8) as char;
    format!("/k{}{}", letter(i / 26 % 26), letter(i % 26))
}

/// The request count of each route on /metrics.
fn by_route(text: &str) -> Vec<(&str, f64)> {
    text.lines()
        .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
        .filter_map(|l| {
            Some((
                l.split("http_route=\"").nth(1)?.split('"').next()?,
                value(l),
            ))
        })
        .collect()
}

/// Aggregation mode with `--max-request-keys 48` and 100 paths, each requested once (one key
/// each: one process, status 200): the first 48 keys get histograms of their own (32 in the
/// per-CPU array's slots, 16 in the hash past them); the other 52 requests find both full and
/// are measured under `OTHER /other`, each counted as agg_map_full. Read on /metrics, against
/// the server's own count.
#[test]
fn a_full_request_key_map_sends_the_rest_to_other_counted_exactly() {
    const KEYS: usize = 48;
    const PATHS: usize = 100;
    assert!(
        KEYS > agent_common::REQ_SLOTS as usize,
        "past the slots, into the hash"
    );
    let s = served(3);
    let agent = s.agent(
        Agent::watch_aggregated,
        &["--max-request-keys", &KEYS.to_string()],
    );
    burst(s.addr, 1, PATHS, key_path);
    let (text, out) = s.metrics_then_stop(agent, PATHS);
    let lost = lost_on_metrics(&text, "agg_map_full");
    let overflow = (PATHS - KEYS) as f64;
    assert_eq!(lost, Some(overflow), "agg_map_full on /metrics:\n{text}");
    let by_route = by_route(&text);
    let other: f64 = by_route
        .iter()
        .filter(|(r, _)| *r == "/other")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(other, overflow, "{by_route:?}");
    // The 16 keys the map held: one request each, under their own paths.
    let own: Vec<&(&str, f64)> = by_route.iter().filter(|(r, _)| *r != "/other").collect();
    assert_eq!(own.len(), KEYS, "{by_route:?}");
    assert!(
        own.iter().all(|(r, n)| *n == 1.0 && r.starts_with("/k")),
        "{by_route:?}"
    );
    out.assert_detached();
}

/// Aggregation mode, keep-alive connections that change their request's key: each of 4
/// connections asks for 36 paths in turn, each twice in a row, and goes round twice. A
/// connection remembers where its last key's histogram is; a repeat uses it, a change looks the
/// new key up. The 36 keys fill the 32 slots of the per-CPU array and 4 go to the hash past
/// them. The truth is what the clients sent: 16 requests of every path, none lost.
#[test]
fn keep_alive_connections_changing_keys_count_every_path() {
    const CONNS: usize = 4;
    const PATHS: usize = 36;
    const EACH: usize = 2 * 2 * PATHS;
    assert!(
        PATHS > agent_common::REQ_SLOTS as usize,
        "past the slots, into the hash"
    );
    let s = served(5);
    let agent = s.agent(Agent::watch_aggregated, &[]);
    burst(s.addr, CONNS, EACH, |i| key_path(i % EACH / 2 % PATHS));
    let (text, out) = s.metrics_then_stop(agent, CONNS * EACH);
    let lost = lost_on_metrics(&text, "agg_map_full").unwrap_or(0.0);
    assert_eq!(lost, 0.0, "{text}");
    let mut counts = by_route(&text);
    counts.sort_by(|a, b| a.0.cmp(b.0));
    let want: Vec<(String, f64)> = (0..PATHS)
        .map(|i| (key_path(i), (CONNS * EACH / PATHS) as f64))
        .collect();
    let got: Vec<(String, f64)> = counts.iter().map(|(r, n)| (r.to_string(), *n)).collect();
    assert_eq!(got, want);
    out.assert_detached();
}

/// `watch --probe-floor` (the benchmark's floor): the programs attach and see the target's
/// sockets, but the I/O path stops at the namespace check. The connection-state program still
/// counts the 5 connections the clients opened (so the programs ran and matched the namespace);
/// not one of the server's 50 requests is measured.
#[test]
fn the_probe_floor_sees_the_target_and_measures_no_request() {
    const CONNS: usize = 5;
    const EACH: usize = 10;
    let s = served(4);
    let agent = s.agent(Agent::watch_aggregated, &["--probe-floor"]);
    burst(s.addr, CONNS, EACH, |i| format!("/f{i}"));
    let (text, out) = s.metrics_then_stop(agent, CONNS * EACH);
    let opened = text
        .lines()
        .find(|l| l.starts_with("awaitlab_connections_opened_total{") && l.contains("\"http\""))
        .map(value);
    assert_eq!(opened, Some(CONNS as f64), "{text}");
    let measured: f64 = text
        .lines()
        .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
        .map(value)
        .sum();
    assert_eq!(measured, 0.0, "{text}");
    out.assert_detached();
}

/// `awaitlab_lost_events_total` of one cause on a /metrics page (None when not exported).
fn lost_on_metrics(text: &str, cause: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("awaitlab_lost_events_total{") && l.contains(cause))
        .map(value)
}

/// The value of one line of the Prometheus text format.
fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A tmpfs mounted for one test and unmounted on drop (lazily, should anything hold it).
struct Tmpfs(tempdir::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempdir::TempDir::new("awl-tmpfs");
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.path().to_str().unwrap(),
            ],
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// The results directory fills up during a run (a filler takes the rest of a small tmpfs once
/// the run has written its index): the run stops with one clear error naming the full disk,
/// and leaves no partial cell file and no temporary file; once space is back, `--resume`
/// runs the cell and writes it.
#[test]
fn a_full_results_disk_is_one_clear_error_and_resume_finishes_the_run() {
    let fs = Tmpfs::new("8m");
    let results = fs.0.path().join("results");
    let run = smoke_run(
        &results,
        &[
            "--no-metrics",
            "--setups",
            "sync",
            "--routes",
            "io_read",
            "--delays",
            "0",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Once the index is there, fill what is left.
    let t0 = std::time::Instant::now();
    let run_dir = loop {
        let found = std::fs::read_dir(&results).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.join("index.json").is_file())
        });
        if let Some(d) = found {
            break d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run wrote no index"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let filler = fs.0.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=64k",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run succeeded on a full disk: {stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one clear error: {stderr}");
    let cells: Vec<String> = std::fs::read_dir(run_dir.join("cells"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !cells
            .iter()
            .any(|c| c.ends_with(".json") || c.contains(".tmp")),
        "a partial or temporary cell file: {cells:?}"
    );

    std::fs::remove_file(&filler).unwrap();
    // The same configuration as the run (a resume checks it is the same matrix).
    let out = std::process::Command::new(agent_bin())
        .args([
            "run",
            "--backend",
            "netns",
            "--profile",
            "smoke",
            "--no-metrics",
        ])
        .args([
            "--setups", "sync", "--routes", "io_read", "--delays", "0", "--resume",
        ])
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run_dir.join("cells/sync__io_read__0ms__r1.json").is_file());
    assert!(run_dir.join("report.md").is_file());
}

/// `awaitlab run` of two smoke cells (sync, io_read, 0 and 100 ms) with `extra` flags; once the
/// first cell's load has run 5 s, every process in the namespace `victim_ns` (awlrund: the
/// database's, awlruns: the server's) is killed. Returns the run's exit status, stderr and
/// directory.
fn run_and_kill(
    results: &std::path::Path,
    victim_ns: &str,
    extra: &[&str],
) -> (std::process::ExitStatus, String, std::path::PathBuf) {
    use std::io::BufRead as _;
    let mut child = smoke_run(
        results,
        &[
            "--no-metrics",
            "--setups",
            "sync",
            "--routes",
            "io_read",
            "--delays",
            "0,100",
            "--order",
            "fixed",
        ],
    )
    .args(extra)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let mut killed = false;
    for line in stderr.lines() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        // Progress lines come every 10 s without a terminal; the first of the first cell's
        // load says how far it is ("[1/2] ...:   5/15 s").
        if !killed && line.starts_with("[1/2]") && line.contains("/15 s") {
            let pids = sh("ip", &["netns", "pids", victim_ns]);
            for pid in pids.split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .status();
            }
            killed = true;
        }
    }
    assert!(killed, "never saw the first cell's load: {said}");
    let status = child.wait().unwrap();
    let dir = std::fs::read_dir(results)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("index.json").is_file())
        .expect("a run directory");
    (status, said, dir)
}

/// What a run leaves: its namespaces and the processes in them.
fn run_leftovers() -> Vec<String> {
    sh("ip", &["netns", "list"])
        .lines()
        .filter(|l| l.starts_with("awlrun"))
        .map(String::from)
        .collect()
}

fn cell_json(dir: &std::path::Path, stem: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("cells").join(format!("{stem}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// PostgreSQL killed in the middle of a cell: the cell is recorded as failed, naming the dead
/// database, the run brings up a new system and runs the next cell, the report lists the
/// failure, and nothing of the run is left.
#[test]
fn postgres_killed_mid_cell_is_a_failed_cell_and_the_run_goes_on() {
    let results = tempdir::TempDir::new("awl-fault-pg");
    let (status, said, dir) = run_and_kill(results.path(), "awlrund", &[]);
    assert!(status.success(), "{said}");
    let first = cell_json(&dir, "sync__io_read__0ms__r1").expect("the failed cell's record");
    assert!(
        first["failed"]
            .as_str()
            .is_some_and(|f| f.starts_with("PostgreSQL (pid ")),
        "{first}"
    );
    let second = cell_json(&dir, "sync__io_read__100ms__r1").expect("the next cell ran");
    assert!(second.get("failed").is_none(), "{second}");
    assert!(
        second["load"]["total_successes"].as_u64().unwrap() > 0,
        "{second}"
    );
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("Cell sync__io_read__0ms__r1 failed: PostgreSQL"),
        "{md}"
    );
    assert!(run_leftovers().is_empty(), "{:?}", run_leftovers());
}

/// The server killed in the middle of a cell with `--fail-fast`: the cell is recorded as
/// failed, naming the dead server, the run stops with one error, and nothing is left.
#[test]
fn the_server_killed_mid_cell_stops_a_fail_fast_run_cleanly() {
    let results = tempdir::TempDir::new("awl-fault-srv");
    let (status, said, dir) = run_and_kill(results.path(), "awlruns", &["--fail-fast"]);
    assert!(!status.success(), "{said}");
    assert!(said.contains("(--fail-fast)"), "{said}");
    let first = cell_json(&dir, "sync__io_read__0ms__r1").expect("the failed cell's record");
    assert!(
        first["failed"]
            .as_str()
            .is_some_and(|f| f.starts_with("the server (pid ")),
        "{first}"
    );
    assert!(
        cell_json(&dir, "sync__io_read__100ms__r1").is_none(),
        "no cell after the stop"
    );
    assert!(run_leftovers().is_empty(), "{:?}", run_leftovers());
}

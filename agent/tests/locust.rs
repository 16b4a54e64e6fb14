//! Privileged test: `awaitlab load` and Locust 2.13.0, the study's own client (`HttpUser`, one
//! task, no wait time), at the same closed-loop load against the system under test itself
//! (netns back end, Sync setup, io_read, both stacks), after a warm-up, both at once. Their
//! report charts (Locust's read off its own stats history) must agree from the first point that
//! averages ten whole seconds of both tools' load, and so must their total successes.
//!
//! Needs Locust 2.13.0 in `/var/lib/awaitlab/venv-locust-2.13` (`cargo xtask setup`, from
//! `xtask/requirements-locust-2.13.txt`). Traffic goes only to the server in the namespace the
//! system under test made; the system, Locust and the temporary files are removed by guards,
//! also on failure.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use awaitlab::{
    load::{
        chart::{self, Tally},
        LoadReport,
    },
    study::experiment::config::WARMUP_S,
    study::sut::{BackendKind, Options, Setup, Stack, Sut},
};

/// Users of each tool, and the run time. The two tools
/// run at the same time, so 20 users in all keep the one sync worker always busy (it serves
/// one request at a time in about 60 ms, and each user's next request waits in the listen
/// queue behind about 19 others); 30 s gives each chart 5 points, the last 3 over ten whole
/// seconds of steady load.
const USERS_EACH: u32 = 10;
/// Users started per second by both tools: all within 0.1 s, so that neither tool has the
/// server to itself at the start while the other's users are still coming (the first chart
/// point covers only the first 3 s).
const SPAWN_RATE: u32 = 100;
const RUN_S: u32 = 30;

/// Must match `xtask/src/setup.rs` (`STUDY_LOCUST_VENV`).
fn locust_bin() -> PathBuf {
    std::env::var_os("AWAITLAB_VENV_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/awaitlab"), PathBuf::from)
        .join("venv-locust-2.13/bin/locust")
}

/// The study's locustfile (an `HttpUser` with one task and Locust's default wait time of 0),
/// plus listeners that change nothing in the load: they say when the test starts, note when
/// each chart point was taken (the chart keeps only HH:MM:SS) and when the first request of
/// each second completed, and write Locust's own chart, per-second counts and totals when it
/// quits.
const LOCUSTFILE: &str = r#"
import json
import os
import time

from locust import HttpUser, events, task


class Study(HttpUser):
    @task
    def io_read(self):
        self.client.get("/posts/io_read/")


class _Timed(list):
    def append(self, point):
        super().append(dict(point, unix=time.time()))


_first = {}


# After Locust's own reset at the start (`clear_all`, which also sets the start time).
@events.test_start.add_listener
def _start(environment, **_kw):
    environment.stats.history = _Timed()
    open(os.environ["AWL_LOCUST_STARTED"], "w").close()


@events.request.add_listener
def _request(**_kw):
    now = time.time()
    _first.setdefault(int(now), now)


@events.quitting.add_listener
def _dump(environment, **_kw):
    total = environment.stats.total
    with open(os.environ["AWL_LOCUST_DUMP"], "w") as f:
        json.dump(
            {
                "history": environment.stats.history,
                "start_time": total.start_time,
                "requests": total.num_requests,
                "failures": total.num_failures,
                "per_second": total.num_reqs_per_sec,
                "fail_per_second": total.num_fail_per_sec,
                "first_done": _first,
            },
            f,
        )
"#;

/// Kills Locust if the test ends while it runs.
struct Kill(Option<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct LocustRun {
    requests: u64,
    failures: u64,
    /// The report chart: current_rps - current_fail_per_sec at each point.
    chart: Vec<f64>,
    /// The same points computed by `awaitlab::load::chart` from Locust's own per-second
    /// counts at the times Locust took them.
    recomputed: Vec<f64>,
    /// Successes completed in each unix second, from its first to its last.
    by_second: BTreeMap<u64, u64>,
}

impl LocustRun {
    fn successes(&self) -> u64 {
        self.requests - self.failures
    }
}

/// Successes awaitlab completed in each unix second of its run.
fn our_successes_by_second(r: &LoadReport) -> BTreeMap<u64, u64> {
    let first = r.started_unix_ms / 1000;
    r.series
        .iter()
        .map(|p| (first + u64::from(p.second), p.successes))
        .collect()
}

/// Each tool's successes in the whole seconds during which both were running: every second
/// both count, less each tool's first and last (partial, and the one tool starts a moment
/// after the other and stops a moment after it, with the server to itself meanwhile: about
/// 16 successes a second here).
fn successes_in_common_seconds(a: &BTreeMap<u64, u64>, b: &BTreeMap<u64, u64>) -> (u64, u64) {
    let inner = |m: &BTreeMap<u64, u64>| {
        let (lo, hi) = (m.keys().next().copied(), m.keys().next_back().copied());
        lo.zip(hi).map_or(1..1, |(lo, hi)| lo + 1..hi)
    };
    let (ra, rb) = (inner(a), inner(b));
    let seconds = ra.start.max(rb.start)..ra.end.min(rb.end);
    let sum = |m: &BTreeMap<u64, u64>| {
        seconds
            .clone()
            .map(|s| m.get(&s).copied().unwrap_or(0))
            .sum()
    };
    (sum(a), sum(b))
}

/// The largest of `chart`'s points from the first one whose 10-second window lies wholly after
/// the start (see `STEADY_FROM`).
fn steady_max(chart: &[f64]) -> f64 {
    chart.iter().skip(STEADY_FROM).copied().fold(0.0, f64::max)
}

/// The chart's first two points (at 5 and 10 s) average over second 0, the wall-clock second
/// in which the tool started, of which it ran only the part after its own start, and divide by
/// whole seconds: a tool that started 0.9 s into its second gets a first point 0.9 / 3 = 30 %
/// lower than one that started at its beginning, at the same load. They also cover the first
/// seconds, when one tool's users, started 0.1-0.3 s before the other's, reach the one worker's
/// listen queue first. So these points measure when each tool started, which the test cannot
/// choose, not how it loads the server: Locust's chart once read 10.0, 8.3, 7.1 ... against
/// awaitlab's largest point of 7.8, with 230 and 231 successes. From the third point (15 s:
/// seconds 3-12), every window is ten whole seconds of both tools' load.
const STEADY_FROM: usize = 2;

/// Starts Locust and returns once its users start (its `test_start`).
fn start_locust(dir: &Path, base: &str) -> Kill {
    let file = dir.join("locustfile.py");
    std::fs::write(&file, LOCUSTFILE).unwrap();
    let started = dir.join("locust.started");
    let _ = std::fs::remove_file(&started);
    let bin = locust_bin();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup`",
        bin.display()
    );
    let child = Command::new("nice")
        .args(["-n", NICE])
        .arg(&bin)
        .arg("-f")
        .arg(&file)
        .args(["--headless", "--only-summary", "--loglevel", "WARNING"])
        .args(["-u", &USERS_EACH.to_string(), "-r", &SPAWN_RATE.to_string()])
        .args(["-t", &format!("{RUN_S}s"), "--host", base, "--csv"])
        .arg(dir.join("locust"))
        .env("AWL_LOCUST_DUMP", dir.join("locust.json"))
        .env("AWL_LOCUST_STARTED", &started)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let mut guard = Kill(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        let exited = guard.0.as_mut().unwrap().try_wait().unwrap();
        assert!(
            exited.is_none(),
            "Locust exited before its test started: {exited:?}"
        );
        assert!(Instant::now() < deadline, "Locust did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    guard
}

/// Waits for the Locust that `start_locust` started, and reads what it wrote.
fn finish_locust(dir: &Path, mut guard: Kill) -> LocustRun {
    let dump = dir.join("locust.json");
    let deadline = Instant::now() + Duration::from_secs(u64::from(RUN_S) + 60);
    let status = loop {
        if let Some(s) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "Locust did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = guard.0.take().and_then(|mut c| c.stderr.take()) {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "Locust failed ({status}): {err}");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dump)
            .unwrap_or_else(|e| panic!("{}: {e}; {err}", dump.display())),
    )
    .unwrap();
    let history = v["history"].as_array().unwrap();
    let chart = history
        .iter()
        .map(|p| p["current_rps"].as_f64().unwrap() - p["current_fail_per_sec"].as_f64().unwrap())
        .collect();
    // Locust's per-second counts as awaitlab's tallies: second 0 is int(start_time), the
    // second Locust clips its averages at.
    let origin = v["start_time"].as_f64().unwrap().floor() as u64;
    let count = |key: &str, s: u64| v[key][s.to_string()].as_u64().unwrap_or(0);
    let last = v["per_second"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse::<u64>().unwrap())
        .max()
        .unwrap_or(origin);
    let tallies: Vec<Tally> = (origin..=last)
        .map(|s| Tally {
            requests: count("per_second", s),
            failures: count("fail_per_second", s),
            first_done_ns: v["first_done"][s.to_string()]
                .as_f64()
                .map_or(0, |t| ((t - s as f64) * 1e9) as u32),
        })
        .collect();
    let recomputed = history
        .iter()
        .map(|p| {
            let t = p["unix"].as_f64().unwrap() - origin as f64;
            let (rps, fps) = chart::current_rates(&tallies, t);
            rps - fps
        })
        .collect();
    let by_second = tallies
        .iter()
        .zip(origin..)
        .map(|(t, s)| (s, t.requests - t.failures))
        .collect();
    LocustRun {
        requests: v["requests"].as_u64().unwrap(),
        failures: v["failures"].as_u64().unwrap(),
        chart,
        recomputed,
        by_second,
    }
}

/// `awaitlab load` with `users` users for `run_s` seconds, started now.
fn start_awaitlab(url: &str, users: u32, run_s: f64) -> Child {
    Command::new("nice")
        .args(["-n", NICE])
        .arg(common::agent_bin())
        .args(["load", url, "--users", &users.to_string(), "--spawn-rate"])
        .arg(SPAWN_RATE.to_string())
        .args(["--run-time", &format!("{run_s}s"), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish_awaitlab(child: Child) -> LoadReport {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "awaitlab load: {stderr}");
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// Priority of the server, PostgreSQL and both clients over other work on the host. On the
/// shared 2-core host here, other processes moved one client's figures against the other's by
/// up to 19 % (a server that waits 20 ms per request, 10 users, 10 s: Locust 387 and 414
/// requests, awaitlab 461 and 474); with the server and the clients at nice -15, six such runs
/// agreed within 7 %. It gives what is measured the CPU, and changes nothing in it.
const NICE: &str = "-15";

/// Gives the running server and PostgreSQL (the connections' backends it forks inherit it)
/// the clients' priority.
fn prioritise(sut: &Sut) {
    for pid in sut.server_pids().iter().chain([&sut.state().db_pid]) {
        let ok = Command::new("renice")
            .args(["-n", NICE, "-p", &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "renice {pid}");
    }
}

/// A closed-loop run leaves requests queued in the one sync worker when it stops (up to 20 x
/// 60 ms): let them finish, so that the next run starts on an idle server.
fn settle() {
    std::thread::sleep(Duration::from_secs(3));
}

/// Run together, the two tools' successes differed by 1.6-4.5 % and their Max sRPS by 1-7 %
/// (a chart point averages only about 100 requests of each tool) in four comparisons here.
/// Successes are compared over the seconds both tools ran: once, the totals of a whole run
/// differed by 17 % (245 and 210) while the sums of the two charts agreed within 2.3 %; most
/// of the difference fell in the run's last seconds, which no chart point covers and where the
/// tools do not stop at the same moment. 15 % leaves room for the 1.6-4.5 %, and still fails a
/// client that keeps its users out of the listen queue for more than about 180 ms of each
/// user's 1.2 s cycle (20 users x 60 ms), such as one that waited for the server's close after
/// a `Connection: close` response.
const TOLERANCE: f64 = 0.15;

fn within(ours: f64, theirs: f64, tol: f64) -> bool {
    theirs > 0.0 && (ours / theirs - 1.0).abs() <= tol
}

#[test]
fn awaitlab_load_and_locust_2_13_agree_on_the_system_under_test() {
    let name = format!("awl{}", common::tag());
    let mut sut = Sut::up(
        BackendKind::Netns,
        &Options::new(Setup::Sync, Stack::Current, &name),
    )
    .unwrap_or_else(|e| panic!("up: {e}"));
    sut.seed().unwrap();
    let dir = common::tempdir::TempDir::new("awl-locust");
    let mut failed = Vec::new();
    for stack in [Stack::Current, Stack::Study] {
        if stack != sut.state().stack {
            sut.switch(Setup::Sync, stack).unwrap();
        }
        prioritise(&sut);
        let base = sut.url().trim_end_matches('/').to_owned();
        let url = format!("{base}/posts/io_read/");
        // The same unmeasured warm-up as every cell of a study (the runner's default): the
        // fresh server's first requests, and PostgreSQL's first scans of the table, must not
        // fall into the measurement.
        finish_awaitlab(start_awaitlab(&url, 2 * USERS_EACH, WARMUP_S));
        settle();
        // Both tools at once, each with half the users. This route is bound by the host's CPU
        // here (PostgreSQL's parallel count(*) of the 1,000,000 rows takes 85-115 ms of CPU
        // per request over the 2 cores), and the host's speed drifts: in 8 consecutive 20 s
        // runs of one tool or the other, one after the other, PostgreSQL's CPU per request
        // went from 83 to 112 ms and the successes moved with it, by up to 30 % (docs/load.md).
        // Run together, both tools meet the same host, the same server and the same listen
        // queue, which serves connections in the order they come: a client that loads the
        // server as the other does gets the same share.
        let locust = start_locust(dir.path(), &base);
        let ours = start_awaitlab(&url, USERS_EACH, f64::from(RUN_S));
        let ours = finish_awaitlab(ours);
        let locust = finish_locust(dir.path(), locust);
        settle();
        eprintln!(
            "{stack:?}: Locust {} successes ({} failures), chart {:?}; awaitlab {} successes ({} failures), chart {:?} (max sRPS {:.2}, best 5 s window {:.2})",
            locust.successes(),
            locust.failures,
            locust.chart,
            ours.total_successes,
            ours.failures,
            ours.chart(),
            ours.max_srps,
            ours.max_srps_5s_window
        );
        // awaitlab's arithmetic is Locust's: on Locust's own counts, at the moments Locust took
        // its points, it gives Locust's chart (the same float operations: equal to rounding).
        assert_eq!(locust.chart.len(), locust.recomputed.len());
        for (a, b) in locust.chart.iter().zip(&locust.recomputed) {
            assert!(
                (a - b).abs() < 1e-9,
                "{stack:?}: Locust's chart {:?}, recomputed {:?}",
                locust.chart,
                locust.recomputed
            );
        }
        // The study's io_read never fails at this load; a failure would mean a broken system.
        assert_eq!(locust.failures, 0, "{stack:?}: Locust saw failures");
        assert_eq!(ours.failures, 0, "{stack:?}: awaitlab saw failures");
        // TOLERANCE: see its definition.
        let (a, b) =
            successes_in_common_seconds(&our_successes_by_second(&ours), &locust.by_second);
        assert!(
            b > 100,
            "{stack:?}: {b} Locust successes in the common seconds"
        );
        if !within(a as f64, b as f64, TOLERANCE) {
            failed.push(format!(
                "{stack:?}: successes in the seconds both ran {a} vs Locust's {b} (totals {} and {})",
                ours.total_successes,
                locust.successes()
            ));
        }
        // Both charts have a point every 5 s up to the same run time.
        let our_chart = ours.chart();
        assert_eq!(
            our_chart.len(),
            locust.chart.len(),
            "{stack:?}: chart lengths"
        );
        assert!(our_chart.len() > STEADY_FROM, "{stack:?}: no steady point");
        let (a, b) = (steady_max(&our_chart), steady_max(&locust.chart));
        if !within(a, b, TOLERANCE) {
            failed.push(format!(
                "{stack:?}: max sRPS from {} s on {a:.2} vs Locust's {b:.2} (charts {our_chart:?}, {:?})",
                5 * (STEADY_FROM + 1),
                locust.chart
            ));
        }
    }
    sut.down().unwrap();
    assert!(failed.is_empty(), "{failed:#?}");
}

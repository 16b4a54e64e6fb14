//! End-to-end tests of `awaitlab run` and `awaitlab report` on the back end that needs no
//! Docker: the study's effect reproduced on a reduced matrix, the HTML report checked in headless
//! Chromium, an interrupted and a killed run resumed, and bad configurations refused. Root only.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{agent_bin, chromium, tempdir::TempDir};

fn cell(dir: &Path, stem: &str) -> serde_json::Value {
    let p = dir.join("cells").join(format!("{stem}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn only_run_dir(results: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(results).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// What a run leaves on the host: its namespaces, processes, delay rules.
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    let ns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    out.extend(ns.lines().filter(|l| l.starts_with("awlrun")).map(|l| format!("namespace {l}")));
    let ps = String::from_utf8_lossy(&Command::new("pgrep").args(["-af", "awlrun"]).output().unwrap().stdout).into_owned();
    out.extend(ps.lines().filter(|l| !l.contains("pgrep")).map(|l| format!("process {l}")));
    let rules = String::from_utf8_lossy(&Command::new("iptables-save").output().unwrap().stdout).into_owned();
    out.extend(rules.lines().filter(|l| l.contains("awaitlab:")).map(|l| format!("rule {l}")));
    out
}

fn run_cmd(results: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.args(["run", "--backend", "netns", "--profile", "smoke", "--results"]).arg(results).args(extra);
    c
}

/// The reduced matrix of the issue: sync and async-unlimited, io_read, 0 and 100 ms, the smoke
/// profile. What the study found must hold, and the report must show it.
#[test]
fn a_reduced_study_reproduces_the_effect_and_writes_the_report() {
    assert!(leftovers().is_empty(), "host not clean before the test: {:?}", leftovers());
    let results = TempDir::new("awl-run");
    let out = run_cmd(results.path(), &["--setups", "sync,async-unlimited", "--routes", "io_read", "--delays", "0,100"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "awaitlab run failed: {stderr}");
    let dir = only_run_dir(results.path());
    let ok = |stem: &str| cell(&dir, stem)["load"]["total_successes"].as_u64().unwrap() as f64;
    let (sync0, sync100, async100) = (ok("sync__io_read__0ms__r1"), ok("sync__io_read__100ms__r1"), ok("async-unlimited__io_read__100ms__r1"));
    // The study's findings, with the margins the issue sets: async keeps serving at 100 ms while
    // one sync worker pays the delay on every round trip of every request.
    assert!(sync100 > 0.0, "sync served nothing at 100 ms");
    assert!(async100 >= 5.0 * sync100, "async at 100 ms {async100} < 5 x sync {sync100}");
    assert!(sync0 >= 5.0 * sync100, "sync at 0 ms {sync0} is not 5 x sync at 100 ms {sync100}");
    // The probes saw the delay on the database round trips: every one crosses the delayed link.
    let rtt = cell(&dir, "sync__io_read__100ms__r1")["probes"]["db"]["round_trip"]["p50_ms"].as_f64().unwrap();
    assert!(rtt >= 100.0, "database round-trip p50 at 100 ms added delay: {rtt} ms");
    // Each cell records what the system ran with (the current stack, SCRAM as in the study) and
    // PostgreSQL's refusals: none at 100 users with max_connections=1000 (async-unlimited).
    let c = cell(&dir, "async-unlimited__io_read__100ms__r1");
    assert_eq!(c["system"]["db_auth_rule"]["method"], "scram-sha-256", "{c}");
    assert_eq!(c["system"]["max_connections"], 1000, "{c}");
    assert_eq!(c["db_refusals"], 0, "{c}");
    let achieved = cell(&dir, "sync__io_read__100ms__r1")["delay"]["achieved_ms"].as_f64().unwrap();
    assert!((99.0..=105.0).contains(&achieved), "achieved delay {achieved} ms");

    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("**Table 2: io_read (total successes / max sRPS)**"), "{md}");
    assert!(md.contains("| added latency | Sync | Async Unlimited |"), "{md}");
    assert!(md.contains("ours beside the study's published numbers"), "{md}");
    assert!(md.contains("| 100 ms | Async Unlimited |") && md.contains("| 5313 |"), "the study's numbers are beside ours: {md}");
    assert!(md.contains("Sync io_read at 100 ms is bound by round trips"), "{md}");
    // The header lists the current stack's deviations from the study, from the records.
    assert!(md.contains("Deviations from the study's system:") && md.contains("DEBUG off (the study: on)"), "{md}");

    // The HTML report as a reader opens it: every figure there, nothing fetched.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    let r = chromium::render(&dir.join("report.html"), &shot);
    // Per cell: users, requests and failures per second, p50 and p95 (3 x 4 cells); across
    // cells: successes vs delay for the one route, and database wait share vs throughput.
    assert_eq!(r.svgs, 3 * 4 + 2, "figures in the rendered page");
    assert_eq!(r.broken_images, 0);
    assert!(r.resources.is_empty(), "the report fetched {:?}", r.resources);
    eprintln!("screenshot kept at {}", shot.display());
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn delay_rule_present() -> bool {
    // The delay rule lives in the server's namespace.
    let ns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    ns.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with("awlrun")).any(|n| {
        let out = Command::new("ip").args(["netns", "exec", n, "iptables-save"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("awaitlab:")
    })
}

/// Ctrl-C in the middle of the second cell, then `--resume`; and the same with `kill -9`.
#[test]
fn an_interrupted_or_killed_run_keeps_its_cells_clears_the_delay_and_resumes() {
    for signal in [libc::SIGINT, libc::SIGKILL] {
        let results = TempDir::new("awl-resume");
        let mut child = run_cmd(results.path(), &["--setups", "sync", "--routes", "io_read", "--delays", "0,100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let first = || std::fs::read_dir(results.path()).ok().and_then(|mut d| d.next()).map(|e| e.unwrap().path().join("cells/sync__io_read__0ms__r1.json"));
        wait_for("the first cell", Duration::from_secs(180), || first().is_some_and(|p| p.exists()));
        wait_for("the delay of the second cell", Duration::from_secs(60), delay_rule_present);
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let dir = only_run_dir(results.path());
        let done_before = std::fs::read(dir.join("cells/sync__io_read__0ms__r1.json")).unwrap();
        assert!(!dir.join("cells/sync__io_read__100ms__r1.json").exists(), "an unfinished cell was written");
        if signal == libc::SIGINT {
            assert_eq!(status.code(), Some(130));
            // The handler cleared the delay and tore the system down before exiting.
            assert!(leftovers().is_empty(), "left behind after Ctrl-C: {:?}", leftovers());
        }
        // A kill -9 leaves everything in place; the resumed run removes it first.
        let out = Command::new(agent_bin())
            .args(["run", "--backend", "netns", "--profile", "smoke", "--setups", "sync", "--routes", "io_read", "--delays", "0,100", "--resume"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(dir.join("cells/sync__io_read__0ms__r1.json")).unwrap(), done_before, "a finished cell was rerun");
        assert!(cell(&dir, "sync__io_read__100ms__r1")["load"]["requests"].as_u64().unwrap() > 0);
        assert!(dir.join("report.md").exists());
        assert!(leftovers().is_empty(), "left behind after resume: {:?}", leftovers());
    }
}

#[test]
fn bad_configurations_are_one_line_usage_errors_and_start_nothing() {
    let results = TempDir::new("awl-bad");
    let cfg = results.path().join("bad.toml");
    std::fs::write(&cfg, "setups = [\"sync\"]\nwarp_speed = true\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--config".into(), cfg.display().to_string()], "warp_speed"),
        (vec!["--setups".into(), "sync,turbo".into()], "unknown setup"),
        (vec!["--routes".into(), "io_delete".into()], "unknown route"),
        (vec!["--delays".into(), "0,-100".into()], "negative"),
        (vec!["--delays".into(), "0,90000".into()], "over the limit"),
        (vec!["--resume".into(), "/nonexistent/run".into()], "not a results directory"),
    ];
    for (args, want) in cases {
        let out = Command::new(agent_bin()).arg("run").arg("--results").arg(results.path().join("r")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!results.path().join("r").exists(), "{args:?} started a run");
    }
    assert!(leftovers().is_empty());
}

/// Regression: the database was reset before the server drained, so io_create requests still
/// queued from the last cell added rows after the reset and the next cell failed.
#[test]
fn io_create_cells_in_a_row_start_from_exactly_the_seed() {
    let results = TempDir::new("awl-create");
    let out = run_cmd(results.path(), &["--setups", "sync", "--routes", "io_create", "--delays", "0", "--repeat", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = only_run_dir(results.path());
    for rep in 1..=2 {
        let c = cell(&dir, &format!("sync__io_create__0ms__r{rep}"));
        assert!(c["load"]["total_successes"].as_u64().unwrap() > 0, "{c}");
    }
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}

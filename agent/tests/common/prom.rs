//! Fixtures for the metrics tests: a real Prometheus (Debian's package) run as a child process
//! with a generated configuration and a temporary data directory, a plain HTTP/1.0 client for
//! loopback endpoints, and the queries of the Grafana dashboards with their variables
//! substituted. Prometheus listens on 127.0.0.1 only and is killed (and its data removed) on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::tempdir::TempDir;

/// `GET path` (or another method with a body) over HTTP/1.0; returns (status, body), or what
/// went wrong (a port published by Docker accepts and resets until its container listens).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut out = Vec::new();
    s.write_all(req.as_bytes())
        .and_then(|()| s.write_all(body))
        .and_then(|()| s.read_to_end(&mut out))
        .map_err(|e| format!("{method} {addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// [`try_http`], panicking on what went wrong.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    try_http(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{e}"))
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, &[], b"")
}

/// Percent-encodes a query parameter value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A free port on 127.0.0.1 (for programs that cannot be told to use port 0 and report it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prometheus scraping the given targets every `interval`.
pub struct Prometheus {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Prometheus {
    pub fn start(targets: &[SocketAddr], interval: Duration) -> Prometheus {
        let dir = TempDir::new("awl-prom");
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let ms = interval.as_millis();
        let config = format!(
            "global:\n  scrape_interval: {ms}ms\n  evaluation_interval: {ms}ms\nscrape_configs:\n  - job_name: awaitlab\n    scrape_timeout: {ms}ms\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (cargo xtask setup installs it)");
        let p = Prometheus { addr, child, dir };
        let t0 = Instant::now();
        loop {
            if TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200 {
                return p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "prometheus did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// An instant query at `time` (Unix seconds); returns the `data.result` array.
    pub fn query(&self, expr: &str, time: f64) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}&time={time:.3}", urlencode(expr));
        let (status, body) = http_get(self.addr, &path);
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every scrape target is up.
    pub fn wait_targets_up(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            let up = self.query("up == 1", now()).unwrap_or_default().len();
            if up >= n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "only {up} of {n} targets up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn prometheus_bin() -> &'static str {
    "prometheus"
}

/// The repository's `dashboards/` folder.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Every dashboard JSON file under `dashboards/`, parsed.
pub fn dashboards() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dashboards_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&p).unwrap();
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", p.display()));
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no dashboards found");
    out
}

/// Every panel of a dashboard, including panels nested in rows.
pub fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// (dashboard, panel title, expr) for every query of every panel.
pub fn dashboard_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        file.clone(),
                        p["title"].as_str().unwrap_or("?").to_string(),
                        e.to_string(),
                    ));
                }
            }
        }
        for a in d["annotations"]["list"].as_array().into_iter().flatten() {
            if let Some(e) = a["expr"].as_str() {
                let name = a["name"].as_str().unwrap_or("?");
                out.push((file.clone(), format!("annotation {name}"), e.to_string()));
            }
        }
    }
    out
}

/// (dashboard, variable name, metric, label) for every `label_values(METRIC, LABEL)` variable.
pub fn dashboard_variables() -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for v in d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["type"] == "query")
        {
            let def = v["definition"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: variable {} has no definition", v["name"]));
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|x| x.strip_suffix(')'))
                .unwrap_or_else(|| {
                    panic!(
                        "{file}: variable {}: only label_values(METRIC, LABEL) is checked: {def}",
                        v["name"]
                    )
                });
            // The label is the last argument; the metric's selector has commas of its own.
            let (metric, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{file}: {def}"));
            out.push((
                file.clone(),
                v["name"].as_str().unwrap_or("?").to_string(),
                metric.trim().to_string(),
                label.trim().to_string(),
            ));
        }
    }
    out
}

/// Substitutes the Grafana variables the dashboards use: template variables match everything
/// (`.*`, what "All" sends), `$__rate_interval` / `$__interval` / `$__range` get the given
/// windows. Panics on a variable it does not know, so a new one is not silently left in.
pub fn substitute(expr: &str, rate_interval: &str, range: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", rate_interval)
        .replace("${__rate_interval}", rate_interval)
        .replace("$__interval", rate_interval)
        .replace("$__range", range);
    for var in ["job", "instance", "target", "setup", "route", "delay_ms"] {
        e = e
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    assert!(
        !e.contains('$'),
        "unknown Grafana variable left in {expr:?}"
    );
    e
}

/// What of the dashboards shows nothing at `at` (Unix seconds) in `p`: every query of every
/// panel and annotation must return a finite value, and every template variable at least one
/// value (what its drop-down would list). `rate_interval` and `range` stand for Grafana's
/// `$__rate_interval` and `$__range`. Returns one line per failure.
pub fn dashboards_without_data(
    p: &Prometheus,
    at: f64,
    rate_interval: &str,
    range: &str,
) -> Vec<String> {
    let mut failed = Vec::new();
    for (file, title, expr) in dashboard_queries() {
        let e = substitute(&expr, rate_interval, range);
        match p.query(&e, at) {
            Err(err) => failed.push(format!("{file} / {title}: {e}: {err}")),
            Ok(r) if r.is_empty() => failed.push(format!("{file} / {title}: {e}: no data")),
            Ok(r) => {
                let finite = r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                });
                if !finite {
                    failed.push(format!("{file} / {title}: {e}: only NaN/Inf: {r:?}"));
                }
            }
        }
    }
    for (file, name, metric, label) in dashboard_variables() {
        let metric = substitute(&metric, rate_interval, range);
        let values = p
            .query(&format!("count by ({label}) ({metric})"), at)
            .unwrap_or_default()
            .iter()
            .filter(|s| s["metric"][label.as_str()].is_string())
            .count();
        if values == 0 {
            failed.push(format!(
                "{file}: variable {name}: label_values({metric}, {label}) is empty"
            ));
        }
    }
    failed
}

/// `promtool check metrics` on an exposition; returns its complaints on failure.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}
